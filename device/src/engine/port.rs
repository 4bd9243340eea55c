//! Where frames from the wire enter the device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::core::{DpWork, RxGate, RX_IN_FLIGHT};

/// Hands frames from the wire to the device's receive path. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct RxPort {
    pub(crate) work: Sender<DpWork>,
    pub(crate) gate: Arc<RxGate>,
}

impl RxPort {
    /// Queues a frame (without FCS) for reception; false if the device is gone. While [`RX_IN_FLIGHT`] frames
    /// already wait for the datapath worker, or while the device is paused, the frame is dropped and counted in
    /// rx_discards, as a NIC drops on a full FIFO; that still returns true, since backends stop reading once this
    /// returns false.
    pub fn receive(&self, frame: Vec<u8>) -> bool {
        // Held across the send: a pause takes the write lock, so a frame is either queued ahead of the worker's
        // pause message or turned away here.
        let paused = self.gate.paused.read().unwrap_or_else(|e| e.into_inner());
        if *paused {
            self.gate.dropped_paused.fetch_add(1, Ordering::AcqRel);
            return true;
        }
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
