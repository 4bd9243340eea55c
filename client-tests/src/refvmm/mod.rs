//! The reference VMM (`vfu-refvmm`): a VMM that owns guest memory, drives the VF with a model of the iavf driver,
//! plays the network, and live-migrates the VF between two `vfu-i40evf` servers with vfio-user migration v2 while
//! traffic flows, then checks that nothing was lost. `docs/refvmm.md` describes it; [`run`] is the whole of it.
//!
//! Threads: the orchestrator (the caller of [`run`]), the vCPU ([`vcpu`]), the wire peer's sender and receiver
//! ([`wire`]), and per server the remap IRQ's handler ([`remap`]). Guest memory: [`mem`]. The commands: [`proto`].
//! [`traffic`] runs traffic on one server without migrating (benchmarks, tests).

pub mod abort;
pub mod mem;
pub mod proto;
pub mod remap;
pub mod traffic;
pub mod vcpu;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::util::{eventfd, eventfd_take};
use crate::Client;
use mem::{GuestRam, PAGE};
use proto::{state, Result};
use remap::{AckPolicy, RemapConn, RemapIrqInfo, Signal};
use vcpu::{Cmd, EthStats, Harvested, Vcpu, VcpuResult, VmmBus};
use wire::{Wire, WireResult};

/// The phases of a run, in order.
pub const PHASES: [&str; 4] = ["source", "pre-copy", "switchover", "destination"];
const P_SOURCE: usize = 0;
const P_PRECOPY: usize = 1;
const P_SWITCHOVER: usize = 2;
const P_DESTINATION: usize = 3;

/// Counters kept per phase.
pub const C_RX_SENT: usize = 0;
pub const C_RX_HARVESTED: usize = 1;
pub const C_TX_SENT: usize = 2;
pub const C_TX_ARRIVED: usize = 3;
pub const C_TX_DONE: usize = 4;
/// Doorbell writes (TX and RX tails, ARQT) by the vCPU: stored through a mapping, sent as REGION_WRITE.
pub const C_DB_MAPPED: usize = 5;
pub const C_DB_TRAPPED: usize = 6;
const NC: usize = 7;

/// What the threads share: the phase, per-phase counters, and the traffic and stop switches.
pub struct Shared {
    pub phase: AtomicUsize,
    counts: [[AtomicU64; NC]; PHASES.len()],
    /// Frames are generated (both directions) while set.
    pub traffic: AtomicBool,
    /// The wire threads end when set.
    pub stop: AtomicBool,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            phase: AtomicUsize::new(P_SOURCE),
            counts: Default::default(),
            traffic: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }

    pub(crate) fn count(&self, c: usize) {
        self.counts[self.phase.load(Ordering::SeqCst)][c].fetch_add(1, Ordering::SeqCst);
    }

    pub fn total(&self, c: usize) -> u64 {
        self.counts.iter().map(|p| p[c].load(Ordering::SeqCst)).sum()
    }

    pub(crate) fn get(&self, phase: usize, c: usize) -> u64 {
        self.counts[phase][c].load(Ordering::SeqCst)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// What to do. [`Config::new`] has the defaults the CLI shows.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The source and destination servers' sockets.
    pub source: PathBuf,
    pub destination: PathBuf,
    /// The wire peer's UDP address (W), the REMOTE of both servers' dgram backends.
    pub wire: SocketAddr,
    /// The LOCAL addresses of the source's and the destination's dgram backends.
    pub source_backend: SocketAddr,
    pub destination_backend: SocketAddr,
    /// Guest memory, bytes (a multiple of 4 KiB, at least 16 MiB).
    pub memory: u64,
    /// Frames in each direction, at least: a quarter before the migration, a quarter after it.
    pub frames: u64,
    /// Frames per second in each direction.
    pub rate: u64,
    /// Pre-copy iterations, at most.
    pub iterations: u32,
    /// Each pre-copy iteration lasts at least this long (traffic runs meanwhile).
    pub iteration_ms: u64,
    /// Stop iterating once an iteration's dirty set is at most this many pages (0: run every iteration).
    pub converge_pages: u64,
    /// Pages per second the guest workload writes.
    pub guest_dirty_rate: u64,
    /// Negative control: do not copy device-dirty pages (guest-dirty pages are still copied).
    pub skip_dirty: bool,
    /// Use the remap IRQ (docs/remap-irq.md) where a server offers it: doorbells through the mapped pages.
    pub remap: bool,
    /// When revocations are acknowledged (tests): prompt, delay:MS or never.
    pub remap_ack: AckPolicy,
}

impl Config {
    pub fn new(
        source: PathBuf,
        destination: PathBuf,
        wire: SocketAddr,
        source_backend: SocketAddr,
        destination_backend: SocketAddr,
    ) -> Config {
        Config {
            source,
            destination,
            wire,
            source_backend,
            destination_backend,
            memory: 64 << 20,
            frames: 1000,
            rate: 2000,
            iterations: 4,
            iteration_ms: 25,
            converge_pages: 0,
            guest_dirty_rate: 2000,
            skip_dirty: false,
            remap: true,
            remap_ack: AckPolicy::Prompt,
        }
    }
}

/// One pass of copying memory to the destination.
#[derive(Debug, Clone, Serialize)]
pub struct Iteration {
    pub index: u32,
    /// "pre-copy" (the VM runs) or "stop-copy" (the final pass, vCPU and device stopped).
    pub kind: &'static str,
    pub start_ms: f64,
    /// Pages DMA_LOGGING_REPORT returned, pages the guest dirtied, and their union.
    pub device_dirty: u64,
    pub guest_dirty: u64,
    pub dirty: u64,
    /// Device-dirty pages not copied (`--skip-dirty` only).
    pub skipped_device: u64,
    pub copied_pages: u64,
    pub bytes: u64,
    /// The first pass copies every page that is not zero.
    pub zero_skipped: u64,
    pub report_ms: f64,
    pub copy_ms: f64,
    pub duration_ms: f64,
}

/// Frames seen in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub start_ms: f64,
    pub end_ms: f64,
    /// RX: frames the wire peer sent toward the VF, frames the driver harvested.
    pub rx_sent: u64,
    pub rx_harvested: u64,
    /// TX: frames the driver posted, completions it reclaimed, frames that arrived at the wire peer.
    pub tx_posted: u64,
    pub tx_completed: u64,
    pub tx_arrived: u64,
    /// MSI-X signals on the active server's eventfds.
    pub interrupts: u64,
    /// The vCPU's doorbell writes (TX and RX tails, ARQT): stores through a mapped page, and REGION_WRITE messages.
    pub doorbells_mapped: u64,
    pub doorbells_trapped: u64,
}

/// The stop-and-copy window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Switchover {
    /// Wire held until the guest had harvested every frame sent to the source (not downtime: the VM runs).
    pub quiesce_ms: f64,
    /// From the STOP_COPY request to its reply (the device finishes queued work and freezes).
    pub stop_copy_ms: f64,
    pub final_copy_ms: f64,
    /// The byte-for-byte comparison of the two memories (a check, excluded from the downtime).
    pub compare_ms: f64,
    pub state_transfer_ms: f64,
    /// RESUMING -> STOP on the destination: the state is checked and loaded.
    pub destination_load_ms: f64,
    /// SET_IRQS and STOP -> RUNNING on the destination.
    pub destination_run_ms: f64,
    /// From the source's STOP_COPY request to the destination's RUNNING reply, less the comparison.
    pub downtime_ms: f64,
    /// The vCPU's pause (stop to resume), less the comparison.
    pub vcpu_paused_ms: f64,
    pub compat_bytes: usize,
    pub state_bytes: usize,
    /// Frames the wire held during the switchover and then sent to the (still stopped) destination.
    pub held_frames: usize,
}

/// Every check, with the numbers behind it. `failures` is empty when the run passed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// At switchover (after the final copy, before the destination runs) the two memories are equal.
    pub memory_equal: bool,
    pub lost_pages: u64,
    /// The first lost pages' guest addresses.
    pub lost_page_addrs: Vec<String>,
    /// Lost pages that were not device-dirty pages skipped on purpose (`--skip-dirty`): a real loss.
    pub lost_unexplained: u64,
    pub rx_sent: u64,
    /// Distinct frames harvested, on the source and on the destination.
    pub rx_harvested: u64,
    pub rx_harvested_source: u64,
    pub rx_harvested_destination: u64,
    pub rx_duplicates: u64,
    /// RX descriptors that held no frame of ours, or a number never sent.
    pub rx_foreign: u64,
    /// Sent, never harvested.
    pub rx_missing: u64,
    /// rx_discards on the destination at the end (its counters continue the source's).
    pub rx_discards: u64,
    /// Datagrams the kernel dropped at the backends' sockets (full receive buffers): never reached a device.
    pub rx_kernel_drops: u64,
    /// Frames the wire peer could not send (the kernel refused them): never counted as sent.
    pub rx_send_errors: u64,
    /// Per queue, frames harvested on the destination.
    pub rx_per_queue_destination: Vec<u64>,
    pub tx_posted: u64,
    pub tx_completed: u64,
    pub tx_arrived: u64,
    pub tx_duplicates: u64,
    pub tx_missing: u64,
    /// Datagrams the kernel dropped at the wire peer's socket: transmitted by the VF, lost on the host.
    pub tx_kernel_drops: u64,
    /// Frames posted on the destination that arrived at the wire peer from the destination's backend.
    pub tx_after_switchover: u64,
    /// Frames that arrived from the wrong server (posted before the switchover but sent by the destination, or
    /// after it by the source).
    pub tx_wrong_server: u64,
    pub tx_per_queue_destination: Vec<u64>,
    pub interrupts_destination: u64,
    pub vf_active: bool,
    pub stats_source: EthStats,
    pub stats_destination: EthStats,
    pub failures: Vec<String>,
}

/// The remap IRQ on one server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemapSide {
    pub irq: Option<RemapIrqInfo>,
    pub enabled: bool,
    /// Why it is not used, when it is not.
    pub note: String,
}

/// A MIG_DEVICE_STATE change the orchestrator made: the remap signals are placed against these.
#[derive(Debug, Clone, Serialize)]
pub struct StateChange {
    pub side: &'static str,
    pub state: &'static str,
    /// When the reply came.
    pub reply_ms: f64,
}

/// The remap IRQ during the run (docs/remap-irq.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemapReport {
    pub source: RemapSide,
    pub destination: RemapSide,
    /// Every signal either handler read, in time order.
    pub signals: Vec<Signal>,
    pub acks: u64,
    pub state_changes: Vec<StateChange>,
}

/// Everything a run produced; serialized as the JSON timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: Config,
    pub mac: String,
    pub page_size: u64,
    pub phases: Vec<Phase>,
    pub iterations: Vec<Iteration>,
    pub switchover: Switchover,
    pub remap: RemapReport,
    pub verification: Verification,
    pub total_ms: f64,
    pub passed: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The running parts that must stop whatever happens: the vCPU thread and the wire peer.
struct Running {
    vcpu: Option<JoinHandle<VcpuResult>>,
    cmds: Sender<Cmd>,
    wire: Option<wire::WireThreads>,
}

impl Running {
    fn order(&self, c: Cmd) -> Result<()> {
        self.cmds.send(c).map_err(|_| "the vCPU thread is gone (it panicked: see above)".to_string())
    }

    fn stop_vcpu(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.order(Cmd::Stop(tx))?;
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the vCPU did not stop".to_string())
    }

    fn stats(&self) -> Result<EthStats> {
        let (tx, rx) = mpsc::channel();
        self.order(Cmd::Stats(tx))?;
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the vCPU did not answer GET_STATS".to_string())?
    }

    fn finish(&mut self) -> Result<(VcpuResult, WireResult)> {
        let _ = self.cmds.send(Cmd::Finish);
        let v = self.vcpu.take().expect("finished twice").join().map_err(|e| {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            format!("the vCPU thread panicked: {}", msg.unwrap_or_default())
        })?;
        let w = self.wire.take().expect("finished twice").finish()?;
        Ok((v, w))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Finish);
        if let Some(w) = self.wire.take() {
            drop(w); // stops and joins the peer
        }
        if let Some(v) = self.vcpu.take() {
            let _ = v.join();
        }
    }
}

/// One server connection with its memory and, if used, its remap IRQ.
pub(crate) struct Side {
    pub conn: Arc<Mutex<Client>>,
    pub ram: Arc<GuestRam>,
    pub remap: Option<RemapConn>,
    pub remap_side: RemapSide,
}

impl Side {
    pub(crate) fn connect(
        path: &std::path::Path,
        memory: u64,
        what: &'static str,
        remap: Option<AckPolicy>,
        shared: &Arc<Shared>,
        t0: Instant,
    ) -> Result<Side> {
        let mut c =
            Client::connect(path).map_err(|e| format!("connecting to the {what} at {}: {e}", path.display()))?;
        proto::negotiate(&mut c)?;
        let flags = proto::migration_flags(&mut c)?;
        let need = proto::MIGRATION_STOP_COPY | proto::MIGRATION_PRE_COPY;
        if flags & need != need {
            return Err(format!("the {what} offers migration flags {flags:#x}, need STOP_COPY | PRE_COPY"));
        }
        let st = proto::get_state(&mut c)?;
        if st != state::RUNNING {
            return Err(format!("the {what}'s device is in {}, not RUNNING", state::name(st)));
        }
        let ram = Arc::new(GuestRam::new(memory));
        proto::dma_map_fd(&mut c, 0, memory, ram.as_fd())?;
        let conn = Arc::new(Mutex::new(c));
        let (remap, remap_side) = match remap {
            None => (None, RemapSide { note: "--remap off".into(), ..Default::default() }),
            Some(policy) => match remap::attach(what, &conn, policy, shared.clone(), t0)? {
                Ok(r) => {
                    let side = RemapSide { irq: Some(r.info), enabled: true, note: String::new() };
                    (Some(r), side)
                }
                Err(note) => (None, RemapSide { note, ..Default::default() }),
            },
        };
        Ok(Side { conn, ram, remap, remap_side })
    }

    pub(crate) fn bus(&self, shared: &Arc<Shared>) -> VmmBus {
        VmmBus {
            conn: self.conn.clone(),
            ram: self.ram.clone(),
            fast: self.remap.as_ref().map(|r| r.maps.clone()),
            shared: shared.clone(),
        }
    }

    /// Stops the remap handler; returns what it saw.
    fn remap_signals(&mut self) -> Vec<Signal> {
        match &mut self.remap {
            Some(r) => {
                r.handler.stop();
                r.handler.signals()
            }
            None => Vec::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        f(&mut self.conn.lock().unwrap())
    }

    fn eventfds(&self) -> Result<Vec<OwnedFd>> {
        let n = self.with(proto::msix_count)?;
        let efds: Vec<OwnedFd> = (0..n).map(|_| eventfd()).collect();
        self.with(|c| proto::set_msix_eventfds(c, &efds))?;
        Ok(efds)
    }
}

fn signals(efds: &[OwnedFd]) -> u64 {
    efds.iter().map(eventfd_take).sum()
}

/// "Boots" the guest: stamps every page outside the driver's area, so memory is not trivially zero.
fn boot(ram: &GuestRam) -> Result<()> {
    let chunk = 256 * PAGE;
    let mut buf = vec![0u8; chunk as usize];
    let mut at = vcpu::WORKLOAD;
    while at < ram.size() {
        let len = (ram.size() - at).min(chunk);
        for p in 0..len / PAGE {
            let o = (p * PAGE) as usize;
            buf[o..o + 8].copy_from_slice(b"vfuGUEST");
            buf[o + 8..o + 16].copy_from_slice(&(at / PAGE + p).to_le_bytes());
        }
        ram.write(at, &buf[..len as usize]).map_err(|e| format!("booting the guest: {e}"))?;
        at += len;
    }
    Ok(())
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs the whole migration with the wire peer bound to `cfg.wire`.
pub fn run(cfg: &Config) -> Result<Report> {
    let sock = UdpSocket::bind(cfg.wire).map_err(|e| format!("binding the wire peer to {}: {e}", cfg.wire))?;
    run_with_socket(cfg, sock)
}

/// [`run`] with the wire peer's socket already bound (tests bind port 0 first, then start the servers).
pub fn run_with_socket(cfg: &Config, sock: UdpSocket) -> Result<Report> {
    if cfg.memory < vcpu::MIN_MEMORY || !cfg.memory.is_multiple_of(PAGE) {
        return Err(format!("guest memory must be whole pages and at least {} MiB", vcpu::MIN_MEMORY >> 20));
    }
    if cfg.iterations == 0 {
        return Err("at least one pre-copy iteration".into());
    }
    let t0 = Instant::now();
    let at = |t: Instant| ms(t.duration_since(t0));
    let shared = Arc::new(Shared::new());

    // Both VMs' memory and connections, and the remap IRQ on each (its handler maps the fast path whenever the
    // server offers it). The destination's memory is mapped now; its device waits in RUNNING (idle) until it is
    // put in RESUMING.
    let remap = cfg.remap.then_some(cfg.remap_ack);
    let mut src = Side::connect(&cfg.source, cfg.memory, "source", remap, &shared, t0)?;
    let mut dst = Side::connect(&cfg.destination, cfg.memory, "destination", remap, &shared, t0)?;
    let src_irqs = src.eventfds()?;
    boot(&src.ram)?;
    let state_changes: Mutex<Vec<StateChange>> = Mutex::new(Vec::new());
    let set_state = |side: &Side, who: &'static str, s: u32| -> Result<()> {
        side.with(|c| proto::set_state(c, s))?;
        state_changes.lock().unwrap().push(StateChange {
            side: who,
            state: state::name(s),
            reply_ms: at(Instant::now()),
        });
        Ok(())
    };

    // The driver brings the VF up on the source.
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

    let mut phases: Vec<Phase> = Vec::new();
    let mut phase_start = Instant::now();
    let mut irqs = [0u64; PHASES.len()];
    let end_phase = |phases: &mut Vec<Phase>, start: &mut Instant, irqs: &[u64; 4], next: usize| {
        let p = shared.phase.load(Ordering::SeqCst);
        let now = Instant::now();
        phases.push(Phase {
            name: PHASES[p],
            start_ms: at(*start),
            end_ms: at(now),
            rx_sent: shared.get(p, C_RX_SENT),
            rx_harvested: shared.get(p, C_RX_HARVESTED),
            tx_posted: shared.get(p, C_TX_SENT),
            tx_completed: shared.get(p, C_TX_DONE),
            tx_arrived: shared.get(p, C_TX_ARRIVED),
            interrupts: irqs[p],
            doorbells_mapped: shared.get(p, C_DB_MAPPED),
            doorbells_trapped: shared.get(p, C_DB_TRAPPED),
        });
        *start = now;
        shared.phase.store(next, Ordering::SeqCst);
    };

    // Phase 1: traffic on the source.
    let traffic = cfg.frames > 0 && cfg.rate > 0;
    shared.traffic.store(traffic, Ordering::SeqCst);
    let quarter = cfg.frames.div_ceil(4);
    if traffic {
        if !wait_until(Duration::from_secs(30), || wire.sent() >= quarter) {
            return Err("the wire peer did not get its first frames out".into());
        }
    } else {
        std::thread::sleep(Duration::from_millis(50));
    }
    irqs[P_SOURCE] = signals(&src_irqs);
    end_phase(&mut phases, &mut phase_start, &irqs, P_PRECOPY);

    // Phase 2: pre-copy. Dirty logging on, the device saving, the compat record to the destination first.
    let page_size = src.with(|c| proto::logging_start(c, PAGE, &[(0, cfg.memory)]))?;
    if page_size != PAGE {
        return Err(format!("DMA logging chose {page_size}-byte pages, asked for {PAGE}"));
    }
    set_state(&src, "source", state::PRE_COPY)?;
    let compat = src.with(proto::data_read_all)?;
    set_state(&dst, "destination", state::RESUMING)?;
    dst.with(|c| proto::data_write_all(c, &compat))
        .map_err(|e| format!("the destination refused the source's compat record (its log says why): {e}"))?;

    let mut iterations = Vec::new();
    let mut skipped_device: BTreeSet<u64> = BTreeSet::new();
    let copy_pass = |index: u32, kind: &'static str, skipped_device: &mut BTreeSet<u64>| -> Result<Iteration> {
        let start = Instant::now();
        let device = src.with(|c| proto::logging_report(c, 0, cfg.memory, PAGE))?;
        let guest = src.ram.take_dirty();
        let report_ms = ms(start.elapsed());
        let t = Instant::now();
        let mut union: BTreeSet<u64> = guest.iter().copied().collect();
        let mut skipped = 0;
        for &p in &device {
            if cfg.skip_dirty && index > 0 {
                if !union.contains(&p) {
                    skipped += 1;
                    skipped_device.insert(p);
                }
            } else {
                union.insert(p);
            }
        }
        let dirty: BTreeSet<u64> = device.iter().chain(&guest).copied().collect();
        let copied = if index == 0 {
            mem::copy_all(&src.ram, &dst.ram)
        } else {
            mem::copy_pages(&src.ram, &dst.ram, &union.into_iter().collect::<Vec<_>>())
        }
        .map_err(|e| format!("copying memory: {e}"))?;
        Ok(Iteration {
            index,
            kind,
            start_ms: at(start),
            device_dirty: device.len() as u64,
            guest_dirty: guest.len() as u64,
            dirty: dirty.len() as u64,
            skipped_device: skipped,
            copied_pages: copied.pages,
            bytes: copied.bytes,
            zero_skipped: copied.zero_skipped,
            report_ms,
            copy_ms: ms(t.elapsed()),
            duration_ms: ms(start.elapsed()),
        })
    };
    for i in 0..cfg.iterations {
        let start = Instant::now();
        let it = copy_pass(i, "pre-copy", &mut skipped_device)?;
        let small = i > 0 && it.dirty <= cfg.converge_pages;
        iterations.push(it);
        if small {
            break;
        }
        if let Some(rest) = Duration::from_millis(cfg.iteration_ms).checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    irqs[P_PRECOPY] = signals(&src_irqs);
    end_phase(&mut phases, &mut phase_start, &irqs, P_SWITCHOVER);

    // Phase 3: switchover. The network holds its frames; the guest harvests what was sent to the source.
    let mut sw = Switchover { compat_bytes: compat.len(), ..Default::default() };
    wire.hold();
    let q = Instant::now();
    let src_drops = || wire::udp_drops(cfg.source_backend.port()).unwrap_or(0);
    wait_until(Duration::from_secs(2), || shared.total(C_RX_HARVESTED) + src_drops() >= wire.sent());
    let stats_source = running.stats()?;
    sw.quiesce_ms = ms(q.elapsed());
    // Stop the vCPU, then the device.
    running.stop_vcpu()?;
    let vcpu_stopped = Instant::now();
    let t_stop_copy = Instant::now();
    set_state(&src, "source", state::STOP_COPY)?;
    sw.stop_copy_ms = ms(t_stop_copy.elapsed());
    let final_it = copy_pass(iterations.len() as u32, "stop-copy", &mut skipped_device)?;
    sw.final_copy_ms = final_it.duration_ms;
    iterations.push(final_it);
    // The check: byte for byte, before the destination runs.
    let t = Instant::now();
    let lost = mem::diff_pages(&src.ram, &dst.ram).map_err(|e| format!("comparing memory: {e}"))?;
    let compare = t.elapsed();
    sw.compare_ms = ms(compare);
    let t = Instant::now();
    let record = src.with(proto::data_read_all)?;
    sw.state_bytes = record.len();
    dst.with(|c| proto::data_write_all(c, &record))
        .map_err(|e| format!("the destination refused the state record: {e}"))?;
    sw.state_transfer_ms = ms(t.elapsed());
    let t = Instant::now();
    set_state(&dst, "destination", state::STOP)
        .map_err(|e| format!("the destination could not load the state (see its log): {e}"))?;
    sw.destination_load_ms = ms(t.elapsed());
    // The network now delivers to the destination: the held frames reach a device that is still stopped.
    sw.held_frames = wire.switch_to(cfg.destination_backend);
    let t = Instant::now();
    let dst_irqs = dst.eventfds()?;
    set_state(&dst, "destination", state::RUNNING)?;
    let running_at = Instant::now();
    sw.destination_run_ms = ms(t.elapsed());
    sw.downtime_ms = ms(running_at.duration_since(t_stop_copy).saturating_sub(compare));
    irqs[P_SWITCHOVER] = signals(&src_irqs);
    end_phase(&mut phases, &mut phase_start, &irqs, P_DESTINATION);
    running.order(Cmd::Resume(Some(dst.bus(&shared))))?;
    sw.vcpu_paused_ms = ms(vcpu_stopped.elapsed().saturating_sub(compare));
    // The source's saving session ends; its device stays stopped.
    src.with(proto::logging_stop)?;
    set_state(&src, "source", state::STOP)?;

    // Phase 4: traffic on the destination, then everything settles.
    if traffic {
        let base = wire.sent();
        let ok = wait_until(Duration::from_secs(60), || {
            let sent = wire.sent();
            sent >= cfg.frames && sent - base >= quarter
        });
        if !ok {
            return Err("the wire peer stalled on the destination".into());
        }
    } else {
        std::thread::sleep(Duration::from_millis(50));
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
        let rx_done = h >= wire.sent() || last.1.elapsed() > Duration::from_millis(200);
        tx_done && rx_done
    });
    let stats_destination = running.stats()?;
    irqs[P_DESTINATION] = signals(&dst_irqs);
    end_phase(&mut phases, &mut phase_start, &irqs, P_DESTINATION);
    let (mut vr, wr) = running.finish()?;
    let rstat = testkit::Bus::read32(&mut vr.driver.bus, device::nic::regs::VFGEN_RSTAT);

    let kernel_drops =
        [cfg.source_backend, cfg.destination_backend].iter().filter_map(|a| wire::udp_drops(a.port())).sum::<u64>();
    let events = std::mem::take(&mut vr.driver.unsolicited);
    let verification = verify(Verify {
        cfg,
        lost: &lost,
        skipped_device: &skipped_device,
        vcpu: &vr,
        wire: &wr,
        stats_source,
        stats_destination,
        kernel_drops,
        wire_drops: wire::udp_drops(cfg.wire.port()).unwrap_or(0),
        rstat,
        interrupts_destination: irqs[P_DESTINATION],
        events,
    });
    let mut verification = verification;
    let mut signals = src.remap_signals();
    signals.extend(dst.remap_signals());
    signals.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    for (s, side) in signals.iter().map(|s| (s, if s.side == "source" { &src.remap_side } else { &dst.remap_side })) {
        let allowed = side.irq.map_or(0, |i| i.regions);
        if s.value & !allowed != 0 {
            verification.failures.push(format!("remap IRQ: signal {:#x} names regions outside {allowed:#x}", s.value));
        }
        if let Some(e) = &s.error {
            verification.failures.push(format!("remap IRQ: handling signal {:#x} at {} ms: {e}", s.value, s.at_ms));
        }
    }
    let remap = RemapReport {
        source: src.remap_side.clone(),
        destination: dst.remap_side.clone(),
        acks: signals.iter().filter(|s| s.acked_ms.is_some()).count() as u64,
        signals,
        state_changes: state_changes.into_inner().unwrap(),
    };
    let passed = verification.failures.is_empty();
    Ok(Report {
        config: cfg.clone(),
        mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        page_size,
        phases,
        iterations,
        switchover: sw,
        remap,
        verification,
        total_ms: ms(t0.elapsed()),
        passed,
    })
}

struct Verify<'a> {
    cfg: &'a Config,
    lost: &'a [u64],
    skipped_device: &'a BTreeSet<u64>,
    vcpu: &'a VcpuResult,
    wire: &'a WireResult,
    stats_source: EthStats,
    stats_destination: EthStats,
    kernel_drops: u64,
    wire_drops: u64,
    rstat: u32,
    interrupts_destination: u64,
    events: Vec<device::nic::adminq::ArqMsg>,
}

fn verify(x: Verify<'_>) -> Verification {
    let mut v = Verification {
        stats_source: x.stats_source,
        stats_destination: x.stats_destination,
        interrupts_destination: x.interrupts_destination,
        ..Default::default()
    };
    let traffic = x.cfg.frames > 0 && x.cfg.rate > 0;
    let mut failures = Vec::new();

    // Memory.
    v.lost_pages = x.lost.len() as u64;
    v.memory_equal = x.lost.is_empty();
    v.lost_page_addrs = x.lost.iter().take(32).map(|p| format!("{:#x}", p * PAGE)).collect();
    v.lost_unexplained = x.lost.iter().filter(|p| !x.skipped_device.contains(p)).count() as u64;
    if !v.memory_equal {
        failures.push(format!(
            "memory differs at switchover: {} lost pages ({} not explained by --skip-dirty), first at {}",
            v.lost_pages,
            v.lost_unexplained,
            v.lost_page_addrs.first().cloned().unwrap_or_default()
        ));
    }

    // RX: every frame sent is harvested exactly once, or counted as dropped by a device whose counters the guest
    // reads after the migration (or dropped by the kernel before it reached one).
    v.rx_sent = x.wire.sent;
    let mut seen: HashMap<u32, u32> = HashMap::new();
    let mut per_queue = vec![0u64; vcpu::PAIRS as usize];
    for &Harvested { seq, queue, phase } in &x.vcpu.rx {
        if seq >= x.wire.generated {
            v.rx_foreign += 1;
            continue;
        }
        *seen.entry(seq).or_default() += 1;
        if usize::from(phase) == P_DESTINATION {
            v.rx_harvested_destination += 1;
            per_queue[queue as usize] += 1;
        } else {
            v.rx_harvested_source += 1;
        }
    }
    v.rx_foreign += x.vcpu.rx_foreign;
    v.rx_harvested = seen.len() as u64;
    v.rx_duplicates = seen.values().map(|&n| u64::from(n - 1)).sum();
    v.rx_missing = v.rx_sent - v.rx_harvested;
    v.rx_discards = x.stats_destination.rx_discards;
    v.rx_kernel_drops = x.kernel_drops;
    v.rx_send_errors = x.wire.send_errors;
    v.rx_per_queue_destination = per_queue;
    if v.rx_duplicates > 0 {
        failures.push(format!("{} RX frames were harvested twice", v.rx_duplicates));
    }
    if v.rx_foreign > 0 {
        failures.push(format!("{} RX buffers held no frame that was sent", v.rx_foreign));
    }
    if v.rx_missing != v.rx_discards + v.rx_kernel_drops {
        failures.push(format!(
            "RX: {} frames sent, {} harvested, {} missing, but the destination counts {} rx_discards (and the \
                 kernel dropped {} at the backends)",
            v.rx_sent, v.rx_harvested, v.rx_missing, v.rx_discards, v.rx_kernel_drops
        ));
    }

    // TX: every frame posted completes and arrives once, from the server that was running when it was posted.
    v.tx_posted = u64::from(x.vcpu.tx_posted);
    v.tx_completed = x.vcpu.tx_completed;
    let boundary = x.vcpu.tx_first_on_destination.unwrap_or(u32::MAX);
    let mut tx_seen: HashMap<u32, u32> = HashMap::new();
    for a in &x.wire.arrivals {
        if a.seq >= x.vcpu.tx_posted {
            v.tx_wrong_server += 1;
            continue;
        }
        *tx_seen.entry(a.seq).or_default() += 1;
        let want = if a.seq < boundary { x.cfg.source_backend } else { x.cfg.destination_backend };
        if a.from != want {
            v.tx_wrong_server += 1;
        } else if a.seq >= boundary {
            v.tx_after_switchover += 1;
        }
    }
    v.tx_arrived = tx_seen.len() as u64;
    v.tx_duplicates = tx_seen.values().map(|&n| u64::from(n - 1)).sum();
    v.tx_missing = v.tx_posted - v.tx_arrived;
    v.tx_kernel_drops = x.wire_drops;
    v.tx_per_queue_destination = x.vcpu.tx_done_after.to_vec();
    if v.tx_completed != v.tx_posted {
        failures.push(format!("TX: {} frames posted, {} completed", v.tx_posted, v.tx_completed));
    }
    if v.tx_missing != v.tx_kernel_drops || v.tx_duplicates > 0 || v.tx_wrong_server > 0 {
        failures.push(format!(
            "TX: {} posted, {} arrived ({} missing, {} dropped by the kernel at the wire peer; {} twice, {} from \
             the wrong server)",
            v.tx_posted, v.tx_arrived, v.tx_missing, v.tx_kernel_drops, v.tx_duplicates, v.tx_wrong_server
        ));
    }

    // The destination carries on: traffic on both queue pairs, its own interrupts, no reset.
    if traffic {
        if v.tx_after_switchover == 0 {
            failures.push("TX: no frame transmitted after the switchover arrived".into());
        }
        if v.rx_per_queue_destination.contains(&0) || v.tx_per_queue_destination.contains(&0) {
            failures.push(format!(
                "queues after the switchover: RX per queue {:?}, TX completions per queue {:?}: a queue is idle",
                v.rx_per_queue_destination, v.tx_per_queue_destination
            ));
        }
        if v.interrupts_destination == 0 {
            failures.push("no interrupt on the destination's eventfds".into());
        }
    }
    v.vf_active = x.rstat & 3 == 2;
    if !v.vf_active {
        failures.push(format!("VFGEN_RSTAT reads {:#x} on the destination, not VFACTIVE", x.rstat));
    }
    for e in &x.events {
        let code = e.payload.get(..4).map(|b| i32::from_le_bytes(b.try_into().unwrap()));
        let link_down = code == Some(1) && e.payload.get(8) == Some(&0);
        if e.op == device::nic::virtchnl::OP_EVENT && (code == Some(2) || link_down) {
            failures.push(format!("the driver got event {code:?} (payload {:?}) after the migration", e.payload));
        }
    }

    // Statistics continue from the source's and account for every frame.
    let (s, d) = (x.stats_source, x.stats_destination);
    for ((name, a), (_, b)) in s.fields().iter().zip(d.fields()) {
        if b < *a {
            failures.push(format!("GET_STATS {name} went back from {a} on the source to {b} on the destination"));
        }
    }
    if d.rx_unicast != v.rx_harvested + v.rx_duplicates {
        failures.push(format!("GET_STATS rx_unicast {} but {} frames were harvested", d.rx_unicast, v.rx_harvested));
    }
    if d.tx_unicast != v.tx_completed {
        failures.push(format!("GET_STATS tx_unicast {} but {} frames completed", d.tx_unicast, v.tx_completed));
    }
    v.failures = failures;
    v
}

impl Report {
    /// The human-readable timeline.
    pub fn timeline(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let _ = writeln!(
            o,
            "vfu-refvmm: {} MiB guest memory, VF {} with {} queue pairs; {}{}",
            c.memory >> 20,
            self.mac,
            vcpu::PAIRS,
            if c.frames > 0 && c.rate > 0 {
                format!("at least {} frames each way at {}/s", c.frames, c.rate)
            } else {
                "no traffic".to_string()
            },
            if c.skip_dirty { "; --skip-dirty (negative control)" } else { "" }
        );
        let _ = writeln!(
            o,
            "\nphase            ms from  ms to   rx sent  rx harvested  tx posted  tx done  tx arrived  irqs  \
             db mapped  db msgs"
        );
        for p in &self.phases {
            let _ = writeln!(
                o,
                "{:<14} {:>8.1} {:>7.1} {:>8} {:>13} {:>10} {:>8} {:>11} {:>5} {:>10} {:>8}",
                p.name,
                p.start_ms,
                p.end_ms,
                p.rx_sent,
                p.rx_harvested,
                p.tx_posted,
                p.tx_completed,
                p.tx_arrived,
                p.interrupts,
                p.doorbells_mapped,
                p.doorbells_trapped
            );
        }
        self.remap_timeline(&mut o);
        let _ = writeln!(
            o,
            "\niteration  kind        device-dirty  guest-dirty  dirty  skipped  copied pages      bytes  zero pages      ms"
        );
        for i in &self.iterations {
            let _ = writeln!(
                o,
                "{:>9}  {:<10} {:>13} {:>12} {:>6} {:>8} {:>13} {:>10} {:>11} {:>7.2}",
                i.index,
                i.kind,
                i.device_dirty,
                i.guest_dirty,
                i.dirty,
                i.skipped_device,
                i.copied_pages,
                i.bytes,
                i.zero_skipped,
                i.duration_ms
            );
        }
        let s = &self.switchover;
        let _ = writeln!(
            o,
            "\nswitchover: quiesce {:.1} ms (VM running); STOP_COPY {:.2} ms, final copy {:.2} ms, state record {} bytes \
             ({:.2} ms), destination load {:.2} ms, SET_IRQS + RUNNING {:.2} ms",
            s.quiesce_ms,
            s.stop_copy_ms,
            s.final_copy_ms,
            s.state_bytes,
            s.state_transfer_ms,
            s.destination_load_ms,
            s.destination_run_ms
        );
        let _ = writeln!(
            o,
            "downtime {:.2} ms (STOP_COPY request to destination RUNNING reply; the {:.2} ms memory comparison \
             excluded); vCPU paused {:.2} ms; compat record {} bytes; {} held frames sent to the stopped destination",
            s.downtime_ms, s.compare_ms, s.vcpu_paused_ms, s.compat_bytes, s.held_frames
        );
        let v = &self.verification;
        let _ = writeln!(
            o,
            "\nmemory: {}",
            if v.memory_equal {
                "destination equals source byte for byte at switchover".to_string()
            } else {
                let first: Vec<&str> = v.lost_page_addrs.iter().take(8).map(String::as_str).collect();
                format!("{} pages differ at switchover (first: {} ...)", v.lost_pages, first.join(" "))
            }
        );
        let _ = writeln!(
            o,
            "RX: {} sent, {} harvested ({} on the source, {} on the destination, per queue {:?}), {} duplicates, {} \
             foreign; {} missing = {} rx_discards + {} kernel drops",
            v.rx_sent,
            v.rx_harvested,
            v.rx_harvested_source,
            v.rx_harvested_destination,
            v.rx_per_queue_destination,
            v.rx_duplicates,
            v.rx_foreign,
            v.rx_missing,
            v.rx_discards,
            v.rx_kernel_drops
        );
        let _ = writeln!(
            o,
            "TX: {} posted, {} completed, {} arrived ({} after the switchover, completions per queue there {:?}), {} \
             missing, {} duplicates, {} from the wrong server",
            v.tx_posted,
            v.tx_completed,
            v.tx_arrived,
            v.tx_after_switchover,
            v.tx_per_queue_destination,
            v.tx_missing,
            v.tx_duplicates,
            v.tx_wrong_server
        );
        let _ = writeln!(
            o,
            "GET_STATS source -> destination: rx_unicast {} -> {}, rx_discards {} -> {}, tx_unicast {} -> {}; VF \
             active: {}; destination interrupts: {}",
            v.stats_source.rx_unicast,
            v.stats_destination.rx_unicast,
            v.stats_source.rx_discards,
            v.stats_destination.rx_discards,
            v.stats_source.tx_unicast,
            v.stats_destination.tx_unicast,
            v.vf_active,
            v.interrupts_destination
        );
        if self.passed {
            let _ = writeln!(o, "\nPASS ({:.0} ms)", self.total_ms);
        } else {
            let _ = writeln!(o, "\nFAIL:");
            for f in &v.failures {
                let _ = writeln!(o, "  - {f}");
            }
        }
        o
    }

    /// The remap IRQ's part of the timeline: how each server's IRQ was used, every signal, the state changes.
    fn remap_timeline(&self, o: &mut String) {
        let r = &self.remap;
        let side = |s: &RemapSide| match (&s.irq, s.enabled) {
            (Some(i), true) => format!("index {}, regions {:#x}, enabled", i.index, i.regions),
            _ => s.note.clone(),
        };
        let _ = writeln!(
            o,
            "\nremap IRQ (--remap {}, --remap-ack {}): source {}; destination {}",
            if self.config.remap { "on" } else { "off" },
            self.config.remap_ack,
            side(&r.source),
            side(&r.destination)
        );
        if r.signals.is_empty() {
            return;
        }
        let _ = writeln!(o, "signal  side          value  read ms  phase        kind     BAR0 areas after  acked ms");
        for (i, s) in r.signals.iter().enumerate() {
            let areas = s.outcome.regions.iter().find(|c| c.region == crate::BAR0).map(|c| c.areas.len());
            let _ = writeln!(
                o,
                "{:>6}  {:<12} {:>6} {:>8.1}  {:<12} {:<8} {:>16}  {}",
                i,
                s.side,
                format!("{:#x}", s.value),
                s.at_ms,
                s.phase,
                s.outcome.kind,
                areas.map_or("-".to_string(), |n| n.to_string()),
                match (s.acked_ms, &s.error) {
                    (_, Some(e)) => format!("error: {e}"),
                    (Some(a), None) => format!("{a:.1}"),
                    (None, None) => "not acknowledged".into(),
                }
            );
        }
        let changes: Vec<String> =
            r.state_changes.iter().map(|c| format!("{} {} {:.1}", c.side, c.state, c.reply_ms)).collect();
        let _ = writeln!(o, "MIG_DEVICE_STATE replies (ms): {}", changes.join(", "));
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }
}
