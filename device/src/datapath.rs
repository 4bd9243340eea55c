//! The datapath worker: TX descriptor rings in guest memory.
//!
//! A tail write (a trapped, posted register write) kicks this worker; the protocol thread never waits for it.
//! Frames are parsed and counted; with no packet backend attached they are dropped after completion, as a NIC
//! with no link partner would.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::mem::MemError;
use crate::regs::QTX_TAIL1;
use crate::vf::Shared;

pub const TX_DESC: u64 = 16;
const DTYPE_MASK: u64 = 0xf;
const DTYPE_DATA: u64 = 0x0;
const DTYPE_CONTEXT: u64 = 0x1;
pub const DTYPE_DONE: u64 = 0xf;
const CMD_EOP: u64 = 1 << 4;
const BUF_SIZE_SHIFT: u32 = 34;
const BUF_SIZE_MASK: u64 = 0x3fff;
/// The most data descriptors one frame may use (the hardware limit the driver respects).
const MAX_FRAGS: usize = 8;
const MAX_FRAME: usize = 16 * 1024;

pub(crate) enum DpWork {
    /// QTX_TAIL(q) moved.
    Tx(u16),
    Stop,
}

pub(crate) fn worker(shared: Arc<Shared>, rx: Receiver<DpWork>) {
    while let Ok(w) = rx.recv() {
        match w {
            DpWork::Tx(q) => process_tx(&shared, q),
            DpWork::Stop => return,
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

/// Completes every frame between the queue's head and its tail.
fn process_tx(shared: &Shared, q: u16) {
    let qi = q as usize;
    loop {
        let (generation, ring, len, head, tail) = {
            let st = shared.lock();
            let Some(cfg) = st.pf.tx.get(qi).copied().flatten() else { return };
            if st.pf.tx_enabled & (1 << q) == 0 {
                return;
            }
            let tail = st.regs.get(QTX_TAIL1 + 4 * u64::from(q));
            (st.generation, cfg.ring, cfg.len, st.tx_head[qi], tail)
        };
        if head == tail {
            return;
        }
        if tail >= len {
            return disable(shared, q, generation, Mdd::Desc("tail past the end of the ring"));
        }
        match tx_frame(shared, ring, len, head, tail) {
            Ok(None) => return, // a frame not yet complete up to the tail: wait for more
            Ok(Some((next, frame))) => {
                let mut st = shared.lock();
                if st.generation != generation {
                    return;
                }
                st.tx_head[qi] = next;
                count_tx(&mut st.pf.stats, &frame);
                let vectors: Vec<usize> =
                    st.pf.irq_map.iter().enumerate().filter(|(_, m)| m.1 & (1 << q) != 0).map(|(v, _)| v).collect();
                for v in vectors {
                    st.raise(v);
                }
            }
            Err(e) => return disable(shared, q, generation, e),
        }
    }
}

/// Reads one frame starting at `head`; writes DTYPE_DONE into its EOP descriptor. Returns the index after it and
/// the frame, or None if the frame's EOP is not before the tail yet.
fn tx_frame(shared: &Shared, ring: u64, len: u32, head: u32, tail: u32) -> Result<Option<(u32, Vec<u8>)>, Mdd> {
    let mut frame = Vec::new();
    let mut i = head;
    let mut frags = 0;
    while i != tail {
        let at = ring + u64::from(i) * TX_DESC;
        let mut d = [0u8; 16];
        shared.mem.read(at, &mut d)?;
        let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
        let qw1 = u64::from_le_bytes(d[8..].try_into().unwrap());
        i = (i + 1) % len;
        match qw1 & DTYPE_MASK {
            DTYPE_CONTEXT => continue, // TSO/tunnel parameters: not needed to complete the frame
            DTYPE_DATA => {}
            DTYPE_DONE => return Err(Mdd::Desc("descriptor already marked done")),
            _ => return Err(Mdd::Desc("unknown descriptor type")),
        }
        let size = ((qw1 >> BUF_SIZE_SHIFT) & BUF_SIZE_MASK) as usize;
        frags += 1;
        if size == 0 || frags > MAX_FRAGS || frame.len() + size > MAX_FRAME {
            return Err(Mdd::Desc("zero-length buffer, too many buffers or an oversized frame"));
        }
        let start = frame.len();
        frame.resize(start + size, 0);
        shared.mem.read(addr, &mut frame[start..])?;
        if qw1 & CMD_EOP != 0 {
            let done = (qw1 & !DTYPE_MASK) | DTYPE_DONE;
            shared.mem.write(at + 8, &done.to_le_bytes())?;
            return Ok(Some((i, frame)));
        }
    }
    Ok(None)
}

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

fn disable(shared: &Shared, q: u16, generation: u64, why: Mdd) {
    let mut st = shared.lock();
    if st.generation != generation {
        return;
    }
    st.pf.tx_enabled &= !(1 << q);
    st.pf.stats[11] += 1; // tx_errors
    log::error!("TX queue {q} disabled (malicious driver detection): {why}");
}
