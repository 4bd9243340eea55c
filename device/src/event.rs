//! Asynchronous events for the control socket (docs/faults.md): link changes, resets, migration state changes,
//! malicious-driver detection. Emitters never block: each subscriber has a bounded queue, and a subscriber that
//! does not keep up loses events (counted, logged) rather than stalling the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::Serialize;

/// Events queued per subscriber before new ones are dropped.
pub const EVENT_QUEUE: usize = 1024;

/// One event. Serialized as `{"event": "LINK_CHANGE", "data": {...}}` by the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Event {
    /// The link state the PF reports to the VF changed.
    LinkChange { up: bool, speed_mbps: u32, cause: String },
    /// A VF reset: `kind` is "vf" (the driver asked), "pf" (PF-initiated), "flr" or "device" (DEVICE_RESET or a new
    /// client); `phase` is "start" or "done".
    Reset { kind: String, phase: String },
    /// The vfio-user migration state changed (server side), or a transition failed into ERROR.
    MigrationState { from: String, to: String },
    /// The device found the driver misbehaving (or a dma-error fault fired) and the PF acted on it.
    MaliciousDriver { queue: Option<u16>, reason: String },
}

/// The subscribers.
#[derive(Debug, Default)]
pub struct Events {
    subs: Mutex<Vec<Sender<Event>>>,
    dropped: AtomicU64,
}

impl Events {
    /// A new subscriber's queue; dropping the receiver unsubscribes.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = bounded(EVENT_QUEUE);
        self.subs.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Sends `e` to every subscriber without waiting.
    pub fn emit(&self, e: Event) {
        log::debug!("event: {e:?}");
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| match s.try_send(e.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!("a control client does not read its events: {n} dropped so far");
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Events dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_every_event_and_a_slow_one_loses_only_its_own() {
        let ev = Events::default();
        let (a, b) = (ev.subscribe(), ev.subscribe());
        for i in 0..EVENT_QUEUE + 5 {
            ev.emit(Event::Reset { kind: "vf".into(), phase: i.to_string() });
            let _ = a.try_recv();
        }
        assert_eq!(b.len(), EVENT_QUEUE);
        assert_eq!(ev.dropped(), 5);
        drop(b);
        ev.emit(Event::LinkChange { up: true, speed_mbps: 10000, cause: "test".into() });
        assert_eq!(ev.subs.lock().unwrap().len(), 1, "a dropped receiver unsubscribes");
        let j = serde_json::to_string(&a.try_recv().unwrap()).unwrap();
        assert_eq!(j, r#"{"event":"LINK_CHANGE","data":{"up":true,"speed_mbps":10000,"cause":"test"}}"#);
    }
}
