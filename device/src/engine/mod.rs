//! What runs on the device's workers, over guest memory: the admin queue, TX and RX rings, the doorbell poller,
//! and the workers themselves (threads, pause). Everything here goes through [`Core`](crate::core::Core).

pub(crate) mod aq;
pub(crate) mod derive;
pub(crate) mod port;
pub(crate) mod rx;
pub(crate) mod tx;
pub(crate) mod worker;

use crate::core::Dev;
use crate::mem::MemError;

/// Counts a queue shut down by malicious driver detection.
pub(crate) fn mdd(d: &mut Dev) {
    d.nic.counters.mdd_events += 1;
}

/// Why a queue was shut down: what hardware's malicious-driver detection would flag.
#[derive(Debug)]
pub(crate) enum Mdd {
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
pub(crate) fn desc_addr(ring: u64, i: u32, size: u64, off: u64) -> Result<u64, Mdd> {
    u64::from(i)
        .checked_mul(size)
        .and_then(|o| ring.checked_add(o))
        .and_then(|at| at.checked_add(off))
        .ok_or(Mdd::Desc("descriptor address overflows"))
}
