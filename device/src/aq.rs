//! The admin queue engine: the VF's transmit queue (ATQ) in guest memory, processed on the device worker.
//!
//! The device state lock is held only to read or update registers, never across a guest-memory access, because
//! with fd-less guest RAM each access is a round trip to the client.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::regs::*;
use crate::vf::{Shared, Work};
use crate::virtchnl::{self, After, Pf};

pub const DESC_SIZE: u64 = 32;

pub const FLAG_DD: u16 = 0x0001;
pub const FLAG_CMP: u16 = 0x0002;
pub const FLAG_ERR: u16 = 0x0004;

/// Opcodes the VF sends.
pub const OP_QUEUE_SHUTDOWN: u16 = 0x0003;
pub const OP_SEND_TO_PF: u16 = 0x0801;

/// A 32-byte admin queue descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    pub flags: u16,
    pub opcode: u16,
    pub datalen: u16,
    pub retval: u16,
    pub cookie_high: u32,
    pub cookie_low: u32,
    pub param0: u32,
    pub param1: u32,
    pub addr_high: u32,
    pub addr_low: u32,
}

impl Desc {
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Desc {
            flags: u16_at(0),
            opcode: u16_at(2),
            datalen: u16_at(4),
            retval: u16_at(6),
            cookie_high: u32_at(8),
            cookie_low: u32_at(12),
            param0: u32_at(16),
            param1: u32_at(20),
            addr_high: u32_at(24),
            addr_low: u32_at(28),
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..2].copy_from_slice(&self.flags.to_le_bytes());
        b[2..4].copy_from_slice(&self.opcode.to_le_bytes());
        b[4..6].copy_from_slice(&self.datalen.to_le_bytes());
        b[6..8].copy_from_slice(&self.retval.to_le_bytes());
        for (o, v) in [
            (8, self.cookie_high),
            (12, self.cookie_low),
            (16, self.param0),
            (20, self.param1),
            (24, self.addr_high),
            (28, self.addr_low),
        ] {
            b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Opcode of PF -> VF messages in the ARQ.
pub const OP_SEND_TO_VF: u16 = 0x0802;
pub const FLAG_BUF: u16 = 0x1000;
pub const FLAG_LB: u16 = 0x0200;
/// Largest virtchnl message the VF may send (its AQ buffers are 4 KiB).
pub const MAX_MSG: usize = 4096;
/// PF -> VF messages held while the ARQ is full before the oldest are dropped (default of `--max-arq-queued`).
pub const ARQ_BACKLOG: usize = 64;

/// A PF -> VF virtchnl message waiting for an ARQ slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArqMsg {
    pub op: u32,
    pub status: i32,
    pub payload: Vec<u8>,
}

pub(crate) fn worker(shared: Arc<Shared>, rx: Receiver<Work>) {
    while let Ok(w) = rx.recv() {
        match w {
            Work::Atq => process_atq(&shared),
            Work::Arq => deliver_arq(&shared),
            Work::PfReset => pf_initiated_reset(&shared),
            Work::Stop => return,
        }
    }
}

struct Ring {
    generation: u64,
    base: u64,
    len: u32,
    head: u32,
    tail: u32,
}

/// Reads a queue's registers; None when the queue is disabled.
fn ring(shared: &Shared, len_reg: u64, bal: u64, bah: u64, head: u64, tail: u64) -> Option<Ring> {
    let st = shared.lock();
    let lenreg = st.regs.get(len_reg);
    (lenreg & AQ_ENABLE != 0).then(|| Ring {
        generation: st.generation,
        base: u64::from(st.regs.get(bal)) | (u64::from(st.regs.get(bah)) << 32),
        len: lenreg & AQ_LEN_MASK,
        head: st.regs.get(head),
        tail: st.regs.get(tail),
    })
}

/// Marks a queue critically broken (LEN.CRIT), as hardware does on a head/tail outside the ring.
fn stall(shared: &Shared, len_reg: u64, why: std::fmt::Arguments<'_>) {
    log::error!("{why}; admin queue stalled until reset");
    let mut st = shared.lock();
    let v = st.regs.get(len_reg) | AQ_CRIT;
    st.regs.set(len_reg, v);
}

/// Processes ATQH..ATQT: read each descriptor and its buffer, handle it, write it back with DD|CMP, then advance
/// ATQH (the driver takes "head == tail" as done, so the head moves only after the writeback).
pub(crate) fn process_atq(shared: &Shared) {
    while let Some(r) = ring(shared, VF_ATQLEN1, VF_ATQBAL1, VF_ATQBAH1, VF_ATQH1, VF_ATQT1) {
        if r.head == r.tail {
            break;
        }
        if r.len == 0 || r.head >= r.len || r.tail >= r.len {
            return stall(
                shared,
                VF_ATQLEN1,
                format_args!("ATQ head {} / tail {} outside ring of {}", r.head, r.tail, r.len),
            );
        }
        let Some(at) = r.base.checked_add(u64::from(r.head) * DESC_SIZE) else {
            return stall(shared, VF_ATQLEN1, format_args!("ATQ base {:#x} wraps the address space", r.base));
        };
        let mut raw = [0u8; 32];
        if let Err(e) = shared.mem.read(at, &mut raw) {
            return stall(shared, VF_ATQLEN1, format_args!("ATQ descriptor {} at {at:#x}: {e}", r.head));
        }
        let mut d = Desc::from_bytes(&raw);
        let after = handle(shared, &d, r.generation);
        d.flags |= FLAG_DD | FLAG_CMP;
        if after.is_err() {
            d.flags |= FLAG_ERR;
        }
        if shared.lock().generation != r.generation {
            return; // reset while we worked: the ring is gone
        }
        if let Err(e) = shared.mem.write(at, &d.to_bytes()) {
            return stall(shared, VF_ATQLEN1, format_args!("ATQ writeback {} at {at:#x}: {e}", r.head));
        }
        {
            let mut st = shared.lock();
            if st.generation != r.generation {
                return;
            }
            st.regs.set(VF_ATQH1, (r.head + 1) % r.len);
            if after == Ok(After::LinkUp) {
                let ev = st.pf.link_event(true);
                st.post(virtchnl::OP_EVENT, 0, ev);
            }
        }
        if after == Ok(After::ResetVf) {
            vf_reset(shared);
            return;
        }
        deliver_arq(shared);
    }
    deliver_arq(shared);
}

/// Handles one ATQ descriptor. Virtchnl replies are queued for the ARQ; Err completes the descriptor with ERR.
fn handle(shared: &Shared, d: &Desc, generation: u64) -> Result<After, ()> {
    match d.opcode {
        OP_QUEUE_SHUTDOWN => {
            log::debug!("ATQ: queue shutdown (param0 {})", d.param0);
            Ok(After::Nothing)
        }
        OP_SEND_TO_PF => {
            let op = d.cookie_high;
            let len = usize::from(d.datalen);
            let mut msg = vec![0u8; len];
            if len > 0 {
                if d.flags & FLAG_BUF == 0 || len > MAX_MSG {
                    log::warn!("virtchnl op {op}: {len} bytes without a buffer or over {MAX_MSG}");
                    return Err(());
                }
                let addr = (u64::from(d.addr_high) << 32) | u64::from(d.addr_low);
                if let Err(e) = shared.mem.read(addr, &mut msg) {
                    log::warn!("virtchnl op {op}: message buffer: {e}");
                    return Err(());
                }
            }
            let mut st = shared.lock();
            if st.generation != generation {
                return Ok(After::Nothing);
            }
            log::debug!("virtchnl: <- op {op} ({len} bytes)");
            let out = st.pf.handle(op, &msg);
            if op == virtchnl::OP_CONFIG_VSI_QUEUES && matches!(out.reply, Some((0, _))) {
                st.tx_head.fill(0); // fresh rings start at descriptor 0
                st.rx_head.fill(0);
            }
            if let Some((status, payload)) = out.reply {
                st.post(op, status, payload);
            }
            Ok(out.after)
        }
        op => {
            log::debug!("ATQ: opcode {op:#06x} completed without action");
            Ok(After::Nothing)
        }
    }
}

/// Moves queued PF -> VF messages into the ARQ's posted buffers while there are free slots, then raises the
/// admin queue interrupt cause.
pub(crate) fn deliver_arq(shared: &Shared) {
    while let Some(r) = ring(shared, VF_ARQLEN1, VF_ARQBAL1, VF_ARQBAH1, VF_ARQH1, VF_ARQT1) {
        if r.len == 0 || r.head >= r.len || r.tail >= r.len {
            return stall(
                shared,
                VF_ARQLEN1,
                format_args!("ARQ head {} / tail {} outside ring of {}", r.head, r.tail, r.len),
            );
        }
        // Slots head..tail belong to the device; head == tail means none is free.
        if r.head == r.tail {
            return;
        }
        let Some(m) = shared.lock().arq_backlog.pop_front() else { return };
        let Some(at) = r.base.checked_add(u64::from(r.head) * DESC_SIZE) else {
            return stall(shared, VF_ARQLEN1, format_args!("ARQ base {:#x} wraps the address space", r.base));
        };
        let mut raw = [0u8; 32];
        if let Err(e) = shared.mem.read(at, &mut raw) {
            return stall(shared, VF_ARQLEN1, format_args!("ARQ descriptor {} at {at:#x}: {e}", r.head));
        }
        let mut d = Desc::from_bytes(&raw);
        let buf = (u64::from(d.addr_high) << 32) | u64::from(d.addr_low);
        if !m.payload.is_empty() && (d.flags & FLAG_BUF == 0 || usize::from(d.datalen) < m.payload.len()) {
            log::error!(
                "ARQ slot {} has no room ({} byte buffer, flags {:#x}) for op {} ({} bytes): message dropped",
                r.head,
                d.datalen,
                d.flags,
                m.op,
                m.payload.len()
            );
            continue;
        }
        if !m.payload.is_empty() {
            if let Err(e) = shared.mem.write(buf, &m.payload) {
                return stall(shared, VF_ARQLEN1, format_args!("ARQ buffer {buf:#x}: {e}"));
            }
        }
        d.flags = (d.flags & (FLAG_BUF | FLAG_LB)) | FLAG_DD | FLAG_CMP;
        d.opcode = OP_SEND_TO_VF;
        d.datalen = m.payload.len() as u16;
        d.retval = 0;
        d.cookie_high = m.op;
        d.cookie_low = m.status as u32;
        if shared.lock().generation != r.generation {
            return;
        }
        if let Err(e) = shared.mem.write(at, &d.to_bytes()) {
            return stall(shared, VF_ARQLEN1, format_args!("ARQ writeback {} at {at:#x}: {e}", r.head));
        }
        let mut st = shared.lock();
        if st.generation != r.generation {
            return;
        }
        st.regs.set(VF_ARQH1, (r.head + 1) % r.len);
        log::debug!("virtchnl: -> op {} status {} ({} bytes)", m.op, m.status, m.payload.len());
        st.raise_misc(ICR0_ADMINQ);
    }
}

/// The VF reset sequence: RSTAT goes INPROGRESS (state cleared, admin queue disabled), COMPLETED, then VFACTIVE.
pub(crate) fn vf_reset(shared: &Shared) {
    log::info!("VF reset: in progress");
    shared.lock().vf_reset();
    for (state, name) in [(RSTAT_COMPLETED, "completed"), (RSTAT_VFACTIVE, "VF active")] {
        std::thread::sleep(std::time::Duration::from_millis(1));
        shared.lock().regs.set(VFGEN_RSTAT, state);
        log::info!("VF reset: {name}");
    }
}

/// A reset the PF starts: warn the driver with RESET_IMPENDING, give it a moment to read it, then reset.
fn pf_initiated_reset(shared: &Shared) {
    log::info!("PF-initiated VF reset: sending RESET_IMPENDING");
    shared.lock().post(virtchnl::OP_EVENT, 0, Pf::reset_impending_event());
    deliver_arq(shared);
    std::thread::sleep(std::time::Duration::from_millis(50));
    vf_reset(shared);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trip() {
        let d = Desc {
            flags: 0x1400,
            opcode: OP_SEND_TO_PF,
            datalen: 8,
            retval: 0,
            cookie_high: 1,
            cookie_low: 0,
            param0: 0,
            param1: 0,
            addr_high: 0x1,
            addr_low: 0x2000,
        };
        assert_eq!(Desc::from_bytes(&d.to_bytes()), d);
        assert_eq!(&d.to_bytes()[2..4], &[0x01, 0x08]);
    }
}
