//! Where transmitted frames go. Packet backends (tap, sockets, loopback) live outside the device crate and
//! implement [`FrameSink`]; received frames come in through an [`RxPort`](crate::RxPort).

/// Receives every frame the guest transmits, already segmented and checksummed (offloads applied).
/// Called from the datapath worker: it must not block for long (drop rather than wait).
pub trait FrameSink: Send + Sync {
    fn transmit(&self, frame: &[u8]);
}

/// Drops every frame: a NIC with no link partner.
pub struct NoSink;

impl FrameSink for NoSink {
    fn transmit(&self, _frame: &[u8]) {}
}
