//! The remap IRQ end to end (docs/remap-irq.md) against the server binary: the reference VMM's client side
//! (`client_tests::refvmm::remap`) and raw requests. Each test checks the server's own count of trapped doorbell
//! writes where it matters (`doorbell writes trapped: N`, logged when a client leaves).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use client_tests::refvmm::mem::GuestRam;
use client_tests::refvmm::proto::{self, state};
use client_tests::refvmm::remap::{self, AckPolicy, ClientConn, Mappings, SharedConn};
use client_tests::refvmm::traffic::{self, TrafficConfig};
use client_tests::refvmm::vcpu::{self, Cmd, Vcpu, VmmBus};
use client_tests::refvmm::wire::Wire;
use client_tests::refvmm::{self, Config, Report, Shared, C_DB_MAPPED, C_DB_TRAPPED};
use client_tests::util::{eventfd, eventfd_take, eventfd_wait};
use client_tests::*;
use device::nic::regs::{QRX_TAIL1, QTX_TAIL1, VFGEN_RSTAT, VF_ARQT1, VF_ATQBAL1};

const WAIT: Duration = Duration::from_secs(2);
const PAGES: [(u64, u64); 3] = [(0, 0x1000), (0x2000, 0x1000), (0x7000, 0x1000)];

/// The counts of the `doorbell writes trapped: N` lines of the first `n` sessions, waiting (<= 5 s) for them. The
/// first line of all is `ServerProcess::start`'s readiness probe (a connection that only connects): skipped.
fn trapped_counts(s: &ServerProcess, n: usize) -> Vec<u64> {
    let n = n + 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.log();
        let v: Vec<u64> = log
            .lines()
            .filter_map(|l| l.split("doorbell writes trapped: ").nth(1))
            .map(|c| c.trim().parse().expect("a count"))
            .collect();
        if v.len() >= n {
            assert!(log.contains(" posted, ") && log.contains(" with a reply"), "and its count of write messages");
            return v[1..n].to_vec();
        }
        assert!(Instant::now() < deadline, "no {n} 'doorbell writes trapped' lines:\n{log}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A server with a dgram backend whose REMOTE is the returned wire socket.
fn net_server(extra: &[&str]) -> (ServerProcess, UdpSocket, SocketAddr) {
    let wire = UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let spec = format!("dgram:{backend},{}", wire.local_addr().unwrap());
    let mut args = vec!["--backend", spec.as_str()];
    args.extend_from_slice(extra);
    (ServerProcess::start_with(&args), wire, backend)
}

/// Connects, discovers the remap IRQ and enables it; returns the client, the IRQ's index and its eventfd.
fn enabled(s: &ServerProcess) -> (Client, u32, std::os::fd::OwnedFd) {
    let mut c = s.connect_negotiated();
    let info = remap::discover(&mut c).unwrap().expect("the default server has a remap IRQ");
    assert_eq!((info.index, info.regions, info.count), (5, 0x1, 1));
    let efd = eventfd();
    remap::enable(&mut c, info.index, efd.as_fd()).unwrap();
    (c, info.index, efd)
}

fn set(c: &mut Client, s: u32) {
    proto::set_state(c, s).unwrap_or_else(|e| panic!("{e}"));
}

/// The client's procedure for signal `v` (re-query, munmap, mmap, acknowledge), over `c`.
fn handle(c: &mut Client, index: u32, maps: &Mappings, v: u64) -> remap::Outcome {
    let stop = AtomicBool::new(false);
    remap::handle_signal(v, &mut ClientConn { conn: c, index }, maps, AckPolicy::Prompt, &stop).unwrap()
}

// ---- (a) ---------------------------------------------------------------------------------------------------

#[test]
fn the_fast_path_carries_tx_and_rx_with_no_trapped_doorbell() {
    let (s, wire, backend) = net_server(&[]);
    let mut cfg = TrafficConfig::new(s.socket_path().into(), backend);
    cfg.duration = Duration::from_millis(300);
    let r = traffic::run(&cfg, wire.try_clone().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    println!("fast path: {r:?}");
    assert!(r.remap.enabled, "{:?}", r.remap);
    assert_eq!(r.bar0_areas_start, PAGES.to_vec(), "REGION_INFO lists the three doorbell pages");
    assert!(r.tx_posted_total > 100 && r.tx_completed_total == r.tx_posted_total, "TX completes: {r:?}");
    assert_eq!(r.tx_arrived_total + r.tx_kernel_drops, r.tx_posted_total, "every TX frame reached the wire");
    assert!(r.rx_harvested_total > 100 && r.rx_foreign == 0, "RX frames land: {r:?}");
    assert!(r.doorbells_mapped > 100, "doorbells went through the mapping: {r:?}");
    assert_eq!(r.doorbells_trapped, 0, "no doorbell was a message");
    assert_eq!(trapped_counts(&s, 1), vec![0], "the server saw no trapped doorbell write");

    // The control, same server: without the remap IRQ every doorbell is a message, and the server counts each.
    cfg.remap = false;
    let r = traffic::run(&cfg, wire).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.remap.enabled && r.bar0_areas_start.is_empty() && r.doorbells_mapped == 0);
    assert!(r.tx_completed_total > 100 && r.rx_harvested_total > 100, "{r:?}");
    assert_eq!(trapped_counts(&s, 2)[1], r.doorbells_trapped, "the server counts what the client trapped");
    assert!(r.doorbells_trapped > 100);
}

/// A guest that keeps its TX rings full through the mapping (a doorbell per frame, busy polling): the device must
/// never take a tail that came round a whole ring to the value it last looked at for "unchanged".
#[test]
fn the_fast_path_keeps_up_with_a_guest_that_fills_its_rings() {
    let (s, wire, backend) = net_server(&[]);
    let mut cfg = TrafficConfig::new(s.socket_path().into(), backend);
    (cfg.rx, cfg.tx_rate, cfg.tx_batch, cfg.poll_sleep) = (false, 0, 1, Duration::from_micros(200));
    let r = traffic::run(&cfg, wire).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.remap.enabled && r.doorbells_trapped == 0, "{r:?}");
    assert!(r.tx_posted_total > 2000, "several rings' worth: {r:?}");
    assert_eq!(r.tx_completed_total, r.tx_posted_total, "every frame posted through the mapping completed");
}

// ---- (b) ---------------------------------------------------------------------------------------------------

#[test]
fn migration_states_revoke_and_return_the_fast_path() {
    let s = ServerProcess::start();
    let (mut c, index, efd) = enabled(&s);
    let maps = Mappings::default();
    let handle = |c: &mut Client, v: u64| {
        assert_eq!(v, 1, "exactly bitmap 0x1, never a sum");
        handle(c, index, &maps, v)
    };

    // Enabling offers the pages.
    let o = handle(&mut c, eventfd_wait(&efd, WAIT));
    assert_eq!((o.kind, o.acked, o.regions[0].areas.clone()), ("offer", true, PAGES.to_vec()));
    let tail = QTX_TAIL1 + 4;
    assert!(maps.store32(BAR0, tail, 5));
    assert_eq!(c.read32(BAR0, tail), 5, "a store through the mapping is the register");

    // RUNNING -> PRE_COPY: revoked; REGION_INFO lists nothing, no fd; the client unmaps and acknowledges.
    set(&mut c, state::PRE_COPY);
    let v = eventfd_take(&efd);
    let r = c.region_info(BAR0, 256).ok("REGION_INFO");
    assert_eq!(r.u32_at(4) & (REGION_FLAG_MMAP | REGION_FLAG_CAPS), 0, "no MMAP, no caps");
    assert!(r.fds.is_empty() && r.payload.len() == 32);
    let o = handle(&mut c, v);
    assert_eq!((o.kind, o.acked, o.regions[0].unmapped), ("revoke", true, 3));
    assert!(maps.areas(BAR0).is_empty() && !maps.store32(BAR0, tail, 6));
    // After the ack, tail writes are messages (the server counts these three).
    for off in [QTX_TAIL1, QRX_TAIL1, VF_ARQT1] {
        c.write32(BAR0, off, 1);
    }
    assert_eq!(eventfd_take(&efd), 0, "nothing more to signal");

    // PRE_COPY -> RUNNING (cancel): offered again.
    set(&mut c, state::RUNNING);
    let o = handle(&mut c, eventfd_take(&efd));
    assert_eq!((o.kind, o.regions[0].areas.clone()), ("offer", PAGES.to_vec()));
    assert!(maps.store32(BAR0, tail, 7));

    // RUNNING -> STOP keeps it; STOP -> STOP_COPY revokes.
    set(&mut c, state::STOP);
    assert_eq!(eventfd_take(&efd), 0, "STOP from RUNNING keeps the fast path");
    assert_eq!(remap::region_info(&mut c, BAR0).unwrap().areas, PAGES.to_vec());
    set(&mut c, state::STOP_COPY);
    let o = handle(&mut c, eventfd_take(&efd));
    assert_eq!((o.kind, o.regions[0].unmapped), ("revoke", 3));
    c.write32(BAR0, QTX_TAIL1 + 8, 2); // trapped: the fourth
    set(&mut c, state::STOP);
    set(&mut c, state::RUNNING);
    let o = handle(&mut c, eventfd_wait(&efd, WAIT));
    assert_eq!((o.kind, o.regions[0].areas.clone()), ("offer", PAGES.to_vec()));
    assert_eq!(c.read32(BAR0, tail), 7, "the registers lived through it");
    assert!(maps.store32(BAR0, QTX_TAIL1, 9)); // not counted: a store

    drop(c);
    assert_eq!(trapped_counts(&s, 1), vec![4], "exactly the tail writes made while revoked");
}

// ---- (c) ---------------------------------------------------------------------------------------------------

#[test]
fn stores_into_the_stale_mapping_before_the_ack_are_all_processed() {
    let (s, wire_sock, backend) = net_server(&[]);
    let shared = Arc::new(Shared::new());
    let mut c = s.connect_negotiated();
    let ram = Arc::new(GuestRam::new(16 << 20));
    proto::dma_map_fd(&mut c, 0, ram.size(), ram.as_fd()).unwrap();
    let info = remap::discover(&mut c).unwrap().unwrap();
    let efd = eventfd();
    remap::enable(&mut c, info.index, efd.as_fd()).unwrap();
    let conn = Arc::new(Mutex::new(c));
    let maps = Arc::new(Mappings::default());
    let mut dev = SharedConn { conn: conn.clone(), index: info.index };
    let stop = AtomicBool::new(false);
    let o = remap::handle_signal(eventfd_wait(&efd, WAIT), &mut dev, &maps, AckPolicy::Prompt, &stop).unwrap();
    assert_eq!(o.regions[0].areas, PAGES.to_vec());

    let bus = VmmBus { conn: conn.clone(), ram: ram.clone(), fast: Some(maps.clone()), shared: shared.clone() };
    let (driver, mac) = vcpu::bring_up(bus).unwrap();
    assert_eq!(shared.total(C_DB_TRAPPED), 0, "bring-up stored its doorbells");
    let wire_port = wire_sock.local_addr().unwrap().port();
    let wire = Wire::new(wire_sock, mac, 2000, backend, shared.clone());
    let (cmds, cmd_rx) = mpsc::channel();
    let v = Vcpu::new(driver, mac, shared.clone(), 2000, 0);
    let vcpu = std::thread::spawn(move || v.run(cmd_rx));
    let peer = wire.spawn().unwrap();

    // Migration starts: the signal is read, the ack withheld. The guest runs traffic meanwhile, first TX alone (so
    // only the device's look at the pages can find the tails: no frame or message wakes it), then RX as well, more
    // frames than the rings had buffers (so recycled buffers, given back by stale stores, were used).
    proto::set_state(&mut conn.lock().unwrap(), state::PRE_COPY).unwrap();
    let signal = eventfd_take(&efd);
    assert_eq!(signal, 1);
    let mapped_before = shared.total(C_DB_MAPPED);
    // TX frames the kernel dropped at the wire socket (a loaded machine) were transmitted all the same.
    let drops = || client_tests::refvmm::wire::udp_drops(wire_port).unwrap_or(0);
    let drops_before = drops();
    let settled = || {
        use client_tests::refvmm::{C_RX_HARVESTED, C_TX_ARRIVED, C_TX_DONE, C_TX_SENT};
        let arrived = shared.total(C_TX_ARRIVED) + drops() - drops_before;
        let tx = shared.total(C_TX_DONE) == shared.total(C_TX_SENT) && arrived == shared.total(C_TX_SENT);
        tx && shared.total(C_RX_HARVESTED) == wire.sent()
    };
    let run = |until: &dyn Fn() -> bool, what: &str| {
        shared.traffic.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while !until() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: the traffic stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.traffic.store(false, Ordering::SeqCst);
        let t = Instant::now();
        while !settled() {
            assert!(t.elapsed() < Duration::from_secs(5), "{what}: not every doorbell was acted on");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    use client_tests::refvmm::C_TX_SENT;
    wire.set_rate(0);
    run(&|| shared.total(C_TX_SENT) >= 300, "TX alone, stale mapping");
    wire.set_rate(2000);
    run(&|| wire.sent() >= 2 * 256 + 100, "TX and RX, stale mapping");
    assert_eq!(shared.total(C_DB_TRAPPED), 0, "every doorbell before the ack went into the stale mapping");
    let stale = shared.total(C_DB_MAPPED) - mapped_before;
    assert!(stale > 20, "{stale} stale stores");

    // The acknowledgement: from now on doorbells are messages, and the server counts exactly those.
    let o = remap::handle_signal(signal, &mut dev, &maps, AckPolicy::Prompt, &stop).unwrap();
    assert_eq!((o.kind, o.acked), ("revoke", true));
    let sent = wire.sent();
    run(&|| wire.sent() >= sent + 50, "after the ack");
    cmds.send(Cmd::Finish).unwrap();
    let vr = vcpu.join().unwrap();
    let wr = peer.finish().unwrap();
    let trapped = shared.total(C_DB_TRAPPED);
    assert!(trapped > 10, "after the ack doorbells are trapped");
    assert_eq!(vr.tx_completed, u64::from(vr.tx_posted));
    let arrived = wr.arrivals.len() as u64 + drops() - drops_before;
    assert_eq!(arrived, u64::from(vr.tx_posted), "every TX frame was transmitted once");
    assert_eq!((vr.rx.len() as u64, vr.rx_foreign), (wr.sent, 0), "every RX frame landed in a buffer");
    drop(vr);
    drop(dev);
    drop(conn);
    assert_eq!(trapped_counts(&s, 1), vec![trapped]);
}

// ---- (d) ---------------------------------------------------------------------------------------------------

fn migrate(ack: AckPolicy) -> (Report, ServerProcess, ServerProcess) {
    migrate_with(ack, true, &[])
}

fn migrate_with(ack: AckPolicy, remap_on: bool, extra: &[&str]) -> (Report, ServerProcess, ServerProcess) {
    let wire = UdpSocket::bind("127.0.0.1:0").unwrap();
    let w = wire.local_addr().unwrap();
    let a = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let start = |local: SocketAddr| {
        let spec = format!("dgram:{local},{w}");
        let mut args = vec!["--backend", spec.as_str(), "--migration-audit"];
        args.extend_from_slice(extra);
        ServerProcess::start_with(&args)
    };
    let (src, dst) = (start(a), start(b));
    let mut cfg = Config::new(src.socket_path().into(), dst.socket_path().into(), w, a, b);
    cfg.memory = 16 << 20;
    cfg.frames = 400;
    cfg.iterations = 3;
    cfg.iteration_ms = 20;
    cfg.remap_ack = ack;
    cfg.remap = remap_on;
    let r = refvmm::run_with_socket(&cfg, wire).unwrap_or_else(|e| panic!("the migration did not run: {e}"));
    println!("{}", r.timeline());
    assert!(r.passed, "{ack}: {:?}", r.verification.failures);
    let log = dst.log();
    assert!(log.contains("migration audit: all"), "{ack}: the destination's audit:\n{log}");
    assert!(!log.contains("pages the device wrote on the source differ"), "{ack}");
    (r, src, dst)
}

#[test]
fn a_late_acknowledgement_still_migrates() {
    let (r, _src, _dst) = migrate(AckPolicy::Delay(150));
    let revoke = r.remap.signals.iter().find(|s| s.side == "source" && s.outcome.kind == "revoke").expect("revoked");
    assert_eq!(revoke.phase, "pre-copy", "PRE_COPY revokes: {revoke:?}");
    let acked = revoke.acked_ms.expect("acknowledged, late");
    assert!(acked - revoke.at_ms >= 150.0, "{revoke:?}");
    let pre = &r.phases[1];
    assert!(pre.doorbells_mapped > 0, "the guest stored into the stale mapping during pre-copy: {pre:?}");
}

#[test]
fn a_client_that_never_acknowledges_still_migrates() {
    let (r, src, dst) = migrate(AckPolicy::Never);
    let revokes: Vec<_> = r.remap.signals.iter().filter(|s| s.outcome.kind == "revoke").collect();
    assert_eq!(revokes.len(), 2, "source PRE_COPY and destination RESUMING: {:?}", r.remap.signals);
    assert!(revokes.iter().all(|s| s.acked_ms.is_none()));
    for p in &r.phases {
        assert_eq!(p.doorbells_trapped, 0, "the stale mapping carried every doorbell: {p:?}");
    }
    drop(r);
    assert_eq!(trapped_counts(&src, 1), vec![0]);
    assert_eq!(trapped_counts(&dst, 1), vec![0]);
}

/// The seed's software dirty tracking end to end: the servers report the pages derived from the descriptors made
/// available (`--dirty-log descriptors`) instead of their exact log; the destination's memory still matches the
/// source's and the audit finds every page the device really wrote inside the reported set. With the fast path (tails
/// found by the poller) and without it (every tail trapped).
#[test]
fn a_migration_with_the_descriptor_dirty_log_is_complete() {
    for remap_on in [true, false] {
        let (r, src, _dst) = migrate_with(AckPolicy::Prompt, remap_on, &["--dirty-log", "descriptors"]);
        assert!(r.phases.iter().any(|p| p.tx_arrived > 0 && p.rx_harvested > 0), "traffic ran: {:?}", r.phases);
        let log = src.log();
        assert!(log.contains("(--dirty-log descriptors)"), "the source used the derived log:\n{log}");
    }
}

#[test]
fn the_cli_switches_the_remap_irq_and_its_ack_policy() {
    let wire = UdpSocket::bind("127.0.0.1:0").unwrap();
    let w = wire.local_addr().unwrap();
    drop(wire); // the binary binds it
    let a = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let start = |local: SocketAddr| ServerProcess::start_with(&["--backend", &format!("dgram:{local},{w}")]);
    let (src, dst) = (start(a), start(b));
    let cli = |extra: &[&str], json: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vfu-refvmm"))
            .arg("--source")
            .arg(src.socket_path())
            .arg("--destination")
            .arg(dst.socket_path())
            .args(["--wire", &w.to_string(), "--source-backend", &a.to_string()])
            .args(["--destination-backend", &b.to_string(), "--memory", "16M", "--frames", "200"])
            .args(["--iterations", "2", "--json"])
            .arg(json)
            .args(extra)
            .output()
            .expect("running vfu-refvmm")
    };
    let json = src.dir().join("t.json");
    let out = cli(&["--remap", "off"], &json);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("remap IRQ (--remap off, --remap-ack prompt): source --remap off"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (v["config"]["remap"].as_bool(), v["remap"]["signals"].as_array().map(Vec::len)),
        (Some(false), Some(0))
    );
    assert!(v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["doorbells_mapped"] == 0 && p["doorbells_trapped"].as_u64() > Some(0)));

    let out = cli(&["--remap-ack", "delay:5"], &json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!((v["config"]["remap"].as_bool(), v["config"]["remap_ack"].as_str()), (Some(true), Some("delay:5")));
    let signals = v["remap"]["signals"].as_array().unwrap();
    assert!(
        signals.iter().any(|s| s["kind"] == "revoke" && s["acked_ms"].as_f64() > s["at_ms"].as_f64()),
        "{signals:?}"
    );
    assert!(v["phases"][0]["doorbells_mapped"].as_u64() > Some(0));

    let out = cli(&["--remap-ack", "later"], &json);
    assert_eq!(out.status.code(), Some(2), "a bad policy is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not prompt, delay:MS or never"));
}

// ---- (e) ---------------------------------------------------------------------------------------------------

#[test]
fn a_client_that_never_enables_the_irq_gets_no_areas_and_traffic_is_trapped() {
    let (s, wire, backend) = net_server(&[]);
    let mut c = s.connect_negotiated();
    let check = |c: &mut Client, when: &str| {
        let r = c.region_info(BAR0, 1024).ok("REGION_INFO");
        assert_eq!(r.u32_at(4), REGION_FLAG_READ | REGION_FLAG_WRITE, "{when}: no MMAP, no caps");
        assert_eq!((r.payload.len(), r.u32_at(0), r.fds.len()), (32, 32, 0), "{when}: the bare 32 bytes");
    };
    check(&mut c, "at start");
    for (st, when) in [
        (state::PRE_COPY, "PRE_COPY"),
        (state::RUNNING, "back in RUNNING"),
        (state::STOP, "STOP"),
        (state::STOP_COPY, "STOP_COPY"),
        (state::STOP, "STOP after STOP_COPY"),
        (state::RUNNING, "RUNNING again"),
    ] {
        set(&mut c, st);
        check(&mut c, when);
    }
    set(&mut c, state::PRE_COPY);
    c.reset().ok("DEVICE_RESET");
    check(&mut c, "after DEVICE_RESET");
    drop(c);

    let mut cfg = TrafficConfig::new(s.socket_path().into(), backend);
    cfg.remap = false;
    let r = traffic::run(&cfg, wire).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.bar0_areas_start.is_empty() && r.bar0_areas_end.is_empty() && r.signals.is_empty());
    assert!(r.tx_completed_total > 100 && r.tx_arrived_total + r.tx_kernel_drops == r.tx_posted_total, "{r:?}");
    assert!(r.rx_harvested_total > 100, "{r:?}");
    assert_eq!(r.doorbells_mapped, 0);
    assert_eq!(trapped_counts(&s, 2)[1], r.doorbells_trapped);
    assert!(r.doorbells_trapped > 100);
}

// ---- (f) ---------------------------------------------------------------------------------------------------

#[test]
fn a_reset_between_the_revocation_and_the_ack_keeps_the_irq_and_resignals() {
    let s = ServerProcess::start();
    let (mut c, index, efd) = enabled(&s);
    let maps = Mappings::default();
    handle(&mut c, index, &maps, eventfd_wait(&efd, WAIT));
    assert!(maps.store32(BAR0, QTX_TAIL1 + 4, 7) && maps.store32(BAR0, VF_ATQBAL1, 0x1234));
    let rstat = c.read32(BAR0, VFGEN_RSTAT);

    // Revoked; the client re-queries and unmaps, then the device is reset before the acknowledgement.
    set(&mut c, state::PRE_COPY);
    assert_eq!(eventfd_take(&efd), 1);
    let layout = remap::region_info(&mut c, BAR0).unwrap();
    assert_eq!(maps.apply(BAR0, &layout).unmapped, 3);
    c.reset().ok("DEVICE_RESET");
    assert_eq!(proto::get_state(&mut c).unwrap(), state::RUNNING);
    assert_eq!(eventfd_take(&efd), 0, "still masked: the reset's change waits for the ack");
    for (off, what) in [(QTX_TAIL1 + 4, "a TX tail"), (VF_ATQBAL1, "ATQBAL")] {
        assert_eq!(c.read32(BAR0, off), 0, "{what} stored through the mapping is back at power-on");
    }
    assert_eq!(c.read32(BAR0, VFGEN_RSTAT), rstat);

    // The ack: the offer the reset made is signalled at once, on the same eventfd (the IRQ stayed enabled).
    remap::unmask(&mut c, index).unwrap();
    let o = handle(&mut c, index, &maps, eventfd_wait(&efd, WAIT));
    assert_eq!((o.kind, o.acked, o.regions[0].areas.clone()), ("offer", true, PAGES.to_vec()));
    assert_eq!(maps.load32(BAR0, QTX_TAIL1 + 4), Some(0), "the new mapping sees power-on values");
    assert!(maps.store32(BAR0, QTX_TAIL1 + 4, 3));
    assert_eq!(c.read32(BAR0, QTX_TAIL1 + 4), 3);
    assert_eq!(eventfd_take(&efd), 0, "one signal per change");

    // Reset before the client even re-queried: it then finds the pages offered again, keeps them, and the device's
    // pending change still comes as one more signal after the ack.
    set(&mut c, state::PRE_COPY);
    let v = eventfd_take(&efd);
    c.reset().ok("DEVICE_RESET");
    let o = handle(&mut c, index, &maps, v);
    assert_eq!((o.kind, o.acked, maps.areas(BAR0)), ("none", true, PAGES.to_vec()));
    let o = handle(&mut c, index, &maps, eventfd_wait(&efd, WAIT));
    assert_eq!((o.kind, o.acked), ("none", true));
    assert_eq!(eventfd_wait(&efd, Duration::from_millis(50)), 0);
}

#[test]
fn a_client_that_leaves_mid_handshake_leaves_nothing_to_the_next() {
    let s = ServerProcess::start();
    let (mut a, index, a_efd) = enabled(&s);
    let maps = Mappings::default();
    handle(&mut a, index, &maps, eventfd_wait(&a_efd, WAIT));
    set(&mut a, state::PRE_COPY);
    assert_eq!(eventfd_take(&a_efd), 1, "revoked; A never acknowledges");
    assert!(maps.store32(BAR0, QTX_TAIL1, 3));
    assert_eq!(a.read32(BAR0, QTX_TAIL1), 3, "limping: A's stale mapping still reaches its device");
    drop(a); // A's mapping stays
    trapped_counts(&s, 1);

    let mut b = s.connect_negotiated();
    let r = b.region_info(BAR0, 1024).ok("REGION_INFO");
    assert_eq!((r.u32_at(4) & REGION_FLAG_MMAP, r.fds.len()), (0, 0), "B gets no areas: the IRQ is disabled");
    assert_eq!(proto::get_state(&mut b).unwrap(), state::RUNNING);
    assert!(maps.store32(BAR0, QTX_TAIL1, 9) && maps.store32(BAR0, QRX_TAIL1, 9));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b.read32(BAR0, QTX_TAIL1), 0, "A's leftover mapping does not reach B's TX tail");
    assert_eq!(b.read32(BAR0, QRX_TAIL1), 0);
    set(&mut b, state::PRE_COPY);
    set(&mut b, state::RUNNING);
    assert_eq!(eventfd_take(&a_efd), 0, "A's eventfd went with A");

    // B enables it and maps its own pages: distinct from A's.
    let b_efd = eventfd();
    remap::enable(&mut b, index, b_efd.as_fd()).unwrap();
    let b_maps = Mappings::default();
    handle(&mut b, index, &b_maps, eventfd_wait(&b_efd, WAIT));
    assert_eq!(b_maps.load32(BAR0, QTX_TAIL1), Some(0));
    assert!(maps.store32(BAR0, QTX_TAIL1, 11));
    assert_eq!((b_maps.load32(BAR0, QTX_TAIL1), b.read32(BAR0, QTX_TAIL1)), (Some(0), 0));
    assert_eq!(maps.load32(BAR0, QTX_TAIL1), Some(11));
}

// ---- (g) ---------------------------------------------------------------------------------------------------

fn irq_info(c: &mut Client, index: u32, argsz: u32) -> Reply {
    c.call(cmd::DEVICE_GET_IRQ_INFO, &Payload::new().u32(argsz).u32(0).u32(index).u32(0).build(), &[])
}

#[test]
fn irq_info_capabilities_and_set_irqs_are_as_documented() {
    let s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    let flags = IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | remap::IRQ_INFO_AUTOMASKED;

    // Too small an argsz: the 16-byte structure, argsz = what is needed, no CAPS.
    for argsz in [16, 55] {
        let r = irq_info(&mut c, 5, argsz).ok("IRQ_INFO 5");
        let p = &r.payload;
        assert_eq!(p.len(), 16, "argsz {argsz}");
        assert_eq!((le_u32(p, 0), le_u32(p, 4), le_u32(p, 8), le_u32(p, 12)), (56, flags, 5, 1), "argsz {argsz}");
    }
    // Enough: the 24-byte vfu_irq_info and the chain, exactly.
    let want = Payload::new()
        .u32(56)
        .u32(flags | remap::VFU_IRQ_INFO_FLAG_CAPS)
        .u32(5)
        .u32(1)
        .u32(24) // cap_offset
        .u32(0) // pad
        .u16(remap::VFU_IRQ_INFO_CAP_TYPE)
        .u16(1)
        .u32(40)
        .u32(remap::VFU_IRQ_TYPE_REMAP)
        .u32(remap::VFU_IRQ_SUBTYPE_REMAP_SPARSE_MMAP)
        .u16(remap::VFU_IRQ_INFO_CAP_REMAP_REGIONS)
        .u16(1)
        .u32(0)
        .u64(0x1)
        .build();
    for argsz in [56, 4096] {
        assert_eq!(irq_info(&mut c, 5, argsz).ok("IRQ_INFO 5").payload, want, "argsz {argsz}");
    }
    // Indexes without capabilities stay 16 bytes whatever the argsz.
    let r = irq_info(&mut c, IRQ_MSIX, 4096).ok("IRQ_INFO MSI-X");
    assert_eq!((r.payload.len(), r.u32_at(0), r.u32_at(4) & remap::VFU_IRQ_INFO_FLAG_CAPS), (16, 16, 0));

    // Only the device triggers it.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 5, 0, 1, &[], &[]).assert_errno(libc::EINVAL, "TRIGGER NONE");
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, 5, 0, 1, &[1], &[]).assert_errno(libc::EINVAL, "TRIGGER BOOL");
    // DATA_BOOL unmask with 1 is an acknowledgement; enabling and disabling work.
    let efd = eventfd();
    remap::enable(&mut c, 5, efd.as_fd()).unwrap();
    assert_eq!(eventfd_wait(&efd, WAIT), 1);
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_UNMASK, 5, 0, 1, &[1], &[]).ok("UNMASK BOOL");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 5, 0, 0, &[], &[]).ok("disable");
    let r = c.region_info(BAR0, 1024).ok("REGION_INFO");
    assert_eq!(r.u32_at(4) & REGION_FLAG_MMAP, 0, "disabled: the pages are not offered any more");
    drop(c);

    // Without the remap IRQ (--doorbells trap): five indexes, index 5 refused.
    let s = ServerProcess::start_with(&["--doorbells", "trap"]);
    let mut c = s.connect_negotiated();
    assert_eq!(c.device_info().ok("DEVICE_GET_INFO").u32_at(12), 5, "num_irqs");
    irq_info(&mut c, 5, 16).assert_errno(libc::EINVAL, "IRQ_INFO 5");
    irq_info(&mut c, 5, 4096).assert_errno(libc::EINVAL, "IRQ_INFO 5, large argsz");
    let efd = eventfd();
    let fds = [efd.as_fd()];
    c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 5, 0, 1, &[], &fds).assert_errno(libc::EINVAL, "SET_IRQS 5");
    assert_eq!(remap::discover(&mut c).unwrap(), None);
    assert_eq!(c.region_info(BAR0, 1024).ok("REGION_INFO").u32_at(4) & REGION_FLAG_MMAP, 0);
}
