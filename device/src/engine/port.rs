//! Where frames from the wire enter the device.

use std::cell::{Cell, RefCell};
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
    ///
    /// Called on the device's own datapath worker (the loopback backend, from TX), the frame is copied into a
    /// reused buffer and taken by the worker when its current work is done: no channel, no allocation.
    pub fn receive(&self, frame: impl AsRef<[u8]>) -> bool {
        let frame = frame.as_ref();
        // Held across the send: a pause takes the write lock, so a frame is either queued ahead of the worker's
        // pause message or turned away here.
        let paused = self.gate.paused.read().unwrap_or_else(|e| e.into_inner());
        if *paused {
            self.gate.dropped_paused.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        if WORKER.with(Cell::get) == Arc::as_ptr(&self.gate) as usize {
            if !LOCAL.with_borrow_mut(|l| l.push(frame)) {
                self.gate.dropped.fetch_add(1, Ordering::AcqRel);
            }
            return true;
        }
        if self.gate.in_flight.fetch_add(1, Ordering::AcqRel) >= RX_IN_FLIGHT {
            self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.gate.dropped.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        if self.work.send(DpWork::Rx(frame.to_vec())).is_err() {
            self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// Frames handed to an [`RxPort`] on its device's datapath worker thread, oldest first, packed into one buffer
/// that is reused from burst to burst (a TX burst of a whole ring comes back as hundreds of frames at once).
#[derive(Default)]
struct Local {
    bytes: Vec<u8>,
    /// (offset, length) in `bytes`.
    frames: Vec<(usize, usize)>,
}

/// A buffer that grew past this (a burst of TSO segments) is not kept.
const KEEP_BYTES: usize = 1 << 20;

impl Local {
    /// False when [`RX_IN_FLIGHT`] frames wait already.
    fn push(&mut self, frame: &[u8]) -> bool {
        if self.frames.len() >= RX_IN_FLIGHT {
            return false;
        }
        self.frames.push((self.bytes.len(), frame.len()));
        self.bytes.extend_from_slice(frame);
        true
    }
}

thread_local! {
    /// The [`RxGate`] (as an address) of the device whose datapath worker this thread is; 0 on other threads.
    static WORKER: Cell<usize> = const { Cell::new(0) };
    static LOCAL: RefCell<Local> = RefCell::default();
}

/// Marks this thread as the datapath worker of the device with `gate`.
pub(crate) fn enter_worker(gate: &Arc<RxGate>) {
    WORKER.with(|w| w.set(Arc::as_ptr(gate) as usize));
}

/// Hands every frame queued on this thread by [`RxPort::receive`] to `f`, oldest first (including frames `f` itself
/// causes to be queued).
pub(crate) fn take_local(mut f: impl FnMut(&[u8])) {
    loop {
        let mut burst = LOCAL.with_borrow_mut(std::mem::take);
        if burst.frames.is_empty() {
            LOCAL.with_borrow_mut(|l| *l = burst);
            return;
        }
        for &(off, len) in &burst.frames {
            f(&burst.bytes[off..off + len]);
        }
        burst.frames.clear();
        burst.bytes.clear();
        LOCAL.with_borrow_mut(|l| {
            if l.frames.is_empty() && burst.bytes.capacity() <= KEEP_BYTES {
                *l = burst;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_frames_come_out_in_order_and_reuse_one_buffer() {
        let mut cap = 0;
        for round in 0..3 {
            for i in 0..300u16 {
                assert!(LOCAL.with_borrow_mut(|l| l.push(&[i as u8; 60][..usize::from(i % 60) + 1])));
            }
            let mut n = 0u16;
            take_local(|f| {
                assert_eq!(f, &[n as u8; 60][..usize::from(n % 60) + 1]);
                n += 1;
            });
            assert_eq!(n, 300);
            let now = LOCAL.with_borrow(|l| l.bytes.capacity());
            if round > 0 {
                assert_eq!(now, cap, "the buffer is kept, not reallocated");
            }
            cap = now;
        }
        for _ in 0..RX_IN_FLIGHT {
            assert!(LOCAL.with_borrow_mut(|l| l.push(&[0; 14])));
        }
        assert!(!LOCAL.with_borrow_mut(|l| l.push(&[0; 14])), "bounded");
        take_local(|_| {});
    }
}
