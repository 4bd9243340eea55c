//! Live migration end to end with the reference VMM (`client_tests::refvmm`, run in-process): two server
//! processes with dgram backends, the VMM's memfds mapped into both, the iavf driver model bringing the VF up on the
//! source, RX and TX traffic through the wire peer, pre-copy with dirty logging, stop-and-copy, and the checks the
//! VMM makes (memory byte for byte at switchover, every frame accounted for, statistics continue). The negative
//! control skips device-dirty pages and must be caught by both the VMM and the destination's `--migration-audit`.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Instant;

use client_tests::refvmm::{self, Config, Report};
use client_tests::ServerProcess;

/// Two servers whose dgram backends talk to the wire socket, and a config for the VMM.
struct Pair {
    src: ServerProcess,
    dst: ServerProcess,
    wire: UdpSocket,
    cfg: Config,
}

/// Two distinct free UDP ports on loopback (bound together, then released for the servers).
fn free_ports() -> (SocketAddr, SocketAddr) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

fn pair(audit: bool) -> Pair {
    let wire = UdpSocket::bind("127.0.0.1:0").expect("binding the wire peer");
    let w = wire.local_addr().unwrap();
    let (a, b) = free_ports();
    let start = |local: SocketAddr| {
        let backend = format!("dgram:{local},{w}");
        let mut args = vec!["--backend", backend.as_str()];
        if audit {
            args.push("--migration-audit");
        }
        ServerProcess::start_with(&args)
    };
    let src = start(a);
    let dst = start(b);
    let mut cfg = Config::new(src.socket_path().into(), dst.socket_path().into(), w, a, b);
    cfg.memory = 32 << 20;
    cfg.frames = 600;
    cfg.rate = 2000;
    cfg.iterations = 3;
    cfg.iteration_ms = 20;
    cfg.guest_dirty_rate = 2000;
    Pair { src, dst, wire, cfg }
}

fn run(p: Pair) -> (Report, ServerProcess, ServerProcess) {
    let Pair { mut src, mut dst, wire, cfg } = p;
    let t = Instant::now();
    let report = refvmm::run_with_socket(&cfg, wire).unwrap_or_else(|e| panic!("the migration did not run: {e}"));
    println!("{}(run took {:?})", report.timeline(), t.elapsed());
    src.assert_alive();
    dst.assert_alive();
    (report, src, dst)
}

/// The number of mismatching pages and the pages checked from the destination's audit line, if it logged one.
fn audit_mismatches(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().find(|l| l.contains("pages the device wrote on the source differ here"))?;
    let rest = &line[line.find("migration audit: ")? + "migration audit: ".len()..];
    let mut words = rest.split_whitespace();
    let n = words.next()?.parse().ok()?;
    let of = words.next()?;
    assert_eq!(of, "of", "audit line: {line}");
    Some((n, words.next()?.parse().ok()?))
}

#[test]
fn migration_under_rx_and_tx_traffic_loses_nothing() {
    let (r, src, dst) = run(pair(true));
    assert!(r.passed, "the reference VMM's checks failed: {:?}", r.verification.failures);
    let v = &r.verification;

    // Pre-copy really iterated under traffic, and the final pass was small.
    let pre: Vec<_> = r.iterations.iter().filter(|i| i.kind == "pre-copy").collect();
    assert_eq!(pre.len(), 3, "three pre-copy iterations");
    assert!(pre[1..].iter().all(|i| i.device_dirty > 0), "the device kept writing during pre-copy: {pre:?}");
    let last = r.iterations.last().unwrap();
    assert_eq!(last.kind, "stop-copy");
    assert!(last.copied_pages < pre[0].copied_pages / 4, "the final pass is small: {last:?}");
    for p in &r.phases {
        if p.name != "switchover" {
            assert!(p.rx_sent > 0 && p.rx_harvested > 0, "RX in phase {}: {p:?}", p.name);
            assert!(p.tx_posted > 0 && p.tx_arrived > 0, "TX in phase {}: {p:?}", p.name);
        }
    }

    // Every frame accounted for, traffic on the destination, statistics continued.
    assert!(v.memory_equal && v.lost_pages == 0);
    assert!(v.rx_sent >= 600 && v.rx_duplicates == 0 && v.rx_foreign == 0);
    assert_eq!(v.rx_missing, v.rx_discards + v.rx_kernel_drops, "missing frames are the counted ones");
    assert!(v.rx_harvested_source > 0 && v.rx_harvested_destination > 0);
    assert!(v.tx_after_switchover > 0 && v.tx_missing == 0 && v.tx_wrong_server == 0);
    assert!(v.stats_destination.rx_unicast > v.stats_source.rx_unicast);
    assert_eq!(v.stats_destination.rx_unicast, v.rx_harvested);
    assert_eq!(v.stats_destination.tx_unicast, v.tx_posted);
    assert!(v.vf_active && v.interrupts_destination > 0);
    assert!(r.switchover.downtime_ms > 0.0 && r.switchover.state_bytes > 0 && r.switchover.compat_bytes > 0);

    // The destination's audit agrees: every page the device wrote on the source arrived.
    let log = dst.log();
    assert!(audit_mismatches(&log).is_none(), "audit mismatches in the destination's log:\n{log}");
    let line = log.lines().find(|l| l.contains("migration audit: all")).unwrap_or_else(|| panic!("no audit:\n{log}"));
    assert!(line.contains("pages the device wrote on the source match"), "{line}");
    assert!(src.log().contains("pages written by the device while logging"));

    // The JSON timeline carries the same.
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["iterations"].as_array().unwrap().len(), 4);
    assert_eq!(json["phases"].as_array().unwrap().len(), 4);
    assert!(json["switchover"]["downtime_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn skipping_device_dirty_pages_is_caught_by_the_vmm_and_the_audit() {
    let mut p = pair(true);
    p.cfg.skip_dirty = true;
    let (r, _src, dst) = run(p);
    let v = &r.verification;
    assert!(!r.passed, "a VMM that skips device-dirty pages must fail");
    assert!(!v.memory_equal && v.lost_pages > 0, "lost pages are found: {v:?}");
    assert_eq!(v.lost_unexplained, 0, "every lost page is a device-dirty page that was skipped");
    assert!(r.iterations.iter().any(|i| i.skipped_device > 0));
    assert!(v.failures.iter().any(|f| f.contains("lost pages")), "{:?}", v.failures);
    let log = dst.log();
    let (n, m) = audit_mismatches(&log).unwrap_or_else(|| panic!("the destination's audit found nothing:\n{log}"));
    assert!(n > 0 && n <= m, "audit: {n} of {m}");
    assert_eq!(n, v.lost_pages, "the audit and the VMM's own comparison find the same pages");
}

#[test]
fn migration_without_traffic() {
    let mut p = pair(false);
    p.cfg.frames = 0;
    p.cfg.memory = 16 << 20;
    let (r, _src, _dst) = run(p);
    assert!(r.passed, "{:?}", r.verification.failures);
    let v = &r.verification;
    assert!(v.memory_equal);
    assert_eq!((v.rx_sent, v.tx_posted, v.rx_discards), (0, 0, 0));
    assert_eq!(v.stats_destination, v.stats_source, "nothing moved, nothing counted");
    assert_eq!(r.switchover.held_frames, 0);
    assert!(r.phases.iter().all(|p| p.rx_sent == 0 && p.tx_posted == 0));
}

#[test]
fn the_cli_prints_the_timeline_and_writes_json() {
    let Pair { mut src, mut dst, wire, cfg: c } = pair(false);
    // The binary binds the wire address itself: release the test's socket (the servers only send to it).
    drop(wire);
    let json = src.dir().join("timeline.json");
    let out = Command::new(env!("CARGO_BIN_EXE_vfu-refvmm"))
        .arg("--source")
        .arg(&c.source)
        .arg("--destination")
        .arg(&c.destination)
        .args(["--wire", &c.wire.to_string()])
        .args(["--source-backend", &c.source_backend.to_string()])
        .args(["--destination-backend", &c.destination_backend.to_string()])
        .args(["--memory", "16M", "--frames", "200", "--rate", "2000", "--iterations", "2"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running vfu-refvmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "vfu-refvmm failed: {:?}", out.status);
    assert!(stdout.contains("downtime") && stdout.contains("PASS"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("the JSON file")).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["config"]["memory"], 16 << 20);
    assert_eq!(v["iterations"].as_array().unwrap().len(), 3);
    src.assert_alive();
    dst.assert_alive();
}
