//! Processes and namespaces the harness starts, and how they end: by PID, on drop, on failure, and from a signal
//! handler ([`force_cleanup`]) when the run does not unwind in time.
//!
//! Every child is registered here while it runs. A PID leaves the registry only in the same critical section that
//! reaps it, so [`force_cleanup`] never signals a PID that was reaped (and could have been reused).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::netns::NetNs;

struct Registry {
    pids: Vec<u32>,
    netns: Vec<String>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { pids: Vec::new(), netns: Vec::new() });

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn signal(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process(p, sig);
    }
}

/// SIGKILL to every registered process and `ip netns del` of every registered namespace. For a signal handler
/// whose run did not clean up by itself in time; the processes stay unreaped (the caller exits right after).
pub fn force_cleanup() {
    let r = registry();
    for &pid in &r.pids {
        signal(pid, Signal::KILL);
    }
    for ns in &r.netns {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

/// A child process, registered while it runs; stopped by PID on drop (SIGTERM, then SIGKILL after the grace time).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    /// Where its stderr (and stdout, unless piped) goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin null (or piped), stdout to the log (or piped), stderr to the log.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        pipe_stdin: bool,
        pipe_stdout: bool,
    ) -> Result<Proc, String> {
        let f = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(if pipe_stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(if pipe_stdout { Stdio::piped() } else { Stdio::from(f2) });
        cmd.stderr(f);
        let mut r = registry();
        let child = cmd.spawn().map_err(|e| format!("starting {name} ({cmd:?}): {e}"))?;
        r.pids.push(child.id());
        Ok(Proc { name: name.to_string(), child: Some(child), status: None, log: log.to_path_buf() })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.as_mut().and_then(|c| c.stdin.take())
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// The exit status if it has exited (reaping it), else None.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = self.child.as_mut()?;
        let mut r = registry();
        if let Ok(Some(st)) = child.try_wait() {
            let pid = child.id();
            r.pids.retain(|&p| p != pid);
            self.status = Some(st);
            self.child = None;
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none() && self.child.is_some()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        let pid = self.pid()?;
        signal(pid, Signal::TERM);
        if let Some(st) = self.wait_timeout(grace) {
            return Some(st);
        }
        signal(pid, Signal::KILL);
        self.wait_timeout(Duration::from_secs(10))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A network namespace registered for [`force_cleanup`]; deleted (and unregistered) on drop.
pub struct Namespace(pub NetNs);

impl Namespace {
    pub fn create(tag: &str) -> Result<Namespace, String> {
        let mut r = registry();
        let ns = NetNs::create(tag)?;
        r.netns.push(ns.name.clone());
        Ok(Namespace(ns))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let mut r = registry();
        let name = self.0.name.clone();
        r.netns.retain(|n| *n != name);
        // Deleted under the lock, so force_cleanup cannot race it; NetNs's own drop then finds nothing to delete.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}
