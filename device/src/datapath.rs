//! The datapath worker: TX and RX descriptor rings in guest memory.
//!
//! A tail write (a trapped, posted register write) kicks this worker; the protocol thread never waits for it.
//! Transmitted frames go to the device's [`FrameSink`](crate::net::FrameSink); frames from the wire arrive through
//! an [`RxPort`](crate::net::RxPort), are filtered by MAC, steered to a queue (RSS when granted) and written into
//! the buffers the driver posted, waiting in a bounded backlog while a ring has none.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::mem::MemError;
use crate::offload::{self, TxOffload};
use crate::regs::{MAX_QUEUES, QRX_TAIL1, QTX_TAIL1};
use crate::vf::{Shared, VfState};
use crate::virtchnl::{RxQueue, TxQueue};

pub const TX_DESC: u64 = 16;
const DTYPE_MASK: u64 = 0xf;
const DTYPE_DATA: u64 = 0x0;
const DTYPE_CONTEXT: u64 = 0x1;
pub const DTYPE_DONE: u64 = 0xf;
const CMD_EOP: u64 = 1 << 4;
const BUF_SIZE_SHIFT: u32 = 34;
const BUF_SIZE_MASK: u64 = 0x3fff;
/// The most data descriptors a non-TSO frame may use (the hardware limit the driver respects).
const MAX_FRAGS: usize = 8;
const MAX_FRAME: usize = 16 * 1024;
/// A TSO frame: up to 64 KiB of payload plus headers, in up to this many buffers.
const MAX_TSO_FRAGS: usize = 256;
const MAX_TSO_FRAME: usize = offload::MAX_TSO_PAYLOAD + 512;

/// Frames from the wire an [`RxPort`](crate::net::RxPort) may have queued for the worker; more are dropped.
pub const RX_IN_FLIGHT: usize = 4096;

/// Shared by every [`RxPort`](crate::net::RxPort) and the worker: bounds the frames queued in the work channel.
#[derive(Default)]
pub(crate) struct RxGate {
    /// Frames sent to the worker and not yet taken by it.
    pub in_flight: AtomicUsize,
    /// Frames dropped because [`RX_IN_FLIGHT`] were queued; the worker moves them into rx_discards.
    pub dropped: AtomicU64,
}

/// Per queue: a tail kick ([`DpWork::Tx`] / [`DpWork::RxTail`]) is queued and not yet taken. A tail write sends a
/// kick only when it sets the flag; the worker clears it before it looks at the tail, so none is lost.
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
    fn take(flags: &[AtomicBool], q: u16) {
        if let Some(f) = flags.get(q as usize) {
            f.swap(false, Ordering::AcqRel);
        }
    }
}

pub(crate) enum DpWork {
    /// QTX_TAIL(q) moved.
    Tx(u16),
    /// QRX_TAIL(q) moved: buffers were posted.
    RxTail(u16),
    /// A frame from the wire.
    Rx(Vec<u8>),
    /// `--doorbells mmap`: a TX queue is enabled, start polling the doorbell page.
    Poll,
    Stop,
}

/// The size of BAR0's first page, which holds the 16 QTX_TAIL registers (0x0000-0x003F).
pub const DOORBELL_PAGE: u64 = 0x1000;
/// How long the poller sleeps between looks at the doorbell page while a TX queue is enabled.
pub const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// `--doorbells mmap`: BAR0's first page in a memfd the client maps directly, so the guest's QTX_TAIL stores land
/// in shared memory with no message; the datapath worker polls it. Trapped accesses to the page use it too.
pub struct DoorbellPage {
    region: MmapRegion<()>,
    /// The datapath worker is polling (set under the device lock; see `VfState::wake_poller`).
    pub(crate) polling: AtomicBool,
}

impl DoorbellPage {
    pub fn new() -> io::Result<Self> {
        let fd = rustix::fs::memfd_create("vfu-i40evf-doorbells", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, DOORBELL_PAGE)?;
        let region = MmapRegion::build(
            Some(FileOffset::new(File::from(fd), 0)),
            DOORBELL_PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(format!("mapping the doorbell page: {e}")))?;
        Ok(DoorbellPage { region, polling: AtomicBool::new(false) })
    }

    /// The memfd the client maps (offset 0).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.file_offset().expect("built with a file").file().as_fd()
    }

    /// `offset + out.len()` is within the page.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let _ = self.region.as_volatile_slice().read_slice(out, offset as usize);
    }

    /// `offset + data.len()` is within the page.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let _ = self.region.as_volatile_slice().write_slice(data, offset as usize);
    }

    pub fn tail(&self, q: u16) -> u32 {
        let at = (QTX_TAIL1 + 4 * u64::from(q)) as usize;
        u32::from_le(self.region.as_volatile_slice().load::<u32>(at, Ordering::Acquire).unwrap_or(0))
    }

    /// Power-on contents: all zero.
    pub fn clear(&self) {
        self.write(0, &[0u8; DOORBELL_PAGE as usize]);
    }
}

/// QTX_TAIL(q): the register file, or the doorbell page in `--doorbells mmap` mode.
fn tx_tail(st: &VfState, q: u16) -> u32 {
    match &st.doorbells {
        Some(page) => page.tail(q),
        None => st.regs.get(QTX_TAIL1 + 4 * u64::from(q)),
    }
}

/// RX descriptor (32-byte legacy format) writeback bits.
pub const RX_DESC: u64 = 32;
const RX_DD: u64 = 1 << 0;
const RX_EOF: u64 = 1 << 1;
const RX_FLTSTAT_RSS: u64 = 3 << 12;
const RX_LEN_SHIFT: u32 = 38;
/// Frames held per queue while its ring has no free buffer.
pub const RX_BACKLOG: usize = 512;

pub(crate) fn worker(shared: Arc<Shared>, rx: Receiver<DpWork>) {
    let doorbells = shared.lock().doorbells.clone();
    if let Some(page) = doorbells {
        return polling_worker(&shared, &rx, &page);
    }
    while let Ok(w) = rx.recv() {
        if !handle(&shared, w) {
            return;
        }
    }
}

/// One message; false on Stop.
fn handle(shared: &Shared, w: DpWork) -> bool {
    match w {
        DpWork::Tx(q) => {
            Kicks::take(&shared.kicks.tx, q);
            process_tx(shared, q);
        }
        DpWork::RxTail(q) => {
            Kicks::take(&shared.kicks.rx, q);
            drain_rx(shared, q);
        }
        DpWork::Rx(frame) => {
            shared.rx_gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            receive(shared, frame);
        }
        DpWork::Poll => {}
        DpWork::Stop => return false,
    }
    true
}

/// `--doorbells mmap`: while a TX queue is enabled, looks at the doorbell page every [`POLL_INTERVAL`] (and after
/// every message) and walks each queue whose tail moved; otherwise blocks until a message comes, so an idle
/// server burns no CPU. A trapped BAR0 write sends [`DpWork::Poll`] once queues are enabled.
fn polling_worker(shared: &Shared, rx: &Receiver<DpWork>, page: &DoorbellPage) {
    let mut seen = [0u32; MAX_QUEUES as usize];
    let mut generation = 0;
    loop {
        let enabled = {
            let st = shared.lock();
            if st.generation != generation {
                generation = st.generation;
                seen = [0; MAX_QUEUES as usize]; // a reset cleared the page
            }
            page.polling.store(st.pf.tx_enabled != 0, Ordering::Relaxed);
            st.pf.tx_enabled
        };
        let w = if enabled != 0 {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(w) => Some(w),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(w) => Some(w),
                Err(_) => return,
            }
        };
        if let Some(w) = w {
            if !handle(shared, w) {
                return;
            }
        }
        for q in 0..MAX_QUEUES as u16 {
            if enabled & (1 << q) == 0 {
                continue;
            }
            let tail = page.tail(q);
            if tail != seen[q as usize] {
                seen[q as usize] = tail;
                process_tx(shared, q);
            }
        }
    }
}

/// Why a queue was shut down: what hardware's malicious-driver detection would flag.
#[derive(Debug)]
enum Mdd {
    Mem(MemError),
    Desc(&'static str),
}

impl std::fmt::Display for Mdd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mdd::Mem(e) => write!(f, "{e}"),
            Mdd::Desc(d) => f.write_str(d),
        }
    }
}

impl From<MemError> for Mdd {
    fn from(e: MemError) -> Self {
        Mdd::Mem(e)
    }
}

/// The address of descriptor `i` of a ring at `ring` (guest-chosen), plus `off` bytes; MDD if it overflows.
fn desc_addr(ring: u64, i: u32, size: u64, off: u64) -> Result<u64, Mdd> {
    u64::from(i)
        .checked_mul(size)
        .and_then(|o| ring.checked_add(o))
        .and_then(|at| at.checked_add(off))
        .ok_or(Mdd::Desc("descriptor address overflows"))
}

/// Completes every frame between the queue's head and its tail.
pub(crate) fn process_tx(shared: &Shared, q: u16) {
    let qi = q as usize;
    loop {
        let (generation, cfg, head, tail) = {
            let st = shared.lock();
            let Some(cfg) = st.pf.tx.get(qi).copied().flatten() else { return };
            if st.pf.tx_enabled & (1 << q) == 0 {
                return;
            }
            let tail = tx_tail(&st, q);
            (st.generation, cfg, st.tx_head[qi], tail)
        };
        if head == tail {
            return;
        }
        if tail >= cfg.len {
            return disable(shared, q, generation, cfg, Mdd::Desc("tail past the end of the ring"));
        }
        if head >= cfg.len {
            return disable(shared, q, generation, cfg, Mdd::Desc("head past the end of the ring"));
        }
        match tx_frame(shared, cfg.ring, cfg.len, head, tail) {
            Ok(None) => return, // a frame not yet complete up to the tail: wait for more
            Ok(Some((next, frame, off))) => {
                // Checksum insertion and TSO happen here, as the NIC does them, so the wire sees finished frames.
                let segments = offload::apply(&frame, &off);
                let mut st = shared.lock();
                if st.generation != generation {
                    return;
                }
                // CONFIG_VSI_QUEUES may have replaced the ring (and zeroed the head) during the walk: the old
                // ring's index means nothing in the new one.
                if st.pf.tx.get(qi).copied().flatten() != Some(cfg) {
                    log::debug!("TX queue {q}: reconfigured during a frame; frame dropped");
                    return;
                }
                st.tx_head[qi] = next;
                let segments = match segments {
                    Ok(s) => s,
                    Err(e) => {
                        st.pf.stats[11] += 1; // tx_errors
                        log::warn!(
                            "TX queue {q}: frame of {} bytes dropped: offload request invalid: {e}",
                            frame.len()
                        );
                        Vec::new()
                    }
                };
                for seg in &segments {
                    st.queue_frames[qi].1 += 1;
                    count_tx(&mut st.pf.stats, seg);
                }
                let sink = st.sink.clone();
                drop(st);
                for seg in &segments {
                    sink.transmit(seg);
                }
                let mut st = shared.lock();
                if st.generation != generation {
                    return;
                }
                st.raise_queue(q, false);
            }
            Err(e) => return disable(shared, q, generation, cfg, e),
        }
    }
}

/// Reads one frame starting at `head`; writes DTYPE_DONE into its EOP descriptor. Returns the index after it, the
/// frame and its offload request, or None if the frame's EOP is not before the tail yet.
fn tx_frame(shared: &Shared, ring: u64, len: u32, head: u32, tail: u32) -> TxResult {
    let mut frame = Vec::new();
    let mut i = head;
    let mut frags = 0;
    let mut ctx: Option<u64> = None;
    let mut data_qw1: Option<u64> = None;
    while i != tail {
        let at = desc_addr(ring, i, TX_DESC, 0)?;
        let mut d = [0u8; 16];
        shared.mem.read(at, &mut d)?;
        let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
        let qw1 = u64::from_le_bytes(d[8..].try_into().unwrap());
        let wb = desc_addr(ring, i, TX_DESC, 8)?;
        i = (i + 1) % len;
        match qw1 & DTYPE_MASK {
            DTYPE_CONTEXT => {
                ctx = Some(qw1); // TSO parameters for the data descriptors that follow
                continue;
            }
            DTYPE_DATA => {}
            DTYPE_DONE => return Err(Mdd::Desc("descriptor already marked done")),
            _ => return Err(Mdd::Desc("unknown descriptor type")),
        }
        let size = ((qw1 >> BUF_SIZE_SHIFT) & BUF_SIZE_MASK) as usize;
        frags += 1;
        let tso = ctx.is_some_and(|c| c & offload::TXD_CTX_QW1_TSO != 0);
        let (max_frags, max_frame) = if tso { (MAX_TSO_FRAGS, MAX_TSO_FRAME) } else { (MAX_FRAGS, MAX_FRAME) };
        if size == 0 || frags > max_frags || frame.len() + size > max_frame {
            return Err(Mdd::Desc("zero-length buffer, too many buffers or an oversized frame"));
        }
        data_qw1.get_or_insert(qw1);
        let start = frame.len();
        frame.resize(start + size, 0);
        shared.mem.read(addr, &mut frame[start..])?;
        if qw1 & CMD_EOP != 0 {
            let done = (qw1 & !DTYPE_MASK) | DTYPE_DONE;
            shared.mem.write(wb, &done.to_le_bytes())?;
            let off = offload::decode(data_qw1.unwrap_or(qw1), ctx);
            return Ok(Some((i, frame, off)));
        }
    }
    Ok(None)
}

type TxResult = Result<Option<(u32, Vec<u8>, TxOffload)>, Mdd>;

/// tx_bytes, tx_unicast, tx_multicast, tx_broadcast are stats words 6..=9.
fn count_tx(stats: &mut [u64; 12], frame: &[u8]) {
    stats[6] += frame.len() as u64;
    let idx = match frame.first() {
        _ if frame.len() >= 6 && frame[..6] == [0xff; 6] => 9,
        Some(b) if b & 1 == 1 => 8,
        _ => 7,
    };
    stats[idx] += 1;
}

/// Shuts TX queue `q` down, unless a reset or CONFIG_VSI_QUEUES replaced what the failed walk was using.
fn disable(shared: &Shared, q: u16, generation: u64, cfg: TxQueue, why: Mdd) {
    let mut st = shared.lock();
    if st.generation != generation || st.pf.tx.get(q as usize).copied().flatten() != Some(cfg) {
        return;
    }
    st.pf.tx_enabled &= !(1 << q);
    st.pf.stats[11] += 1; // tx_errors
    log::error!("TX queue {q} disabled (malicious driver detection): {why}");
}

/// Frames an [`RxPort`](crate::net::RxPort) dropped because too many were queued count as rx_discards.
fn count_port_drops(shared: &Shared, stats: &mut [u64; 12]) {
    let dropped = shared.rx_gate.dropped.swap(0, Ordering::AcqRel);
    if dropped > 0 {
        stats[4] += dropped;
        log::warn!("{dropped} received frames dropped: {RX_IN_FLIGHT} already waiting for the datapath worker");
    }
}

/// Where a received frame goes: filtered by destination MAC, then steered to an enabled queue.
pub(crate) fn receive(shared: &Shared, frame: Vec<u8>) {
    let mut st = shared.lock();
    count_port_drops(shared, &mut st.pf.stats);
    if frame.len() < 14 || !st.pf.queues_enabled() {
        st.pf.stats[4] += 1; // rx_discards
        return;
    }
    let dst: [u8; 6] = frame[..6].try_into().unwrap();
    let (bcast, mcast) = (dst == [0xff; 6], dst[0] & 1 == 1);
    let wanted =
        bcast || st.pf.macs.contains(&dst) || (!mcast && st.pf.promisc & 1 != 0) || (mcast && st.pf.promisc & 2 != 0);
    if !wanted {
        return; // not for us: a NIC filters it silently
    }
    let q = st.pf.rx_queue_for(&frame);
    let Some(q) = q else {
        st.pf.stats[4] += 1;
        return;
    };
    let backlog = &mut st.rx_backlog[q as usize];
    if backlog.len() >= RX_BACKLOG {
        st.pf.stats[4] += 1;
        return;
    }
    backlog.push_back(frame);
    drop(st);
    drain_rx(shared, q);
}

/// Writes waiting frames into queue `q`'s posted buffers until the backlog or the buffers run out.
pub(crate) fn drain_rx(shared: &Shared, q: u16) {
    let qi = q as usize;
    let mut delivered = 0;
    loop {
        let (generation, cfg, head, frame) = {
            let mut st = shared.lock();
            count_port_drops(shared, &mut st.pf.stats);
            let Some(cfg) = st.pf.rx.get(qi).copied().flatten() else { return };
            if st.pf.rx_enabled & (1 << q) == 0 {
                return;
            }
            let tail = st.regs.get(QRX_TAIL1 + 4 * u64::from(q));
            let head = st.rx_head[qi];
            if tail >= cfg.len || head >= cfg.len {
                drop(st);
                return disable_rx(shared, q, cfg, Mdd::Desc("RX tail or head past the end of the ring"));
            }
            let free = (tail + cfg.len - head) % cfg.len;
            let Some(frame) = st.rx_backlog[qi].front() else { break };
            let need = frame.len().div_ceil(cfg.buf_size as usize);
            if frame.len() > cfg.max_frame as usize || need > cfg.len as usize - 1 {
                // It could never be delivered: waiting for it would block every frame behind it.
                let len = frame.len();
                st.rx_backlog[qi].pop_front();
                st.pf.stats[4] += 1; // rx_discards
                log::debug!(
                    "RX queue {q}: frame of {len} bytes dropped (max frame {}, ring of {} x {} bytes)",
                    cfg.max_frame,
                    cfg.len,
                    cfg.buf_size
                );
                continue;
            }
            if (free as usize) < need {
                break; // wait for the driver to post buffers
            }
            let frame = st.rx_backlog[qi].pop_front().unwrap();
            (st.generation, cfg, head, frame)
        };
        let hash = shared.lock().pf.rss_hash(&frame);
        match rx_frame(shared, &cfg, head, &frame, hash) {
            Ok(next) => {
                let mut st = shared.lock();
                if st.generation != generation {
                    return;
                }
                // CONFIG_VSI_QUEUES may have replaced the ring (and zeroed the head) while the frame was written.
                if st.pf.rx.get(qi).copied().flatten() != Some(cfg) {
                    log::debug!("RX queue {q}: reconfigured during a frame; frame dropped");
                    st.pf.stats[4] += 1;
                    return;
                }
                st.rx_head[qi] = next;
                st.queue_frames[qi].0 += 1;
                count_rx(&mut st.pf.stats, &frame);
                delivered += 1;
            }
            Err(e) => return disable_rx(shared, q, cfg, e),
        }
    }
    if delivered > 0 {
        let mut st = shared.lock();
        st.raise_queue(q, true);
    }
}

/// Writes one frame into descriptors starting at `head`, buffer by buffer; each descriptor's writeback comes after
/// its data, and its status qword last (the driver checks DD, then reads the rest). Returns the next head.
fn rx_frame(shared: &Shared, cfg: &RxQueue, head: u32, frame: &[u8], hash: Option<u32>) -> Result<u32, Mdd> {
    let mut i = head;
    let chunks: Vec<&[u8]> = frame.chunks(cfg.buf_size as usize).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        let at = desc_addr(cfg.ring, i, RX_DESC, 0)?;
        let (at8, at16) = (desc_addr(cfg.ring, i, RX_DESC, 8)?, desc_addr(cfg.ring, i, RX_DESC, 16)?);
        let mut d = [0u8; 8];
        shared.mem.read(at, &mut d)?;
        let buf = u64::from_le_bytes(d);
        shared.mem.write(buf, chunk)?;
        let last = n + 1 == chunks.len();
        let qw0 = u64::from(hash.unwrap_or(0)) << 32;
        let mut qw1 = RX_DD | ((chunk.len() as u64) << RX_LEN_SHIFT);
        if last {
            // The driver takes ptype and checksum status from the EOF descriptor.
            qw1 |= RX_EOF | offload::rx_checksum_ok(frame).qword1_bits();
        }
        if hash.is_some() {
            qw1 |= RX_FLTSTAT_RSS;
        }
        shared.mem.write(at, &qw0.to_le_bytes())?;
        shared.mem.write(at16, &[0u8; 16])?;
        shared.mem.write(at8, &qw1.to_le_bytes())?;
        i = (i + 1) % cfg.len;
    }
    Ok(i)
}

/// rx_bytes, rx_unicast, rx_multicast, rx_broadcast are stats words 0..=3.
fn count_rx(stats: &mut [u64; 12], frame: &[u8]) {
    stats[0] += frame.len() as u64;
    let idx = if frame[..6] == [0xff; 6] {
        3
    } else if frame[0] & 1 == 1 {
        2
    } else {
        1
    };
    stats[idx] += 1;
}

/// Shuts RX queue `q` down, unless CONFIG_VSI_QUEUES replaced what the failed walk was using.
fn disable_rx(shared: &Shared, q: u16, cfg: RxQueue, why: Mdd) {
    let mut st = shared.lock();
    if st.pf.rx.get(q as usize).copied().flatten() != Some(cfg) {
        return;
    }
    st.pf.rx_enabled &= !(1 << q);
    st.rx_backlog[q as usize].clear();
    st.pf.stats[4] += 1;
    log::error!("RX queue {q} disabled (malicious driver detection): {why}");
}
