//! Issue 4's acceptance: two VMs under QEMU 11 (TCG) ping each other: VM A has our VF (stock iavf), VM B has QEMU's
//! own virtio-net, and the server's packet backend joins them: `dgram` (UDP on loopback) or `stream` (a UNIX
//! socket). Only loopback exists on the host; 10.214.0.0/24 lives on the virtual link between the two guests.
//!
//! Both guests run `qemu-configs/guest/net.sh`: each waits for the other to answer (they boot at different speeds),
//! sends 20 counted echo requests, then lingers until the other has finished pinging it.

use std::fs::{self, File};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use client_tests::ServerProcess;

const A: &str = "10.214.0.1";
const B: &str = "10.214.0.2";
const COUNT: u32 = 20;
/// run-vm.sh's own watchdog; the test gives up a little later.
const VM_TIMEOUT: u64 = 400;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A temporary directory (short path: it holds a UNIX socket), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!("/tmp/vfu-2vm-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One booted guest: run-vm.sh exec's QEMU, so the child's PID is QEMU's. Killed (SIGKILL, by PID) on drop if
/// still running.
struct Vm {
    name: &'static str,
    child: Child,
    out: PathBuf,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Boots `net.sh` with the ping test against `peer`; `args` are extra run-vm.sh arguments.
    fn boot(name: &'static str, dir: &Path, ip: &str, peer: &str, driver: &str, args: &[&str]) -> Vm {
        let out = dir.join(format!("{name}.console"));
        let f = File::create(&out).expect("creating console file");
        let mut cmd = Command::new(workspace().join("qemu-configs/run-vm.sh"));
        cmd.args(["--kernel", "6.12", "--mem", "512", "--timeout", &VM_TIMEOUT.to_string()]);
        cmd.arg("--script").arg(workspace().join("qemu-configs/guest/net.sh"));
        cmd.args([
            "--append",
            &format!(
                "vfu.ip={ip}/24 vfu.peer={peer} vfu.driver={driver} vfu.tests=ping vfu.count={COUNT} vfu.wait=120 \
                 vfu.linger=60"
            ),
        ]);
        cmd.args(args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup console file"))
            .stderr(f)
            .spawn()
            .expect("spawning run-vm.sh");
        Vm { name, child, out, status: None }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    fn poll(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status.is_some()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.poll() {
            let _ = self.child.kill(); // SIGKILL to QEMU's PID
            let _ = self.child.wait();
        }
    }
}

/// Runs both VMs concurrently to completion; returns (A's console, B's console).
fn run_pair(server: &mut ServerProcess, a: &mut Vm, b: &mut Vm) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(VM_TIMEOUT + 30);
    while !(a.poll() & b.poll()) {
        if Instant::now() > deadline {
            panic!("VMs still running after {} s\n{}", VM_TIMEOUT + 30, report(a, b));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ca, cb) = (a.console(), b.console());
    for (vm, text) in [(&*a, &ca), (&*b, &cb)] {
        let ok = text.contains("VFU: done") && text.contains("VFU: setup ok") && !text.contains("VFU: driver-error");
        assert!(ok, "VM {} did not finish cleanly\n{}", vm.name, report(a, b));
        let want = format!("VFU: ping {COUNT} packets transmitted, {COUNT} packets received");
        assert!(text.contains(&want), "VM {}: want '{want}'\n{}", vm.name, report(a, b));
    }
    server.assert_alive();
    (ca, cb)
}

fn report(a: &Vm, b: &Vm) -> String {
    format!("=== VM A ({:?})\n{}\n=== VM B ({:?})\n{}", a.status, a.console(), b.status, b.console())
}

fn vm_a(server: &ServerProcess, dir: &Path) -> Vm {
    let sock = server.socket_path().to_str().expect("UTF-8 socket path");
    Vm::boot("A", dir, A, B, "iavf", &["--socket", sock])
}

fn vm_b(dir: &Path, netdev: &str) -> Vm {
    Vm::boot(
        "B",
        dir,
        B,
        A,
        "virtio_net",
        &["--no-device", "--", "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:14:00:02"],
    )
}

fn timing(t: Instant, ca: &str, cb: &str) {
    let grab = |c: &str, p: &str| c.lines().find(|l| l.starts_with(p)).unwrap_or("").to_string();
    eprintln!(
        "two VMs done in {:.1} s\n  A: {} | {} | {}\n  B: {} | {} | {}",
        t.elapsed().as_secs_f64(),
        grab(ca, "VFU: peer-up"),
        grab(ca, "VFU: ping"),
        grab(ca, "VFU: linger"),
        grab(cb, "VFU: peer-up"),
        grab(cb, "VFU: ping"),
        grab(cb, "VFU: linger"),
    );
}

/// Two distinct free loopback UDP ports (both held while choosing, released before use).
fn two_udp_ports() -> (u16, u16) {
    let s1 = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let s2 = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    (s1.local_addr().unwrap().port(), s2.local_addr().unwrap().port())
}

#[test]
fn vf_and_virtio_net_ping_each_other_over_dgram() {
    let t = Instant::now();
    let dir = TempDir::new("dgram");
    let (pa, pb) = two_udp_ports();
    let mut server = ServerProcess::start_with(&["--backend", &format!("dgram:127.0.0.1:{pa},127.0.0.1:{pb}")]);
    let netdev = format!(
        "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={pb},\
         remote.type=inet,remote.host=127.0.0.1,remote.port={pa}"
    );
    let mut a = vm_a(&server, &dir.0);
    let mut b = vm_b(&dir.0, &netdev);
    let (ca, cb) = run_pair(&mut server, &mut a, &mut b);
    timing(t, &ca, &cb);
}

#[test]
fn vf_and_virtio_net_ping_each_other_over_stream() {
    let t = Instant::now();
    let dir = TempDir::new("stream");
    let path = dir.0.join("net.sock");
    let path = path.to_str().expect("UTF-8 temp path");
    assert!(!path.contains(','), "QEMU option values would need ',' doubled: {path}");
    let mut server = ServerProcess::start_with(&["--backend", &format!("stream-server:unix:{path}")]);
    // QEMU is the client; reconnect-ms retries should the server's listener not be there yet (or go away).
    let netdev = format!("stream,id=n0,server=off,addr.type=unix,addr.path={path},reconnect-ms=1000");
    let mut a = vm_a(&server, &dir.0);
    let mut b = vm_b(&dir.0, &netdev);
    let (ca, cb) = run_pair(&mut server, &mut a, &mut b);
    timing(t, &ca, &cb);
}
