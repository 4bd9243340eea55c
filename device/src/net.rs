//! Where frames leave and enter the device. Packet backends (tap, sockets, loopback) live outside the device
//! crate; they implement [`FrameSink`] for transmitted frames and feed received frames through an [`RxPort`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::datapath::{DpWork, RxGate, RX_IN_FLIGHT};

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
pub struct RxPort {
    pub(crate) work: Sender<DpWork>,
    pub(crate) gate: Arc<RxGate>,
}

impl RxPort {
    /// Queues a frame (without FCS) for reception; false if the device is gone. While [`RX_IN_FLIGHT`] frames
    /// already wait for the datapath worker the frame is dropped (counted in rx_discards), as a NIC drops on a full
    /// FIFO; that still returns true, since backends stop reading once this returns false.
    pub fn receive(&self, frame: Vec<u8>) -> bool {
        if self.gate.in_flight.fetch_add(1, Ordering::AcqRel) >= RX_IN_FLIGHT {
            self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.gate.dropped.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        if self.work.send(DpWork::Rx(frame)).is_err() {
            self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}
