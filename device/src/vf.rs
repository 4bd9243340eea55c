//! The i40e VF as the server sees it: regions, interrupts and reset through [`VfioDevice`], the BAR0 register
//! semantics, and the device-wide operations migration needs: pause, resume, save, load.
//!
//! While paused (see docs/device-state.md), the device makes no DMA, raises no interrupt and changes no ring or
//! register state. Client accesses are still served: config space and the MSI-X BAR as usual (a VMM restores
//! config space on a stopped device); BAR0 reads from the frozen registers with no side effects; BAR0 writes are
//! held, in order, and applied at resume (they are part of the saved state, so they reach a destination too).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::cfg::{Doorbells, VfConfig};
use crate::core::{AqWork, Core, DpWork};
use crate::engine::derive::{self, Ring};
use crate::engine::port::RxPort;
use crate::engine::worker::{self, Workers};
use crate::event::Events;
use crate::fault::Faults;
use crate::mem::doorbell::{DoorbellPages, DOORBELL_PAGES, PAGE};
use crate::mem::GuestMem;
use crate::net::FrameSink;
use crate::nic::regs::*;
use crate::nic::stats::{EthStats, QueueStats};
use crate::pci::{self, msix};
use crate::remap;
use crate::state::{Counters, DeviceState, Identity, StateError, MAX_HELD_WRITES};
use crate::stream::{self, Extra};
use crate::vfio::{DevResult, Errno, IrqAction, IrqData, IrqInfo, Migratable, RegionInfo, RegionMmap, VfioDevice};

pub const NUM_REGIONS: u32 = 9;
pub const CONFIG_REGION: u32 = 7;

/// A PF-initiated reset requested from another thread (a signal handler thread, say).
#[derive(Clone)]
pub struct PfResetHandle(Sender<AqWork>);

impl PfResetHandle {
    pub fn trigger(&self) {
        let _ = self.0.send(AqWork::PfReset);
    }
}

/// Statistics and counters, readable while the device runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub eth: EthStats,
    pub queues: Vec<QueueStats>,
    pub counters: Counters,
    /// Tail writes (TX, RX, ARQ) that came as messages since the client connected: none on the fast path.
    pub trapped_doorbells: u64,
}

pub struct I40eVf {
    core: Arc<Core>,
    workers: Workers,
}

impl I40eVf {
    pub fn new(cfg: VfConfig, mem: GuestMem) -> Self {
        match cfg.doorbells {
            Doorbells::Trap => log::info!("doorbells: trapped (no remap IRQ)"),
            Doorbells::Remap => log::info!("doorbells: trapped; mapped for a client that enables the remap IRQ"),
            Doorbells::Mmap => log::info!("doorbells: BAR0's doorbell pages are mmap areas outside migration"),
        }
        let core = Arc::new(Core::new(cfg, mem));
        let workers = Workers::spawn(&core);
        I40eVf { core, workers }
    }

    /// A device built from saved state and new resources (guest memory here; eventfds and the sink are given
    /// afterwards). The state is checked against `cfg` first. The device comes back paused: give it its
    /// resources, then [`I40eVf::resume`]. Nothing is written to guest memory.
    pub fn restore(cfg: VfConfig, mem: GuestMem, state: &DeviceState) -> Result<Self, StateError> {
        state.validate(&cfg)?;
        let vf = I40eVf::new(cfg, mem);
        vf.pause();
        vf.load(state)?;
        Ok(vf)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.core.cfg.mac
    }

    pub fn config(&self) -> &VfConfig {
        &self.core.cfg
    }

    /// What a destination must match: sent first, so an incompatible one can refuse before the guest stops.
    pub fn identity(&self) -> Identity {
        Identity::of(&self.core.cfg)
    }

    /// A VF reset the PF starts on its own: the driver gets RESET_IMPENDING, then the reset happens.
    pub fn pf_reset(&self) {
        let _ = self.workers.aq.send(AqWork::PfReset);
    }

    /// The PF reports the link up or down to the driver (a LINK_CHANGE event when it changes).
    pub fn set_link(&self, up: bool) {
        let _ = self.workers.aq.send(AqWork::SetLink { up, cause: "set by the control socket" });
    }

    /// The link state the PF reports.
    pub fn link_up(&self) -> bool {
        self.core.lock().nic.pf.link_up
    }

    /// Tells the device that faults were set or cleared at run time ([`Faults::set`], [`Faults::clear`]): link-down
    /// and link-flap take effect at once (a LINK_CHANGE event to the driver), and a reset held by reset-stuck goes
    /// on once that fault is cleared. Faults that act where they hook (tx-hang, rx-drop, ...) need no call.
    pub fn faults_changed(&self) {
        let _ = self.workers.aq.send(AqWork::FaultsChanged);
    }

    /// FLR or DEVICE_RESET: back to power-on; reset-stuck / reset-slow hold RSTAT at INPROGRESS for the admin queue
    /// worker to finish.
    fn full_reset(&self, kind: &'static str) {
        let held = {
            let mut st = self.core.lock();
            st.reset(&self.core.cfg);
            st.reset_done_or_held(kind)
        };
        if held {
            self.core.poke_aq();
        }
    }

    /// The faults set on this device (shared with whoever built its [`VfConfig`]).
    pub fn faults(&self) -> Arc<Faults> {
        self.core.cfg.faults.clone()
    }

    /// Where the device reports its events.
    pub fn events(&self) -> Arc<Events> {
        self.core.cfg.events.clone()
    }

    /// A handle that starts [`I40eVf::pf_reset`] from another thread.
    pub fn pf_reset_handle(&self) -> PfResetHandle {
        PfResetHandle(self.workers.aq.clone())
    }

    /// Sends every transmitted frame to `sink` from now on.
    pub fn set_sink(&self, sink: Arc<dyn FrameSink>) {
        self.core.lock().sink = sink;
    }

    /// Where frames from the wire enter the device.
    pub fn rx_port(&self) -> RxPort {
        RxPort { work: self.workers.dp.clone(), gate: self.core.rx_gate.clone() }
    }

    /// Messages waiting for the datapath worker (tail kicks, received frames): a diagnostic for tests and logs.
    pub fn datapath_backlog(&self) -> usize {
        self.workers.dp.len()
    }

    pub fn stats(&self) -> Stats {
        let mut st = self.core.lock();
        self.core.fold_port_drops(&mut st);
        let n = &st.nic;
        Stats {
            eth: n.pf.stats,
            queues: n.queues.iter().map(|q| q.stats).collect(),
            counters: n.counters,
            trapped_doorbells: self.core.trapped_doorbells.load(Ordering::Relaxed),
        }
    }

    // ---- pause, resume, save, load --------------------------------------------------------------------------

    /// Starts a pause and returns at once: from now on no interrupt is delivered (they pend), frames from the
    /// backend are dropped and counted, and BAR0 writes are held. The workers finish the work already queued (so
    /// DMA may still happen until [`I40eVf::is_paused`]) and park. Never blocks, so the thread that serves the
    /// client's DMA replies may call it.
    pub fn request_pause(&self) {
        if !self.core.pause.request() {
            return;
        }
        *self.core.rx_gate.paused.write().unwrap_or_else(|e| e.into_inner()) = true;
        self.core.lock().irq.freeze();
        let _ = self.workers.aq.send(AqWork::Pause);
        let _ = self.workers.dp.send(DpWork::Pause);
    }

    /// The pause is complete: both workers are parked; the device makes no DMA, raises no interrupt and changes
    /// no state until [`I40eVf::resume`].
    pub fn is_paused(&self) -> bool {
        self.core.pause.requested() && self.core.pause.parked() == worker::COUNT
    }

    /// Whether a pause was requested (complete or not).
    pub fn pause_requested(&self) -> bool {
        self.core.pause.requested()
    }

    /// [`I40eVf::request_pause`], then waits until it is complete. Not for the thread that serves DMA replies for
    /// fd-less guest memory: a worker may be waiting for one.
    pub fn pause(&self) {
        self.request_pause();
        while !self.core.pause.wait_parked(worker::COUNT, Duration::from_secs(10)) {
            log::warn!("pausing: a device worker has been busy for 10 s (waiting for a DMA reply?)");
        }
    }

    /// Ends a pause: frames are accepted again, held writes (and a held FLR) are applied in order, pending
    /// interrupts are delivered where the client's masks allow, and every queue is kicked once so a restored
    /// state picks up where it stopped.
    pub fn resume(&self) {
        if !self.core.pause.requested() {
            return;
        }
        self.core.pause.release();
        *self.core.rx_gate.paused.write().unwrap_or_else(|e| e.into_inner()) = false;
        let (writes, flr) = {
            let mut st = self.core.lock();
            self.core.fold_port_drops(&mut st);
            (std::mem::take(&mut st.nic.held_writes), std::mem::take(&mut st.nic.held_flr))
        };
        if flr {
            log::info!("function level reset requested while paused: carried out now");
            self.full_reset("flr");
        }
        if !writes.is_empty() {
            log::info!("applying {} BAR0 writes held while paused", writes.len());
        }
        for (off, val) in writes {
            self.reg_write(u64::from(off), val);
        }
        self.core.lock().irq.thaw();
        self.kick_all();
    }

    /// The device's state as plain data; needs a complete pause.
    pub fn save(&self) -> Result<DeviceState, StateError> {
        if !self.is_paused() {
            return Err(StateError::NotPaused);
        }
        let mut st = self.core.lock();
        self.core.fold_port_drops(&mut st);
        Ok(st.save(&self.core.cfg))
    }

    /// Replaces the device's state with `state` (checked against this device's configuration first; on error
    /// nothing changes). Needs a complete pause; the client's eventfds and the packet sink stay. Nothing is
    /// written to guest memory.
    pub fn load(&self, state: &DeviceState) -> Result<(), StateError> {
        if !self.is_paused() {
            return Err(StateError::NotPaused);
        }
        // Frames the port turned away while paused and not yet counted stay with the port: they are folded into
        // the loaded state at resume, so a destination accounts for frames that reached it before its state did.
        self.core.lock().load(&self.core.cfg, state)
    }

    // ---- the remap IRQ (docs/remap-irq.md) ------------------------------------------------------------------

    fn set_remap_irq(&self, action: IrqAction, count: u32, data: IrqData) -> DevResult<()> {
        let mut st = self.core.lock();
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfd(mut fds)) if fds.len() == 1 => {
                log::info!("remap IRQ enabled by the client");
                st.remap.enable(std::fs::File::from(fds.pop().expect("one fd")));
            }
            (IrqAction::Trigger, IrqData::Eventfd(fds)) if fds.is_empty() => {
                log::info!("remap IRQ disabled by the client");
                st.remap.disable();
            }
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                log::info!("remap IRQ disabled by the client");
                st.remap.disable();
            }
            (IrqAction::Trigger, _) => {
                log::warn!("SET_IRQS: the remap IRQ is signalled by the device only");
                return Err(Errno::EINVAL);
            }
            (IrqAction::Unmask, IrqData::None) => {
                let released = st.remap.ack();
                log::info!("remap IRQ acknowledged{}", if released & 1 != 0 { ": BAR0 is trapped now" } else { "" });
            }
            (IrqAction::Mask, IrqData::None) => st.remap.mask(),
            (IrqAction::Unmask, IrqData::Bool(b)) if b == [true] => {
                st.remap.ack();
            }
            (IrqAction::Mask, IrqData::Bool(b)) if b == [true] => st.remap.mask(),
            (_, IrqData::Bool(_)) => {}
            (_, IrqData::Eventfd(_)) => return Err(Errno::EINVAL),
        }
        drop(st);
        self.core.wake_poller();
        Ok(())
    }

    /// Migration moved into (false) or out of (true) a state in which the device must see every doorbell.
    pub fn fast_path(&self, allowed: bool) {
        self.core.lock().remap.set_allowed(allowed);
        self.core.wake_poller();
    }

    // ---- registers ------------------------------------------------------------------------------------------

    fn kick_tail(&self, q: u16, rx: bool) {
        self.core.kick_tail(q, rx);
    }

    fn bar0_read(&self, offset: u64, out: &mut [u8]) {
        let paused = self.core.pause.requested();
        let mut st = self.core.lock();
        let first = offset & !3;
        let end = offset + out.len() as u64;
        let mut dw = first;
        while dw < end {
            // A doorbell page reads back whatever a store through a mapping left there, as the mapping does.
            let v = if is_register(dw) || DoorbellPages::owns(dw) { st.reg(dw) } else { 0 };
            if dw == VFINT_ICR01 && !paused {
                st.set_reg(VFINT_ICR01, 0); // clear on read (not while paused: no side effects then)
            }
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                let at = dw + i as u64;
                if at >= offset && at < end {
                    out[(at - offset) as usize] = *b;
                }
            }
            dw += 4;
        }
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) -> DevResult<()> {
        if !offset.is_multiple_of(4) || !data.len().is_multiple_of(4) {
            log::warn!("BAR0 write of {} bytes at {offset:#x}: registers are 32-bit; ignored", data.len());
            return Err(Errno::EINVAL);
        }
        let values = data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()));
        let doorbells = (0..data.len() as u64 / 4).filter(|i| is_doorbell(offset + 4 * i)).count();
        self.core.trapped_doorbells.fetch_add(doorbells as u64, Ordering::Relaxed);
        if self.core.pause.requested() {
            let mut st = self.core.lock();
            for (i, v) in values.enumerate() {
                if st.nic.held_writes.len() >= MAX_HELD_WRITES {
                    st.nic.counters.held_writes_dropped += 1;
                    log::warn!("paused: {MAX_HELD_WRITES} BAR0 writes already held; one more dropped");
                    continue;
                }
                let off = offset + 4 * i as u64;
                if is_register(off) {
                    st.nic.held_writes.push((off as u32, v));
                }
            }
            return Ok(());
        }
        for (i, v) in values.enumerate() {
            self.reg_write(offset + 4 * i as u64, v);
        }
        Ok(())
    }

    fn reg_write(&self, off: u64, val: u32) {
        if !is_register(off) {
            if DoorbellPages::owns(off) {
                self.core.lock().set_reg(off, val); // kept, as a store through a mapping would be
            } else {
                log::trace!("BAR0 write {val:#x} to unimplemented offset {off:#x} ignored");
            }
            return;
        }
        let mut st = self.core.lock();
        match off {
            VFGEN_RSTAT | VFINT_ICR01 => {}
            VF_ATQLEN1 | VF_ARQLEN1 => {
                let was = st.reg(off);
                let v = (val & (AQ_LEN_MASK | AQ_ENABLE)) | (was & AQ_ERR_BITS & !val);
                st.set_reg(off, v);
                st.observed.forget(if off == VF_ATQLEN1 { Ring::Atq } else { Ring::Arq });
                let q = if off == VF_ATQLEN1 { "ATQ" } else { "ARQ" };
                if v & AQ_ENABLE != 0 && was & AQ_ENABLE == 0 {
                    log::info!("VF driver enabled the admin queue {q}: {} entries", v & AQ_LEN_MASK);
                } else if v & AQ_ENABLE == 0 && was & AQ_ENABLE != 0 {
                    log::info!("VF driver disabled the admin queue ({q})");
                }
            }
            VF_ATQH1 | VF_ARQH1 => {
                st.set_reg(off, val & AQ_LEN_MASK);
                st.observed.forget(if off == VF_ATQH1 { Ring::Atq } else { Ring::Arq });
            }
            VF_ARQT1 | VF_ATQT1 => {
                st.set_reg(off, val & AQ_LEN_MASK);
                drop(st);
                let _ = self.workers.aq.send(if off == VF_ATQT1 { AqWork::Atq } else { AqWork::Arq });
            }
            _ if (QRX_TAIL1..QRX_TAIL1 + 4 * MAX_QUEUES).contains(&off) => {
                // Latched even before the queue is configured: iavf writes it first.
                st.set_reg(off, val);
                drop(st);
                self.kick_tail(((off - QRX_TAIL1) / 4) as u16, true);
            }
            _ if (QTX_TAIL1..QTX_TAIL1 + 4 * MAX_QUEUES).contains(&off) => {
                st.set_reg(off, val);
                drop(st);
                self.kick_tail(((off - QTX_TAIL1) / 4) as u16, false);
            }
            VFINT_DYN_CTL01 => {
                st.set_reg(off, val & !(DYN_SWINT_TRIG | DYN_CLEARPBA));
                st.write_dyn_ctl(0, val);
            }
            _ if (VFINT_DYN_CTLN1..VFINT_DYN_CTLN1 + 4 * MAX_QUEUES).contains(&off) => {
                st.set_reg(off, val & !(DYN_SWINT_TRIG | DYN_CLEARPBA));
                st.write_dyn_ctl(((off - VFINT_DYN_CTLN1) / 4 + 1) as usize, val);
            }
            VFINT_ICR0_ENA1 => {
                st.set_reg(off, val);
                if st.reg(VFINT_ICR01) & val != 0 {
                    st.nic.vectors[0].pending = true;
                    if st.nic.vectors[0].intena {
                        st.raise(0);
                    }
                }
            }
            _ => st.set_reg(off, val),
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.core.lock();
        let old_cmd = st.config.u16(pci::config::CMD);
        st.config.write(offset as usize, data);
        let cmd = st.config.u16(pci::config::CMD);
        if cmd != old_cmd {
            log::debug!("PCI command register {old_cmd:#06x} -> {cmd:#06x}");
        }
        let bme = pci::config::CMD_BUS_MASTER;
        if (old_cmd ^ cmd) & bme != 0 {
            log::info!("bus mastering {} by the driver", if cmd & bme != 0 { "enabled" } else { "disabled: no DMA" });
        }
        let kick = cmd & bme != 0 && old_cmd & bme == 0 && !self.core.pause.requested();
        let devctl = st.config.u16(pci::config::PCIE_DEVCTL);
        let mut held = false;
        if devctl & pci::config::PCIE_DEVCTL_FLR != 0 {
            if self.core.pause.requested() {
                // Writes held before it would be wiped by it; those after it still apply.
                log::info!("function level reset requested while paused: held until resume");
                let cleared = devctl & !pci::config::PCIE_DEVCTL_FLR;
                st.config.set_bytes(pci::config::PCIE_DEVCTL, &cleared.to_le_bytes());
                st.nic.held_writes.clear();
                st.nic.held_flr = true;
            } else {
                log::info!("function level reset requested through PCIe Device Control");
                st.reset(&self.core.cfg);
                held = st.reset_done_or_held("flr");
            }
        }
        drop(st);
        if held {
            self.core.poke_aq();
        }
        if kick {
            // Work that waited for bus mastering (tails written, frames received) goes on now.
            self.kick_all();
        }
    }

    /// Kicks the admin queue and every queue once.
    fn kick_all(&self) {
        let _ = self.workers.aq.send(AqWork::Atq);
        let _ = self.workers.aq.send(AqWork::Arq);
        for q in 0..self.core.cfg.queue_pairs {
            self.kick_tail(q, false);
            self.kick_tail(q, true);
        }
    }
}

/// A tail register of the doorbell pages: what the fast path spares a message.
fn is_doorbell(off: u64) -> bool {
    (QTX_TAIL1..QTX_TAIL1 + 4 * MAX_QUEUES).contains(&off)
        || (QRX_TAIL1..QRX_TAIL1 + 4 * MAX_QUEUES).contains(&off)
        || off == VF_ARQT1
}

impl Drop for I40eVf {
    fn drop(&mut self) {
        self.core.pause.release(); // parked workers must see the stop message
        self.workers.stop();
    }
}

impl Migratable for I40eVf {
    fn request_pause(&self) {
        I40eVf::request_pause(self)
    }

    fn is_paused(&self) -> bool {
        I40eVf::is_paused(self)
    }

    fn resume(&self) {
        I40eVf::resume(self)
    }

    fn set_pause_notifier(&self, notify: Arc<dyn Fn() + Send + Sync>) {
        self.core.pause.set_notifier(notify);
    }

    fn fast_path(&self, allowed: bool) {
        I40eVf::fast_path(self, allowed)
    }

    fn outstanding_dma(&self, during: &mut dyn FnMut()) -> Vec<(u64, u64)> {
        // Under the device lock no engine looks at a tail, so none can take descriptors between this look and
        // `during` (a harvest) unseen; descriptors are read before it, while unused ones still hold addresses.
        let mut st = self.core.lock();
        let mut out = Vec::new();
        for span in st.outstanding() {
            derive::ranges(&self.core.mem, &span, &mut out);
        }
        during();
        out
    }

    fn compat_record(&self) -> Vec<u8> {
        stream::encode_compat(&self.identity())
    }

    fn state_record(&self, extras: &[Extra]) -> Result<Vec<u8>, String> {
        let s = self.save().map_err(|e| e.to_string())?;
        Ok(stream::encode_state(&s, extras))
    }

    fn check_compat(&self, record: &[u8]) -> Result<(), String> {
        let r = stream::parse_record(record).map_err(|e| e.to_string())?;
        let id = stream::decode_identity(&r).map_err(|e| e.to_string())?;
        id.check(&self.identity()).map_err(|e| e.to_string())
    }

    fn load_record(&self, record: &[u8], extra_kinds: &[u16]) -> Result<Vec<Extra>, String> {
        let r = stream::parse_record(record).map_err(|e| e.to_string())?;
        let (state, extras) = stream::decode_state(&r, extra_kinds).map_err(|e| e.to_string())?;
        self.load(&state).map_err(|e| e.to_string())?;
        Ok(extras)
    }
}

impl VfioDevice for I40eVf {
    fn num_regions(&self) -> u32 {
        NUM_REGIONS
    }

    fn num_irqs(&self) -> u32 {
        match self.core.cfg.doorbells {
            Doorbells::Trap => msix::NUM_IRQS,
            _ => remap::IRQ_INDEX + 1,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = |size| RegionInfo { size, read: true, write: true, mmap_areas: vec![] };
        match index {
            0 if self.core.lock().remap.offers(0) => Some(RegionInfo {
                mmap_areas: DOORBELL_PAGES.iter().map(|&p| (p, PAGE)).collect(),
                ..rw(pci::BAR0_SIZE)
            }),
            0 => Some(rw(pci::BAR0_SIZE)),
            3 => Some(rw(pci::BAR3_SIZE)),
            CONFIG_REGION => Some(rw(pci::CONFIG_SIZE as u64)),
            i if i < NUM_REGIONS => Some(RegionInfo::default()),
            _ => None,
        }
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        if index != 0 {
            return None;
        }
        let st = self.core.lock();
        match st.doorbells.fd().try_clone_to_owned() {
            Ok(fd) => Some(RegionMmap { fd, offset: 0 }),
            Err(e) => {
                log::error!("duplicating the doorbell memfd: {e}");
                None
            }
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let efd = |count, maskable| IrqInfo { count, eventfd: true, maskable, ..Default::default() };
        match index {
            msix::INTX | msix::MSI => Some(IrqInfo { count: 0, ..Default::default() }),
            msix::MSIX => Some(efd(u32::from(self.core.cfg.msix_vectors()), true)),
            msix::ERR | msix::REQ => Some(efd(1, false)),
            remap::IRQ_INDEX if self.core.cfg.doorbells != Doorbells::Trap => Some(IrqInfo {
                automasked: true,
                cap_type: Some((remap::IRQ_TYPE, remap::IRQ_SUBTYPE_SPARSE_MMAP)),
                remap_regions: Some(self.core.lock().remap.regions()),
                ..efd(1, true)
            }),
            _ => None,
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DevResult<()> {
        match index {
            0 => self.bar0_read(offset, data),
            3 => self.core.lock().irq.bar_read(offset, data),
            CONFIG_REGION => self.core.lock().config.read(offset as usize, data),
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        match index {
            0 => return self.bar0_write(offset, data),
            3 => self.core.lock().irq.bar_write(offset, data),
            CONFIG_REGION => self.config_write(offset, data),
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, action: IrqAction, start: u32, count: u32, data: IrqData) -> DevResult<()> {
        if index == remap::IRQ_INDEX {
            return self.set_remap_irq(action, count, data);
        }
        self.core.lock().irq.set_irqs(index, action, start, count, data)
    }

    fn reset(&mut self) {
        log::info!("device reset");
        self.full_reset("device");
    }

    fn migration(&self) -> Option<&dyn Migratable> {
        Some(self)
    }

    fn client_gone(&mut self) {
        let mut st = self.core.lock();
        st.irq.forget_client();
        if st.remap.maybe_mapped() != 0 {
            log::info!("remap IRQ: the client may have left the doorbell pages mapped; the next one gets new ones");
        }
        st.remap.client_gone();
        st.renew_doorbells();
        let per_queue: Vec<String> = st
            .nic
            .queues
            .iter()
            .enumerate()
            .map(|(q, s)| format!("q{q} rx {} tx {}", s.stats.rx_frames, s.stats.tx_frames))
            .collect();
        log::info!("frames per queue: {}", per_queue.join(", "));
        let trapped = self.core.trapped_doorbells.swap(0, Ordering::Relaxed);
        log::info!("doorbell writes trapped: {trapped}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vf() -> I40eVf {
        I40eVf::new(VfConfig::default(), GuestMem::new())
    }

    fn rd(vf: &mut I40eVf, index: u32, off: u64) -> u32 {
        let mut b = [0u8; 4];
        vf.region_read(index, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn wr(vf: &mut I40eVf, index: u32, off: u64, v: u32) {
        vf.region_write(index, off, &v.to_le_bytes()).unwrap();
    }

    #[test]
    fn power_on_registers() {
        let mut d = vf();
        assert_eq!(rd(&mut d, 0, VFGEN_RSTAT) & 3, RSTAT_VFACTIVE);
        assert_eq!(rd(&mut d, CONFIG_REGION, 0), 0x154c_8086);
        for (off, v) in
            [(VF_ATQBAL1, 0x1234_5000), (VF_ATQBAH1, 0x1), (VF_ARQBAL1, 0xabc0_0000), (VF_ATQLEN1, 32 | AQ_ENABLE)]
        {
            wr(&mut d, 0, off, v);
            assert_eq!(rd(&mut d, 0, off), v, "{off:#x}");
        }
        wr(&mut d, 0, VF_ATQH1, 0xffff_ffff);
        assert_eq!(rd(&mut d, 0, VF_ATQH1), 0x3ff, "head is 10 bits");
        wr(&mut d, 0, VFGEN_RSTAT, 0);
        assert_eq!(rd(&mut d, 0, VFGEN_RSTAT), RSTAT_VFACTIVE, "read-only");
    }

    #[test]
    fn unaligned_bar0_write_is_rejected_and_reads_any_size() {
        let mut d = vf();
        assert_eq!(d.region_write(0, 2, &[0; 4]), Err(Errno::EINVAL));
        wr(&mut d, 0, VF_ARQBAL1, 0x1122_3344);
        let mut b = [0u8; 2];
        d.region_read(0, VF_ARQBAL1 + 1, &mut b).unwrap();
        assert_eq!(b, [0x33, 0x22]);
        assert_eq!(rd(&mut d, 0, 0x9000), 0, "unimplemented offsets read 0");
    }

    #[test]
    fn icr0_clears_on_read_and_swint_fires_vector0() {
        let mut d = vf();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        d.set_irqs(msix::MSIX, IrqAction::Trigger, 0, 1, IrqData::Eventfd(vec![a.into()])).unwrap();
        wr(&mut d, 0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
        let mut buf = [0u8; 64];
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 8);
        assert_eq!(rd(&mut d, 0, VFINT_ICR01), ICR0_SWINT);
        assert_eq!(rd(&mut d, 0, VFINT_ICR01), 0);
        // Auto-masked: a second trigger without INTENA only pends, and fires on the next INTENA write.
        wr(&mut d, 0, VFINT_DYN_CTL01, DYN_SWINT_TRIG);
        assert!(std::io::Read::read(&mut &b, &mut buf).is_err());
        wr(&mut d, 0, VFINT_DYN_CTL01, DYN_INTENA);
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 8);
    }

    #[test]
    fn reset_and_flr_restore_power_on() {
        let mut d = vf();
        wr(&mut d, 0, VF_ATQLEN1, 32 | AQ_ENABLE);
        wr(&mut d, CONFIG_REGION, 4, 0x6);
        d.reset();
        assert_eq!(rd(&mut d, 0, VF_ATQLEN1), 0);
        assert_eq!(rd(&mut d, CONFIG_REGION, 4) & 0xffff, 0);
        wr(&mut d, 0, VF_ARQLEN1, 32 | AQ_ENABLE);
        let devctl = rd(&mut d, CONFIG_REGION, pci::config::PCIE_DEVCTL as u64);
        wr(&mut d, CONFIG_REGION, pci::config::PCIE_DEVCTL as u64, devctl | u32::from(pci::config::PCIE_DEVCTL_FLR));
        assert_eq!(rd(&mut d, 0, VF_ARQLEN1), 0);
        assert_eq!(
            rd(&mut d, CONFIG_REGION, pci::config::PCIE_DEVCTL as u64) & u32::from(pci::config::PCIE_DEVCTL_FLR),
            0
        );
    }
}
