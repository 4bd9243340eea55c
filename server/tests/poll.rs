//! `--poll-us`: adaptive busy polling of the client socket. Requests are served as without it, signals still stop
//! the server, an idle server (no client, or a client quiet past the window) uses no CPU, and bad values are
//! refused naming the flag.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const BIN: &str = env!("CARGO_BIN_EXE_vfu-i40evf");
const CONFIG_ID: u32 = 0x154c_8086;
/// /proc/<pid>/stat counts in clock ticks of 10 ms (USER_HZ 100).
const TICKS_PER_S: u64 = 100;

struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("vfu-poll-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// A server child, killed by PID if the test fails before it exits.
struct Server(Child);

impl Server {
    fn spawn(args: &[&str]) -> Server {
        Server(Command::new(BIN).args(args).stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    }

    /// utime + stime of every thread so far, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        rest.split_whitespace().skip(11).take(2).map(|f| f.parse::<u64>().unwrap()).sum()
    }

    fn cpu_over(&self, d: Duration) -> u64 {
        let t0 = self.cpu_ticks();
        std::thread::sleep(d);
        self.cpu_ticks() - t0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(p: &Path) -> UnixStream {
    let t = Instant::now();
    loop {
        match UnixStream::connect(p) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                return s;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "{}: {e}", p.display()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn header(id: u16, cmd: u16, size: usize, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&cmd.to_le_bytes());
    b.extend_from_slice(&(size as u32).to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

/// One whole message: (id, cmd, flags, errno, payload).
fn recv(s: &mut UnixStream) -> (u16, u16, u32, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("a reply");
    let le32 = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let mut p = vec![0u8; le32(4) as usize - 16];
    s.read_exact(&mut p).unwrap();
    (u16::from_le_bytes([h[0], h[1]]), u16::from_le_bytes([h[2], h[3]]), le32(8), le32(12), p)
}

fn negotiate(s: &mut UnixStream) {
    let json = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}"#;
    let mut m = header(1, 1, 16 + 4 + json.len() + 1, 0);
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(json);
    m.push(0);
    s.write_all(&m).unwrap();
    let (id, cmd, flags, errno, _) = recv(s);
    assert_eq!((id, cmd, flags, errno), (1, 1, 1, 0), "VERSION reply");
}

fn access(id: u16, cmd: u16, region: u32, offset: u64, data: Option<u32>) -> Vec<u8> {
    let size = 32 + if data.is_some() { 4 } else { 0 };
    let mut m = header(id, cmd, size, if cmd == 10 { 1 << 4 } else { 0 });
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(&region.to_le_bytes());
    m.extend_from_slice(&4u32.to_le_bytes());
    if let Some(v) = data {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m
}

fn read32(s: &mut UnixStream, id: u16, region: u32, offset: u64) -> u32 {
    s.write_all(&access(id, 9, region, offset, None)).unwrap();
    let (rid, cmd, flags, errno, p) = recv(s);
    assert_eq!((rid, cmd, flags, errno, p.len()), (id, 9, 1, 0, 20), "REGION_READ reply");
    u32::from_le_bytes(p[16..20].try_into().unwrap())
}

#[test]
fn poll_us_serves_requests_and_signals() {
    let dir = tmpdir("serve");
    let sock = dir.0.join("s.sock");
    let mut srv = Server::spawn(&["--socket", sock.to_str().unwrap(), "--poll-us", "200"]);
    for client in 0..2 {
        let mut c = connect(&sock);
        negotiate(&mut c);
        // Many requests in a row, each answered while the server polls.
        for i in 0..5000u16 {
            assert_eq!(read32(&mut c, i.wrapping_add(2), 7, 0), CONFIG_ID, "client {client} read {i}");
        }
        // Posted writes (no reply) then a read of the same register: the last value, and nothing else came back.
        for v in 1..=500u32 {
            c.write_all(&access(0, 10, 0, 0x7c00, Some(v * 0x40))).unwrap();
        }
        assert_eq!(read32(&mut c, 7, 0, 0x7c00), 500 * 0x40);
        // Pauses longer than the window: the server sleeps in between and still answers the next request.
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(read32(&mut c, 100 + i, 7, 0), CONFIG_ID);
        }
    }
    // A signal still stops it, even right after traffic (inside a polling window).
    let mut c = connect(&sock);
    negotiate(&mut c);
    read32(&mut c, 2, 7, 0);
    kill_process(Pid::from_raw(srv.0.id() as i32).unwrap(), Signal::TERM).unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = srv.0.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "SIGTERM did not stop a polling server");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "exit after SIGTERM: {st}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn idle_server_with_poll_us_uses_no_cpu() {
    let dir = tmpdir("idle");
    let sock = dir.0.join("s.sock");
    let srv = Server::spawn(&["--socket", sock.to_str().unwrap(), "--poll-us", "1000"]);
    drop(connect(&sock)); // up
    std::thread::sleep(Duration::from_millis(100));
    // No client.
    let ticks = srv.cpu_over(Duration::from_secs(1));
    assert!(ticks * 100 < 5 * TICKS_PER_S, "no client: {ticks} ticks of CPU in 1 s (limit 5% of a core)");
    // A client that sent requests and then went quiet: polling stops once the window passes.
    let mut c = connect(&sock);
    negotiate(&mut c);
    for i in 0..200u16 {
        assert_eq!(read32(&mut c, i + 2, 7, 0), CONFIG_ID);
    }
    std::thread::sleep(Duration::from_millis(20));
    let ticks = srv.cpu_over(Duration::from_secs(1));
    assert!(ticks * 100 < 5 * TICKS_PER_S, "idle client: {ticks} ticks of CPU in 1 s (limit 5% of a core)");
    assert_eq!(read32(&mut c, 300, 7, 0), CONFIG_ID, "still serving after idling");
}

#[test]
fn bad_poll_us_values_are_refused_naming_the_flag() {
    for bad in ["--poll-us=-1", "--poll-us=100001", "--poll-us=x", "--poll-us=1.5", "--poll-us="] {
        let o = Command::new(BIN)
            .args(["--socket", "/tmp/vfu-poll-never-bound.sock", bad])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{bad} was accepted");
        assert!(err.contains("--poll-us"), "{bad}: stderr does not name the flag:\n{err}");
    }
    assert!(!Path::new("/tmp/vfu-poll-never-bound.sock").exists());
    let o = Command::new(BIN).arg("--help").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("--poll-us") && out.contains("busy polling"), "--help lacks --poll-us:\n{out}");
}
