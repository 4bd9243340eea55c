//! The control socket (`--control PATH`, docs/faults.md) against the server binary: the greeting, every command in
//! its success and error forms, every event, malformed JSON, oversize lines, many clients, and a client that never
//! reads. The vfio-user side is driven with the raw client (and the reference VMM's traffic for the
//! malicious-driver event).

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use client_tests::control::{start_with_control, ControlClient};
use client_tests::refvmm::traffic::{self, TrafficConfig};
use client_tests::{cmd, Client, Payload, BAR0};
use device::fault::FAULTS;
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);
const NONE: Value = Value::Null;

fn connect(path: &std::path::Path) -> ControlClient {
    ControlClient::connect(path).unwrap_or_else(|e| panic!("connecting to the control socket: {e}"))
}

// MIG_DEVICE_STATE (vfio uapi).
const SET_STATE: u32 = (1 << 17) | 2;
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const PRE_COPY: u32 = 6;

fn set_state(c: &mut Client, s: u32) -> client_tests::Reply {
    c.call(cmd::DEVICE_FEATURE, &Payload::new().u32(16).u32(SET_STATE).u32(s).u32(u32::MAX).build(), &[])
}

#[test]
fn greeting_and_the_query_commands() {
    let (_srv, path) = start_with_control(&["--seed", "7", "--fault", "rx-drop=10"]);
    let mut c = connect(&path);
    let g = &c.greeting["greeting"];
    assert_eq!(g["version"]["package"], "vfu-i40evf", "{g}");
    assert!(g["version"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{g}");
    let caps: Vec<&str> = g["capabilities"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(caps.contains(&"events") && caps.contains(&"faults"), "{g}");
    let names: Vec<&str> = g["faults"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, FAULTS.iter().map(|f| f.0).collect::<Vec<_>>(), "every fault, by name");

    let cmds = c.ok("query-commands", NONE);
    let cmds: Vec<&str> = cmds.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for want in ["query-status", "query-stats", "query-faults", "set-fault", "clear-fault", "set-link", "pf-reset"] {
        assert!(cmds.contains(&want), "{want} in {cmds:?}");
    }
    assert!(cmds.contains(&"query-migration"));

    // No vfio-user client yet.
    let st = c.ok("query-status", NONE);
    assert_eq!(st["link_up"], true, "{st}");
    assert_eq!(st["client_connected"], false, "{st}");
    assert_eq!(st["client"], Value::Null, "{st}");
    assert_eq!(st["migration_state"], "RUNNING", "{st}");
    assert_eq!(st["vf"]["reset"], "VFACTIVE", "{st}");
    assert_eq!(st["vf"]["admin_queue"], false, "no driver has set up the admin queue: {st}");

    // A client connects and negotiates: the status says so.
    let mut vc = Client::connect(_srv.socket_path()).unwrap();
    vc.negotiate();
    let st = c.ok("query-status", NONE);
    assert_eq!(st["client_connected"], true, "{st}");
    assert_eq!(st["client"]["negotiated"], true, "{st}");
    assert_eq!(st["clients_served"], st["client"]["id"], "the start-up probe counts too: {st}");
    assert!(st["client"]["messages"].as_u64().unwrap() >= 1, "{st}");

    let stats = c.ok("query-stats", NONE);
    let q = stats["queues"].as_array().unwrap();
    assert_eq!(q.len(), 4, "--queues 4 by default: {stats}");
    for (i, q) in q.iter().enumerate() {
        assert_eq!(q["queue"], i);
        assert_eq!((q["rx_packets"].as_u64(), q["tx_packets"].as_u64()), (Some(0), Some(0)), "{q}");
    }
    for k in ["rx_bytes", "rx_unicast", "rx_discards", "tx_bytes", "tx_unicast", "tx_errors", "tx_discards"] {
        assert_eq!(stats[k], 0, "{k}: {stats}");
    }
    assert_eq!(stats["counters"]["mdd_events"], 0, "{stats}");

    let f = c.ok("query-faults", NONE);
    assert_eq!(f["seed"], 7, "{f}");
    assert_eq!(f["faults"], json!([{"name": "rx-drop", "arg": "10", "spec": "rx-drop=10", "fired": 0}]), "{f}");

    let m = c.ok("query-migration", NONE);
    assert_eq!(m["state"], "RUNNING", "{m}");
    assert_eq!((m["bytes_transferred"].as_u64(), m["dirty_pages_reported"].as_u64()), (Some(0), Some(0)), "{m}");
    assert_eq!(m["audit"], Value::Null, "{m}");
    assert_eq!(m["audit_enabled"], false, "{m}");

    // Error forms shared by every command: unknown command (id echoed), stray arguments, bad shapes.
    let (class, desc) = c.err("query-everything", NONE);
    assert_eq!(class, "CommandNotFound", "{desc}");
    for cmd in ["query-status", "query-stats", "query-faults", "query-migration", "pf-reset", "query-commands"] {
        let (class, desc) = c.err(cmd, json!({"verbose": true}));
        assert_eq!(class, "GenericError");
        assert!(desc.contains("'verbose' is unexpected"), "{cmd}: {desc}");
    }
    c.send_raw(b"{\"execute\":\"query-status\",\"arguments\":[1],\"id\":\"x\"}\n").unwrap();
    let a = c.answer(SEC).unwrap();
    assert_eq!((a["id"].as_str(), a["error"]["class"].as_str()), (Some("x"), Some("GenericError")), "{a}");
    c.send_raw(b"{\"arguments\":{}}\n").unwrap();
    let a = c.answer(SEC).unwrap();
    assert!(a["error"]["desc"].as_str().unwrap().contains("'execute' is missing"), "{a}");
    c.send_raw(b"{\"execute\":5}\n").unwrap();
    assert!(c.answer(SEC).unwrap()["error"]["desc"].as_str().unwrap().contains("must be a string"));
}

#[test]
fn set_fault_and_clear_fault() {
    let (srv, path) = start_with_control(&["--seed", "1"]);
    let mut c = connect(&path);
    assert_eq!(c.ok("set-fault", json!({"fault": "slow-mmio=200"})), json!({"fault": "slow-mmio=200"}));
    assert_eq!(
        c.ok("set-fault", json!({"fault": "aq-error=CONFIG_RSS_KEY"})),
        json!({"fault": "aq-error=config_rss_key"})
    );
    assert_eq!(c.ok("set-fault", json!({"fault": "slow-mmio=300"}))["fault"], "slow-mmio=300", "replaces the argument");
    let f = c.ok("query-faults", NONE);
    let specs: Vec<&str> = f["faults"].as_array().unwrap().iter().map(|x| x["spec"].as_str().unwrap()).collect();
    assert_eq!(specs, ["aq-error=config_rss_key", "slow-mmio=300"], "{f}");

    // The slow-mmio set at run time acts: a BAR0 read takes at least 300 us, and it counts as fired.
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    let t = Instant::now();
    for _ in 0..10 {
        vc.read32(BAR0, 0x8800);
    }
    assert!(t.elapsed() >= Duration::from_micros(3000), "10 slow reads: {:?}", t.elapsed());
    let f = c.ok("query-faults", NONE);
    assert_eq!(f["fired"]["slow-mmio"], 10, "{f}");
    let slow = f["faults"].as_array().unwrap().iter().find(|x| x["name"] == "slow-mmio").unwrap().clone();
    assert_eq!(slow["fired"], 10, "{f}");

    // Errors: a bad spec says what is valid; a missing or non-string argument.
    let (class, desc) = c.err("set-fault", json!({"fault": "frobnicate"}));
    assert_eq!(class, "InvalidParameter");
    assert!(desc.contains("unknown fault 'frobnicate'") && desc.contains("disconnect-after=N"), "{desc}");
    let (class, desc) = c.err("set-fault", json!({"fault": "rx-drop=101"}));
    assert!(class == "InvalidParameter" && desc.contains("out of range"), "{desc}");
    assert!(c.err("set-fault", NONE).1.contains("'fault' is missing"));
    assert!(c.err("set-fault", json!({"fault": 3})).1.contains("must be a string"));
    assert!(c.err("set-fault", json!({"fault": "tx-hang", "x": 1})).1.contains("'x' is unexpected"));

    // clear-fault by name (an argument is ignored), of one not set, of an unknown one; all; both forms at once.
    assert_eq!(c.ok("clear-fault", json!({"name": "slow-mmio"})), json!({"cleared": ["slow-mmio"]}));
    assert_eq!(c.ok("clear-fault", json!({"name": "slow-mmio=5"})), json!({"cleared": []}), "not set any more");
    let (class, desc) = c.err("clear-fault", json!({"name": "nope"}));
    assert!(class == "InvalidParameter" && desc.contains("valid: reset-stuck"), "{desc}");
    assert!(c.err("clear-fault", NONE).1.contains("missing"));
    assert!(c.err("clear-fault", json!({"name": "aq-error", "all": true})).1.contains("not both"));
    assert!(c.err("clear-fault", json!({"all": false})).1.contains("must be true"));
    c.ok("set-fault", json!({"fault": "tx-hang"}));
    assert_eq!(c.ok("clear-fault", json!({"all": true})), json!({"cleared": ["aq-error", "tx-hang"]}));
    assert_eq!(c.ok("query-faults", NONE)["faults"], json!([]));
    vc.read32(BAR0, 0x8800);
    assert_eq!(c.ok("query-faults", NONE)["fired"]["slow-mmio"], 10, "cleared: no more delays");
}

#[test]
fn set_link_and_its_link_change_events() {
    let (_srv, path) = start_with_control(&[]);
    let mut c = connect(&path);
    assert_eq!(c.ok("set-link", json!({"up": false})), json!({}));
    let e = c.wait_event("LINK_CHANGE", 5 * SEC, |d| d["up"] == false).expect("LINK_CHANGE down");
    assert_eq!(e["data"]["speed_mbps"], 10000, "{e}");
    assert!(e["data"]["cause"].as_str().is_some(), "{e}");
    let ts = &e["timestamp"];
    let secs = ts["seconds"].as_u64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(secs <= now && now - secs < 60, "{ts}");
    assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000, "{ts}");
    assert_eq!(c.ok("query-status", NONE)["link_up"], false);
    c.ok("set-link", json!({"up": true}));
    c.wait_event("LINK_CHANGE", 5 * SEC, |d| d["up"] == true).expect("LINK_CHANGE up");
    assert_eq!(c.ok("query-status", NONE)["link_up"], true);

    assert!(c.err("set-link", NONE).1.contains("'up' is missing"));
    assert!(c.err("set-link", json!({"up": "yes"})).1.contains("must be a boolean"));
    assert!(c.err("set-link", json!({"up": true, "speed": 1})).1.contains("'speed' is unexpected"));
}

#[test]
fn pf_reset_and_its_reset_events() {
    let (_srv, path) = start_with_control(&[]);
    let mut c = connect(&path);
    assert_eq!(c.ok("pf-reset", NONE), json!({}));
    // (A "device" reset of the start-up probe's session may come first.)
    c.wait_event("RESET", 5 * SEC, |d| d["phase"] == "start" && d["kind"] == "pf").expect("RESET pf start");
    c.wait_event("RESET", 5 * SEC, |d| d["phase"] == "done" && d["kind"] == "pf").expect("RESET pf done");
    assert_eq!(c.ok("query-status", NONE)["vf"]["reset"], "VFACTIVE");
}

#[test]
fn migration_state_events_and_query_migration() {
    let (srv, path) = start_with_control(&["--migration-audit"]);
    let mut c = connect(&path);
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    let changed = |c: &mut ControlClient, from: &str, to: &str| {
        c.wait_event("MIGRATION_STATE", 5 * SEC, |d| d["from"] == from && d["to"] == to)
            .unwrap_or_else(|| panic!("MIGRATION_STATE {from} -> {to}"));
    };
    assert_eq!(set_state(&mut vc, STOP).errno, None);
    changed(&mut c, "RUNNING", "STOP");
    assert_eq!(c.ok("query-migration", NONE)["state"], "STOP");
    assert_eq!(c.ok("query-status", NONE)["paused"], true);
    assert_eq!(set_state(&mut vc, PRE_COPY).errno, None, "STOP -> RUNNING -> PRE_COPY");
    changed(&mut c, "STOP", "RUNNING");
    changed(&mut c, "RUNNING", "PRE_COPY");
    // The compat record: bytes read are counted.
    let r = vc.call(cmd::MIG_DATA_READ, &Payload::new().u32(8 + 4096).u32(4096).build(), &[]);
    assert_eq!(r.errno, None);
    let n = u64::from(r.u32_at(4));
    assert!(n > 0);
    let m = c.ok("query-migration", NONE);
    assert_eq!((m["state"].as_str(), m["bytes_read"].as_u64()), (Some("PRE_COPY"), Some(n)), "{m}");
    assert_eq!(m["audit_enabled"], true, "{m}");
    assert_eq!(set_state(&mut vc, RUNNING).errno, None);
    changed(&mut c, "PRE_COPY", "RUNNING");

    // A failed transition: into ERROR, reported; DEVICE_RESET leaves it.
    c.ok("set-fault", json!({"fault": "mig-fail=stop"}));
    assert_eq!(set_state(&mut vc, STOP).errno, Some(libc::EINVAL));
    changed(&mut c, "RUNNING", "ERROR");
    assert_eq!(c.ok("query-migration", NONE)["state"], "ERROR");
    assert_eq!(c.ok("query-faults", NONE)["fired"]["mig-fail"], 1);
    vc.reset().ok("DEVICE_RESET");
    changed(&mut c, "ERROR", "RUNNING");
    assert_eq!(c.ok("query-status", NONE)["migration_state"], "RUNNING");
}

/// dma-error set while a driver runs traffic: the device's next guest-memory access fails, MALICIOUS_DRIVER is
/// reported and the PF resets the VF (RESET pf).
#[test]
fn malicious_driver_event_from_a_dma_error() {
    let wire = UdpSocket::bind("127.0.0.1:0").unwrap();
    let w = wire.local_addr().unwrap();
    let local = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let spec = format!("dgram:{local},{w}");
    let (mut srv, path) = start_with_control(&["--backend", &spec]);
    let mut c = connect(&path);
    let mut cfg = TrafficConfig::new(srv.socket_path().into(), local);
    cfg.duration = Duration::from_millis(1500);
    cfg.remap = false;
    let t = std::thread::spawn(move || traffic::run(&cfg, wire));
    // Wait for the driver to be up and frames to move, then fail the next DMA.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = c.ok("query-stats", NONE);
        if st["tx_unicast"].as_u64().unwrap_or(0) > 0 && st["rx_unicast"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no traffic: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok("set-fault", json!({"fault": "dma-error"}));
    let e = c.wait_event("MALICIOUS_DRIVER", 5 * SEC, |_| true).expect("MALICIOUS_DRIVER");
    assert!(e["data"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    c.wait_event("RESET", 5 * SEC, |d| d["kind"] == "pf").expect("the PF resets the VF");
    let f = c.ok("query-faults", NONE);
    assert_eq!(f["fired"]["dma-error"], 1, "{f}");
    assert_eq!(f["faults"], json!([]), "one-shot: {f}");
    assert!(c.ok("query-stats", NONE)["counters"]["mdd_events"].as_u64().unwrap() >= 1);
    // The traffic run may or may not survive the reset (its driver model does not recover): its result is not
    // the point. The server must.
    let _ = t.join();
    srv.assert_alive();
    srv.assert_serves_new_client("after a dma-error");
}

#[test]
fn malformed_json_and_oversize_lines_keep_the_connection() {
    let (_srv, path) = start_with_control(&[]);
    let mut c = connect(&path);
    for bad in [&b"{"[..], b"not json", b"[1,2,3]", b"\"query-status\"", b"{\"execute\":\"query-status\"", b"\xff\xfe"]
    {
        let mut line = bad.to_vec();
        line.push(b'\n');
        c.send_raw(&line).unwrap();
        let a = c.answer(5 * SEC).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(bad)));
        assert_eq!(a["error"]["class"], "GenericError", "{a}");
    }
    // Blank lines are ignored; the connection still works.
    c.send_raw(b"\n\r\n   \n").unwrap();
    assert_eq!(c.ok("query-status", NONE)["migration_state"], "RUNNING");

    // A line over 64 KiB, sent in pieces without a newline for a while: one error, the rest of it skipped, and the
    // next line is a command again.
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..8 {
        c.send_raw(&chunk).unwrap();
    }
    let a = c.answer(5 * SEC).unwrap();
    assert!(a["error"]["desc"].as_str().unwrap().contains("longer than 65536"), "{a}");
    for _ in 0..8 {
        c.send_raw(&chunk).unwrap();
    }
    c.send_raw(b"still the same line\n").unwrap();
    assert_eq!(c.ok("query-status", NONE)["link_up"], true, "resynchronised at the newline");
    // A long line that arrives whole with its newline, followed by a command in the same write.
    let mut long = vec![b' '; 70 * 1024];
    long.extend_from_slice(b"\n{\"execute\":\"query-faults\",\"id\":9}\n");
    c.send_raw(&long).unwrap();
    assert!(c.answer(5 * SEC).unwrap()["error"]["desc"].as_str().unwrap().contains("longer than"));
    assert_eq!(c.answer(5 * SEC).unwrap()["id"], 9);
    // Exactly 64 KiB is a line like any other (here: padded JSON).
    let mut max = b"{\"execute\":\"query-status\",\"id\":10}".to_vec();
    max.resize(64 * 1024, b' ');
    max.push(b'\n');
    c.send_raw(&max).unwrap();
    assert_eq!(c.answer(5 * SEC).unwrap()["id"], 10);
}

#[test]
fn sixteen_clients_get_events_and_the_seventeenth_is_refused() {
    let (_srv, path) = start_with_control(&[]);
    let mut clients: Vec<ControlClient> = (0..16).map(|_| connect(&path)).collect();
    // The 17th: one error line, then the socket closes.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(5 * SEC)).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).expect("the refused client is closed");
    let v: Value = serde_json::from_str(all.trim()).unwrap_or_else(|e| panic!("{e}: {all:?}"));
    assert_eq!(v["error"]["class"], "TooManyClients", "{v}");
    assert_eq!(all.lines().count(), 1, "{all}");

    // An event reaches every client.
    clients[3].ok("set-link", json!({"up": false}));
    for (i, c) in clients.iter_mut().enumerate() {
        c.wait_event("LINK_CHANGE", 5 * SEC, |d| d["up"] == false).unwrap_or_else(|| panic!("client {i}"));
    }
    // Every client can still talk, and once one leaves a new one is accepted.
    for c in clients.iter_mut() {
        assert_eq!(c.ok("query-status", NONE)["link_up"], false);
    }
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        let c = connect(&path);
        if c.greeting.get("greeting").is_some() {
            break c;
        }
        assert!(Instant::now() < deadline, "no room after a client left: {}", c.greeting);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(again.ok("query-status", NONE)["link_up"], false);
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_others() {
    let (mut srv, path) = start_with_control(&[]);
    let mut good = connect(&path);
    // The bad client floods commands (each answered with about 700 bytes of stats) and never reads.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let flood = std::thread::spawn(move || {
        let line = b"{\"execute\":\"query-stats\"}\n".repeat(200);
        let mut sent = 0;
        for _ in 0..50 {
            if bad.write_all(&line).is_err() {
                break; // dropped by the server
            }
            sent += 200;
        }
        (bad, sent)
    });
    let mut vc = Client::connect(srv.socket_path()).unwrap();
    vc.negotiate();
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(2) {
        let a = Instant::now();
        let up = good.ok("query-status", NONE)["link_up"].as_bool().unwrap();
        good.ok("set-link", json!({"up": !up}));
        vc.read32(BAR0, 0x8800); // and the vfio-user client is served meanwhile
        slowest = slowest.max(a.elapsed());
    }
    // A server stalled on the bad client would wait for it until it is dropped (its write timeout is 20 s); a
    // loaded 2-CPU machine answers within about a second.
    assert!(slowest < Duration::from_secs(5), "the good client waited {slowest:?}");
    let (mut bad, sent) = flood.join().unwrap();
    // The bad client was dropped once its unread output passed the cap: it reads what was queued, then EOF.
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    let _ = bad.read_to_end(&mut sink); // EOF (or a reset): the server closed it
    assert!(sink.len() < sent * 700, "not every answer was queued for it: {} bytes for {sent} commands", sink.len());
    let log = srv.log();
    assert!(log.contains("does not read"), "the server says why it dropped it:\n{log}");
    srv.assert_alive();
    assert_eq!(good.ok("query-status", NONE)["client_connected"], true);
}
