//! Traffic without a migration: the reference VMM's vCPU and wire peer against one server for a fixed time, with
//! or without the remap IRQ's fast path. `vfu-remapbench` compares the two with it; tests use it for traffic on
//! the fast path and trapped.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::proto::Result;
use super::remap::{self, AckPolicy, Signal};
use super::vcpu::{self, Vcpu};
use super::wire::Wire;
use super::{wait_until, RemapSide, Running, Shared, Side};
use super::{C_DB_MAPPED, C_DB_TRAPPED, C_RX_HARVESTED, C_RX_SENT, C_TX_ARRIVED, C_TX_DONE, C_TX_SENT};
use crate::BAR0;

/// What to run. [`TrafficConfig::new`] has the defaults.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficConfig {
    pub socket: PathBuf,
    /// The LOCAL address of the server's dgram backend (its REMOTE is the wire socket's address).
    pub backend: SocketAddr,
    pub memory: u64,
    /// Traffic time, measured (after bring-up).
    pub duration: Duration,
    /// Which directions run.
    pub tx: bool,
    pub rx: bool,
    /// TX frames per second; 0: as fast as the vCPU goes (the rings kept full).
    pub tx_rate: u64,
    /// RX frames per second; 0: closed loop, `rx_window` frames sent and not yet harvested.
    pub rx_rate: u64,
    pub rx_window: u64,
    /// Frames per TX tail write, at most.
    pub tx_batch: u32,
    /// The vCPU's sleep between polls (zero: busy polling).
    pub poll_sleep: Duration,
    /// Use the remap IRQ (as `Config::remap`), and when to acknowledge revocations.
    pub remap: bool,
    pub remap_ack: AckPolicy,
}

impl TrafficConfig {
    pub fn new(socket: PathBuf, backend: SocketAddr) -> TrafficConfig {
        TrafficConfig {
            socket,
            backend,
            memory: 16 << 20,
            duration: Duration::from_millis(300),
            tx: true,
            rx: true,
            tx_rate: 2000,
            rx_rate: 2000,
            rx_window: 64,
            tx_batch: u32::MAX,
            poll_sleep: Duration::from_micros(500),
            remap: true,
            remap_ack: AckPolicy::Prompt,
        }
    }
}

/// What a traffic run saw.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficReport {
    pub remap: RemapSide,
    /// BAR0's mmap areas as REGION_INFO listed them after set-up and at the end.
    pub bar0_areas_start: Vec<(u64, u64)>,
    pub bar0_areas_end: Vec<(u64, u64)>,
    /// The measured window, and what happened in it.
    pub seconds: f64,
    pub tx_posted: u64,
    pub tx_completed: u64,
    pub tx_arrived: u64,
    pub rx_sent: u64,
    pub rx_harvested: u64,
    pub tx_fps: f64,
    pub rx_fps: f64,
    /// The vCPU's doorbell writes over the whole run (bring-up included): stored into a mapping, and messages.
    pub doorbells_mapped: u64,
    pub doorbells_trapped: u64,
    /// At the end: everything posted completed, and the frames that arrived at the wire peer.
    pub tx_completed_total: u64,
    pub tx_posted_total: u64,
    pub tx_arrived_total: u64,
    /// Datagrams the kernel dropped at the wire peer's socket (it could not read them fast enough).
    pub tx_kernel_drops: u64,
    pub rx_harvested_total: u64,
    pub rx_foreign: u64,
    pub signals: Vec<Signal>,
}

fn bar0_areas(side: &Side) -> Result<Vec<(u64, u64)>> {
    Ok(side.with(|c| remap::region_info(c, BAR0))?.areas)
}

/// Brings the VF up on the server at `cfg.socket` and runs traffic for `cfg.duration`; `sock` is the wire peer's
/// socket (the backend's REMOTE).
pub fn run(cfg: &TrafficConfig, sock: UdpSocket) -> Result<TrafficReport> {
    let t0 = Instant::now();
    let wire_port = sock.local_addr().map_err(|e| format!("the wire socket: {e}"))?.port();
    let drops = || super::wire::udp_drops(wire_port).unwrap_or(0);
    let drops_before = drops();
    let shared = Arc::new(Shared::new());
    let remap = cfg.remap.then_some(cfg.remap_ack);
    let mut side = Side::connect(&cfg.socket, cfg.memory, "source", remap, &shared, t0)?;
    let _irqs = side.eventfds()?;
    let bar0_areas_start = bar0_areas(&side)?;
    let (driver, mac) = vcpu::bring_up(side.bus(&shared))?;
    // A rate of 0 stops a direction in the vCPU and the wire peer: "unlimited" is u64::MAX there.
    let rate = |on: bool, r: u64| {
        if !on {
            0
        } else if r == 0 {
            u64::MAX
        } else {
            r
        }
    };
    let wire = Wire::new(sock, mac, rate(cfg.rx, cfg.rx_rate), cfg.backend, shared.clone());
    if cfg.rx && cfg.rx_rate == 0 {
        wire.set_window(cfg.rx_window.max(1));
    }
    let mut v = Vcpu::new(driver, mac, shared.clone(), rate(cfg.tx, cfg.tx_rate), 0);
    v.poll_sleep = cfg.poll_sleep;
    v.tx_batch = cfg.tx_batch.max(1);
    let (cmds, cmd_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("refvmm-vcpu".into())
        .spawn(move || v.run(cmd_rx))
        .map_err(|e| format!("spawning the vCPU: {e}"))?;
    let mut running = Running { vcpu: Some(thread), cmds, wire: None };
    running.wire = Some(wire.spawn().map_err(|e| format!("starting the wire peer: {e}"))?);

    let snap = |c| shared.total(c);
    let counters = [C_TX_SENT, C_TX_DONE, C_TX_ARRIVED, C_RX_SENT, C_RX_HARVESTED];
    shared.traffic.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let before = counters.map(snap);
    std::thread::sleep(cfg.duration);
    let after = counters.map(snap);
    let seconds = start.elapsed().as_secs_f64();
    shared.traffic.store(false, Ordering::SeqCst);
    // Settle: everything posted completes and arrives, everything sent is harvested (or given up on).
    let mut last = (u64::MAX, Instant::now());
    wait_until(Duration::from_secs(3), || {
        let arrived = snap(C_TX_ARRIVED) + drops() - drops_before;
        let tx = snap(C_TX_DONE) == snap(C_TX_SENT) && arrived >= snap(C_TX_SENT);
        let h = snap(C_RX_HARVESTED);
        if h != last.0 {
            last = (h, Instant::now());
        }
        tx && (h >= wire.sent() || last.1.elapsed() > Duration::from_millis(200))
    });
    let (vr, wr) = running.finish()?;
    let bar0_areas_end = bar0_areas(&side)?;
    let signals = side.remap_signals();
    let d = |i: usize| after[i] - before[i];
    Ok(TrafficReport {
        remap: side.remap_side.clone(),
        bar0_areas_start,
        bar0_areas_end,
        seconds,
        tx_posted: d(0),
        tx_completed: d(1),
        tx_arrived: d(2),
        rx_sent: d(3),
        rx_harvested: d(4),
        tx_fps: d(1) as f64 / seconds,
        rx_fps: d(4) as f64 / seconds,
        doorbells_mapped: snap(C_DB_MAPPED),
        doorbells_trapped: snap(C_DB_TRAPPED),
        tx_completed_total: vr.tx_completed,
        tx_posted_total: u64::from(vr.tx_posted),
        tx_arrived_total: wr.arrivals.len() as u64,
        tx_kernel_drops: drops() - drops_before,
        rx_harvested_total: vr.rx.len() as u64,
        rx_foreign: vr.rx_foreign,
        signals,
    })
}
