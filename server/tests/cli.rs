//! The binary's command line and socket lifecycle: clear errors and non-zero exits for bad input, safe socket
//! replacement, clean shutdown on signals, and inherited fds.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const BIN: &str = env!("CARGO_BIN_EXE_vfu-i40evf");

/// A temporary directory removed on drop, so a failing test leaves nothing behind either.
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("vfu-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A server child, killed by PID if the test fails before it exits.
struct Server(Child);

impl Server {
    fn spawn(args: &[&str]) -> Server {
        Server(Command::new(BIN).args(args).stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
    }

    fn signal(&self, sig: Signal) {
        kill_process(Pid::from_raw(self.0.id() as i32).unwrap(), sig).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < within, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "{} never accepted", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn help_explains_every_flag() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in ["--socket", "--fd", "--mac", "--verbose", "vfio-user-pci"] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn bad_flags_fail_with_a_reason() {
    for (args, says) in [
        (vec![], "--socket"),
        (vec!["--socket", "/tmp/x.sock", "--bogus"], "--bogus"),
        (vec!["--socket", "/tmp/x.sock", "--mac", "zz:00:00:00:00:01"], "not a hex byte"),
        (vec!["--socket", "/tmp/x.sock", "--mac", "01:00:00:00:00:01"], "multicast"),
        (vec!["--socket", "/tmp/x.sock", "--mac", "00:00:00:00:00:00"], "all-zero"),
        (vec!["--socket", "/tmp/x.sock", "--mac", "02:00:00:00:01"], "six"),
        (vec!["--socket", "/tmp/x.sock", "--fd", "5"], "cannot be used with"),
        (vec!["--fd", "notanumber"], "invalid"),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(says), "{args:?}: stderr lacks {says:?}:\n{}", stderr(&o));
    }
}

#[test]
fn limit_flags_reject_bad_values_naming_the_flag() {
    for (flag, bad) in [
        ("--max-dma-regions", "0"),
        ("--max-dma-regions", "65536"),
        ("--max-dma-regions", "many"),
        ("--max-data-xfer-size", "4095"),
        ("--max-data-xfer-size", "67108865"),
        ("--max-data-xfer-size", "1M"),
        ("--max-data-xfer-size", "4294967296"),
        ("--max-arq-queued", "0"),
        ("--max-arq-queued", "65537"),
        ("--max-arq-queued", "x"),
        ("--max-pending-dma", "0"),
        ("--max-pending-dma", "65537"),
        ("--max-pending-dma", "1.5"),
        ("--idle-timeout-ms", "1s"),
        ("--idle-timeout-ms", "18446744073709551616"),
        ("--idle-timeout-ms", ""),
    ] {
        let o = run(&["--socket", "/tmp/vfu-cli-never-bound.sock", flag, bad]);
        assert!(!o.status.success(), "{flag} {bad:?} was accepted");
        assert!(stderr(&o).contains(flag), "{flag} {bad:?}: stderr does not name the flag:\n{}", stderr(&o));
    }
    // A negative number only parses as a value when attached with '=' (else it reads as a flag).
    for flag in
        ["--max-dma-regions", "--max-data-xfer-size", "--max-arq-queued", "--max-pending-dma", "--idle-timeout-ms"]
    {
        let o = run(&["--socket", "/tmp/vfu-cli-never-bound.sock", &format!("{flag}=-1")]);
        assert!(!o.status.success(), "{flag}=-1 was accepted");
        assert!(stderr(&o).contains(flag), "{flag}=-1: stderr does not name the flag:\n{}", stderr(&o));
    }
    assert!(!Path::new("/tmp/vfu-cli-never-bound.sock").exists(), "a server with a bad flag bound its socket");
}

#[test]
fn help_lists_the_limit_flags() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in
        ["--max-dma-regions", "--max-data-xfer-size", "--max-arq-queued", "--max-pending-dma", "--idle-timeout-ms"]
    {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn unusable_socket_paths_are_errors() {
    let d = tmpdir("paths");
    let file = d.join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    let o = run(&["--socket", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a socket"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me", "a regular file must never be removed");

    let o = run(&["--socket", d.join("no/such/dir/vf.sock").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("binding"), "{}", stderr(&o));

    // A live socket belongs to someone else.
    let live = d.join("live.sock");
    let _l = UnixListener::bind(&live).unwrap();
    let o = run(&["--socket", live.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another server is listening"), "{}", stderr(&o));
}

#[test]
fn stale_socket_is_replaced_and_sigterm_removes_it() {
    let d = tmpdir("stale");
    let sock = d.join("vf.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves a socket file nobody listens on
    assert!(sock.exists());
    let mut s = Server::spawn(&["--socket", sock.to_str().unwrap()]);
    wait_for_socket(&sock);
    s.signal(Signal::TERM);
    assert!(s.wait_exit(Duration::from_secs(5)).success());
    assert!(!sock.exists(), "socket left behind after SIGTERM");

    let mut s = Server::spawn(&["--socket", sock.to_str().unwrap()]);
    wait_for_socket(&sock);
    s.signal(Signal::INT);
    assert!(s.wait_exit(Duration::from_secs(5)).success());
    assert!(!sock.exists(), "socket left behind after SIGINT");
}

#[test]
fn inherited_fds() {
    let o = run(&["--fd", "1"]);
    assert!(!o.status.success() && stderr(&o).contains("stdin/stdout/stderr"), "{}", stderr(&o));
    let o = run(&["--fd", "999"]);
    assert!(!o.status.success() && stderr(&o).contains("not an open file descriptor"), "{}", stderr(&o));

    // A listening socket handed over by a supervisor: clients connect through the path it was bound to.
    let d = tmpdir("fd");
    let sock = d.join("vf.sock");
    let l = UnixListener::bind(&sock).unwrap();
    rustix::io::fcntl_setfd(l.as_fd(), rustix::io::FdFlags::empty()).unwrap(); // let the child inherit it
    let fd = rustix::fd::AsRawFd::as_raw_fd(&l).to_string();
    let mut s = Server::spawn(&["--fd", &fd]);
    drop(l);
    let mut c = UnixStream::connect(&sock).unwrap();
    // VERSION 0.0 without capabilities: the reply proves a vfio-user server is behind the inherited fd.
    use std::io::{Read, Write};
    c.write_all(&[1, 0, 1, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut hdr = [0u8; 16];
    c.read_exact(&mut hdr).unwrap();
    assert_eq!((hdr[0], hdr[2], hdr[8] & 0xf, hdr[8] & 0x20), (1, 1, 1, 0), "VERSION reply header {hdr:?}");
    s.signal(Signal::TERM);
    assert!(s.wait_exit(Duration::from_secs(5)).success());

    // A connected socket: serve it, exit when it closes.
    let (a, b) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(b.as_fd(), rustix::io::FdFlags::empty()).unwrap();
    let fd = rustix::fd::AsRawFd::as_raw_fd(&b).to_string();
    let mut s = Server::spawn(&["--fd", &fd]);
    drop(b);
    drop(a);
    assert!(s.wait_exit(Duration::from_secs(5)).success(), "server should exit when its only client leaves");

    // Not a socket at all.
    let f = std::fs::File::open("/dev/null").unwrap();
    rustix::io::fcntl_setfd(f.as_fd(), rustix::io::FdFlags::empty()).unwrap();
    let fd = rustix::fd::AsRawFd::as_raw_fd(&f).to_string();
    let mut s = Server::spawn(&["--fd", &fd]);
    assert!(!s.wait_exit(Duration::from_secs(5)).success());
    let mut err = String::new();
    s.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("not a UNIX stream socket"), "{err}");
}
