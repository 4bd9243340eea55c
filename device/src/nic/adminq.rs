//! The admin queue's message format: the 32-byte descriptor, its flags and opcodes, and PF -> VF messages
//! waiting for ARQ slots.

use serde::{Deserialize, Serialize};

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
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArqMsg {
    pub op: u32,
    pub status: i32,
    pub payload: Vec<u8>,
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
