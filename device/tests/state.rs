//! Pause, save and restore with the driver model and real traffic: a device moved in-process under traffic loses
//! and duplicates nothing but what it counts as dropped, and a paused device is silent whatever the driver and
//! the backend do.

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::pci::msix as irq;
use device::{FrameSink, I40eVf, IrqAction, IrqData, RxPort, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel, Ram, VfBus};

const RX_BUFS: u64 = 0x30_0000;
const TX_BUFS: u64 = 0x3d_0000;
/// RX buffers posted per queue (2 KiB each): the driver model's rings are 4 KiB apart, so at most 128 RX
/// descriptors fit; the test sends no more frames than one queue can hold.
const POSTED: u32 = 120;
const MAGIC: [u8; 4] = *b"vfuT";

/// The loopback backend: what the device transmits comes back to whichever device is plugged in now.
#[derive(Default)]
struct Loop(Mutex<Option<RxPort>>);

impl FrameSink for Loop {
    fn transmit(&self, frame: &[u8]) {
        if let Some(p) = &*self.0.lock().unwrap() {
            p.receive(frame);
        }
    }
}

fn tx_ring(q: u16) -> u64 {
    dm::RINGS + 0x2000 * u64::from(q)
}

fn rx_ring(q: u16) -> u64 {
    tx_ring(q) + 0x1000
}

fn rx_buf(q: u16, i: u32) -> u64 {
    RX_BUFS + (u64::from(q) * u64::from(POSTED) + u64::from(i)) * 2048
}

/// A UDP frame to `mac` carrying `seq`; the source port varies with it, so RSS spreads frames over the queues.
fn frame(mac: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = mac.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe, 0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let sport = 1000 + (seq % 50000) as u16;
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&[0x30, 0x39, 0, 26, 0, 0]);
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(64, 0);
    f
}

struct Bench {
    d: DriverModel<VfBus>,
    mac: [u8; 6],
    tx_next: [u32; 2],
    sent: u32,
    wire: Arc<Loop>,
}

impl Bench {
    fn up(cfg: VfConfig) -> Bench {
        let _ = env_logger::builder().is_test(true).try_init();
        let mut d = dm::testbed(cfg);
        let res = d.bring_up(2, dm::RINGS);
        let mac: [u8; 6] = res[30..36].try_into().unwrap();
        let key = [VSI_ID.to_le_bytes().to_vec(), 52u16.to_le_bytes().to_vec(), vec![0x6d; 52]].concat();
        assert_eq!(d.request(OP_CONFIG_RSS_KEY, &key).status, 0);
        for q in 0..2 {
            for i in 0..POSTED {
                let desc = [rx_buf(q, i).to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat();
                d.bus.mem_write(rx_ring(q) + 32 * u64::from(i), &desc);
            }
            d.bus.write32(QRX_TAIL1 + 4 * u64::from(q), POSTED);
        }
        let wire = Arc::new(Loop::default());
        *wire.0.lock().unwrap() = Some(d.bus.vf.rx_port());
        d.bus.vf.set_sink(wire.clone());
        Bench { d, mac, tx_next: [0; 2], sent: 0, wire }
    }

    /// Transmits `n` frames, alternating queues, without waiting.
    fn send(&mut self, n: u32) {
        for _ in 0..n {
            let q = (self.sent % 2) as u16;
            let i = self.tx_next[q as usize];
            let buf = TX_BUFS + u64::from(self.sent) * 128;
            let f = frame(self.mac, self.sent);
            self.d.bus.mem_write(buf, &f);
            let qw1 = 0x30u64 | ((f.len() as u64) << 34); // EOP | RS
            self.d.bus.mem_write(tx_ring(q) + 16 * u64::from(i), &[buf.to_le_bytes(), qw1.to_le_bytes()].concat());
            self.tx_next[q as usize] = i + 1;
            self.d.bus.write32(QTX_TAIL1 + 4 * u64::from(q), i + 1);
            self.sent += 1;
        }
    }

    fn tx_done(&mut self) -> bool {
        (0..2u16).all(|q| {
            (0..self.tx_next[q as usize]).all(|i| {
                let mut b = [0u8; 8];
                self.d.bus.mem_read(tx_ring(q) + 16 * u64::from(i) + 8, &mut b);
                u64::from_le_bytes(b) & 0xf == 0xf
            })
        })
    }

    /// Sequence numbers found in the RX buffers (with their count, to see duplicates).
    fn received(&mut self) -> Vec<u32> {
        let mut seqs = Vec::new();
        for q in 0..2 {
            for i in 0..POSTED {
                let mut qw1 = [0u8; 8];
                self.d.bus.mem_read(rx_ring(q) + 32 * u64::from(i) + 8, &mut qw1);
                if u64::from_le_bytes(qw1) & 1 == 0 {
                    continue;
                }
                let mut f = [0u8; 64];
                self.d.bus.mem_read(rx_buf(q, i), &mut f);
                assert_eq!(f[42..46], MAGIC, "queue {q} slot {i}: not one of ours");
                seqs.push(u32::from_le_bytes(f[46..50].try_into().unwrap()));
            }
        }
        seqs
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn eventfd() -> (std::os::fd::OwnedFd, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    (a.into(), b)
}

fn signals(b: &UnixStream) -> usize {
    let mut buf = [0u8; 256];
    std::io::Read::read(&mut &*b, &mut buf).map(|n| n / 8).unwrap_or(0)
}

#[test]
fn move_under_traffic_loses_nothing_uncounted() {
    let cfg = VfConfig { queue_pairs: 2, ..Default::default() };
    let mut b = Bench::up(cfg.clone());

    // Before: 40 frames round trip on the source.
    b.send(40);
    wait("40 frames on the source", || b.tx_done() && b.received().len() == 40);
    let before = b.d.bus.vf.stats();
    assert!(before.queues.iter().all(|q| q.rx_frames > 0), "RSS should use both queues: {:?}", before.queues);

    // During: 40 more go out and the source is paused while they are in flight.
    b.send(40);
    b.d.bus.vf.pause();
    // 10 more while paused: the tail writes are held, saved with the state and carried out by the destination.
    b.send(10);
    let state = b.d.bus.vf.save().expect("saved");
    assert_eq!(state.nic.held_writes.len(), 10);
    let copy = Arc::new(Ram::from_bytes(b.d.bus.ram.snapshot()));

    // The destination: new guest memory (a copy), new eventfds, a new port on the wire.
    let dst = I40eVf::restore(cfg, copy.guest_mem(), &state).expect("restored");
    let (efd, ev) = eventfd();
    let mut dst_dev = dst;
    dst_dev.set_irqs(irq::MSIX, IrqAction::Trigger, 1, 1, IrqData::Eventfd(vec![efd])).unwrap();
    *b.wire.0.lock().unwrap() = Some(dst_dev.rx_port());
    dst_dev.set_sink(b.wire.clone());
    let src = std::mem::replace(&mut b.d.bus.vf, dst_dev);
    b.d.bus.ram = copy;
    b.d.bus.vf.resume();
    b.d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA);

    // After: traffic continues on the destination.
    b.send(30);
    wait("every frame transmitted", || b.tx_done());
    let mut last = (0, 0);
    wait("RX settles", || {
        let now = (b.received().len(), b.d.bus.vf.stats().counters.rx_dropped_paused);
        let settled = now == last && now.0 as u64 + now.1 >= 120;
        last = now;
        settled
    });
    let seqs = b.received();
    let unique: HashSet<u32> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "a frame was delivered twice");
    assert!(unique.iter().all(|&s| s < 120));
    let st = b.d.bus.vf.stats();
    println!("{} frames received, {} counted as dropped while paused", seqs.len(), st.counters.rx_dropped_paused);
    assert_eq!(
        seqs.len() as u64 + st.counters.rx_dropped_paused,
        120,
        "every frame is in an RX buffer or counted as dropped while paused ({} received)",
        seqs.len()
    );
    assert!(st.eth.rx_discards >= st.counters.rx_dropped_paused);
    // Statistics continue from the source's.
    assert_eq!(st.eth.tx_unicast, 120, "TX statistics continue across the move");
    assert_eq!(st.queues.iter().map(|q| q.tx_frames).sum::<u64>(), 120);
    assert_eq!(st.eth.rx_unicast, seqs.len() as u64);
    assert!(signals(&ev) > 0, "the destination's queue vector fires on its new eventfd");
    // Link, queues and filters came along: virtchnl still answers and queues stay enabled.
    assert_eq!(b.d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0)).status, 0);
    drop(src);
}

#[test]
fn a_paused_device_is_silent_whatever_the_driver_and_backend_do() {
    let mut b = Bench::up(VfConfig { queue_pairs: 2, ..Default::default() });
    let (efd, ev) = eventfd();
    b.d.bus.vf.set_irqs(irq::MSIX, IrqAction::Trigger, 1, 1, IrqData::Eventfd(vec![efd])).unwrap();
    b.d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA);
    b.send(10);
    wait("10 frames before the pause", || b.tx_done() && b.received().len() == 10);
    wait("the queue vector fired", || signals(&ev) > 0);

    b.d.bus.vf.pause();
    assert!(b.d.bus.vf.is_paused());
    let writes = b.d.bus.ram.device_writes();
    let stats = b.d.bus.vf.stats();
    // The backend keeps delivering, the driver keeps writing tails, re-arming vectors and asking the PF.
    let port = b.d.bus.vf.rx_port();
    let mac = b.mac;
    let backend = std::thread::spawn(move || {
        for seq in 1000..1200 {
            assert!(port.receive(frame(mac, seq)));
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    b.send(20);
    for q in 0..2u64 {
        b.d.bus.write32(QRX_TAIL1 + 4 * q, POSTED);
    }
    b.d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA | DYN_SWINT_TRIG);
    b.d.send(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    backend.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b.d.bus.ram.device_writes(), writes, "a paused device wrote guest memory");
    assert_eq!(signals(&ev), 0, "a paused device raised an interrupt");
    let during = b.d.bus.vf.stats();
    assert_eq!(during.eth.tx_unicast, stats.eth.tx_unicast, "a paused device transmitted");
    assert_eq!(during.counters.rx_dropped_paused, 200, "frames that arrived while paused are counted");
    assert!(b.d.wait_atq_done(Duration::from_millis(100)).is_none(), "a paused device answered the driver");

    // Resume: the held tail writes and the virtchnl request are carried out, the held interrupt fires.
    b.d.bus.vf.resume();
    wait("held TX tails processed", || b.tx_done());
    assert!(b.d.wait_atq_done(Duration::from_secs(2)).is_some(), "the held ATQ tail write");
    wait("the held interrupt", || signals(&ev) > 0);
    assert_eq!(b.d.bus.vf.stats().eth.tx_unicast, stats.eth.tx_unicast + 20);
}

/// A driver that lets go of the VF clears Bus Master Enable; from then on the device touches no guest memory,
/// whatever arrives from the wire or is written to its tails, and goes on where it was when the bit comes back.
#[test]
fn no_dma_without_bus_mastering() {
    let mut b = Bench::up(VfConfig { queue_pairs: 2, ..Default::default() });
    b.send(4);
    wait("4 frames with bus mastering on", || b.tx_done() && b.received().len() == 4);
    b.d.bus.config_write16(testkit::PCI_COMMAND, testkit::PCI_COMMAND_MEMORY);
    let writes = b.d.bus.ram.device_writes();
    let port = b.d.bus.vf.rx_port();
    for seq in 100..110 {
        port.receive(frame(b.mac, seq));
    }
    b.send(3);
    b.d.send(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(b.d.bus.ram.device_writes(), writes, "the device wrote guest memory with bus mastering off");
    assert!(!b.tx_done(), "frames completed with bus mastering off");
    b.d.bus.config_write16(testkit::PCI_COMMAND, testkit::PCI_COMMAND_MEMORY | testkit::PCI_COMMAND_MASTER);
    wait("the held work goes on", || b.tx_done() && b.received().len() == 7);
    assert!(b.d.wait_atq_done(Duration::from_secs(2)).is_some(), "the admin queue request waited for bus mastering");
    assert!(b.d.bus.vf.stats().eth.rx_discards >= 10, "frames from the wire without bus mastering are dropped");
}
