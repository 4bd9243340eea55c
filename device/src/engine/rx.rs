//! RX: frames from the wire are filtered by MAC, steered to a queue (RSS when granted) and written into the
//! buffers the driver posted, waiting in a bounded backlog while a ring has none.

use std::borrow::Cow;
use std::sync::MutexGuard;

use crate::core::{Core, Dev};
use crate::engine::derive::{self, Ring};
use crate::engine::{desc_addr, mdd, Mdd};
use crate::nic::offload;
use crate::nic::virtchnl::RxQueue;

/// RX descriptor (32-byte legacy format) writeback bits.
pub const RX_DESC: u64 = 32;
const RX_DD: u64 = 1 << 0;
const RX_EOF: u64 = 1 << 1;
const RX_FLTSTAT_RSS: u64 = 3 << 12;
const RX_LEN_SHIFT: u32 = 38;
/// Frames held per queue while its ring has no free buffer.
pub const RX_BACKLOG: usize = 512;

/// Where a received frame goes: filtered by destination MAC, then steered to an enabled queue. A frame that finds
/// its queue's backlog empty and a buffer posted is written straight from `frame`; only one that has to wait is
/// copied into the backlog.
pub(crate) fn receive(core: &Core, frame: &[u8]) {
    let mut st = core.lock();
    core.fold_port_drops(&mut st);
    let pf = &st.nic.pf;
    if frame.len() < 14 || !pf.queues_enabled() || !st.bus_master() {
        st.nic.pf.stats.rx_discards += 1;
        return;
    }
    let dst: [u8; 6] = frame[..6].try_into().unwrap();
    let (bcast, mcast) = (dst == [0xff; 6], dst[0] & 1 == 1);
    let wanted = bcast || pf.macs.contains(&dst) || (!mcast && pf.promisc & 1 != 0) || (mcast && pf.promisc & 2 != 0);
    if !wanted {
        return; // not for us: a NIC filters it silently
    }
    if core.cfg.faults.drop_rx() {
        // rx-drop: lost before it reaches a ring, counted like a frame the NIC had no room for.
        st.nic.pf.stats.rx_discards += 1;
        log::trace!("rx-drop fault: frame of {} bytes dropped", frame.len());
        return;
    }
    // The hash is computed once, here, under the lock: the queue is chosen by it and the writeback reports it.
    let Some((q, hash)) = pf.rx_steer(frame) else {
        st.nic.pf.stats.rx_discards += 1;
        return;
    };
    if st.rx_backlog[q as usize].is_empty() {
        return drain(core, q, Some(st), Some((frame, hash)));
    }
    park(&mut st, q, Some((frame, hash)));
    drain(core, q, Some(st), None);
}

/// Queues `frame` (if any) at the back of queue `q`'s backlog, or counts it discarded when the backlog is full.
fn park(st: &mut Dev, q: u16, frame: Option<(&[u8], Option<u32>)>) {
    let Some((frame, hash)) = frame else { return };
    if st.rx_backlog[q as usize].len() >= RX_BACKLOG {
        st.nic.pf.stats.rx_discards += 1;
        return;
    }
    st.rx_backlog[q as usize].push_back((frame.to_vec(), hash));
}

/// Writes waiting frames into queue `q`'s posted buffers until the backlog or the buffers run out.
pub(crate) fn drain_rx(core: &Core, q: u16) {
    drain(core, q, None, None);
}

/// [`drain_rx`], starting under the lock `held` if the caller has it, with `first` (a frame that arrived while the
/// backlog was empty, so it goes first) ahead of the backlog. `first` is parked in the backlog before the lock is
/// given up for anything but its own delivery, so frames stay in order.
fn drain<'c>(core: &'c Core, q: u16, mut held: Option<MutexGuard<'c, Dev>>, mut first: Option<(&[u8], Option<u32>)>) {
    let qi = q as usize;
    let mut delivered = 0;
    // The lock taken to commit a frame is kept to look at the next one (one lock per frame, not two).
    loop {
        let (generation, cfg, head, frame, hash) = {
            let mut st = held.take().unwrap_or_else(|| core.lock());
            core.fold_port_drops(&mut st);
            let Some(cfg) = st.nic.pf.rx.get(qi).copied().flatten() else { return park(&mut st, q, first) };
            if st.nic.pf.rx_enabled & (1 << q) == 0 || !st.bus_master() {
                return park(&mut st, q, first);
            }
            let tail = st.rx_tail(q);
            let head = st.nic.queues[qi].rx_head;
            if tail >= cfg.len || head >= cfg.len {
                park(&mut st, q, first);
                drop(st);
                return disable_rx(core, q, cfg, Mdd::Desc("RX tail or head past the end of the ring"));
            }
            if core.mem.deriving() {
                let span = st.observe(Ring::Rx(q), cfg.ring, cfg.len, head, tail, u64::from(cfg.buf_size));
                if span.is_some() {
                    park(&mut st, q, first.take());
                    drop(st);
                    derive::mark(core, span);
                    continue;
                }
            }
            let free = (tail + cfg.len - head) % cfg.len;
            let len = match (first, st.rx_backlog[qi].front()) {
                (Some((f, _)), _) => f.len(),
                (None, Some((f, _))) => f.len(),
                (None, None) => {
                    if delivered > 0 {
                        st.raise_queue(q, true);
                    }
                    return;
                }
            };
            let need = len.div_ceil(cfg.buf_size as usize);
            if len > cfg.max_frame as usize || need > cfg.len as usize - 1 {
                // It could never be delivered: waiting for it would block every frame behind it.
                if first.take().is_none() {
                    st.rx_backlog[qi].pop_front();
                }
                st.nic.pf.stats.rx_discards += 1;
                log::debug!(
                    "RX queue {q}: frame of {len} bytes dropped (max frame {}, ring of {} x {} bytes)",
                    cfg.max_frame,
                    cfg.len,
                    cfg.buf_size
                );
                continue;
            }
            if (free as usize) < need {
                // Wait for the driver to post buffers.
                park(&mut st, q, first);
                if delivered > 0 {
                    st.raise_queue(q, true);
                }
                return;
            }
            let (frame, hash) = match first.take() {
                Some((f, h)) => (Cow::Borrowed(f), h),
                None => {
                    let (f, h) = st.rx_backlog[qi].pop_front().unwrap();
                    (Cow::Owned(f), h)
                }
            };
            (st.generation, cfg, head, frame, hash)
        };
        match rx_frame(core, &cfg, head, &frame, hash) {
            Ok(next) => {
                let mut st = core.lock();
                if st.generation != generation {
                    return;
                }
                // CONFIG_VSI_QUEUES may have replaced the ring (and zeroed the head) while the frame was written.
                if st.nic.pf.rx.get(qi).copied().flatten() != Some(cfg) {
                    log::debug!("RX queue {q}: reconfigured during a frame; frame dropped");
                    st.nic.pf.stats.rx_discards += 1;
                    return;
                }
                st.nic.queues[qi].rx_head = next;
                st.nic.queues[qi].stats.rx_frames += 1;
                st.nic.pf.stats.count_rx(&frame);
                delivered += 1;
                held = Some(st);
            }
            Err(e) => return disable_rx(core, q, cfg, e),
        }
    }
}

/// Writes one frame into descriptors starting at `head`, buffer by buffer; each descriptor's writeback comes after
/// its data, and its status qword last (the driver checks DD, then reads the rest). Returns the next head.
fn rx_frame(core: &Core, cfg: &RxQueue, head: u32, frame: &[u8], hash: Option<u32>) -> Result<u32, Mdd> {
    let mut i = head;
    let count = frame.len().div_ceil(cfg.buf_size as usize);
    let mut dma = core.dma_batch();
    for (n, chunk) in frame.chunks(cfg.buf_size as usize).enumerate() {
        let at = desc_addr(cfg.ring, i, RX_DESC, 0)?;
        let at8 = desc_addr(cfg.ring, i, RX_DESC, 8)?;
        desc_addr(cfg.ring, i, RX_DESC, RX_DESC - 1)?; // the writeback covers the whole descriptor
        let mut d = [0u8; 8];
        dma.read(at, &mut d)?;
        let buf = u64::from_le_bytes(d);
        dma.write(buf, chunk)?;
        let last = n + 1 == count;
        let qw0 = u64::from(hash.unwrap_or(0)) << 32;
        let mut qw1 = RX_DD | ((chunk.len() as u64) << RX_LEN_SHIFT);
        if last {
            // The driver takes ptype and checksum status from the EOF descriptor.
            qw1 |= RX_EOF | offload::rx_checksum_ok(frame).qword1_bits();
        }
        if hash.is_some() {
            qw1 |= RX_FLTSTAT_RSS;
        }
        // qword 0 and qwords 2-3 in one write with qword 1 (the status) still zero, so DD stays clear until the
        // status qword goes in last: the driver sees the descriptor done only once the rest is there.
        let mut rest = [0u8; RX_DESC as usize];
        rest[..8].copy_from_slice(&qw0.to_le_bytes());
        dma.write(at, &rest)?;
        dma.write(at8, &qw1.to_le_bytes())?;
        i = (i + 1) % cfg.len;
    }
    Ok(i)
}

/// Shuts RX queue `q` down, unless CONFIG_VSI_QUEUES replaced what the failed walk was using.
fn disable_rx(core: &Core, q: u16, cfg: RxQueue, why: Mdd) {
    {
        let mut st = core.lock();
        if st.nic.pf.rx.get(q as usize).copied().flatten() != Some(cfg) {
            drop(st);
            // Nothing to shut down any more; an injected failure still gets its PF reset.
            if core.injected_dma.load(std::sync::atomic::Ordering::SeqCst) {
                core.malicious_driver(Some(q), format!("RX queue {q}: {why}"));
            }
            return;
        }
        mdd(&mut st);
        st.nic.pf.rx_enabled &= !(1 << q);
        st.rx_backlog[q as usize].clear();
        st.nic.pf.stats.rx_discards += 1;
        log::error!("RX queue {q} disabled (malicious driver detection): {why}");
    }
    core.malicious_driver(Some(q), format!("RX queue {q}: {why}"));
}
