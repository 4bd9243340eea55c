//! The device's two worker threads: the admin queue worker (ATQ, ARQ delivery, VF resets) and the datapath worker
//! (TX and RX rings, and in `--doorbells mmap` mode the doorbell poller). Each parks on a pause message and stops
//! on a stop message.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use crate::core::{AqWork, Core, DpWork, Kicks};
use crate::engine::{aq, rx, tx};
use crate::mem::doorbell::DoorbellPage;
use crate::nic::regs::MAX_QUEUES;

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

fn datapath(core: &Core, rx: Receiver<DpWork>) {
    if let Some(page) = core.doorbells.clone() {
        return polling_datapath(core, &rx, &page);
    }
    while let Ok(w) = rx.recv() {
        if !handle(core, w) {
            return;
        }
    }
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
            rx::receive(core, frame);
        }
        DpWork::Poll => {}
        DpWork::Pause => core.pause.park(),
        DpWork::Stop => return false,
    }
    true
}

/// `--doorbells mmap`: while a TX queue is enabled, looks at the doorbell page every [`POLL_INTERVAL`] (and after
/// every message) and walks each queue whose tail moved; otherwise blocks until a message comes, so an idle
/// server burns no CPU. A trapped BAR0 write sends [`DpWork::Poll`] once queues are enabled.
fn polling_datapath(core: &Core, rx: &Receiver<DpWork>, page: &DoorbellPage) {
    let mut seen = [0u32; MAX_QUEUES as usize];
    let mut generation = 0;
    loop {
        let enabled = {
            let st = core.lock();
            if st.generation != generation {
                generation = st.generation;
                seen = [0; MAX_QUEUES as usize]; // a reset or a load rewrote the page
            }
            page.polling.store(st.nic.pf.tx_enabled != 0, Ordering::Relaxed);
            st.nic.pf.tx_enabled
        };
        let w = if enabled != 0 {
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
            let paused = matches!(w, DpWork::Pause);
            if !handle(core, w) {
                return;
            }
            if paused {
                continue; // look at the state afresh: it may have been replaced while parked
            }
        }
        for q in 0..MAX_QUEUES as u16 {
            if enabled & (1 << q) == 0 {
                continue;
            }
            let tail = page.tail(q);
            if tail != seen[q as usize] {
                seen[q as usize] = tail;
                tx::process_tx(core, q);
            }
        }
    }
}
