//! The processes the benchmark starts (the server, the ping-pong peer) and its private temporary directory.
//! Everything is torn down on drop: processes are stopped by their own PID, the directory is removed.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process, Pid, Signal};

/// How long a child gets to come up (socket connectable) or to exit after SIGTERM.
const STARTUP: Duration = Duration::from_secs(5);
const SHUTDOWN: Duration = Duration::from_secs(2);

/// A private directory under $TMPDIR, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> io::Result<TempDir> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("vfu-bench-{}-{nanos:08x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("vfu-bench: removing {}: {e}", self.0.display());
        }
    }
}

/// A child process we own: SIGTERM on drop (SIGKILL if it lingers), then reaped.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: Option<PathBuf>) -> Result<Proc, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if let Some(l) = &log {
            let f = fs::File::create(l).map_err(|e| format!("creating {}: {e}", l.display()))?;
            cmd.stderr(f);
        }
        let child = cmd.spawn().map_err(|e| format!("starting the {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The PID as the ID of the process's main thread, for `sched_setaffinity`.
    pub fn main_thread(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// `None` while the process runs, else how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(st)) => Some(format!("{} (pid {}) exited: {st}", self.name, self.pid())),
            Err(e) => Some(format!("{} (pid {}): wait failed: {e}", self.name, self.pid())),
        }
    }

    /// What to tell the user when something went wrong: is the process alive, and the end of its log.
    pub fn diagnose(&mut self) -> String {
        // A process that just closed its socket may not have finished exiting yet.
        let deadline = Instant::now() + Duration::from_millis(200);
        while self.exited().is_none() && Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
        let mut s = self.exited().unwrap_or_else(|| format!("{} (pid {}) is still running", self.name, self.pid()));
        if let Some(text) = self.log.as_ref().and_then(|l| fs::read_to_string(l).ok()).filter(|t| !t.trim().is_empty())
        {
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("; last lines of its log:\n{}", lines[lines.len().saturating_sub(10)..].join("\n")));
        }
        s
    }

    /// Connects to the UNIX socket the process is about to create.
    pub fn connect(&mut self, path: &Path) -> Result<UnixStream, String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if self.exited().is_some() {
                        return Err(format!("{} before accepting connections", self.diagnose()));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("cannot connect to {}: {e}", path.display()));
                    }
                    sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Accepts the connection this process makes to `listener`.
    pub fn accept(&mut self, listener: &UnixListener) -> Result<UnixStream, String> {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + STARTUP;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(why) = self.exited() {
                        return Err(format!("{why} before connecting"));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("the {} did not connect within {STARTUP:?}", self.name));
                    }
                    sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    }

    /// CPU time and context switches of the process's main thread so far.
    pub fn sched(&self) -> Result<Sched, String> {
        Sched::of(&self.pid().to_string())
    }

    /// VmRSS and VmHWM from /proc/<pid>/status, in KiB.
    pub fn rss_kib(&self) -> Result<(u64, u64), String> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .ok_or_else(|| format!("{path}: no {key} line"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// Memory of process `pid` beyond VmRSS, in KiB: (Pss from /proc/<pid>/smaps_rollup: its share of pages mapped by
/// several processes, such as the executable's text when many servers run; RssAnon from /proc/<pid>/status: its
/// own heap and stacks).
pub fn pss_anon_kib(pid: u32) -> Result<(u64, u64), String> {
    let field = |path: &str, key: &str| -> Result<u64, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no {key} line"))
    };
    Ok((field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")?, field(&format!("/proc/{pid}/status"), "RssAnon:")?))
}

/// A thread's on-CPU time (ns, from schedstat) and its voluntary (blocked) and involuntary (preempted) context
/// switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sched {
    pub cpu_ns: u64,
    pub vcsw: u64,
    pub ivcsw: u64,
}

impl Sched {
    /// `who` is a PID or `self`; the numbers are its main thread's.
    pub fn of(who: &str) -> Result<Sched, String> {
        let read = |f: &str| {
            let path = format!("/proc/{who}/{f}");
            fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))
        };
        let schedstat = read("schedstat")?;
        let cpu_ns = schedstat.split_whitespace().next().and_then(|v| v.parse().ok());
        let status = read("status")?;
        let count =
            |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok());
        match (cpu_ns, count("voluntary_ctxt_switches:"), count("nonvoluntary_ctxt_switches:")) {
            (Some(cpu_ns), Some(vcsw), Some(ivcsw)) => Ok(Sched { cpu_ns, vcsw, ivcsw }),
            _ => Err(format!("/proc/{who}: unexpected schedstat/status format")),
        }
    }

    pub fn since(&self, earlier: &Sched) -> Sched {
        Sched {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            vcsw: self.vcsw.saturating_sub(earlier.vcsw),
            ivcsw: self.ivcsw.saturating_sub(earlier.ivcsw),
        }
    }

    pub fn add(&mut self, other: &Sched) {
        self.cpu_ns += other.cpu_ns;
        self.vcsw += other.vcsw;
        self.ivcsw += other.ivcsw;
    }
}

/// The CPU a process's main thread last ran on (`who`: a PID or `self`), field 39 of /proc/<who>/stat.
pub fn last_cpu(who: &str) -> Result<u32, String> {
    let path = format!("/proc/{who}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces; field 3 (state) comes first.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(39 - 3))
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("{path}: unexpected format"))
}

/// CPU time of the whole machine so far, in clock ticks (first line of /proc/stat): (busy, busy + idle, number of
/// CPUs). Busy is user, nice, system, irq and softirq; steal (the host running something else) counts as neither.
pub fn machine_ticks() -> Result<(u64, u64, u64), String> {
    let stat = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let ncpus = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count() as u64;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    if v.len() < 7 {
        return Err("/proc/stat: unexpected format".into());
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    Ok((busy, busy + v[3] + v[4], ncpus.max(1)))
}

/// User + system time of a whole process (all its threads) so far, in clock ticks (`who`: a PID or `self`),
/// fields 14 and 15 of /proc/<who>/stat.
pub fn process_ticks(who: &str) -> Result<u64, String> {
    let path = format!("/proc/{who}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().skip(14 - 3).take(2).filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    match f[..] {
        [utime, stime] => Ok(utime + stime),
        _ => Err(format!("{path}: unexpected format")),
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let deadline = Instant::now() + SHUTDOWN;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            sleep(Duration::from_millis(5));
        }
        eprintln!("vfu-bench: the {} (pid {}) ignored SIGTERM: killing it", self.name, self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
