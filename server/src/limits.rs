//! Resource limits a client cannot argue with. Each bounds something a hostile or broken client could otherwise
//! grow without end; `docs/safety.md` says what each protects. All are command-line flags with safe defaults.

use std::time::Duration;

use crate::wire::HEADER_SIZE;

/// Room for a message's header and fixed fields beyond its data.
const MSG_HEADROOM: usize = HEADER_SIZE + 4096;

#[derive(Debug, Clone)]
pub struct Limits {
    /// DMA mappings at once (VERSION's max_dma_maps); more get ENOSPC.
    pub max_dma_maps: usize,
    /// Data bytes in one message (VERSION's max_data_xfer_size): REGION_READ/WRITE counts; messages larger than
    /// this plus headroom get E2BIG.
    pub max_data_xfer: usize,
    /// Server -> client DMA requests outstanding at once; more fail on the device side.
    pub max_pending_dma: usize,
    /// Close a connection that has sent part of a message and then nothing for this long. None: never (a VMM may
    /// legitimately idle between whole messages, and that never counts).
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_dma_maps: 65535, max_data_xfer: 1 << 20, max_pending_dma: 1024, idle_timeout: None }
    }
}

impl Limits {
    /// The largest message accepted.
    pub fn max_msg(&self) -> usize {
        self.max_data_xfer + MSG_HEADROOM
    }
}
