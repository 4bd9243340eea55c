//! A migration that fails, and the VMM's recovery: the reference VMM's source, pre-copy and switchover as in
//! [`super::run_with_socket`], but when a step fails (a source transition refused, a state record the destination
//! refuses) the VMM aborts as a production VMM would: the destination is reset, the source is set RUNNING again
//! where its state allows (from ERROR it needs nothing: the device never stopped), the held frames go to the
//! source, the vCPU resumes there, and traffic goes on. Then every frame is accounted for on the source. Tests of
//! the migration faults (mig-fail, mig-corrupt) use it.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::mem::{self as gmem, PAGE};
use super::proto::{self, state, Result};
use super::vcpu::{self, Vcpu};
use super::wire::{self, Wire};
use super::{
    boot, signals, wait_until, Config, Running, Shared, Side, C_RX_HARVESTED, C_TX_ARRIVED, C_TX_DONE, C_TX_SENT,
};

/// What happened.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AbortReport {
    /// The step that failed ("" if none did: the migration went through, which a test of a fault calls a failure)
    /// and its error.
    pub failed_step: String,
    pub error: String,
    /// The source's migration state right after the failure, and at the end.
    pub source_state_after_failure: String,
    pub source_state_end: String,
    /// Frames each way: before the failure and after the recovery (RX counted as harvested by the guest).
    pub rx_sent: u64,
    pub rx_harvested: u64,
    pub rx_harvested_after_recovery: u64,
    pub rx_duplicates: u64,
    pub rx_missing: u64,
    /// The source's rx_discards at the end (frames it counted as dropped).
    pub rx_discards: u64,
    pub rx_kernel_drops: u64,
    pub tx_posted: u64,
    pub tx_completed: u64,
    pub tx_arrived: u64,
    pub tx_posted_after_recovery: u64,
    pub tx_missing: u64,
    pub tx_duplicates: u64,
    /// Frames that arrived at the wire from anywhere but the source.
    pub tx_wrong_server: u64,
    pub interrupts_after_recovery: u64,
    pub held_frames: usize,
    pub vf_active: bool,
    /// Every check that failed; empty: the source came through the failed migration with nothing lost.
    pub failures: Vec<String>,
}

/// Runs traffic on the source, attempts the migration, and recovers when a step fails (see the module comment).
/// Err only when the run itself could not be carried out (a server gone, the recovery refused).
pub fn run(cfg: &Config, sock: UdpSocket) -> Result<AbortReport> {
    let t0 = Instant::now();
    let shared = Arc::new(Shared::new());
    let remap = cfg.remap.then_some(cfg.remap_ack);
    let src = Side::connect(&cfg.source, cfg.memory, "source", remap, &shared, t0)?;
    let dst = Side::connect(&cfg.destination, cfg.memory, "destination", remap, &shared, t0)?;
    let src_irqs = src.eventfds()?;
    boot(&src.ram)?;
    let (driver, mac) = vcpu::bring_up(src.bus(&shared))?;
    let wire = Wire::new(sock, mac, cfg.rate, cfg.source_backend, shared.clone());
    let (cmds, cmd_rx) = mpsc::channel();
    let v = Vcpu::new(driver, mac, shared.clone(), cfg.rate, cfg.guest_dirty_rate);
    let vcpu_thread = std::thread::Builder::new()
        .name("refvmm-vcpu".into())
        .spawn(move || v.run(cmd_rx))
        .map_err(|e| format!("spawning the vCPU: {e}"))?;
    let mut running = Running { vcpu: Some(vcpu_thread), cmds, wire: None };
    running.wire = Some(wire.spawn().map_err(|e| format!("starting the wire peer: {e}"))?);
    shared.traffic.store(true, Ordering::SeqCst);
    let quarter = cfg.frames.div_ceil(4).max(1);
    if !wait_until(Duration::from_secs(30), || wire.sent() >= quarter) {
        return Err("the wire peer did not get its first frames out".into());
    }

    let mut r = AbortReport::default();
    // Pre-copy and the switchover, until a step fails.
    let attempt = || -> std::result::Result<(), (String, String)> {
        let step = |name: &str, res: Result<()>| res.map_err(|e| (name.to_string(), e));
        let ps = src.with(|c| proto::logging_start(c, PAGE, &[(0, cfg.memory)]));
        step("DMA_LOGGING_START", ps.map(|_| ()))?;
        step("source PRE_COPY", src.with(|c| proto::set_state(c, state::PRE_COPY)).map(|_| ()))?;
        let compat = src.with(proto::data_read_all).map_err(|e| ("source compat record".to_string(), e))?;
        step("destination RESUMING", dst.with(|c| proto::set_state(c, state::RESUMING)).map(|_| ()))?;
        step("destination compat record", dst.with(|c| proto::data_write_all(c, &compat)))?;
        src.with(|c| proto::logging_report(c, 0, cfg.memory, PAGE)).map_err(|e| ("DMA_LOGGING_REPORT".into(), e))?;
        let _ = src.ram.take_dirty();
        gmem::copy_all(&src.ram, &dst.ram).map_err(|e| ("copying memory".to_string(), e.to_string()))?;
        std::thread::sleep(Duration::from_millis(cfg.iteration_ms));
        // Switchover: the network holds, the guest harvests, the vCPU stops, the device stops.
        wire.hold();
        wait_until(Duration::from_secs(2), || shared.total(C_RX_HARVESTED) >= wire.sent());
        running.stop_vcpu().map_err(|e| ("stopping the vCPU".to_string(), e))?;
        step("source STOP_COPY", src.with(|c| proto::set_state(c, state::STOP_COPY)).map(|_| ()))?;
        let record = src.with(proto::data_read_all).map_err(|e| ("source state record".to_string(), e))?;
        step("destination state record", dst.with(|c| proto::data_write_all(c, &record)))?;
        step("destination STOP (load)", dst.with(|c| proto::set_state(c, state::STOP)).map(|_| ()))?;
        Ok(())
    };
    match attempt() {
        Ok(()) => {
            r.failures.push("the migration did not fail".into());
        }
        Err((s, e)) => {
            r.failed_step = s;
            r.error = e;
        }
    }
    let get = |side: &Side| side.with(proto::get_state).map(|s| state::name(s).to_string());
    r.source_state_after_failure = get(&src)?;

    // Recovery: the destination is reset (its session ends); the source runs again where its state allows.
    dst.with(|c| {
        c.reset().ok("destination DEVICE_RESET");
        Ok(())
    })?;
    let st = src.with(proto::get_state)?;
    // ERROR (0): the device never stopped, and only DEVICE_RESET would leave the state (resetting the guest's VF).
    if st != state::RUNNING && st != 0 {
        src.with(|c| proto::set_state(c, state::RUNNING))?;
    }
    let _ = src.with(proto::logging_stop);
    let irqs_before = signals(&src_irqs);
    r.held_frames = wire.switch_to(cfg.source_backend);
    running.order(super::vcpu::Cmd::Resume(None))?;
    let (rx_before, tx_before) = (shared.total(C_RX_HARVESTED), shared.total(C_TX_SENT));

    // Traffic on the source again, then everything settles.
    let base = wire.sent();
    if !wait_until(Duration::from_secs(60), || {
        let sent = wire.sent();
        sent >= cfg.frames && sent - base >= quarter
    }) {
        return Err("the wire peer stalled on the source after the recovery".into());
    }
    shared.traffic.store(false, Ordering::SeqCst);
    let mut last = (u64::MAX, Instant::now());
    wait_until(Duration::from_secs(3), || {
        let tx_done =
            shared.total(C_TX_DONE) == shared.total(C_TX_SENT) && shared.total(C_TX_ARRIVED) >= shared.total(C_TX_SENT);
        let h = shared.total(C_RX_HARVESTED);
        if h != last.0 {
            last = (h, Instant::now());
        }
        tx_done && (h >= wire.sent() || last.1.elapsed() > Duration::from_millis(200))
    });
    let stats = running.stats()?;
    r.interrupts_after_recovery = signals(&src_irqs) - irqs_before.min(signals(&src_irqs));
    r.rx_harvested_after_recovery = shared.total(C_RX_HARVESTED) - rx_before;
    r.tx_posted_after_recovery = shared.total(C_TX_SENT) - tx_before;
    let (mut vr, wr) = running.finish()?;
    let rstat = testkit::Bus::read32(&mut vr.driver.bus, device::nic::regs::VFGEN_RSTAT);
    r.vf_active = rstat & 3 == 2;
    r.source_state_end = get(&src)?;

    // RX: every frame sent harvested once, or counted by the source as dropped.
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for h in &vr.rx {
        if h.seq < wr.generated {
            *seen.entry(h.seq).or_default() += 1;
        }
    }
    r.rx_sent = wr.sent;
    r.rx_harvested = seen.len() as u64;
    r.rx_duplicates = seen.values().map(|&n| u64::from(n - 1)).sum();
    r.rx_missing = r.rx_sent - r.rx_harvested;
    r.rx_discards = stats.rx_discards;
    r.rx_kernel_drops = wire::udp_drops(cfg.source_backend.port()).unwrap_or(0);
    // TX: every frame posted completes and arrives once, from the source.
    r.tx_posted = u64::from(vr.tx_posted);
    r.tx_completed = vr.tx_completed;
    let mut tx_seen: HashMap<u32, u32> = HashMap::new();
    for a in &wr.arrivals {
        if a.seq >= vr.tx_posted || a.from != cfg.source_backend {
            r.tx_wrong_server += 1;
            continue;
        }
        *tx_seen.entry(a.seq).or_default() += 1;
    }
    r.tx_arrived = tx_seen.len() as u64;
    r.tx_duplicates = tx_seen.values().map(|&n| u64::from(n - 1)).sum();
    r.tx_missing = r.tx_posted - r.tx_arrived;
    let wire_drops = wire::udp_drops(cfg.wire.port()).unwrap_or(0);

    let f = &mut r.failures;
    if r.rx_duplicates > 0 || r.rx_missing != r.rx_discards + r.rx_kernel_drops {
        f.push(format!(
            "RX: {} sent, {} harvested ({} twice), {} missing but {} rx_discards + {} kernel drops",
            r.rx_sent, r.rx_harvested, r.rx_duplicates, r.rx_missing, r.rx_discards, r.rx_kernel_drops
        ));
    }
    if r.tx_completed != r.tx_posted || r.tx_missing != wire_drops || r.tx_duplicates > 0 || r.tx_wrong_server > 0 {
        f.push(format!(
            "TX: {} posted, {} completed, {} arrived ({} missing, {} twice, {} from elsewhere)",
            r.tx_posted, r.tx_completed, r.tx_arrived, r.tx_missing, r.tx_duplicates, r.tx_wrong_server
        ));
    }
    if r.rx_harvested_after_recovery == 0 || r.tx_posted_after_recovery == 0 {
        f.push(format!(
            "no traffic after the recovery: {} RX harvested, {} TX posted",
            r.rx_harvested_after_recovery, r.tx_posted_after_recovery
        ));
    }
    if !r.vf_active {
        f.push(format!("VFGEN_RSTAT reads {rstat:#x} at the end, not VFACTIVE"));
    }
    Ok(r)
}
