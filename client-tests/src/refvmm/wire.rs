//! The wire peer: the VMM process plays the network. Its UDP socket W is the REMOTE of both servers' `dgram`
//! backends, so every frame the VF transmits arrives here; it sends numbered frames to the VF's MAC at the
//! backend address of whichever server is active.
//!
//! During the switchover the peer *holds* its frames (at most [`HOLD_CAP`]; then it generates none until it can
//! send again): a frame sent to a source whose state has already been saved would be dropped by a
//! device whose counters no longer migrate, and no one could account for it. Once the destination has loaded the
//! state, the held frames are sent to it at once: they reach a device that is still stopped, which counts them as
//! dropped (rx_discards), and those counters are the ones the guest reads afterwards.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Shared, C_RX_SENT, C_TX_ARRIVED};

/// Frames held during a switchover, at most: a burst the destination's socket buffer takes whole.
pub const HOLD_CAP: usize = 64;

/// The MAC the peer uses as its own (source of RX frames, destination of TX frames).
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// Markers in the UDP payload: frames to the VF (RX) and from it (TX).
pub const RX_MAGIC: [u8; 4] = *b"vfuR";
pub const TX_MAGIC: [u8; 4] = *b"vfuX";

/// A 64-byte IPv4/UDP frame from `src` to `dst` carrying `magic` and `seq` at bytes 42..50; the UDP source port
/// varies with `seq`, so RSS spreads frames over the queues.
pub fn frame(dst: [u8; 6], src: [u8; 6], magic: [u8; 4], seq: u32) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let sport = 1000 + (seq % 50000) as u16;
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&[0x30, 0x39, 0, 26, 0, 0]);
    f.extend_from_slice(&magic);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(64, 0);
    f
}

/// The sequence number of one of our frames with `magic`.
pub fn parse(f: &[u8], magic: [u8; 4]) -> Option<u32> {
    (f.len() >= 50 && f[42..46] == magic).then(|| u32::from_le_bytes(f[46..50].try_into().unwrap()))
}

struct Target {
    to: Option<SocketAddr>,
    held: VecDeque<u32>,
    next_seq: u32,
    /// Rate schedule: `base_seq + rate * (now - base)` frames are due.
    base: Instant,
    base_seq: u32,
    /// Window mode: the harvest count last seen and when it moved, frames given up as lost.
    win_seen: u64,
    win_at: Instant,
    win_lost: u64,
}

/// A TX frame that arrived at W.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub seq: u32,
    pub from: SocketAddr,
}

/// What the receiver saw: our frames, and how many other datagrams.
type Received = (Vec<Arrival>, u64);

pub struct WireResult {
    /// Sequence numbers 0..generated were used; `sent` of them went out (the others are `send_errors`, or still
    /// held when the run ended).
    pub generated: u32,
    pub sent: u64,
    pub send_errors: u64,
    pub arrivals: Vec<Arrival>,
    /// Datagrams at W that were not one of the VF's numbered frames.
    pub other: u64,
}

pub struct Wire {
    sock: UdpSocket,
    vf_mac: [u8; 6],
    rate: AtomicU64,
    target: Mutex<Target>,
    send_errors: AtomicU64,
    shared: Arc<Shared>,
    /// Closed loop instead of a rate: at most this many frames sent and not yet harvested (0: use the rate).
    window: AtomicU64,
}

impl Wire {
    pub fn new(sock: UdpSocket, vf_mac: [u8; 6], rate: u64, to: SocketAddr, shared: Arc<Shared>) -> Arc<Wire> {
        Arc::new(Wire {
            sock,
            vf_mac,
            rate: AtomicU64::new(rate),
            target: Mutex::new(Target {
                to: Some(to),
                held: VecDeque::new(),
                next_seq: 0,
                base: Instant::now(),
                base_seq: 0,
                win_seen: 0,
                win_at: Instant::now(),
                win_lost: 0,
            }),
            send_errors: AtomicU64::new(0),
            shared,
            window: AtomicU64::new(0),
        })
    }

    /// Frames per second from now on (0: none).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::SeqCst);
    }

    /// RX as fast as the guest takes it: keep `frames` sent and not yet harvested (0: back to the rate).
    pub fn set_window(&self, frames: u64) {
        self.window.store(frames, Ordering::SeqCst);
    }

    /// Sends frame `seq`; only a frame the kernel took counts as sent (what it then drops at the receiving
    /// socket shows in that socket's drop counter, [`udp_drops`]).
    fn send(&self, to: SocketAddr, seq: u32) {
        let f = frame(self.vf_mac, PEER_MAC, RX_MAGIC, seq);
        match self.sock.send_to(&f, to) {
            Ok(_) => self.shared.count(C_RX_SENT),
            Err(_) => {
                self.send_errors.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Frames to the VF from now on are held (switchover).
    pub fn hold(&self) {
        self.target.lock().unwrap().to = None;
    }

    /// Sends the held frames to `to`, then keeps sending there. Returns how many were held.
    pub fn switch_to(&self, to: SocketAddr) -> usize {
        let mut t = self.target.lock().unwrap();
        let held: Vec<u32> = t.held.drain(..).collect();
        for &seq in &held {
            self.send(to, seq);
        }
        t.to = Some(to);
        held.len()
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u64 {
        self.shared.total(C_RX_SENT)
    }

    /// The sender: frames at `rate` per second while traffic is on.
    fn tx_loop(&self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            {
                let mut t = self.target.lock().unwrap();
                let full = t.to.is_none() && t.held.len() >= HOLD_CAP;
                let rate = self.rate.load(Ordering::SeqCst);
                let on = self.shared.traffic.load(Ordering::SeqCst) && rate > 0 && !full;
                let window = self.window.load(Ordering::SeqCst);
                if on && window > 0 {
                    let harvested = self.shared.total(super::C_RX_HARVESTED);
                    if harvested != t.win_seen {
                        t.win_seen = harvested;
                        t.win_at = Instant::now();
                    }
                    // A frame the device dropped is never harvested: after 20 ms without progress, start afresh.
                    if t.win_at.elapsed() > Duration::from_millis(20) {
                        t.win_lost = self.sent().saturating_sub(harvested);
                        t.win_at = Instant::now();
                    }
                    let limit = harvested + t.win_lost + window;
                    for _ in 0..window {
                        let Some(to) = t.to.filter(|_| self.sent() < limit) else { break };
                        let seq = t.next_seq;
                        t.next_seq += 1;
                        self.send(to, seq);
                    }
                } else if on {
                    let due =
                        u64::from(t.base_seq) + (t.base.elapsed().as_micros() as u64).saturating_mul(rate) / 1_000_000;
                    while u64::from(t.next_seq) < due {
                        let seq = t.next_seq;
                        t.next_seq += 1;
                        match t.to {
                            Some(to) => self.send(to, seq),
                            None => t.held.push_back(seq),
                        }
                        if t.to.is_none() && t.held.len() >= HOLD_CAP {
                            break;
                        }
                    }
                } else {
                    // Off (or holding a full buffer): the schedule restarts when frames flow again, no burst.
                    t.base = Instant::now();
                    t.base_seq = t.next_seq;
                }
            }
            let window = self.window.load(Ordering::SeqCst) > 0;
            std::thread::sleep(Duration::from_micros(if window { 50 } else { 500 }));
        }
    }

    /// The receiver: frames the VF transmitted.
    fn rx_loop(&self, sock: UdpSocket) -> io::Result<Received> {
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut arrivals = Vec::new();
        let mut other = 0;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => match parse(&buf[..n], TX_MAGIC) {
                    Some(seq) => {
                        arrivals.push(Arrival { seq, from });
                        self.shared.count(C_TX_ARRIVED);
                    }
                    None => other += 1,
                },
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Ok((arrivals, other));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the sender and the receiver.
    pub fn spawn(self: &Arc<Self>) -> io::Result<WireThreads> {
        let rx_sock = self.sock.try_clone()?;
        let w = self.clone();
        let tx = std::thread::Builder::new().name("refvmm-wire-tx".into()).spawn(move || w.tx_loop())?;
        let w = self.clone();
        let rx = std::thread::Builder::new().name("refvmm-wire-rx".into()).spawn(move || w.rx_loop(rx_sock))?;
        Ok(WireThreads { wire: self.clone(), tx: Some(tx), rx: Some(rx) })
    }
}

/// The running peer; [`WireThreads::finish`] (or drop) stops it. `Shared::stop` must be set first.
pub struct WireThreads {
    wire: Arc<Wire>,
    tx: Option<JoinHandle<()>>,
    rx: Option<JoinHandle<io::Result<Received>>>,
}

impl WireThreads {
    pub fn finish(mut self) -> Result<WireResult, String> {
        self.wire.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.tx.take() {
            t.join().map_err(|_| "the wire sender panicked".to_string())?;
        }
        let (arrivals, other) = match self.rx.take().map(|t| t.join()) {
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => return Err(format!("the wire receiver failed: {e}")),
            _ => return Err("the wire receiver panicked".into()),
        };
        let t = self.wire.target.lock().unwrap();
        Ok(WireResult {
            generated: t.next_seq,
            sent: self.wire.sent(),
            send_errors: self.wire.send_errors.load(Ordering::SeqCst),
            arrivals,
            other,
        })
    }
}

impl Drop for WireThreads {
    fn drop(&mut self) {
        self.wire.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.tx.take() {
            let _ = t.join();
        }
        if let Some(t) = self.rx.take() {
            let _ = t.join();
        }
    }
}

/// The kernel's drop count for the IPv4 UDP socket bound to `port` (/proc/net/udp): datagrams that reached the
/// host but not the socket (a full receive buffer). None when there is no such socket or no procfs.
pub fn udp_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!(":{port:04X}");
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 13 && f[1].ends_with(&want)).then(|| f[f.len() - 1].parse().ok()).flatten()
    })
}
