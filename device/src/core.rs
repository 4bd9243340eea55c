//! The live device: its state under one lock ([`Dev`]), the resources it uses beside it (guest memory, the
//! client's eventfds, the packet sink, the doorbell pages), and the small synchronisation pieces the register front
//! and the workers share ([`Core`]). The lock is held only for register-sized critical sections, never across a
//! guest-memory access.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::cfg::{Doorbells, VfConfig};
use crate::engine::derive::Observed;
use crate::event::Event;
use crate::fault::Faults;
use crate::mem::doorbell::DoorbellPages;
use crate::mem::{GuestMem, MemError};
use crate::net::{FrameSink, NoSink};
use crate::nic::regs::*;
use crate::nic::virtchnl::Pf;
use crate::pci::{self, Interrupts, PciConfig};
use crate::remap::Remap;
use crate::state::{Counters, DeviceState, Identity, NicState, QueueState, ResetPhase, StateError, VectorState};

/// Frames from the wire an [`RxPort`](crate::RxPort) may have queued for the datapath worker; more are dropped.
pub const RX_IN_FLIGHT: usize = 4096;

/// The device state and the resources that must change with it, behind [`Core::lock`].
pub(crate) struct Dev {
    pub config: PciConfig,
    /// MSI-X table and PBA (state) with the client's eventfds (resources).
    pub irq: Interrupts,
    pub nic: NicState,
    /// Frames waiting for RX buffers, per queue, each with the RSS hash it was steered by: a NIC's internal FIFO,
    /// not saved (counted as dropped on save).
    pub rx_backlog: Vec<VecDeque<(Vec<u8>, Option<u32>)>>,
    /// Where transmitted frames go.
    pub sink: Arc<dyn FrameSink>,
    /// The only storage of the registers in BAR0's doorbell pages (a memfd the client may map).
    pub doorbells: Arc<DoorbellPages>,
    /// The remap IRQ's handshake: whether the doorbell pages are offered, and may be mapped.
    pub remap: Remap,
    /// Bumped by every reset and load, so work started before does not write back after.
    pub generation: u64,
    /// `--dirty-log descriptors`: the tails the engines last acted on.
    pub observed: Observed,
    /// What started the reset under way ("vf", "pf", "flr", "device"), for its Reset "done" event; not state.
    pub reset_kind: Option<&'static str>,
    /// The faults (irq-drop hooks [`Dev::raise`]; link-down holds the link down across resets).
    faults: Arc<Faults>,
    events: Arc<crate::event::Events>,
    arq_max: usize,
}

fn power_on_nic(cfg: &VfConfig) -> NicState {
    let n = cfg.msix_vectors();
    let mut pf = Pf::new(cfg.mac, cfg.queue_pairs, n, cfg.link_speed);
    if cfg.faults.link_down() {
        pf.link_up = false; // link-down: the PF reports the link down from the start
    }
    NicState {
        regs: RegFile::power_on(),
        pf,
        vectors: vec![VectorState::default(); n as usize],
        arq: VecDeque::new(),
        queues: vec![QueueState::default(); cfg.queue_pairs as usize],
        counters: Counters::default(),
        reset: ResetPhase::Idle,
        held_writes: Vec::new(),
        held_flr: false,
    }
}

impl Dev {
    pub fn power_on(cfg: &VfConfig) -> Self {
        let n = cfg.msix_vectors();
        let doorbells = Arc::new(DoorbellPages::new().expect("creating the doorbell pages' memfd"));
        let regions = if cfg.doorbells == Doorbells::Trap { 0 } else { 1 };
        Dev {
            config: pci::vf_config(n),
            irq: Interrupts::new(n as usize),
            nic: power_on_nic(cfg),
            rx_backlog: vec![VecDeque::new(); cfg.queue_pairs as usize],
            sink: Arc::new(NoSink),
            doorbells,
            remap: Remap::new(regions, cfg.doorbells == Doorbells::Mmap),
            generation: 0,
            observed: Observed::default(),
            reset_kind: None,
            faults: cfg.faults.clone(),
            events: cfg.events.clone(),
            arq_max: cfg.max_arq_queued.max(1),
        }
    }

    /// DEVICE_RESET / FLR: back to power-on, keeping the client's eventfds, the sink, the counters a reset does not
    /// clear, and the negotiated virtchnl version.
    pub fn reset(&mut self, cfg: &VfConfig) {
        let version = self.nic.pf.version;
        let counters = self.nic.counters;
        self.config = pci::vf_config(cfg.msix_vectors());
        self.irq.reset();
        self.nic = power_on_nic(cfg);
        self.nic.pf.version = version;
        self.nic.counters = counters;
        self.rx_backlog.iter_mut().for_each(VecDeque::clear);
        self.doorbells.clear();
        self.observed = Observed::default();
        self.generation += 1;
    }

    /// After an FLR or DEVICE_RESET ([`Dev::reset`], which is instant): reports the reset (`kind` "flr" or
    /// "device") and, for an FLR while reset-stuck or reset-slow is set, holds RSTAT at INPROGRESS for the admin
    /// queue worker to finish like a VF reset. A DEVICE_RESET (a new client, a VMM's reset) is a power-on and is
    /// never held: the guest could not even probe the VF. True when the worker must be poked
    /// (see [`Core::poke_aq`]).
    pub fn reset_done_or_held(&mut self, kind: &'static str) -> bool {
        self.events.emit(Event::Reset { kind: kind.into(), phase: "start".into() });
        if kind == "flr" && (self.faults.is_set("reset-stuck") || self.faults.is_set("reset-slow")) {
            log::info!("{kind} reset: held in progress by a reset fault");
            self.nic.regs.set(VFGEN_RSTAT, RSTAT_INPROGRESS);
            self.nic.reset = ResetPhase::InProgress;
            self.reset_kind = Some(kind);
            return true;
        }
        self.reset_kind = None;
        self.events.emit(Event::Reset { kind: kind.into(), phase: "done".into() });
        false
    }

    /// A reset starts (RESET_VF from the driver, "vf", or the PF's own, "pf"): its Reset "start" event.
    pub fn reset_started(&mut self, kind: &'static str) {
        self.reset_kind = Some(kind);
        self.events.emit(Event::Reset { kind: kind.into(), phase: "start".into() });
    }

    /// The reset under way finished (RSTAT reads VFACTIVE): its Reset "done" event.
    pub fn reset_finished(&mut self) {
        let kind = self.reset_kind.take().unwrap_or("vf");
        self.events.emit(Event::Reset { kind: kind.into(), phase: "done".into() });
    }

    /// VF reset (RESET_VF or PF-initiated): registers, admin queue, queues, filters, IRQ map and RSS are
    /// forgotten; config space, MSI-X table, the virtchnl version and the link stay. RSTAT reads INPROGRESS
    /// afterwards; the admin queue worker moves it on.
    pub fn vf_reset(&mut self) {
        self.generation += 1;
        self.clear_registers();
        self.nic.regs.set(VFGEN_RSTAT, RSTAT_INPROGRESS);
        self.nic.reset = ResetPhase::InProgress;
        self.nic.vectors.fill(VectorState::default());
        self.nic.pf.reset();
        self.nic.arq.clear();
        for q in &mut self.nic.queues {
            (q.tx_head, q.rx_head) = (0, 0);
        }
        self.rx_backlog.iter_mut().for_each(VecDeque::clear);
    }

    /// BAR0's registers (the doorbell pages too) back to their power-on values, and the tails the engines saw
    /// with them.
    pub fn clear_registers(&mut self) {
        self.nic.regs = RegFile::power_on();
        self.doorbells.clear();
        self.observed = Observed::default();
    }

    /// Queues a PF -> VF message for the ARQ. A driver that stopped returning ARQ buffers loses the oldest.
    pub fn post(&mut self, op: u32, status: i32, payload: Vec<u8>) {
        if self.nic.arq.len() >= self.arq_max {
            let lost = self.nic.arq.pop_front();
            self.nic.counters.arq_dropped += 1;
            log::warn!("ARQ backlog full: dropped PF message op {:?}", lost.map(|m| m.op));
        }
        self.nic.arq.push_back(crate::nic::adminq::ArqMsg { op, status, payload });
    }

    /// Raises vector `v`: fires now if enabled (then auto-masks), otherwise remembers it.
    pub fn raise(&mut self, v: usize) {
        let Some(vs) = self.nic.vectors.get_mut(v) else { return };
        if vs.intena {
            vs.intena = false;
            vs.pending = false;
            if self.faults.drop_irq() {
                // irq-drop: lost on the way, as a lost MSI is: not pending, and the vector stays auto-masked.
                log::debug!("irq-drop fault: MSI-X vector {v} not signalled");
                return;
            }
            self.irq.fire(v);
        } else {
            vs.pending = true;
        }
    }

    /// Raises every vector CONFIG_IRQ_MAP binds to RX (`rx`) or TX queue `q`.
    pub fn raise_queue(&mut self, q: u16, rx: bool) {
        for v in 0..self.nic.pf.irq_map.len() {
            let (rxq, txq) = self.nic.pf.irq_map[v];
            if (if rx { rxq } else { txq }) & (1 << q) != 0 {
                self.raise(v);
            }
        }
    }

    /// Raises an ICR0 cause on vector 0 if the cause is enabled.
    pub fn raise_misc(&mut self, cause: u32) {
        let icr = self.nic.regs.get(VFINT_ICR01) | cause;
        self.nic.regs.set(VFINT_ICR01, icr);
        if self.nic.regs.get(VFINT_ICR0_ENA1) & cause != 0 {
            self.raise(0);
        }
    }

    pub fn write_dyn_ctl(&mut self, v: usize, val: u32) {
        let Some(vs) = self.nic.vectors.get_mut(v) else { return };
        if val & DYN_CLEARPBA != 0 {
            vs.pending = false;
        }
        if val & DYN_INTENA_MSK == 0 {
            vs.intena = val & DYN_INTENA != 0;
        }
        if val & DYN_SWINT_TRIG != 0 {
            vs.pending = true;
            if v == 0 {
                let icr = self.nic.regs.get(VFINT_ICR01) | ICR0_SWINT;
                self.nic.regs.set(VFINT_ICR01, icr);
            }
        }
        let vs = self.nic.vectors[v];
        if vs.intena && vs.pending {
            self.raise(v);
        }
    }

    /// Bus Master Enable in the PCI command register: without it a PCI function may not touch memory, so no engine
    /// does (a driver that lets go of the VF clears it before the VMM unplugs the device).
    pub fn bus_master(&self) -> bool {
        self.config.u16(pci::config::CMD) & pci::config::CMD_BUS_MASTER != 0
    }

    /// The BAR0 register at `off`: from the doorbell pages or the register file.
    pub fn reg(&self, off: u64) -> u32 {
        if DoorbellPages::owns(off) {
            self.doorbells.get(off)
        } else {
            self.nic.regs.get(off)
        }
    }

    pub fn set_reg(&mut self, off: u64, v: u32) {
        if DoorbellPages::owns(off) {
            self.doorbells.set(off, v)
        } else {
            self.nic.regs.set(off, v)
        }
    }

    pub fn tx_tail(&self, q: u16) -> u32 {
        self.reg(QTX_TAIL1 + 4 * u64::from(q))
    }

    pub fn rx_tail(&self, q: u16) -> u32 {
        self.reg(QRX_TAIL1 + 4 * u64::from(q))
    }

    /// Whether the datapath worker must poll the doorbell pages: the client may have them mapped, and a store
    /// there could start work (a TX queue is enabled, or frames or PF messages wait for buffers).
    pub fn must_poll(&self) -> bool {
        self.remap.maybe_mapped() & 1 != 0
            && (self.nic.pf.tx_enabled != 0
                || self.rx_backlog.iter().any(|b| !b.is_empty())
                || (!self.nic.arq.is_empty() && self.reg(VF_ARQLEN1) & AQ_ENABLE != 0))
    }

    /// A new memfd behind the doorbell pages (same contents), so a departed client's mapping reaches nothing of
    /// the next client's. On failure the old one stays, and the fast path is refused.
    pub fn renew_doorbells(&mut self) -> bool {
        match DoorbellPages::new() {
            Ok(p) => {
                for off in DoorbellPages::offsets() {
                    p.set(off, self.doorbells.get(off));
                }
                self.doorbells = Arc::new(p);
                true
            }
            Err(e) => {
                log::error!("a new doorbell memfd for the next client: {e}; BAR0 stays trapped");
                false
            }
        }
    }

    /// The state as plain data. Doorbell-page tails go into the saved register file; frames still waiting for RX
    /// buffers are counted as dropped in the saved copy (they are not carried).
    pub fn save(&self, cfg: &VfConfig) -> DeviceState {
        let mut nic = self.nic.clone();
        for off in DoorbellPages::offsets().filter(|&o| is_register(o)) {
            nic.regs.set(off, self.doorbells.get(off));
        }
        let waiting: u64 = self.rx_backlog.iter().map(|b| b.len() as u64).sum();
        nic.counters.rx_dropped_paused += waiting;
        nic.pf.stats.rx_discards += waiting;
        DeviceState { identity: Identity::of(cfg), config: self.config.save(), msix: self.irq.save(), nic }
    }

    /// Replaces the state with `s` after checking it; the client's eventfds and the sink stay. Nothing is written
    /// to guest memory. On error nothing changed.
    pub fn load(&mut self, cfg: &VfConfig, s: &DeviceState) -> Result<(), StateError> {
        s.validate(cfg)?;
        let mut config = pci::vf_config(cfg.msix_vectors());
        config.load(&s.config).map_err(StateError::Invalid)?;
        self.irq.load(&s.msix).map_err(StateError::Invalid)?;
        self.config = config;
        self.nic = s.nic.clone();
        self.rx_backlog.iter_mut().for_each(VecDeque::clear);
        for off in DoorbellPages::offsets() {
            self.doorbells.set(off, self.nic.regs.get(off));
        }
        self.observed = Observed::default();
        self.generation += 1;
        Ok(())
    }
}

/// Per queue: a tail kick is queued for the datapath worker and not yet taken. A tail write sends a kick only when
/// it sets the flag; the worker clears it before it looks at the tail, so none is lost.
#[derive(Default)]
pub(crate) struct Kicks {
    pub tx: [AtomicBool; MAX_QUEUES as usize],
    pub rx: [AtomicBool; MAX_QUEUES as usize],
}

impl Kicks {
    /// Whether the caller must send the kick (no kick for this queue is waiting yet).
    pub fn arm(flags: &[AtomicBool], q: u16) -> bool {
        flags.get(q as usize).is_none_or(|f| !f.swap(true, Ordering::AcqRel))
    }

    /// The worker takes a kick: later tail writes queue a new one.
    pub fn take(flags: &[AtomicBool], q: u16) {
        if let Some(f) = flags.get(q as usize) {
            f.swap(false, Ordering::AcqRel);
        }
    }
}

/// Shared by every [`RxPort`](crate::RxPort) and the datapath worker: bounds the frames queued in the work channel
/// and turns frames away while the device is paused.
#[derive(Default)]
pub(crate) struct RxGate {
    /// Frames sent to the worker and not yet taken by it.
    pub in_flight: AtomicUsize,
    /// Frames dropped because [`RX_IN_FLIGHT`] were queued; the worker moves them into rx_discards.
    pub dropped: AtomicU64,
    /// Frames that arrived while the device was paused; moved into the counters at resume and on save.
    pub dropped_paused: AtomicU64,
    /// True while paused. A port sends under the read lock, so once pause holds the write lock every frame
    /// already sent is queued ahead of the worker's pause message.
    pub paused: RwLock<bool>,
}

/// Told when the last worker parks.
pub(crate) type PauseNotifier = Arc<dyn Fn() + Send + Sync>;

/// Workers park here while the device is paused.
#[derive(Default)]
pub(crate) struct PauseGate {
    m: Mutex<(bool, usize)>,
    cv: Condvar,
    notify: Mutex<Option<PauseNotifier>>,
}

impl PauseGate {
    /// Asks the workers to park; false when a pause was already requested.
    pub fn request(&self) -> bool {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut g.0, true)
    }

    pub fn requested(&self) -> bool {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Worker side: parks until released (returns at once if no pause is requested).
    pub fn park(&self) {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        if !g.0 {
            return;
        }
        g.1 += 1;
        self.cv.notify_all();
        if g.1 == crate::engine::worker::COUNT {
            if let Some(n) = self.notify.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                n();
            }
        }
        while g.0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.1 -= 1;
    }

    /// Waits until `n` workers are parked; false on timeout.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        while g.1 < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    pub fn set_notifier(&self, n: PauseNotifier) {
        *self.notify.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    pub fn parked(&self) -> usize {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    pub fn release(&self) {
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = false;
        self.cv.notify_all();
    }
}

/// Work for the admin queue worker.
pub(crate) enum AqWork {
    /// ATQT moved: process the transmit admin queue.
    Atq,
    /// ARQT moved: buffers were returned, deliver what is waiting.
    Arq,
    /// The PF resets the VF on its own (RESET_IMPENDING first).
    PfReset,
    /// The PF reports the link up or down (a LINK_CHANGE event if it changed); `cause` is for the log and events.
    SetLink { up: bool, cause: &'static str },
    /// A fault was set or cleared (or an FLR is held by a reset fault): apply link-down and link-flap now, and look
    /// at the reset phase again.
    FaultsChanged,
    /// Park until resumed.
    Pause,
    /// The device is being dropped. (Channel disconnection cannot signal it: reset handles keep senders.)
    Stop,
}

/// Work for the datapath worker.
pub(crate) enum DpWork {
    /// QTX_TAIL(q) moved.
    Tx(u16),
    /// QRX_TAIL(q) moved: buffers were posted.
    RxTail(u16),
    /// A frame from the wire.
    Rx(Vec<u8>),
    /// Look at the doorbell pages now, and start polling them if [`Dev::must_poll`].
    Poll,
    /// Park until resumed.
    Pause,
    Stop,
}

/// What the register front and the workers share.
pub(crate) struct Core {
    dev: Mutex<Dev>,
    pub mem: GuestMem,
    pub cfg: VfConfig,
    /// Tail kicks waiting for the datapath worker, one at most per queue and direction.
    pub kicks: Kicks,
    pub rx_gate: Arc<RxGate>,
    pub pause: PauseGate,
    /// The datapath worker's channel, set once the workers run (the admin queue engine kicks queues through it).
    pub dp: OnceLock<Sender<DpWork>>,
    /// The admin queue worker's channel, set once the workers run (the poller kicks ARQ delivery through it).
    pub aq: OnceLock<Sender<AqWork>>,
    /// The datapath worker is polling the doorbell pages.
    pub polling: AtomicBool,
    /// Tail writes that arrived as messages (see [`crate::Stats::trapped_doorbells`]).
    pub trapped_doorbells: AtomicU64,
    /// A dma-error fault failed an engine's guest-memory access and the error has not been reported yet.
    pub injected_dma: AtomicBool,
}

impl Core {
    pub fn new(cfg: VfConfig, mem: GuestMem) -> Self {
        Core {
            dev: Mutex::new(Dev::power_on(&cfg)),
            mem,
            cfg,
            kicks: Kicks::default(),
            rx_gate: Arc::default(),
            pause: PauseGate::default(),
            dp: OnceLock::new(),
            aq: OnceLock::new(),
            polling: AtomicBool::new(false),
            trapped_doorbells: AtomicU64::new(0),
            injected_dma: AtomicBool::new(false),
        }
    }

    /// Starts the datapath worker polling if it must and is not (it blocks in `recv` otherwise). Call without the
    /// device lock.
    pub fn wake_poller(&self) {
        if !self.polling.load(Ordering::Relaxed) && self.lock().must_poll() {
            if let Some(dp) = self.dp.get() {
                let _ = dp.send(DpWork::Poll);
            }
        }
    }

    /// Kicks the datapath worker for TX (`rx` false) or RX queue `q`, unless a kick for that queue waits already.
    pub fn kick_tail(&self, q: u16, rx: bool) {
        let (flags, w) = if rx { (&self.kicks.rx, DpWork::RxTail(q)) } else { (&self.kicks.tx, DpWork::Tx(q)) };
        if let Some(dp) = self.dp.get() {
            if Kicks::arm(flags, q) {
                let _ = dp.send(w);
            }
        }
    }

    /// An engine's guest-memory read: fails as if `addr` were unmapped when a dma-error fault fires.
    pub fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.dma_fault(addr)?;
        self.mem.read(addr, buf)
    }

    /// An engine's guest-memory write: fails as if `addr` were unmapped when a dma-error fault fires.
    pub fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.dma_fault(addr)?;
        self.mem.write(addr, data)
    }

    /// Several engine accesses in order under one guest-memory lock ([`GuestMem::batch`]), each subject to
    /// dma-error like [`Core::dma_read`].
    pub fn dma_batch(&self) -> DmaBatch<'_> {
        DmaBatch { core: self, b: self.mem.batch() }
    }

    /// dma-error: one atomic load unless set; when it fires, the access fails and the failure is remembered so
    /// that the engine's error path ([`Core::malicious_driver`]) has the PF reset the VF.
    fn dma_fault(&self, addr: u64) -> Result<(), MemError> {
        if self.cfg.faults.take_dma_error() {
            log::error!("dma-error fault: the device's access to {addr:#x} fails");
            self.injected_dma.store(true, Ordering::SeqCst);
            return Err(MemError::Unmapped(addr));
        }
        Ok(())
    }

    /// An engine shut a queue or ring down (malicious driver detection): the MALICIOUS_DRIVER event, and when the
    /// failure was a dma-error fault, the PF resets the VF (RESET_IMPENDING first), as the i40e PF does on an MDD
    /// event. Call without the device lock.
    pub fn malicious_driver(&self, queue: Option<u16>, reason: String) {
        self.cfg.events.emit(Event::MaliciousDriver { queue, reason });
        if self.injected_dma.swap(false, Ordering::SeqCst) {
            log::error!("PF: malicious driver detection on the VF (dma-error fault): resetting the VF");
            if let Some(aq) = self.aq.get() {
                let _ = aq.send(AqWork::PfReset);
            }
        }
    }

    /// Wakes the admin queue worker so it looks at the reset phase and the faults again.
    pub fn poke_aq(&self) {
        if let Some(aq) = self.aq.get() {
            let _ = aq.send(AqWork::FaultsChanged);
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Dev> {
        // A panic in a worker must not take the device down with poisoned state errors.
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the port's drop counts into the statistics (the worker does this as frames pass; pause and save do it
    /// so nothing counted is missing from the state).
    pub fn fold_port_drops(&self, d: &mut Dev) {
        // A load first: these are almost always zero, and a swap is a locked instruction on every frame.
        let full = match self.rx_gate.dropped.load(Ordering::Acquire) {
            0 => 0,
            _ => self.rx_gate.dropped.swap(0, Ordering::AcqRel),
        };
        if full > 0 {
            d.nic.pf.stats.rx_discards += full;
            log::warn!("{full} received frames dropped: {RX_IN_FLIGHT} already waiting for the datapath worker");
        }
        let paused = match self.rx_gate.dropped_paused.load(Ordering::Acquire) {
            0 => 0,
            _ => self.rx_gate.dropped_paused.swap(0, Ordering::AcqRel),
        };
        if paused > 0 {
            d.nic.pf.stats.rx_discards += paused;
            d.nic.counters.rx_dropped_paused += paused;
        }
    }
}

/// See [`Core::dma_batch`].
pub struct DmaBatch<'c> {
    core: &'c Core,
    b: crate::mem::Batch<'c>,
}

impl DmaBatch<'_> {
    pub fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.core.dma_fault(addr)?;
        self.b.read(addr, buf)
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.core.dma_fault(addr)?;
        self.b.write(addr, data)
    }
}
