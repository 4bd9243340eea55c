//! The i40e VF as a NIC: the register map, the admin queue's message format, the virtchnl PF, offloads, RSS and
//! statistics. Definitions and pure logic over bytes: no threads, no guest memory, no device-wide state, so each
//! is tested (and fuzzed) on its own.

pub mod adminq;
pub(crate) mod le;
pub mod offload;
pub mod regs;
pub mod rss;
pub mod stats;
pub mod virtchnl;
