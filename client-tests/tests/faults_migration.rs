//! The server-side faults (docs/faults.md) end to end: mig-fail and mig-corrupt make a migration by the reference
//! VMM fail cleanly while the source keeps its guest's traffic with nothing lost; dirty-miss makes the VMM lose pages
//! and the destination's `--migration-audit` names exactly those; disconnect-after drops a client after N messages
//! and the next one gets a fresh device; slow-mmio answers every BAR access late, in order.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use client_tests::control::{control_path, ControlClient};
use client_tests::refvmm::{self, abort, Config};
use client_tests::{Client, ServerProcess, BAR0, CONFIG};
use serde_json::{json, Value};

const NONE: Value = Value::Null;

struct Pair {
    src: ServerProcess,
    dst: ServerProcess,
    src_ctl: PathBuf,
    dst_ctl: PathBuf,
    wire: UdpSocket,
    cfg: Config,
}

/// Two servers with dgram backends toward one wire socket, each with a control socket; `src_extra` and `dst_extra`
/// are added to each one's flags.
fn pair(src_extra: &[&str], dst_extra: &[&str]) -> Pair {
    let wire = UdpSocket::bind("127.0.0.1:0").unwrap();
    let w = wire.local_addr().unwrap();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let start = |local: SocketAddr, ctl: &PathBuf, extra: &[&str]| {
        let spec = format!("dgram:{local},{w}");
        let ctl = ctl.to_str().unwrap().to_string();
        let mut args = vec!["--backend", spec.as_str(), "--control", ctl.as_str(), "--seed", "5"];
        args.extend_from_slice(extra);
        ServerProcess::start_with(&args)
    };
    let (src_ctl, dst_ctl) = (control_path(), control_path());
    let src = start(a, &src_ctl, src_extra);
    let dst = start(b, &dst_ctl, dst_extra);
    let mut cfg = Config::new(src.socket_path().into(), dst.socket_path().into(), w, a, b);
    cfg.memory = 16 << 20;
    cfg.frames = 400;
    cfg.rate = 2000;
    cfg.iterations = 2;
    cfg.iteration_ms = 20;
    cfg.remap = false;
    Pair { src, dst, src_ctl, dst_ctl, wire, cfg }
}

fn ctl(path: &std::path::Path) -> ControlClient {
    ControlClient::connect(path).unwrap_or_else(|e| panic!("control socket {}: {e}", path.display()))
}

/// The wire socket again, on the same address (the servers' backends send to it).
fn rebind(cfg: &Config) -> UdpSocket {
    UdpSocket::bind(cfg.wire).unwrap_or_else(|e| panic!("rebinding the wire peer {}: {e}", cfg.wire))
}

/// The reference VMM's migration fails with an error naming the step; then the VMM that recovers (abort::run)
/// shows the source running on with every frame accounted for.
fn fails_cleanly(p: Pair, expect_err: &str, failed_step: &str, state_after: &str) -> (Pair, abort::AbortReport) {
    let Pair { mut src, mut dst, src_ctl, dst_ctl, wire, cfg } = p;
    let mut events = ctl(&src_ctl);
    match refvmm::run_with_socket(&cfg, wire) {
        Ok(r) => panic!("the migration should fail; it ran:\n{}", r.timeline()),
        Err(e) => assert!(e.contains(expect_err), "the error names the step: {e}"),
    }
    src.assert_alive();
    dst.assert_alive();
    // The source reported its state changes, the failed one included when it was the source's.
    let seen = events.events_within(Duration::from_millis(300));
    let mig: Vec<(String, String)> = seen
        .iter()
        .filter(|e| e["event"] == "MIGRATION_STATE")
        .map(|e| (e["data"]["from"].as_str().unwrap().into(), e["data"]["to"].as_str().unwrap().into()))
        .collect();
    assert!(mig.contains(&("RUNNING".into(), "PRE_COPY".into())), "{mig:?}");

    let r = abort::run(&cfg, rebind(&cfg)).unwrap_or_else(|e| panic!("the recovering VMM could not run: {e}"));
    println!("{r:#?}");
    assert_eq!(r.failed_step, failed_step, "{r:?}");
    assert!(!r.error.is_empty());
    assert_eq!(r.source_state_after_failure, state_after, "{r:?}");
    assert!(r.failures.is_empty(), "the source lost something: {:?}", r.failures);
    assert!(r.rx_harvested_after_recovery > 0 && r.tx_posted_after_recovery > 0, "{r:?}");
    assert_eq!(r.rx_discards, 0, "no frame dropped: the held frames reached a running source: {r:?}");
    assert_eq!((r.rx_missing, r.tx_missing), (0, 0), "{r:?}");
    assert!(r.held_frames > 0 || r.rx_sent > 0);
    assert!(r.vf_active);
    src.assert_alive();
    dst.assert_alive();
    (Pair { src, dst, src_ctl, dst_ctl, wire: rebind(&cfg), cfg }, r)
}

#[test]
fn mig_fail_at_stop_copy_fails_cleanly_and_the_source_keeps_running() {
    let p = pair(&["--fault", "mig-fail=stop_copy"], &[]);
    let (p, r) = fails_cleanly(p, "STOP_COPY", "source STOP_COPY", "ERROR");
    // ERROR with the device still running: the recovering VMM needed no transition.
    assert_eq!(r.source_state_end, "ERROR");
    let log = p.src.log();
    assert!(log.contains("PRE_COPY -> STOP_COPY failed: fault mig-fail=stop_copy"), "{log}");
    let mut c = ctl(&p.src_ctl);
    let f = c.ok("query-faults", NONE);
    assert_eq!(f["fired"]["mig-fail"], 2, "once per run: {f}");
    // The failure into ERROR is an event: seen here with a client of our own on the freshly reset device.
    let mut vc = Client::connect(p.src.socket_path()).unwrap();
    vc.negotiate();
    let state = |s: u32| client_tests::Payload::new().u32(16).u32((1 << 17) | 2).u32(s).u32(u32::MAX).build();
    assert_eq!(vc.call(client_tests::cmd::DEVICE_FEATURE, &state(6), &[]).errno, None, "PRE_COPY");
    let r = vc.call(client_tests::cmd::DEVICE_FEATURE, &state(3), &[]);
    assert_eq!(r.errno, Some(libc::EINVAL), "STOP_COPY fails");
    c.wait_event("MIGRATION_STATE", Duration::from_secs(5), |d| d["from"] == "PRE_COPY" && d["to"] == "ERROR")
        .expect("the failure into ERROR is an event");
    assert_eq!(c.ok("query-migration", NONE)["state"], "ERROR");
    // The destination never left its idle RUNNING for good: it was reset.
    assert!(!p.dst.log().contains("device state loaded"));
}

#[test]
fn mig_corrupt_fails_the_destination_load_cleanly_and_the_source_resumes() {
    let p = pair(&["--fault", "mig-corrupt"], &[]);
    let (p, r) = fails_cleanly(p, "refused the state record", "destination state record", "STOP_COPY");
    assert_eq!(r.source_state_end, "RUNNING", "the recovering VMM set the source RUNNING");
    let dlog = p.dst.log();
    assert!(dlog.contains("checksum mismatch"), "the destination says why:\n{dlog}");
    assert!(!dlog.contains("device state loaded"), "nothing was loaded");
    let slog = p.src.log();
    assert!(slog.contains("fault mig-corrupt: flipped byte"), "{slog}");
    let mut c = ctl(&p.src_ctl);
    let f = c.ok("query-faults", NONE);
    assert!(f["fired"]["mig-corrupt"].as_u64().unwrap() >= 2, "at least one read per run: {f}");
    let m = c.ok("query-migration", NONE);
    assert!(m["bytes_read"].as_u64().unwrap() > 0, "{m}");
    // The compat record is never corrupted: the destination accepted it in both runs.
    assert!(dlog.contains("the source's identity matches this device"));
    let _ = ctl(&p.dst_ctl);
}

/// dirty-miss=1: every page the device newly dirties is left out of the log. (With a larger N whether a missed page
/// is lost depends on timing: the page may be dirtied again and reported, or be guest-dirty too. The every-Nth
/// arithmetic is checked exactly in device/tests/faults.rs.)
#[test]
fn dirty_miss_loses_pages_and_the_destination_audit_names_exactly_them() {
    let p = pair(&["--fault", "dirty-miss=1", "--migration-audit"], &["--migration-audit"]);
    let Pair { mut src, mut dst, src_ctl, dst_ctl, wire, cfg } = p;
    let r = refvmm::run_with_socket(&cfg, wire).unwrap_or_else(|e| panic!("the migration did not run: {e}"));
    println!("{}", r.timeline());
    src.assert_alive();
    dst.assert_alive();
    let v = &r.verification;
    assert!(!r.passed, "a device that leaves pages out of its dirty log loses them");
    assert!(!v.memory_equal && v.lost_pages > 0, "{v:?}");
    assert_eq!(v.lost_unexplained, v.lost_pages, "no --skip-dirty: every lost page is the device's fault");

    let f = ctl(&src_ctl).ok("query-faults", NONE);
    assert!(f["fired"]["dirty-miss"].as_u64().unwrap() >= v.lost_pages, "{f}");
    // The destination's audit: the same count in its log and in query-migration, and the same pages.
    let log = dst.log();
    let line = log
        .lines()
        .find(|l| l.contains("pages the device wrote on the source differ here"))
        .unwrap_or_else(|| panic!("the destination's audit found nothing:\n{log}"));
    let n: u64 =
        line[line.find("migration audit: ").unwrap() + 17..].split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(n, v.lost_pages, "{line}");
    let m = ctl(&dst_ctl).ok("query-migration", NONE);
    let audit = &m["audit"];
    assert_eq!(audit["mismatches"].as_u64(), Some(v.lost_pages), "{m}");
    let audited: BTreeSet<u64> =
        audit["mismatched_pages"].as_array().unwrap().iter().map(|a| a.as_u64().unwrap()).collect();
    assert_eq!(audited.len() as u64, v.lost_pages, "{m}");
    let lost: BTreeSet<u64> =
        v.lost_page_addrs.iter().map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap()).collect();
    assert!(
        !lost.is_empty() && lost.is_subset(&audited),
        "the VMM's lost pages {lost:x?} are the audit's {audited:x?}"
    );
    assert!(line.contains(&format!("{:#x}", lost.iter().next().unwrap())), "the log names them: {line}");
    assert!(m["state"] == "STOP" || m["state"] == "RUNNING", "{m}");
}

#[test]
fn disconnect_after_drops_the_client_and_the_next_one_gets_a_fresh_device() {
    let path = control_path();
    let mut srv = ServerProcess::start_with(&["--control", path.to_str().unwrap(), "--fault", "disconnect-after=6"]);
    let mut c = ctl(&path);
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate(); // 1
    vc.write32(BAR0, 0x6c00, 0x0012_3000); // 2: VF_ARQBAL1
    assert_eq!(vc.read32(BAR0, 0x6c00), 0x0012_3000); // 3
    vc.write32(CONFIG, 4, 0x0006); // 4: memory space and bus master
    assert_eq!(vc.read32(CONFIG, 4) & 0x6, 0x6); // 5
    assert_eq!(vc.read32(BAR0, 0x6c00), 0x0012_3000, "the 6th message is still answered"); // 6
    assert!(vc.closed_within(Duration::from_secs(5)), "the server closes the connection after 6 messages");
    let log = srv.log();
    assert!(log.contains("fault disconnect-after=6: dropping the client after 6 messages"), "{log}");
    let f = c.ok("query-faults", NONE);
    assert_eq!(f["fired"]["disconnect-after"], 1, "{f}");

    // The next client is served, on a freshly reset device.
    srv.assert_serves_new_client("after disconnect-after");
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    assert_eq!(vc.read32(BAR0, 0x6c00), 0, "BAR0 is back to power-on");
    assert_eq!(vc.read32(CONFIG, 4) & 0x6, 0, "the command register too");
    let st = c.ok("query-status", NONE);
    assert_eq!(st["client_connected"], true, "{st}");
    // The count is per client: this one is dropped after its own 6th message too.
    for _ in 0..3 {
        vc.read32(CONFIG, 0);
    }
    assert!(vc.closed_within(Duration::from_secs(5)));
    assert_eq!(c.ok("query-faults", NONE)["fired"]["disconnect-after"], 2);
    // Cleared at run time: the next client is never dropped.
    c.ok("clear-fault", json!({"name": "disconnect-after"}));
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    for _ in 0..20 {
        vc.read32(CONFIG, 0);
    }
    assert!(!vc.closed_within(Duration::from_millis(200)));
    srv.assert_alive();
}

#[test]
fn slow_mmio_answers_every_bar_access_late_and_in_order() {
    let path = control_path();
    let srv = ServerProcess::start_with(&["--control", path.to_str().unwrap(), "--fault", "slow-mmio=20000"]);
    let mut c = ctl(&path);
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    // Config space is not a BAR: not delayed (the fault did not fire).
    vc.read32(CONFIG, 0);
    assert_eq!(c.ok("query-faults", NONE)["fired"].get("slow-mmio"), None, "a config read is not slowed");
    // A BAR0 read: 20 ms late.
    let t = Instant::now();
    vc.read32(BAR0, 0x8800);
    assert!(t.elapsed() >= Duration::from_millis(20), "BAR0 read: {:?}", t.elapsed());
    // Five posted writes and a read behind them: each write is processed 20 ms late, in order, so the read (which
    // sees the last write) comes after six delays; a config read sent behind them waits its turn.
    let t = Instant::now();
    for i in 1..=5u32 {
        vc.posted_write(BAR0, 0x6c00, &(i << 12).to_le_bytes());
    }
    assert_eq!(vc.read32(BAR0, 0x6c00), 5 << 12, "the writes were applied in order before the read");
    assert!(t.elapsed() >= Duration::from_millis(120), "six slow accesses: {:?}", t.elapsed());
    let f = c.ok("query-faults", NONE);
    assert_eq!(f["fired"]["slow-mmio"], 7, "{f}");
    // The control socket is not slowed down meanwhile, and clearing the fault takes effect at once.
    c.ok("clear-fault", json!({"name": "slow-mmio"}));
    vc.read32(BAR0, 0x8800);
    assert_eq!(c.ok("query-faults", NONE)["fired"]["slow-mmio"], 7, "cleared: no more delays");
}
