//! The i40e VF: PCI personality, BAR0 register semantics, MSI-X, reset. Work that touches guest memory (the admin
//! queue) runs on the device's worker thread so the protocol thread never waits for the client.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};

use crate::aq::{ArqMsg, ARQ_BACKLOG};
use crate::datapath::{self, DoorbellPage, DpWork, Kicks, RxGate, DOORBELL_PAGE};
use crate::irq::{self, Interrupts};
use crate::mem::GuestMem;
use crate::net::{FrameSink, NoSink, RxPort};
use crate::pci::{self, PciConfig};
use crate::regs::*;
use crate::virtchnl::{LinkSpeed, Pf};
use crate::{aq, DevResult, Errno, IrqAction, IrqData, IrqInfo, RegionInfo, RegionMmap, VfioDevice};

pub const NUM_REGIONS: u32 = 9;
pub const CONFIG_REGION: u32 = 7;
/// A real i40e VF's MSI-X table: 4 queue vectors and the misc vector.
pub const MSIX_VECTORS: u16 = 5;
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// What the user chose on the command line.
#[derive(Debug, Clone)]
pub struct VfConfig {
    pub mac: [u8; 6],
    /// Queue pairs offered to the driver (1..=16).
    pub queue_pairs: u16,
    pub link_speed: LinkSpeed,
    /// `--doorbells mmap`: BAR0's first page (the QTX_TAIL registers) is offered as an mmap area backed by a
    /// memfd the datapath worker polls, instead of trapped register writes (`docs/doorbells.md`).
    pub mmap_doorbells: bool,
    /// PF -> VF messages held while the driver posts no ARQ buffers; past this the oldest is dropped.
    pub max_arq_queued: usize,
}

impl Default for VfConfig {
    fn default() -> Self {
        // Locally administered unicast; 4 queue pairs and 5 vectors like a real VF.
        VfConfig {
            mac: [0x02, 0x00, 0x00, 0x15, 0x4c, 0x01],
            queue_pairs: 4,
            link_speed: LinkSpeed(10000),
            mmap_doorbells: false,
            max_arq_queued: ARQ_BACKLOG,
        }
    }
}

impl VfConfig {
    /// MSI-X vectors: one per queue pair plus the misc vector, at least the real VF's five.
    pub fn msix_vectors(&self) -> u16 {
        (self.queue_pairs + 1).max(MSIX_VECTORS)
    }
}

/// Mutable device state, behind one lock held only for short register-sized critical sections.
pub struct VfState {
    pub config: PciConfig,
    pub regs: RegFile,
    pub irq: Interrupts,
    /// INTENA per vector (vector 0 = DYN_CTL01, n + 1 = DYN_CTLN1(n)); cleared when the vector fires (auto-mask).
    pub intena: Vec<bool>,
    /// A cause arrived while the vector was masked; fire on the next INTENA write.
    pub pending: Vec<bool>,
    /// Bumped by every reset, so work started before a reset does not write back after it.
    pub generation: u64,
    /// The PF's view of the VF (virtchnl state).
    pub pf: Pf,
    /// PF -> VF messages waiting for ARQ slots, at most `arq_max`.
    pub arq_backlog: VecDeque<ArqMsg>,
    pub arq_max: usize,
    /// Per TX queue: the next descriptor the device will read.
    pub tx_head: Vec<u32>,
    /// Per RX queue: the next descriptor the device will fill, and frames waiting for buffers.
    pub rx_head: Vec<u32>,
    pub rx_backlog: Vec<VecDeque<Vec<u8>>>,
    /// Where transmitted frames go.
    pub sink: Arc<dyn FrameSink>,
    /// Frames per queue since power-on: (received, transmitted).
    pub queue_frames: Vec<(u64, u64)>,
    /// `--doorbells mmap`: the shared page holding the QTX_TAIL registers (which then are not in `regs`).
    pub doorbells: Option<Arc<DoorbellPage>>,
}

impl VfState {
    pub(crate) fn power_on(cfg: &VfConfig) -> Self {
        let n = cfg.msix_vectors();
        VfState {
            config: pci::vf_config(n),
            regs: RegFile::power_on(pci::BAR0_SIZE),
            irq: Interrupts::new(n as usize),
            intena: vec![false; n as usize],
            pending: vec![false; n as usize],
            generation: 0,
            pf: Pf::new(cfg.mac, cfg.queue_pairs, n, cfg.link_speed),
            arq_backlog: VecDeque::new(),
            arq_max: cfg.max_arq_queued.max(1),
            tx_head: vec![0; cfg.queue_pairs as usize],
            rx_head: vec![0; cfg.queue_pairs as usize],
            rx_backlog: vec![VecDeque::new(); cfg.queue_pairs as usize],
            sink: Arc::new(NoSink),
            queue_frames: vec![(0, 0); cfg.queue_pairs as usize],
            doorbells: None,
        }
    }

    /// DEVICE_RESET / FLR: back to power-on, keeping the client's eventfds, the generation count and the
    /// negotiated virtchnl version.
    fn reset(&mut self, cfg: &VfConfig) {
        let generation = self.generation + 1;
        let version = self.pf.version;
        let irq = std::mem::replace(&mut self.irq, Interrupts::new(0));
        let sink = self.sink.clone();
        let doorbells = self.doorbells.take();
        *self = VfState::power_on(cfg);
        self.irq = irq;
        self.sink = sink;
        if let Some(page) = &doorbells {
            page.clear();
        }
        self.doorbells = doorbells;
        self.irq.reset();
        self.generation = generation;
        self.pf.version = version;
    }

    /// VF reset (RESET_VF or PF-initiated): registers, admin queue, queues, filters, IRQ map and RSS are
    /// forgotten; config space, MSI-X table and the virtchnl version stay. RSTAT reads INPROGRESS afterwards;
    /// the caller moves it on.
    pub fn vf_reset(&mut self) {
        self.generation += 1;
        self.regs = RegFile::power_on(pci::BAR0_SIZE);
        if let Some(page) = &self.doorbells {
            page.clear();
        }
        self.regs.set(VFGEN_RSTAT, RSTAT_INPROGRESS);
        self.intena.fill(false);
        self.pending.fill(false);
        self.pf.reset();
        self.arq_backlog.clear();
        self.tx_head.fill(0);
        self.rx_head.fill(0);
        self.rx_backlog.iter_mut().for_each(VecDeque::clear);
    }

    /// Queues a PF -> VF message for the ARQ. A driver that stopped returning ARQ buffers loses the oldest.
    pub fn post(&mut self, op: u32, status: i32, payload: Vec<u8>) {
        if self.arq_backlog.len() >= self.arq_max {
            let lost = self.arq_backlog.pop_front();
            log::warn!("ARQ backlog full: dropped PF message op {:?}", lost.map(|m| m.op));
        }
        self.arq_backlog.push_back(ArqMsg { op, status, payload });
    }

    /// Raises vector `v`: fires now if enabled (then auto-masks), otherwise remembers it.
    pub fn raise(&mut self, v: usize) {
        if self.intena[v] {
            self.intena[v] = false;
            self.pending[v] = false;
            self.irq.fire(v);
        } else {
            self.pending[v] = true;
        }
    }

    /// Raises every vector CONFIG_IRQ_MAP binds to RX (`rx`) or TX queue `q`.
    pub fn raise_queue(&mut self, q: u16, rx: bool) {
        for v in 0..self.pf.irq_map.len() {
            let (rxq, txq) = self.pf.irq_map[v];
            if (if rx { rxq } else { txq }) & (1 << q) != 0 {
                self.raise(v);
            }
        }
    }

    /// Raises an ICR0 cause on vector 0 if the cause is enabled.
    pub fn raise_misc(&mut self, cause: u32) {
        let icr = self.regs.get(VFINT_ICR01) | cause;
        self.regs.set(VFINT_ICR01, icr);
        if self.regs.get(VFINT_ICR0_ENA1) & cause != 0 {
            self.raise(0);
        }
    }

    fn write_dyn_ctl(&mut self, v: usize, val: u32) {
        if val & DYN_CLEARPBA != 0 {
            self.pending[v] = false;
        }
        if val & DYN_INTENA_MSK == 0 {
            self.intena[v] = val & DYN_INTENA != 0;
        }
        if val & DYN_SWINT_TRIG != 0 {
            if v == 0 {
                self.regs.set(VFINT_ICR01, self.regs.get(VFINT_ICR01) | ICR0_SWINT);
            }
            self.pending[v] = true;
        }
        if self.intena[v] && self.pending[v] {
            self.raise(v);
        }
    }
}

pub(crate) struct Shared {
    pub state: Mutex<VfState>,
    pub mem: GuestMem,
    pub cfg: VfConfig,
    /// Tail kicks waiting for the datapath worker, one at most per queue and direction.
    pub kicks: Kicks,
    /// Bounds the received frames waiting for the datapath worker.
    pub rx_gate: Arc<RxGate>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, VfState> {
        // A panic in a worker must not take the device down with poisoned state errors.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) enum Work {
    /// ATQT moved: process the transmit admin queue.
    Atq,
    /// ARQT moved: buffers were returned, deliver what is waiting.
    Arq,
    /// The PF resets the VF on its own (RESET_IMPENDING first).
    PfReset,
    /// The device is being dropped. (Channel disconnection cannot signal it: reset handles keep senders.)
    Stop,
}

#[derive(Clone)]
pub struct PfResetHandle(Option<Sender<Work>>);

impl PfResetHandle {
    pub fn trigger(&self) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Work::PfReset);
        }
    }
}

pub struct I40eVf {
    shared: Arc<Shared>,
    work: Option<Sender<Work>>,
    dp: Option<Sender<DpWork>>,
    workers: Vec<JoinHandle<()>>,
    doorbells: Option<Arc<DoorbellPage>>,
}

impl I40eVf {
    pub fn new(cfg: VfConfig, mem: GuestMem) -> Self {
        let mut state = VfState::power_on(&cfg);
        let doorbells =
            cfg.mmap_doorbells.then(|| Arc::new(DoorbellPage::new().expect("creating the doorbell page memfd")));
        state.doorbells = doorbells.clone();
        if doorbells.is_some() {
            log::info!(
                "doorbells: BAR0 0x0-0xfff (QTX_TAIL) is an mmap area, polled every {:?}",
                datapath::POLL_INTERVAL
            );
        }
        let shared =
            Arc::new(Shared { state: Mutex::new(state), mem, cfg, kicks: Kicks::default(), rx_gate: Arc::default() });
        let (tx, rx) = unbounded();
        let s = shared.clone();
        let aq = std::thread::Builder::new()
            .name("vf-aq".into())
            .spawn(move || aq::worker(s, rx))
            .expect("spawning the admin queue worker");
        let (dtx, drx) = unbounded();
        let s = shared.clone();
        let dp = std::thread::Builder::new()
            .name("vf-datapath".into())
            .spawn(move || datapath::worker(s, drx))
            .expect("spawning the datapath worker");
        I40eVf { shared, work: Some(tx), dp: Some(dtx), workers: vec![aq, dp], doorbells }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.shared.cfg.mac
    }

    /// A VF reset the PF starts on its own: the driver gets RESET_IMPENDING, then the reset happens.
    pub fn pf_reset(&self) {
        self.kick(Work::PfReset);
    }

    /// Sends every transmitted frame to `sink` from now on.
    pub fn set_sink(&self, sink: Arc<dyn FrameSink>) {
        self.shared.lock().sink = sink;
    }

    /// Where frames from the wire enter the device.
    pub fn rx_port(&self) -> RxPort {
        RxPort {
            work: self.dp.clone().expect("datapath worker runs while the device exists"),
            gate: self.shared.rx_gate.clone(),
        }
    }

    /// Messages waiting for the datapath worker (tail kicks, received frames): a diagnostic for tests and logs.
    pub fn datapath_backlog(&self) -> usize {
        self.dp.as_ref().map_or(0, |d| d.len())
    }

    /// Kicks the datapath worker for a TX (`rx` false) or RX tail write, unless a kick for that queue waits already.
    fn kick_tail(&self, q: u16, rx: bool) {
        let (flags, w) =
            if rx { (&self.shared.kicks.rx, DpWork::RxTail(q)) } else { (&self.shared.kicks.tx, DpWork::Tx(q)) };
        if Kicks::arm(flags, q) {
            if let Some(dp) = &self.dp {
                let _ = dp.send(w);
            }
        }
    }

    /// A handle that starts [`I40eVf::pf_reset`] from another thread (a signal handler thread, say).
    pub fn pf_reset_handle(&self) -> PfResetHandle {
        PfResetHandle(self.work.clone())
    }

    fn kick(&self, w: Work) {
        if let Some(tx) = &self.work {
            let _ = tx.send(w);
        }
    }

    fn bar0_read(&self, offset: u64, out: &mut [u8]) {
        if let Some(page) = self.doorbells.as_ref().filter(|_| offset < DOORBELL_PAGE) {
            let n = out.len().min((DOORBELL_PAGE - offset) as usize);
            page.read(offset, &mut out[..n]);
            if n < out.len() {
                self.bar0_read(DOORBELL_PAGE, &mut out[n..]);
            }
            return;
        }
        let mut st = self.shared.lock();
        let first = offset & !3;
        let end = offset + out.len() as u64;
        let mut dw = first;
        while dw < end {
            let v = if is_register(dw) { st.regs.get(dw) } else { 0 };
            if dw == VFINT_ICR01 {
                st.regs.set(VFINT_ICR01, 0); // clear on read
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
        self.wake_poller();
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let off = offset + 4 * i as u64;
            self.reg_write(off, u32::from_le_bytes(chunk.try_into().unwrap()));
        }
        Ok(())
    }

    /// `--doorbells mmap`: a trapped write is the driver's sign of life after ENABLE_QUEUES (ARQT, DYN_CTL
    /// re-arms); it starts the datapath worker polling the doorbell page if it was blocked.
    fn wake_poller(&self) {
        let Some(page) = &self.doorbells else { return };
        let st = self.shared.lock();
        if st.pf.tx_enabled != 0 && !page.polling.swap(true, Ordering::Relaxed) {
            drop(st);
            if let Some(dp) = &self.dp {
                let _ = dp.send(DpWork::Poll);
            }
        }
    }

    fn reg_write(&self, off: u64, val: u32) {
        if let Some(page) = self.doorbells.as_ref().filter(|_| off < DOORBELL_PAGE) {
            // The page is shared memory: what the client stores there directly and what arrives trapped are one.
            page.write(off, &val.to_le_bytes());
            if (QTX_TAIL1..QTX_TAIL1 + 4 * MAX_QUEUES).contains(&off) {
                self.kick_tail(((off - QTX_TAIL1) / 4) as u16, false);
            }
            return;
        }
        if !is_register(off) {
            log::trace!("BAR0 write {val:#x} to unimplemented offset {off:#x} ignored");
            return;
        }
        let mut st = self.shared.lock();
        match off {
            VFGEN_RSTAT | VFINT_ICR01 => {}
            VF_ATQLEN1 | VF_ARQLEN1 => {
                let was = st.regs.get(off);
                let v = (val & (AQ_LEN_MASK | AQ_ENABLE)) | (was & AQ_ERR_BITS & !val);
                st.regs.set(off, v);
                if v & AQ_ENABLE != 0 && was & AQ_ENABLE == 0 {
                    let q = if off == VF_ATQLEN1 { "ATQ" } else { "ARQ" };
                    log::info!("VF driver enabled the admin queue {q}: {} entries", v & AQ_LEN_MASK);
                } else if v & AQ_ENABLE == 0 && was & AQ_ENABLE != 0 {
                    log::info!(
                        "VF driver disabled the admin queue ({})",
                        if off == VF_ATQLEN1 { "ATQ" } else { "ARQ" }
                    );
                }
            }
            VF_ATQH1 | VF_ARQH1 => st.regs.set(off, val & AQ_LEN_MASK),
            VF_ARQT1 => {
                st.regs.set(off, val & AQ_LEN_MASK);
                drop(st);
                self.kick(Work::Arq);
            }
            VF_ATQT1 => {
                st.regs.set(off, val & AQ_LEN_MASK);
                drop(st);
                self.kick(Work::Atq);
            }
            _ if (QRX_TAIL1..QRX_TAIL1 + 4 * MAX_QUEUES).contains(&off) => {
                // Latched even before the queue is configured: iavf writes it first.
                st.regs.set(off, val);
                drop(st);
                self.kick_tail(((off - QRX_TAIL1) / 4) as u16, true);
            }
            _ if (QTX_TAIL1..QTX_TAIL1 + 4 * MAX_QUEUES).contains(&off) => {
                st.regs.set(off, val);
                drop(st);
                self.kick_tail(((off - QTX_TAIL1) / 4) as u16, false);
            }
            VFINT_DYN_CTL01 => {
                st.regs.set(off, val & !(DYN_SWINT_TRIG | DYN_CLEARPBA));
                st.write_dyn_ctl(0, val);
            }
            _ if (VFINT_DYN_CTLN1..VFINT_DYN_CTLN1 + 4 * MAX_QUEUES).contains(&off) => {
                st.regs.set(off, val & !(DYN_SWINT_TRIG | DYN_CLEARPBA));
                let v = ((off - VFINT_DYN_CTLN1) / 4 + 1) as usize;
                if v < st.intena.len() {
                    st.write_dyn_ctl(v, val);
                }
            }
            VFINT_ICR0_ENA1 => {
                st.regs.set(off, val);
                let fire = st.regs.get(VFINT_ICR01) & val != 0;
                if fire {
                    st.pending[0] = true;
                    if st.intena[0] {
                        st.raise(0);
                    }
                }
            }
            _ => st.regs.set(off, val),
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.shared.lock();
        let old_cmd = st.config.u16(pci::CMD);
        st.config.write(offset as usize, data);
        let cmd = st.config.u16(pci::CMD);
        if cmd != old_cmd {
            log::debug!("PCI command register {old_cmd:#06x} -> {cmd:#06x}");
        }
        let devctl = st.config.u16(pci::PCIE_DEVCTL);
        if devctl & pci::PCIE_DEVCTL_FLR != 0 {
            log::info!("function level reset requested through PCIe Device Control");
            st.reset(&self.shared.cfg);
        }
    }
}

impl Drop for I40eVf {
    fn drop(&mut self) {
        if let Some(w) = self.work.take() {
            let _ = w.send(Work::Stop);
        }
        if let Some(d) = self.dp.take() {
            let _ = d.send(DpWork::Stop);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl VfioDevice for I40eVf {
    fn num_regions(&self) -> u32 {
        NUM_REGIONS
    }

    fn num_irqs(&self) -> u32 {
        irq::NUM_IRQS
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = |size| RegionInfo { size, read: true, write: true, mmap_areas: vec![] };
        match index {
            0 if self.doorbells.is_some() => {
                Some(RegionInfo { mmap_areas: vec![(0, DOORBELL_PAGE)], ..rw(pci::BAR0_SIZE) })
            }
            0 => Some(rw(pci::BAR0_SIZE)),
            3 => Some(rw(pci::BAR3_SIZE)),
            CONFIG_REGION => Some(rw(pci::CONFIG_SIZE as u64)),
            i if i < NUM_REGIONS => Some(RegionInfo::default()),
            _ => None,
        }
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap<'_>> {
        let page = self.doorbells.as_ref().filter(|_| index == 0)?;
        Some(RegionMmap { fd: page.fd(), offset: 0 })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let efd = |count, maskable| IrqInfo { count, eventfd: true, maskable, ..Default::default() };
        match index {
            irq::INTX | irq::MSI => Some(IrqInfo { count: 0, ..Default::default() }),
            irq::MSIX => Some(efd(u32::from(self.shared.cfg.msix_vectors()), true)),
            irq::ERR | irq::REQ => Some(efd(1, false)),
            _ => None,
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DevResult<()> {
        match index {
            0 => self.bar0_read(offset, data),
            3 => self.shared.lock().irq.bar_read(offset, data),
            CONFIG_REGION => self.shared.lock().config.read(offset as usize, data),
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        match index {
            0 => return self.bar0_write(offset, data),
            3 => self.shared.lock().irq.bar_write(offset, data),
            CONFIG_REGION => self.config_write(offset, data),
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, action: IrqAction, start: u32, count: u32, data: IrqData) -> DevResult<()> {
        self.shared.lock().irq.set_irqs(index, action, start, count, data)
    }

    fn reset(&mut self) {
        log::info!("device reset");
        self.shared.lock().reset(&self.shared.cfg);
    }

    fn client_gone(&mut self) {
        let mut st = self.shared.lock();
        st.irq.forget_client();
        let per_queue: Vec<String> =
            st.queue_frames.iter().enumerate().map(|(q, (rx, tx))| format!("q{q} rx {rx} tx {tx}")).collect();
        log::info!("frames per queue: {}", per_queue.join(", "));
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
        d.set_irqs(irq::MSIX, IrqAction::Trigger, 0, 1, IrqData::Eventfd(vec![a.into()])).unwrap();
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
        let devctl = rd(&mut d, CONFIG_REGION, pci::PCIE_DEVCTL as u64);
        wr(&mut d, CONFIG_REGION, pci::PCIE_DEVCTL as u64, devctl | u32::from(pci::PCIE_DEVCTL_FLR));
        assert_eq!(rd(&mut d, 0, VF_ARQLEN1), 0);
        assert_eq!(rd(&mut d, CONFIG_REGION, pci::PCIE_DEVCTL as u64) & u32::from(pci::PCIE_DEVCTL_FLR), 0);
    }
}
