//! One `vfu-i40evf` process per test, in its own temporary directory, cleaned up by PID.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process, Pid, Signal};

use crate::Client;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The server binary: `$VFU_BIN`, else `<workspace>/target/<debug|release>/vfu-i40evf` (`VFU_PROFILE=release`).
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VFU_BIN") {
        return PathBuf::from(p);
    }
    let profile = match std::env::var("VFU_PROFILE") {
        Ok(p) if p == "release" => "release",
        _ => "debug",
    };
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join(profile).join("vfu-i40evf")
}

fn fresh_dir() -> PathBuf {
    let mut base = std::env::temp_dir();
    // Unix socket paths are limited to 108 bytes.
    if base.as_os_str().len() > 60 {
        base = PathBuf::from("/tmp");
    }
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let d =
            base.join(format!("vfu-test-{}-{}-{nanos:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        match fs::create_dir(&d) {
            Ok(()) => return d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", d.display()),
        }
    }
}

/// A running server. Dropping it sends SIGTERM to its PID, waits up to 5 s, then SIGKILL, and removes its
/// directory.
pub struct ServerProcess {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl ServerProcess {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the server with extra arguments (e.g. `["--mac", "02:..."]`) and waits (<= 10 s) until its socket
    /// accepts connections.
    pub fn start_with(extra: &[&str]) -> Self {
        let bin = server_binary();
        if !bin.exists() {
            panic!("{} not found: build the server first: cargo build -p server", bin.display());
        }
        let dir = fresh_dir();
        let socket = dir.join("vf.sock");
        let log = dir.join("server.log");
        let out = File::create(&log).expect("creating server.log");
        let err = out.try_clone().expect("dup server.log");
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut s = ServerProcess { child: Some(child), dir, socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = s.try_status() {
                panic!("server exited during start-up ({st}); log:\n{}", s.log());
            }
            if UnixStream::connect(&s.socket).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                panic!("server socket {} not accepting after 10 s; log:\n{}", s.socket.display(), s.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server already stopped").id()
    }

    /// The server's stdout + stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("waitpid"))
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Panics unless the server is still running and has not logged a panic.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_status() {
            panic!("server died ({st}); log:\n{}", self.log());
        }
        let log = self.log();
        assert!(!log.contains("panicked at"), "server logged a panic; log:\n{log}");
    }

    /// Number of open fds in the server process.
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir}: {e}")).count()
    }

    /// The server's resident set size in KiB (VmRSS in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}"))
    }

    /// Asserts that a new client is served now: it connects, negotiates VERSION and reads the device's
    /// vendor:device (0x154c8086 at offset 0 of config space), each within [`crate::client::REPLY_TIMEOUT`].
    #[track_caller]
    pub fn assert_serves_new_client(&self, what: &str) {
        let mut c =
            Client::connect(&self.socket).unwrap_or_else(|e| panic!("{what}: the next client cannot connect: {e}"));
        let mut caps = crate::QEMU_LIKE_CAPS.as_bytes().to_vec();
        caps.push(0);
        let version = crate::Payload::new().u16(0).u16(0).bytes(&caps).build();
        let r = c
            .request(crate::cmd::VERSION, &version, &[])
            .unwrap_or_else(|e| panic!("{what}: the next client gets no VERSION reply: {e}"));
        assert_eq!(r.errno, None, "{what}: the next client's VERSION failed");
        let read = crate::Payload::new().u64(0).u32(crate::CONFIG).u32(4).build();
        let r = c
            .request(crate::cmd::REGION_READ, &read, &[])
            .unwrap_or_else(|e| panic!("{what}: the next client gets no REGION_READ reply: {e}"));
        assert_eq!(r.errno, None, "{what}: the next client's config read failed");
        assert_eq!(r.payload.len(), 20, "{what}: the next client's config read reply length");
        assert_eq!(crate::le_u32(&r.payload, 16), 0x154c_8086, "{what}: the next client's config read");
    }

    /// Polls the server's fd count until it equals `want` or `timeout` passes; returns the last count.
    pub fn wait_fd_count(&self, want: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.fd_count();
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new raw connection (not negotiated).
    pub fn connect(&self) -> Client {
        Client::connect(&self.socket).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()))
    }

    /// A new connection that has negotiated with [`crate::QEMU_LIKE_CAPS`].
    pub fn connect_negotiated(&self) -> Client {
        let mut c = self.connect();
        c.negotiate();
        c
    }

    /// Sends SIGTERM and waits (<= 5 s) for the exit status. SIGKILL after that.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        let pid = Pid::from_child(&child);
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(st) = child.try_wait().expect("waitpid") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill(); // SIGKILL to this PID
                let st = child.wait().expect("waitpid");
                panic!("server ignored SIGTERM for 5 s (killed: {st}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = kill_process(Pid::from_child(&child), Signal::TERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while child.try_wait().ok().flatten().is_none() {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log.chars().skip(log.chars().count().saturating_sub(6000)).collect();
            eprintln!("---- server log tail ({}) ----\n{tail}\n---- end ----", self.log.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
