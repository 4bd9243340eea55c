//! TX rings: a tail write kicks the datapath worker, which walks the descriptors from the queue's head to the
//! tail, gathers each frame, applies its offloads and hands the result to the packet sink.

use crate::core::Core;
use crate::engine::derive::{self, Ring};
use crate::engine::{desc_addr, mdd, Mdd};
use crate::nic::offload::{self, TxOffload};
use crate::nic::regs::QTX_TAIL1;
use crate::nic::virtchnl::TxQueue;

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

/// Completes every frame between the queue's head and its tail.
pub(crate) fn process_tx(core: &Core, q: u16) {
    let qi = q as usize;
    let mut buf = Gather::take();
    // The lock taken to raise a frame's interrupt is kept to look at the next frame.
    let mut held = None;
    loop {
        let (generation, cfg, head, tail) = {
            let mut st = held.take().unwrap_or_else(|| core.lock());
            let Some(cfg) = st.nic.pf.tx.get(qi).copied().flatten() else {
                log::trace!("TX queue {q}: kicked, not configured");
                return;
            };
            if st.nic.pf.tx_enabled & (1 << q) == 0 {
                log::trace!("TX queue {q}: kicked, not enabled (tail {})", st.tx_tail(q));
                return;
            }
            if !st.bus_master() {
                log::trace!("TX queue {q}: kicked, bus mastering off");
                return;
            }
            let (generation, head, tail) = (st.generation, st.nic.queues[qi].tx_head, st.tx_tail(q));
            let span = core.mem.deriving().then(|| st.observe(Ring::Tx(q), cfg.ring, cfg.len, head, tail, 0));
            drop(st);
            derive::mark(core, span.flatten()); // before the descriptors' writeback
            (generation, cfg, head, tail)
        };
        log::trace!("TX queue {q}: head {head} tail {tail}");
        if head == tail {
            return;
        }
        if core.cfg.faults.tx_hang() {
            // tx-hang: the queue's engine is stuck: nothing is read, completed or sent; the next kick after the
            // fault is cleared picks up from the same head.
            core.cfg.faults.tx_hang_fired();
            log::debug!("tx-hang fault: TX queue {q} holds descriptors {head}..{tail}");
            return;
        }
        if tail >= cfg.len {
            return disable(core, q, generation, cfg, Mdd::Desc("tail past the end of the ring"));
        }
        if head >= cfg.len {
            return disable(core, q, generation, cfg, Mdd::Desc("head past the end of the ring"));
        }
        match tx_frame(core, cfg.ring, cfg.len, head, tail, &mut buf.0) {
            Ok(None) => return, // a frame not yet complete up to the tail: wait for more
            Ok(Some((next, len, off))) => {
                // Checksum insertion and TSO happen here, as the NIC does them, so the wire sees finished frames.
                // Without TSO the frame goes out of the gather buffer itself, checksums filled in place.
                let out = match off.tso {
                    Some(_) => offload::apply(&buf.0[..len], &off).map(Out::Segments),
                    None => offload::fill_checksums(&mut buf.0[..len], &off).map(|()| Out::Frame),
                };
                let frame = &buf.0[..len];
                let mut st = core.lock();
                if st.generation != generation {
                    return;
                }
                // CONFIG_VSI_QUEUES may have replaced the ring (and zeroed the head) during the walk: the old
                // ring's index means nothing in the new one.
                if st.nic.pf.tx.get(qi).copied().flatten() != Some(cfg) {
                    log::debug!("TX queue {q}: reconfigured during a frame; frame dropped");
                    return;
                }
                st.nic.queues[qi].tx_head = next;
                let out = match out {
                    Ok(o) => o,
                    Err(e) => {
                        st.nic.pf.stats.tx_errors += 1;
                        log::warn!("TX queue {q}: frame of {len} bytes dropped: offload request invalid: {e}");
                        Out::Dropped
                    }
                };
                out.each(frame, |seg| {
                    st.nic.queues[qi].stats.tx_frames += 1;
                    st.nic.pf.stats.count_tx(seg);
                });
                let sink = st.sink.clone();
                drop(st);
                out.each(frame, |seg| sink.transmit(seg));
                let mut st = core.lock();
                if st.generation != generation {
                    return;
                }
                st.raise_queue(q, false);
                held = Some(st);
            }
            Err(e) => {
                log::warn!("TX queue {q}: the walk from head {head} to tail {tail} (ring of {}) failed", cfg.len);
                return disable(core, q, generation, cfg, e);
            }
        }
    }
}

/// What a frame became once its offloads were applied.
enum Out {
    /// The gathered frame itself (no offload, or checksums filled in place).
    Frame,
    /// TSO segments.
    Segments(Vec<Vec<u8>>),
    /// An invalid offload request: nothing goes out.
    Dropped,
}

impl Out {
    fn each(&self, frame: &[u8], mut f: impl FnMut(&[u8])) {
        match self {
            Out::Frame => f(frame),
            Out::Segments(segs) => segs.iter().for_each(|s| f(s)),
            Out::Dropped => {}
        }
    }
}

thread_local! {
    /// The TX gather buffer of this worker thread, reused from frame to frame so that TX allocates nothing per
    /// frame. It only grows (to the largest frame seen, at most a TSO frame); its bytes past a frame are stale.
    static GATHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The thread's gather buffer, taken for one [`process_tx`] and given back when dropped (on every return path).
struct Gather(Vec<u8>);

impl Gather {
    fn take() -> Self {
        Gather(GATHER.try_with(|g| std::mem::take(&mut *g.borrow_mut())).unwrap_or_default())
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let _ = GATHER.try_with(|g| *g.borrow_mut() = v);
    }
}

/// Reads one frame starting at `head` into `buf` (grown as needed, never shrunk: the frame is `buf[..len]`); writes
/// DTYPE_DONE into its EOP descriptor. Returns the index after it, the frame's length and its offload request, or
/// None if the frame's EOP is not before the tail yet.
fn tx_frame(core: &Core, ring: u64, len: u32, head: u32, tail: u32, buf: &mut Vec<u8>) -> TxResult {
    let mut flen = 0usize;
    let mut i = head;
    let mut frags = 0;
    let mut ctx: Option<u64> = None;
    let mut data_qw1: Option<u64> = None;
    let mut dma = core.dma_batch();
    while i != tail {
        let at = desc_addr(ring, i, TX_DESC, 0)?;
        let mut d = [0u8; 16];
        dma.read(at, &mut d)?;
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
        if size == 0 || frags > max_frags || flen + size > max_frame {
            return Err(Mdd::Desc("zero-length buffer, too many buffers or an oversized frame"));
        }
        data_qw1.get_or_insert(qw1);
        let start = flen;
        flen += size;
        if buf.len() < flen {
            buf.resize(flen, 0);
        }
        dma.read(addr, &mut buf[start..flen])?;
        if qw1 & CMD_EOP != 0 {
            let done = (qw1 & !DTYPE_MASK) | DTYPE_DONE;
            dma.write(wb, &done.to_le_bytes())?;
            let off = offload::decode(data_qw1.unwrap_or(qw1), ctx);
            return Ok(Some((i, flen, off)));
        }
    }
    Ok(None)
}

/// At ENABLE_QUEUES, before the latched kick: a tail that points past a never-written (all-zero) descriptor at the
/// head was written for the ring a VF reset replaced (iavf can transmit on the old ring until its reset task
/// stops the queues, after the reset completed), not for this one. It is dropped (the tail register reads as the
/// head), so the new ring starts empty instead of the walk calling a zero descriptor malicious; the driver's next
/// tail write moves it on. A tail written for this ring (a frame posted before the queues were enabled) points at
/// a written descriptor and is kept.
pub(crate) fn drop_stale_tail(core: &Core, q: u16) {
    let (cfg, head, tail) = {
        let st = core.lock();
        let Some(cfg) = st.nic.pf.tx.get(q as usize).copied().flatten() else { return };
        (cfg, st.nic.queues[q as usize].tx_head, st.tx_tail(q))
    };
    if head == tail || head >= cfg.len || tail >= cfg.len {
        return;
    }
    let Ok(at) = desc_addr(cfg.ring, head, TX_DESC, 0) else { return };
    let mut d = [0u8; 16];
    if core.mem.read(at, &mut d).is_err() || d != [0; 16] {
        return; // a bad ring address is the walk's to report
    }
    let mut st = core.lock();
    if st.nic.pf.tx.get(q as usize).copied().flatten() == Some(cfg) && st.tx_tail(q) == tail {
        st.set_reg(QTX_TAIL1 + 4 * u64::from(q), head);
        log::info!("TX queue {q}: tail {tail}, written before the ring was configured, points at unwritten descriptors: dropped");
    }
}

type TxResult = Result<Option<(u32, usize, TxOffload)>, Mdd>;

/// Shuts TX queue `q` down, unless a reset or CONFIG_VSI_QUEUES replaced what the failed walk was using.
fn disable(core: &Core, q: u16, generation: u64, cfg: TxQueue, why: Mdd) {
    {
        let mut st = core.lock();
        if st.generation != generation || st.nic.pf.tx.get(q as usize).copied().flatten() != Some(cfg) {
            drop(st);
            // Nothing to shut down any more; an injected failure still gets its PF reset.
            if core.injected_dma.load(std::sync::atomic::Ordering::SeqCst) {
                core.malicious_driver(Some(q), format!("TX queue {q}: {why}"));
            }
            return;
        }
        mdd(&mut st);
        st.nic.pf.tx_enabled &= !(1 << q);
        st.nic.pf.stats.tx_errors += 1;
        log::error!("TX queue {q} disabled (malicious driver detection): {why}");
    }
    core.malicious_driver(Some(q), format!("TX queue {q}: {why}"));
}
