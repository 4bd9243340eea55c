//! The "vCPU": the iavf driver model (testkit's [`DriverModel`]) running on its own thread over a [`VmmBus`] (the
//! socket for BAR0, the VMM's memfd for memory), doing what the driver's NAPI poll and xmit paths do: harvest the
//! RX rings and give every buffer back, feed the TX rings with numbered frames and reclaim completed descriptors,
//! re-arm the queue vector. It also dirties some guest pages of its own (a guest workload), as a real guest does.
//!
//! The orchestrator stops it (no more register or memory access: the vCPU is paused) before STOP_COPY and
//! resumes it with the destination's bus after the destination runs.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device::nic::regs::{MAX_QUEUES, QRX_TAIL1, QTX_TAIL1, VFINT_DYN_CTLN1, VF_ARQT1};
use device::nic::virtchnl::{OP_CONFIG_RSS_KEY, OP_GET_STATS, VSI_ID};
use testkit::{msg_queue_select, Bus, DriverModel};

use super::mem::GuestRam;
use super::remap::Mappings;
use super::wire::{frame, parse, PEER_MAC, RX_MAGIC, TX_MAGIC};
use super::{Shared, C_DB_MAPPED, C_DB_TRAPPED, C_RX_HARVESTED, C_TX_DONE, C_TX_SENT};
use crate::reg::DYN_INTENA;
use crate::{Client, BAR0};

/// Guest memory layout (guest physical = IOVA).
pub const AQ_BASE: u64 = 0x10_0000;
pub const RINGS: u64 = 0x20_0000;
pub const RX_BUFS: u64 = 0x30_0000;
pub const TX_BUFS: u64 = 0x40_0000;
/// The guest workload dirties pages from here to the end of memory.
pub const WORKLOAD: u64 = 0x80_0000;
/// The smallest guest memory the layout fits in (with some workload pages).
pub const MIN_MEMORY: u64 = 16 << 20;

pub const PAIRS: u16 = 2;
pub const RING_LEN: u32 = 256;
const RX_BUF: u64 = 2048;
const TX_BUF: u64 = 256;
const RX_DESC: u64 = 32;
const TX_DESC: u64 = 16;

pub fn tx_ring(q: u16) -> u64 {
    RINGS + 0x4000 * u64::from(q)
}

pub fn rx_ring(q: u16) -> u64 {
    tx_ring(q) + 0x2000
}

fn rx_buf(q: u16, slot: u32) -> u64 {
    RX_BUFS + (u64::from(q) * u64::from(RING_LEN) + u64::from(slot)) * RX_BUF
}

fn tx_buf(q: u16, slot: u32) -> u64 {
    TX_BUFS + (u64::from(q) * u64::from(RING_LEN) + u64::from(slot)) * TX_BUF
}

/// BAR0 through a vfio-user connection, memory through the VMM's memfd (writes tracked as guest-dirty). BAR0
/// offsets inside an area the remap handler has mapped are plain loads and stores into that mapping, as a guest's
/// accesses to a KVM memory slot would be; everything else is a REGION_READ/REGION_WRITE message.
#[derive(Clone)]
pub struct VmmBus {
    pub conn: Arc<Mutex<Client>>,
    pub ram: Arc<GuestRam>,
    /// BAR0's fast path (None: the remap IRQ is not used).
    pub fast: Option<Arc<Mappings>>,
    /// Where doorbell writes are counted, per phase.
    pub shared: Arc<Shared>,
}

/// A doorbell: a TX or RX tail, or the ARQ tail.
pub fn is_doorbell(off: u64) -> bool {
    (QTX_TAIL1..QTX_TAIL1 + 4 * MAX_QUEUES).contains(&off)
        || (QRX_TAIL1..QRX_TAIL1 + 4 * MAX_QUEUES).contains(&off)
        || off == VF_ARQT1
}

impl Bus for VmmBus {
    fn read32(&mut self, off: u64) -> u32 {
        if let Some(v) = self.fast.as_ref().and_then(|m| m.load32(BAR0, off)) {
            return v;
        }
        self.conn.lock().unwrap().read32(BAR0, off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        let mapped = self.fast.as_ref().is_some_and(|m| m.store32(BAR0, off, v));
        if !mapped {
            self.conn.lock().unwrap().write32(BAR0, off, v);
        }
        if is_doorbell(off) {
            self.shared.count(if mapped { C_DB_MAPPED } else { C_DB_TRAPPED });
        }
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.conn.lock().unwrap().region_write(crate::CONFIG, off, &v.to_le_bytes()).ok("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.ram.read(addr, buf).unwrap_or_else(|e| panic!("guest read: {e}"))
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.ram.write(addr, data).unwrap_or_else(|e| panic!("guest write: {e}"))
    }
}

/// `struct virtchnl_eth_stats`, as GET_STATS returns it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EthStats {
    pub rx_bytes: u64,
    pub rx_unicast: u64,
    pub rx_multicast: u64,
    pub rx_broadcast: u64,
    pub rx_discards: u64,
    pub rx_unknown_protocol: u64,
    pub tx_bytes: u64,
    pub tx_unicast: u64,
    pub tx_multicast: u64,
    pub tx_broadcast: u64,
    pub tx_discards: u64,
    pub tx_errors: u64,
}

impl EthStats {
    pub fn parse(b: &[u8]) -> Option<EthStats> {
        if b.len() < 96 {
            return None;
        }
        let v = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        Some(EthStats {
            rx_bytes: v(0),
            rx_unicast: v(1),
            rx_multicast: v(2),
            rx_broadcast: v(3),
            rx_discards: v(4),
            rx_unknown_protocol: v(5),
            tx_bytes: v(6),
            tx_unicast: v(7),
            tx_multicast: v(8),
            tx_broadcast: v(9),
            tx_discards: v(10),
            tx_errors: v(11),
        })
    }

    pub fn fields(&self) -> [(&'static str, u64); 12] {
        [
            ("rx_bytes", self.rx_bytes),
            ("rx_unicast", self.rx_unicast),
            ("rx_multicast", self.rx_multicast),
            ("rx_broadcast", self.rx_broadcast),
            ("rx_discards", self.rx_discards),
            ("rx_unknown_protocol", self.rx_unknown_protocol),
            ("tx_bytes", self.tx_bytes),
            ("tx_unicast", self.tx_unicast),
            ("tx_multicast", self.tx_multicast),
            ("tx_broadcast", self.tx_broadcast),
            ("tx_discards", self.tx_discards),
            ("tx_errors", self.tx_errors),
        ]
    }
}

/// GET_STATS through the admin queue.
pub fn get_stats(d: &mut DriverModel<VmmBus>) -> Result<EthStats, String> {
    let r = d.request(OP_GET_STATS, &msg_queue_select(0, 0));
    if r.status != 0 {
        return Err(format!("GET_STATS failed with virtchnl status {}", r.status));
    }
    EthStats::parse(&r.payload).ok_or_else(|| format!("GET_STATS reply of {} bytes", r.payload.len()))
}

/// The probe and bring-up of the driver: admin queue, VERSION, resources, IRQ map (both pairs on vector 1), MAC
/// filter, [`PAIRS`] queue pairs of [`RING_LEN`], enable; an RSS key so traffic spreads over both pairs; every RX
/// descriptor given a buffer. Returns the driver and the VF's MAC.
pub fn bring_up(bus: VmmBus) -> Result<(DriverModel<VmmBus>, [u8; 6]), String> {
    let mut d = DriverModel::new(bus, AQ_BASE);
    if !d.wait_active(Duration::from_secs(5)) {
        return Err("the VF never read VFACTIVE".into());
    }
    let rings: Vec<(u64, u64)> = (0..PAIRS).map(|q| (tx_ring(q), rx_ring(q))).collect();
    let all = (1u16 << PAIRS) - 1;
    let res = d.bring_up_with(&rings, RING_LEN as u16, &[(1, all, all), (0, 0, 0)]);
    let mac: [u8; 6] = res[30..36].try_into().unwrap();
    let key = [VSI_ID.to_le_bytes().to_vec(), 52u16.to_le_bytes().to_vec(), vec![0x6d; 52]].concat();
    let r = d.request(OP_CONFIG_RSS_KEY, &key);
    if r.status != 0 {
        return Err(format!("CONFIG_RSS_KEY failed with virtchnl status {}", r.status));
    }
    for q in 0..PAIRS {
        for slot in 0..RING_LEN {
            d.bus.mem_write(rx_ring(q) + RX_DESC * u64::from(slot), &rx_desc(q, slot));
        }
        d.bus.write32(QRX_TAIL1 + 4 * u64::from(q), RING_LEN - 1);
    }
    d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA);
    Ok((d, mac))
}

/// A legacy 32-byte RX descriptor in read format: the buffer address, everything else zero (DD clear).
fn rx_desc(q: u16, slot: u32) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&rx_buf(q, slot).to_le_bytes());
    d
}

/// Orders from the orchestrator.
pub enum Cmd {
    /// Stop touching the device and memory; answer when stopped.
    Stop(Sender<()>),
    /// Run again, on another bus (the destination) if given.
    Resume(Option<VmmBus>),
    /// GET_STATS now.
    Stats(Sender<Result<EthStats, String>>),
    /// End: the thread returns the driver and what it saw.
    Finish,
}

/// An RX frame the driver harvested.
#[derive(Debug, Clone, Copy)]
pub struct Harvested {
    pub seq: u32,
    pub queue: u16,
    pub phase: u8,
}

pub struct VcpuResult {
    pub driver: DriverModel<VmmBus>,
    pub rx: Vec<Harvested>,
    /// RX descriptors whose buffer held no frame of ours.
    pub rx_foreign: u64,
    /// TX frames posted (sequence numbers 0..tx_posted), and per queue in each phase.
    pub tx_posted: u32,
    pub tx_completed: u64,
    /// The first TX sequence number posted on the destination.
    pub tx_first_on_destination: Option<u32>,
    /// TX completions per queue after the switchover.
    pub tx_done_after: [u64; PAIRS as usize],
    pub workload_writes: u64,
}

pub struct Vcpu {
    d: DriverModel<VmmBus>,
    mac: [u8; 6],
    shared: Arc<Shared>,
    rate: u64,
    workload_rate: u64,
    rx_ntc: [u32; PAIRS as usize],
    rx_tail: [u32; PAIRS as usize],
    tx_ntu: [u32; PAIRS as usize],
    tx_clean: [u32; PAIRS as usize],
    tx_seq: u32,
    tx_base: (Instant, u32),
    tx_completed: u64,
    tx_first_on_destination: Option<u32>,
    tx_done_after: [u64; PAIRS as usize],
    on_destination: bool,
    work_base: (Instant, u64),
    workload_writes: u64,
    rng: u64,
    rx: Vec<Harvested>,
    rx_foreign: u64,
    /// Sleep between polls (a NAPI-ish cadence); zero: busy polling.
    pub poll_sleep: Duration,
    /// Frames posted per TX tail write, at most (the tail is written at the end of each pass in any case).
    pub tx_batch: u32,
}

impl Vcpu {
    pub fn new(d: DriverModel<VmmBus>, mac: [u8; 6], shared: Arc<Shared>, rate: u64, workload_rate: u64) -> Vcpu {
        Vcpu {
            d,
            mac,
            shared,
            rate,
            workload_rate,
            rx_ntc: [0; PAIRS as usize],
            rx_tail: [RING_LEN - 1; PAIRS as usize],
            tx_ntu: [0; PAIRS as usize],
            tx_clean: [0; PAIRS as usize],
            tx_seq: 0,
            tx_base: (Instant::now(), 0),
            tx_completed: 0,
            tx_first_on_destination: None,
            tx_done_after: [0; PAIRS as usize],
            on_destination: false,
            work_base: (Instant::now(), 0),
            workload_writes: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            rx: Vec::new(),
            rx_foreign: 0,
            poll_sleep: Duration::from_micros(500),
            tx_batch: u32::MAX,
        }
    }

    /// The thread body: poll, obey orders.
    pub fn run(mut self, cmds: Receiver<Cmd>) -> VcpuResult {
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Stop(ack)) => {
                    let _ = ack.send(());
                    loop {
                        match cmds.recv() {
                            Ok(Cmd::Resume(bus)) => {
                                if let Some(b) = bus {
                                    self.d.bus = b;
                                    self.on_destination = true;
                                    self.tx_first_on_destination = Some(self.tx_seq);
                                }
                                self.reset_schedules();
                                break;
                            }
                            Ok(Cmd::Stats(r)) => {
                                let _ = r.send(get_stats(&mut self.d));
                            }
                            Ok(Cmd::Stop(ack)) => {
                                let _ = ack.send(());
                            }
                            Ok(Cmd::Finish) | Err(_) => return self.finish(),
                        }
                    }
                }
                Ok(Cmd::Stats(r)) => {
                    let _ = r.send(get_stats(&mut self.d));
                }
                Ok(Cmd::Resume(_)) => {}
                Ok(Cmd::Finish) => return self.finish(),
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return self.finish(),
            }
            let worked = self.harvest_rx() + self.clean_tx();
            self.post_tx();
            self.workload();
            if worked > 0 {
                self.d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA); // re-arm, as after a NAPI poll
            }
            if self.poll_sleep.is_zero() {
                std::thread::yield_now();
            } else {
                std::thread::sleep(self.poll_sleep);
            }
        }
    }

    fn finish(self) -> VcpuResult {
        VcpuResult {
            driver: self.d,
            rx: self.rx,
            rx_foreign: self.rx_foreign,
            tx_posted: self.tx_seq,
            tx_completed: self.tx_completed,
            tx_first_on_destination: self.tx_first_on_destination,
            tx_done_after: self.tx_done_after,
            workload_writes: self.workload_writes,
        }
    }

    /// No catch-up burst after a stop: the schedules restart now.
    fn reset_schedules(&mut self) {
        self.tx_base = (Instant::now(), self.tx_seq);
        self.work_base = (Instant::now(), self.workload_writes);
    }

    fn harvest_rx(&mut self) -> usize {
        let mut total = 0;
        let mut ring = vec![0u8; (RX_DESC * u64::from(RING_LEN)) as usize];
        for q in 0..PAIRS {
            let qi = q as usize;
            self.d.bus.mem_read(rx_ring(q), &mut ring);
            let mut n = 0;
            while n < RING_LEN - 1 {
                let i = self.rx_ntc[qi];
                let at = (RX_DESC * u64::from(i)) as usize + 8;
                let qw1 = u64::from_le_bytes(ring[at..at + 8].try_into().unwrap());
                if qw1 & 1 == 0 {
                    break;
                }
                let len = ((qw1 >> 38) & 0x3fff) as usize;
                let mut f = vec![0u8; len.min(64)];
                self.d.bus.mem_read(rx_buf(q, i), &mut f);
                match parse(&f, RX_MAGIC) {
                    Some(seq) if qw1 & 2 != 0 => {
                        let phase = self.shared.phase.load(Ordering::SeqCst) as u8;
                        self.rx.push(Harvested { seq, queue: q, phase });
                        self.shared.count(C_RX_HARVESTED);
                    }
                    _ => self.rx_foreign += 1,
                }
                // Give a buffer back at the tail (the slot just behind the one harvested), then move on.
                let t = self.rx_tail[qi];
                self.d.bus.mem_write(rx_ring(q) + RX_DESC * u64::from(t), &rx_desc(q, t));
                self.rx_tail[qi] = (t + 1) % RING_LEN;
                self.rx_ntc[qi] = (i + 1) % RING_LEN;
                n += 1;
            }
            if n > 0 {
                self.d.bus.write32(QRX_TAIL1 + 4 * u64::from(q), self.rx_tail[qi]);
            }
            total += n as usize;
        }
        total
    }

    fn clean_tx(&mut self) -> usize {
        let mut total = 0;
        let mut ring = vec![0u8; (TX_DESC * u64::from(RING_LEN)) as usize];
        for q in 0..PAIRS {
            let qi = q as usize;
            if self.tx_clean[qi] == self.tx_ntu[qi] {
                continue;
            }
            self.d.bus.mem_read(tx_ring(q), &mut ring);
            while self.tx_clean[qi] != self.tx_ntu[qi] {
                let at = (TX_DESC * u64::from(self.tx_clean[qi])) as usize + 8;
                let qw1 = u64::from_le_bytes(ring[at..at + 8].try_into().unwrap());
                if qw1 & 0xf != 0xf {
                    break;
                }
                self.tx_clean[qi] = (self.tx_clean[qi] + 1) % RING_LEN;
                self.tx_completed += 1;
                if self.on_destination {
                    self.tx_done_after[qi] += 1;
                }
                self.shared.count(C_TX_DONE);
                total += 1;
            }
        }
        total
    }

    fn post_tx(&mut self) {
        if !self.shared.traffic.load(Ordering::SeqCst) || self.rate == 0 {
            self.tx_base = (Instant::now(), self.tx_seq);
            return;
        }
        let since = self.tx_base.0.elapsed().as_micros() * u128::from(self.rate) / 1_000_000;
        let due = u64::from(self.tx_base.1).saturating_add(since.min(u128::from(u64::MAX)) as u64);
        let mut bumped = [0u32; PAIRS as usize];
        while u64::from(self.tx_seq) < due {
            let q = (self.tx_seq % u32::from(PAIRS)) as u16;
            let qi = q as usize;
            let in_flight = (self.tx_ntu[qi] + RING_LEN - self.tx_clean[qi]) % RING_LEN;
            if in_flight >= RING_LEN - 1 {
                // Ring full: the stack waits (the schedule slips rather than bursts later).
                self.tx_base = (Instant::now(), self.tx_seq);
                break;
            }
            let i = self.tx_ntu[qi];
            let f = frame(PEER_MAC, self.mac, TX_MAGIC, self.tx_seq);
            self.d.bus.mem_write(tx_buf(q, i), &f);
            let qw1 = 0x30u64 | ((f.len() as u64) << 34); // data descriptor, EOP | RS
            let desc = [tx_buf(q, i).to_le_bytes(), qw1.to_le_bytes()].concat();
            self.d.bus.mem_write(tx_ring(q) + TX_DESC * u64::from(i), &desc);
            self.tx_ntu[qi] = (i + 1) % RING_LEN;
            self.tx_seq += 1;
            bumped[qi] += 1;
            self.shared.count(C_TX_SENT);
            if bumped[qi] >= self.tx_batch {
                self.d.bus.write32(QTX_TAIL1 + 4 * u64::from(q), self.tx_ntu[qi]);
                bumped[qi] = 0;
            }
        }
        for q in 0..PAIRS {
            if bumped[q as usize] > 0 {
                self.d.bus.write32(QTX_TAIL1 + 4 * u64::from(q), self.tx_ntu[q as usize]);
            }
        }
    }

    /// The guest's own work: a counter written into pseudo-random pages of the workload area.
    fn workload(&mut self) {
        let size = self.d.bus.ram.size();
        if self.workload_rate == 0 || size <= WORKLOAD {
            return;
        }
        let due = self.work_base.1 + self.work_base.0.elapsed().as_micros() as u64 * self.workload_rate / 1_000_000;
        let pages = (size - WORKLOAD) / super::mem::PAGE;
        while self.workload_writes < due {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let page = self.rng % pages;
            let at = WORKLOAD + page * super::mem::PAGE + (self.rng >> 52) * 8 % super::mem::PAGE;
            self.d.bus.mem_write(at, &self.workload_writes.to_le_bytes());
            self.workload_writes += 1;
        }
    }
}
