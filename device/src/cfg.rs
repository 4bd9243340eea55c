//! What the user chose on the command line: the device's fixed configuration. It is not state: a destination is
//! configured the same way and checks the saved state against it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::Events;
use crate::fault::Faults;

use crate::nic::adminq::ARQ_BACKLOG;
use crate::nic::virtchnl::LinkSpeed;

/// A real i40e VF's MSI-X table: 4 queue vectors and the misc vector.
pub const MSIX_VECTORS: u16 = 5;
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// `--doorbells`: whether BAR0's doorbell pages may be mapped by the client.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Doorbells {
    /// Never: every access is a message; no remap IRQ.
    Trap,
    /// Offered to every client from the start (outside migration); the remap IRQ tells one that enables it when
    /// the pages are taken back.
    Mmap,
    /// Offered only to a client that enables the remap IRQ, outside migration.
    Remap,
}

impl Doorbells {
    pub fn name(self) -> &'static str {
        match self {
            Doorbells::Trap => "trap",
            Doorbells::Mmap => "mmap",
            Doorbells::Remap => "remap",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VfConfig {
    pub mac: [u8; 6],
    /// Queue pairs offered to the driver (1..=16).
    pub queue_pairs: u16,
    pub link_speed: LinkSpeed,
    /// How BAR0's doorbell pages reach the device (`docs/remap-irq.md`).
    pub doorbells: Doorbells,
    /// PF -> VF messages held while the driver posts no ARQ buffers; past this the oldest is dropped.
    pub max_arq_queued: usize,
    /// Fault injection (docs/faults.md), shared with the server and the control socket.
    pub faults: Arc<Faults>,
    /// Where the device reports link changes, resets and malicious-driver detection.
    pub events: Arc<Events>,
}

impl Default for VfConfig {
    fn default() -> Self {
        // Locally administered unicast; 4 queue pairs and 5 vectors like a real VF.
        VfConfig {
            mac: [0x02, 0x00, 0x00, 0x15, 0x4c, 0x01],
            queue_pairs: 4,
            link_speed: LinkSpeed(10000),
            doorbells: Doorbells::Remap,
            max_arq_queued: ARQ_BACKLOG,
            faults: Arc::default(),
            events: Arc::default(),
        }
    }
}

impl VfConfig {
    /// MSI-X vectors: one per queue pair plus the misc vector, at least the real VF's five.
    pub fn msix_vectors(&self) -> u16 {
        (self.queue_pairs + 1).max(MSIX_VECTORS)
    }
}
