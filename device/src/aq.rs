//! The admin queue engine: the VF's transmit queue (ATQ) in guest memory, processed on the device worker.
//!
//! The device state lock is held only to read or update registers, never across a guest-memory access, because
//! with fd-less guest RAM each access is a round trip to the client.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::regs::*;
use crate::vf::{Shared, Work};

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

pub(crate) fn worker(shared: Arc<Shared>, rx: Receiver<Work>) {
    while let Ok(w) = rx.recv() {
        match w {
            Work::Atq => process_atq(&shared),
        }
    }
}

/// Processes ATQH..ATQT: read each descriptor, handle it, write it back with DD|CMP, then advance ATQH (the
/// driver takes "head == tail" as done, so the head moves only after the writeback).
fn process_atq(shared: &Shared) {
    loop {
        let (generation, base, len, head, tail) = {
            let st = shared.lock();
            let lenreg = st.regs.get(VF_ATQLEN1);
            let base = u64::from(st.regs.get(VF_ATQBAL1)) | (u64::from(st.regs.get(VF_ATQBAH1)) << 32);
            (st.generation, base, lenreg & AQ_LEN_MASK, st.regs.get(VF_ATQH1), st.regs.get(VF_ATQT1))
        };
        if !atq_enabled(shared) || head == tail {
            return;
        }
        if len == 0 || head >= len || tail >= len {
            log::error!("ATQ head {head} / tail {tail} outside ring of {len}: admin queue stalled until reset");
            let mut st = shared.lock();
            let v = st.regs.get(VF_ATQLEN1) | (1 << 30);
            st.regs.set(VF_ATQLEN1, v);
            return;
        }
        let at = base + u64::from(head) * DESC_SIZE;
        let mut raw = [0u8; 32];
        if let Err(e) = shared.mem.read(at, &mut raw) {
            log::error!("ATQ descriptor {head} at {at:#x}: {e}; admin queue stalled until reset");
            return;
        }
        let mut d = Desc::from_bytes(&raw);
        let ok = handle(shared, &d);
        d.flags |= FLAG_DD | FLAG_CMP;
        if !ok {
            d.flags |= FLAG_ERR;
        }
        {
            let st = shared.lock();
            if st.generation != generation {
                return; // reset while we worked: the ring is gone
            }
        }
        if let Err(e) = shared.mem.write(at, &d.to_bytes()) {
            log::error!("ATQ writeback {head} at {at:#x}: {e}");
            return;
        }
        let mut st = shared.lock();
        if st.generation == generation {
            st.regs.set(VF_ATQH1, (head + 1) % len);
        }
    }
}

fn atq_enabled(shared: &Shared) -> bool {
    shared.lock().regs.get(VF_ATQLEN1) & AQ_ENABLE != 0
}

/// Handles one descriptor; false completes it with ERR.
fn handle(_shared: &Shared, d: &Desc) -> bool {
    match d.opcode {
        OP_QUEUE_SHUTDOWN => {
            log::debug!("ATQ: queue shutdown (param0 {})", d.param0);
            true
        }
        OP_SEND_TO_PF => {
            log::debug!("ATQ: virtchnl op {} ({} bytes): no PF side yet", d.cookie_high, d.datalen);
            true
        }
        op => {
            log::debug!("ATQ: opcode {op:#06x} completed without action");
            true
        }
    }
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
