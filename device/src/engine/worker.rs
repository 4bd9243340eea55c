//! The device's two worker threads: the admin queue worker (ATQ, ARQ delivery, VF resets) and the datapath worker
//! (TX and RX rings, and the doorbell poller while the client may have the doorbell pages mapped). Each parks on a
//! pause message and stops on a stop message.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use crate::core::{AqWork, Core, DpWork, Kicks};
use crate::engine::{aq, port, rx, tx};
use crate::nic::regs::{MAX_QUEUES, VF_ARQT1};

/// How long the poller sleeps between looks at the doorbell page while a TX queue is enabled.
pub const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// The worker threads and the channels that feed them.
pub(crate) struct Workers {
    pub aq: Sender<AqWork>,
    pub dp: Sender<DpWork>,
    handles: Vec<JoinHandle<()>>,
}

/// Workers that park on a pause.
pub(crate) const COUNT: usize = 2;

impl Workers {
    pub fn spawn(core: &Arc<Core>) -> Self {
        let (aq_tx, aq_rx) = unbounded();
        let c = core.clone();
        let aq = std::thread::Builder::new()
            .name("vf-aq".into())
            .spawn(move || aq::worker(&c, aq_rx))
            .expect("spawning the admin queue worker");
        let (dp_tx, dp_rx) = unbounded();
        let c = core.clone();
        let dp = std::thread::Builder::new()
            .name("vf-datapath".into())
            .spawn(move || datapath(&c, dp_rx))
            .expect("spawning the datapath worker");
        let _ = core.dp.set(dp_tx.clone());
        let _ = core.aq.set(aq_tx.clone());
        Workers { aq: aq_tx, dp: dp_tx, handles: vec![aq, dp] }
    }

    /// Stops both workers and waits for them.
    pub fn stop(&mut self) {
        let _ = self.aq.send(AqWork::Stop);
        let _ = self.dp.send(DpWork::Stop);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Serves kicks and frames. While [`Dev::must_poll`](crate::core::Dev::must_poll) (the client may store
/// doorbells into its mapping and a store could start work) it also looks at the doorbell pages every
/// [`POLL_INTERVAL`] and after every message, and acts on each tail that moved; otherwise it blocks until a message
/// comes, so an idle server burns no CPU. It looks once more after polling stops, so stores made before the
/// client unmapped the pages are not missed.
fn datapath(core: &Core, rx: Receiver<DpWork>) {
    port::enter_worker(&core.rx_gate);
    let mut seen = Seen::default();
    let mut generation = u64::MAX;
    let mut was_mapped = false;
    loop {
        let (poll, mapped) = {
            let st = core.lock();
            if st.generation != generation {
                generation = st.generation;
                seen = Seen::default(); // a reset or a load rewrote the pages
            }
            (st.must_poll(), st.remap.maybe_mapped() & 1 != 0)
        };
        core.polling.store(poll, Ordering::Relaxed);
        if mapped || was_mapped {
            scan(core, &mut seen);
            take_local(core);
        }
        was_mapped = mapped;
        let w = if poll {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(w) => Some(w),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(w) => Some(w),
                Err(_) => return,
            }
        };
        if let Some(w) = w {
            // Stores made before the pause was asked for are work the device finishes before it stops.
            if matches!(w, DpWork::Pause) && (mapped || was_mapped) {
                scan(core, &mut seen);
                take_local(core);
            }
            if !handle(core, w) {
                return;
            }
            take_local(core);
        }
    }
}

/// Receives the frames the worker's own TX sent to a loopback backend (queued by [`crate::RxPort`] on this
/// thread), before the next message: a pause that follows finds them delivered.
fn take_local(core: &Core) {
    port::take_local(|frame| rx::receive(core, frame));
}

/// One message; false on Stop.
fn handle(core: &Core, w: DpWork) -> bool {
    match w {
        DpWork::Tx(q) => {
            Kicks::take(&core.kicks.tx, q);
            tx::process_tx(core, q);
        }
        DpWork::RxTail(q) => {
            Kicks::take(&core.kicks.rx, q);
            rx::drain_rx(core, q);
        }
        DpWork::Rx(frame) => {
            core.rx_gate.in_flight.fetch_sub(1, Ordering::AcqRel);
            rx::receive(core, &frame);
        }
        DpWork::Poll => {}
        DpWork::Pause => core.pause.park(),
        DpWork::Stop => return false,
    }
    true
}

/// The doorbell values the poller last acted on.
#[derive(Default)]
struct Seen {
    tx: [u32; MAX_QUEUES as usize],
    rx: [u32; MAX_QUEUES as usize],
    arqt: u32,
}

/// Acts on every doorbell in the pages that moved since the last look: TX tails of enabled queues, RX tails of
/// queues with frames waiting for buffers, and ARQT while PF messages wait.
fn scan(core: &Core, seen: &mut Seen) {
    let (tx_enabled, rx_waiting, arqt, arq_waiting, tx_tails, rx_tails) = {
        let st = core.lock();
        let rx_waiting: u32 =
            st.rx_backlog.iter().enumerate().filter(|(_, b)| !b.is_empty()).map(|(q, _)| 1 << q).sum();
        let tx_tails: [u32; MAX_QUEUES as usize] = std::array::from_fn(|q| st.tx_tail(q as u16));
        let rx_tails: [u32; MAX_QUEUES as usize] = std::array::from_fn(|q| st.rx_tail(q as u16));
        (st.nic.pf.tx_enabled, rx_waiting, st.reg(VF_ARQT1), !st.nic.arq.is_empty(), tx_tails, rx_tails)
    };
    for q in 0..MAX_QUEUES as usize {
        // The engines follow the tail past what this look saw: remember where they stopped (the head), or a tail
        // that comes round to the value seen here a ring later would pass for unchanged.
        if tx_enabled & (1 << q) != 0 && tx_tails[q] != seen.tx[q] {
            tx::process_tx(core, q as u16);
            seen.tx[q] = core.lock().nic.queues[q].tx_head;
        }
        if rx_waiting & (1 << q) != 0 && rx_tails[q] != seen.rx[q] {
            rx::drain_rx(core, q as u16);
            seen.rx[q] = core.lock().nic.queues[q].rx_head;
        }
    }
    if arq_waiting && arqt != seen.arqt {
        seen.arqt = arqt;
        if let Some(aq) = core.aq.get() {
            let _ = aq.send(AqWork::Arq);
        }
    }
}
