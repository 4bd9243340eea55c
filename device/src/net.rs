//! Where frames leave and enter the device. Packet backends (tap, sockets, loopback) live outside the device
//! crate; they implement [`FrameSink`] for transmitted frames and feed received frames through an [`RxPort`].

use crossbeam_channel::Sender;

use crate::datapath::DpWork;

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

/// Hands frames from the wire to the device's receive path. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct RxPort(pub(crate) Sender<DpWork>);

impl RxPort {
    /// Queues a frame (without FCS) for reception; false if the device is gone.
    pub fn receive(&self, frame: Vec<u8>) -> bool {
        self.0.send(DpWork::Rx(frame)).is_ok()
    }
}
