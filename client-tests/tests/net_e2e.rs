//! Real traffic through the VF with the stock iavf driver under QEMU 11.1.3 (TCG): the server's tap backend is
//! moved into a network namespace the test creates, and the host end of every exchange lives in it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use client_tests::netns::{pattern, unique_name, NetNs};
use client_tests::ServerProcess;
use sha2::{Digest, Sha256};

const HOST: &str = "10.213.0.1";
const GUEST: &str = "10.213.0.2";
const MIB64: usize = 64 << 20;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A server with a tap backend whose link is moved into a fresh namespace at 10.213.0.1/24.
struct Net {
    ns: NetNs,
    server: ServerProcess,
}

fn net(extra: &[&str]) -> Net {
    let ns = NetNs::new();
    let tap = unique_name("t");
    let spec = format!("tap:{tap}");
    let mut args = vec!["--backend", spec.as_str()];
    args.extend_from_slice(extra);
    let server = ServerProcess::start_with(&args);
    ns.adopt(&tap, &format!("{HOST}/24"));
    Net { ns, server }
}

/// Boots a guest running `qemu-configs/guest/net.sh` with `tests`; returns its console output.
fn guest(server: &ServerProcess, kernel: &str, tests: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(workspace().join("qemu-configs/run-vm.sh"));
    cmd.arg("--socket").arg(server.socket_path());
    cmd.args(["--kernel", kernel, "--mem", "512", "--timeout", "400"]);
    cmd.arg("--script").arg(workspace().join("qemu-configs/guest/net.sh"));
    cmd.args(["--append", &format!("vfu.ip={GUEST}/24 vfu.peer={HOST} vfu.tests={tests}")]);
    cmd.args(extra);
    let out = cmd.stdin(Stdio::null()).output().expect("run-vm.sh");
    let text =
        format!("{}\n--- stderr ---\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("VFU: done"), "guest did not finish:\n{text}");
    assert!(text.contains("VFU: setup ok"), "{text}");
    assert!(!text.contains("VFU: driver-error"), "iavf logged errors:\n{text}");
    text
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no '{prefix}' line:\n{out}"))
}

fn field<'a>(l: &'a str, key: &str) -> &'a str {
    l.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {l}"))
}

fn ping(kernel: &str) {
    let mut n = net(&[]);
    let out = guest(&n.server, kernel, "ping", &[]);
    let l = line(&out, "VFU: ping");
    assert!(l.contains("100 packets transmitted, 100 packets received"), "{l}\n{out}");
    n.server.assert_alive();
}

#[test]
fn guest_pings_the_host_through_a_tap_on_6_1() {
    ping("6.1");
}

#[test]
fn guest_pings_the_host_through_a_tap_on_6_12() {
    ping("6.12");
}

#[test]
fn guest_pings_the_host_through_a_tap_on_7_x() {
    ping("7.x");
}

/// 64 MiB each way over TCP with the driver's default offloads (TSO, checksum insertion), content checked.
#[test]
fn tcp_64_mib_both_ways_arrives_intact() {
    let mut n = net(&[]);
    // Guest -> host: the host receives in the namespace and hashes what arrives.
    let rx = n.ns.spawn(|| {
        let l = TcpListener::bind((HOST, 5001)).expect("bind 5001");
        let (mut s, _) = l.accept().expect("guest connects");
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    h.update(&buf[..k]);
                    total += k;
                }
                Err(e) => panic!("receiving: {e}"),
            }
        }
        (hex(&h.finalize()), total)
    });
    // Host -> guest: connect once the guest listens.
    let data = pattern(MIB64, 0x5eed);
    let want_in = hex(&Sha256::digest(&data));
    let tx = n.ns.spawn(move || {
        let t = Instant::now();
        loop {
            match TcpStream::connect((GUEST, 5002)) {
                Ok(mut s) => {
                    s.write_all(&data).expect("sending to the guest");
                    return;
                }
                Err(_) if t.elapsed() < Duration::from_secs(300) => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => panic!("guest never listened: {e}"),
            }
        }
    });
    let out = guest(&n.server, "6.12", "tcp-out,tcp-in", &[]);
    let (got_out, bytes) = rx.join().unwrap();
    tx.join().unwrap();
    let sent = field(line(&out, "VFU: tcp-out"), "sha256=");
    assert_eq!((got_out.as_str(), bytes), (sent, MIB64), "guest -> host");
    let l = line(&out, "VFU: tcp-in");
    assert_eq!((field(l, "sha256="), field(l, "bytes=")), (want_in.as_str(), "67108864"), "host -> guest");
    n.server.assert_alive();
}

/// Two vCPUs, two queue pairs: UDP from 32 source ports spreads over both RX queues by RSS, and both queue
/// vectors fire in the guest.
#[test]
fn two_queue_pairs_both_carry_traffic() {
    let mut n = net(&["--queues", "2"]);
    let sender = n.ns.spawn(|| {
        let t = Instant::now();
        let socks: Vec<UdpSocket> = (0..32).map(|_| UdpSocket::bind((HOST, 0)).unwrap()).collect();
        while t.elapsed() < Duration::from_secs(120) {
            for s in &socks {
                let _ = s.send_to(b"spread me", (GUEST, 9));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = guest(&n.server, "6.12", "ping,queues", &["--extra", "-smp 2"]);
    drop(sender); // it stops on its own; the namespace goes with `n`
    assert!(line(&out, "VFU: setup ok").contains("queues=2"), "{out}");
    let counts: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with("VFU: queue-irqs"))
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 2, "{out}");
    assert!(counts.iter().all(|&c| c > 0), "both queue vectors must fire: {counts:?}\n{out}");
    n.server.assert_alive();
}
