//! TX rings: frames complete with the done descriptor type, queue vectors fire, stats count, and a hostile
//! driver's bad descriptors disable only its queue.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::pci::msix as irq;
use device::{IrqAction, IrqData, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel, VfBus};

const BUFS: u64 = 0x30_0000;

/// A VF with `pairs` queue pairs up; vector 1 serves queue 0 (the driver model's IRQ map), armed, with an eventfd.
fn up(pairs: u16) -> (DriverModel<VfBus>, UnixStream) {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut d = dm::testbed(VfConfig::default());
    d.bring_up(pairs, dm::RINGS);
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    d.bus.vf.set_irqs(irq::MSIX, IrqAction::Trigger, 1, 1, IrqData::Eventfd(vec![a.into()])).unwrap();
    d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA);
    (d, b)
}

fn tx_ring(q: u16) -> u64 {
    dm::RINGS + 0x2000 * u64::from(q)
}

/// Writes a data descriptor at slot `i` of queue `q`'s ring.
fn put_desc(d: &mut DriverModel<VfBus>, q: u16, i: u64, addr: u64, len: u64, eop: bool) {
    let cmd = if eop { 0x30 } else { 0 }; // EOP | RS
    let qw1 = cmd | (len << 34);
    let desc = [addr.to_le_bytes(), qw1.to_le_bytes()].concat();
    d.bus.mem_write(tx_ring(q) + 16 * i, &desc);
}

fn qw1(d: &mut DriverModel<VfBus>, q: u16, i: u64) -> u64 {
    let mut b = [0u8; 8];
    d.bus.mem_read(tx_ring(q) + 16 * i + 8, &mut b);
    u64::from_le_bytes(b)
}

fn wait_done(d: &mut DriverModel<VfBus>, q: u16, i: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if qw1(d, q, i) & 0xf == 0xf {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn stats(d: &mut DriverModel<VfBus>) -> Vec<u64> {
    let r = d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    r.payload.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn signals(b: &UnixStream) -> usize {
    let mut buf = [0u8; 64];
    std::io::Read::read(&mut &*b, &mut buf).map(|n| n / 8).unwrap_or(0)
}

fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    f.resize(len, 0xab);
    f
}

#[test]
fn frames_complete_raise_the_queue_vector_and_count() {
    let (mut d, ev) = up(2);
    d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
    d.bus.mem_write(BUFS + 0x1000, &frame([0xff; 6], 100));
    put_desc(&mut d, 0, 0, BUFS, 60, true);
    // A two-buffer frame: 40 + 60 bytes.
    put_desc(&mut d, 0, 1, BUFS + 0x1000, 40, false);
    put_desc(&mut d, 0, 2, BUFS + 0x1000 + 40, 60, true);
    d.bus.write32(QTX_TAIL1, 3);
    assert!(wait_done(&mut d, 0, 0) && wait_done(&mut d, 0, 2), "EOP descriptors written back with DTYPE 0xf");
    assert_eq!(qw1(&mut d, 0, 1) & 0xf, 0, "only the EOP descriptor is written back");
    assert!(signals(&ev) >= 1, "queue 0's vector fired");
    let s = stats(&mut d);
    assert_eq!((s[6], s[7], s[9]), (160, 1, 1), "tx_bytes, unicast, broadcast");
}

#[test]
fn a_frame_is_not_completed_before_its_last_buffer_is_posted() {
    let (mut d, _ev) = up(1);
    d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 100));
    put_desc(&mut d, 0, 0, BUFS, 50, false);
    d.bus.write32(QTX_TAIL1, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(qw1(&mut d, 0, 0) & 0xf, 0);
    put_desc(&mut d, 0, 1, BUFS + 50, 50, true);
    d.bus.write32(QTX_TAIL1, 2);
    assert!(wait_done(&mut d, 0, 1));
}

#[test]
fn hostile_descriptors_disable_only_their_queue() {
    for (what, addr, len) in [
        ("outside guest memory", dm::TESTBED_RAM + 0x1000, 64),
        ("zero length", BUFS, 0),
        ("wrapping", u64::MAX - 8, 64),
    ] {
        let (mut d, _ev) = up(2);
        put_desc(&mut d, 0, 0, addr, len, true);
        d.bus.write32(QTX_TAIL1, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(qw1(&mut d, 0, 0) & 0xf, 0, "{what}: must not complete");
        // Queue 1 still works.
        d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
        put_desc(&mut d, 1, 0, BUFS, 60, true);
        d.bus.write32(QTX_TAIL1 + 4, 1);
        assert!(wait_done(&mut d, 1, 0), "{what}: queue 1 must keep working");
        assert_eq!(stats(&mut d)[11], 1, "{what}: tx_errors counts the disabled queue");
        // Queue 0 stays off until the driver reconfigures it.
        d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
        put_desc(&mut d, 0, 1, BUFS, 60, true);
        d.bus.write32(QTX_TAIL1, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(qw1(&mut d, 0, 1) & 0xf, 0, "{what}: disabled queue stays disabled");
    }
}

#[test]
fn tail_past_the_ring_disables_the_queue() {
    let (mut d, _ev) = up(1);
    d.bus.write32(QTX_TAIL1, 4000);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(stats(&mut d)[11], 1);
}

fn rx_ring(q: u16) -> u64 {
    tx_ring(q) + 0x1000
}

/// Posts `n` RX buffers (2 KiB each, the driver model's buffer size) at ring slots `first..first + n` of queue
/// `q`, then moves the tail past them.
fn post_rx(d: &mut DriverModel<VfBus>, q: u16, first: u64, n: u64) {
    for i in first..first + n {
        let buf = BUFS + 0x8_0000 + 0x1000 * (i + 64 * u64::from(q));
        let desc = [buf.to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat();
        d.bus.mem_write(rx_ring(q) + 32 * i, &desc);
    }
    d.bus.write32(QRX_TAIL1 + 4 * u64::from(q), ((first + n) % 512) as u32);
}

/// The writeback of RX slot `i`: (qword1, buffer contents of `len` bytes).
fn rx_wb(d: &mut DriverModel<VfBus>, q: u16, i: u64) -> Option<(u64, Vec<u8>)> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let mut desc = [0u8; 32];
        d.bus.mem_read(rx_ring(q) + 32 * i, &mut desc);
        let qw1 = u64::from_le_bytes(desc[8..16].try_into().unwrap());
        if qw1 & 1 == 1 {
            let len = ((qw1 >> 38) & 0x3fff) as usize;
            let buf = BUFS + 0x8_0000 + 0x1000 * (i + 64 * u64::from(q));
            let mut data = vec![0u8; len];
            d.bus.mem_read(buf, &mut data);
            return Some((qw1, data));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

const OUR_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x15, 0x4c, 0x01];

#[test]
fn received_frames_land_in_posted_buffers() {
    let (mut d, ev) = up(1);
    // Jumbo frames allowed, so the 3000-byte frame below fits (frames over max_frame are dropped).
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, dm::RINGS, 512, 2048, 9728)).status, 0);
    post_rx(&mut d, 0, 0, 8);
    let f = frame(OUR_MAC, 100);
    assert!(d.bus.vf.rx_port().receive(f.clone()));
    let (qw1, data) = rx_wb(&mut d, 0, 0).expect("frame written back");
    assert_eq!(qw1 & 0b11, 0b11, "DD and EOF");
    assert_eq!(data, f);
    assert!(signals(&ev) >= 1, "queue 0's vector fired");
    // A 3000-byte frame spans two 2 KiB buffers; EOF only on the second.
    let big = frame([0xff; 6], 3000);
    d.bus.vf.rx_port().receive(big.clone());
    let (q1, a) = rx_wb(&mut d, 0, 1).unwrap();
    let (q2, b) = rx_wb(&mut d, 0, 2).unwrap();
    assert_eq!((q1 & 2, q2 & 2), (0, 2));
    assert_eq!([a, b].concat(), big);
    let s = stats(&mut d);
    assert_eq!((s[0], s[1], s[3]), (3100, 1, 1), "rx_bytes, unicast, broadcast");
}

#[test]
fn frames_wait_for_buffers_and_foreign_unicast_is_filtered() {
    let (mut d, _ev) = up(1);
    d.bus.vf.rx_port().receive(frame([0x02, 7, 7, 7, 7, 7], 80)); // not our MAC: filtered
    let f = frame(OUR_MAC, 90);
    d.bus.vf.rx_port().receive(f.clone());
    std::thread::sleep(Duration::from_millis(50));
    post_rx(&mut d, 0, 0, 4);
    let (_, data) = rx_wb(&mut d, 0, 0).expect("backlogged frame delivered once buffers exist");
    assert_eq!(data, f);
    std::thread::sleep(Duration::from_millis(50));
    let mut desc = [0u8; 32];
    d.bus.mem_read(rx_ring(0) + 32, &mut desc);
    assert_eq!(desc[8] & 1, 0, "the foreign frame was not delivered");
}

#[test]
fn hostile_rx_descriptor_disables_the_queue() {
    let (mut d, _ev) = up(1);
    let desc = [(dm::TESTBED_RAM + 0x10000).to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat();
    d.bus.mem_write(rx_ring(0), &desc);
    d.bus.write32(QRX_TAIL1, 1);
    d.bus.vf.rx_port().receive(frame(OUR_MAC, 64));
    std::thread::sleep(Duration::from_millis(50));
    post_rx(&mut d, 0, 1, 4);
    d.bus.vf.rx_port().receive(frame(OUR_MAC, 64));
    std::thread::sleep(Duration::from_millis(50));
    let mut desc = [0u8; 32];
    d.bus.mem_read(rx_ring(0) + 32, &mut desc);
    assert_eq!(desc[8] & 1, 0, "a disabled queue receives nothing");
    assert!(stats(&mut d)[4] >= 1, "rx_discards");
}

/// Every transmitted frame comes back: the datapath end to end through a sink.
#[test]
fn transmitted_frames_reach_the_sink() {
    struct Loop(device::RxPort);
    impl device::FrameSink for Loop {
        fn transmit(&self, frame: &[u8]) {
            let mut f = frame.to_vec();
            f[..6].copy_from_slice(&OUR_MAC);
            self.0.receive(f);
        }
    }
    let (mut d, _ev) = up(1);
    let port = d.bus.vf.rx_port();
    d.bus.vf.set_sink(std::sync::Arc::new(Loop(port)));
    post_rx(&mut d, 0, 0, 4);
    let f = frame([0x02, 9, 9, 9, 9, 9], 200);
    d.bus.mem_write(BUFS, &f);
    put_desc(&mut d, 0, 0, BUFS, 200, true);
    d.bus.write32(QTX_TAIL1, 1);
    let (_, data) = rx_wb(&mut d, 0, 0).expect("looped frame received");
    assert_eq!(&data[6..], &f[6..]);
}

/// An IPv4/UDP frame to us from `sport`; the checksum fields are left 0 (UDP allows it, and RSS ignores them).
fn udp_frame(sport: u16) -> Vec<u8> {
    let mut f = OUR_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 213, 0, 1, 10, 213, 0, 2];
    let sum = ip.chunks(2).fold(0u32, |a, w| a + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let csum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&16u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(b"spread!!");
    f
}

#[test]
fn rss_spreads_flows_over_queues_and_reports_the_hash() {
    let (mut d, _ev) = up(2);
    // As iavf does after GET_VF_RESOURCES: a random key, and a LUT over its queues.
    let mut key = [VSI_ID.to_le_bytes(), (RSS_KEY_SIZE as u16).to_le_bytes()].concat();
    key.extend(dm_pattern(RSS_KEY_SIZE + 1));
    assert_eq!(d.request(OP_CONFIG_RSS_KEY, &key).status, 0);
    let mut lut = [VSI_ID.to_le_bytes(), (RSS_LUT_SIZE as u16).to_le_bytes()].concat();
    lut.extend((0..=RSS_LUT_SIZE).map(|i| (i % 2) as u8));
    assert_eq!(d.request(OP_CONFIG_RSS_LUT, &lut).status, 0);
    post_rx(&mut d, 0, 0, 64);
    post_rx(&mut d, 1, 0, 64);
    for port in 1000..1032 {
        d.bus.vf.rx_port().receive(udp_frame(port));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut per_queue = [0; 2];
    for (q, count) in per_queue.iter_mut().enumerate() {
        for i in 0..64 {
            let mut desc = [0u8; 32];
            d.bus.mem_read(rx_ring(q as u16) + 32 * i, &mut desc);
            let qw1 = u64::from_le_bytes(desc[8..16].try_into().unwrap());
            if qw1 & 1 == 1 {
                *count += 1;
                assert_eq!(qw1 >> 12 & 3, 3, "FLTSTAT says the RSS hash is valid");
                assert_eq!(qw1 >> 30 & 0xff, 24, "ptype IPv4 UDP");
                assert_ne!(qw1 & (1 << 3), 0, "L3L4P: checksums were checked");
            }
        }
    }
    assert_eq!(per_queue[0] + per_queue[1], 32);
    assert!(per_queue.iter().all(|&c| c > 0), "both queues get flows: {per_queue:?}");
}

fn dm_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(151).wrapping_add(7)).collect()
}

/// A TSO request (context descriptor + data descriptor) leaves as MSS-sized TCP segments.
#[test]
fn tso_frames_leave_as_segments() {
    use std::sync::{Arc, Mutex};
    struct Capture(Mutex<Vec<Vec<u8>>>);
    impl device::FrameSink for Capture {
        fn transmit(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }
    let (mut d, _ev) = up(1);
    let cap = Arc::new(Capture(Mutex::new(Vec::new())));
    d.bus.vf.set_sink(cap.clone());
    // Ethernet + IPv4 (total length and checksum zeroed, as iavf leaves them for TSO) + TCP + 4000 bytes.
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let mut f = vec![0x02, 9, 9, 9, 9, 9, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0x13, 0x88, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(&payload);
    d.bus.mem_write(BUFS, &f);
    let (mss, tso_len) = (1000u64, payload.len() as u64);
    let ctx = 0x1 | (0x1 << 4) | (tso_len << 30) | (mss << 50);
    d.bus.mem_write(tx_ring(0), &[0u64.to_le_bytes(), ctx.to_le_bytes()].concat());
    let cmd: u64 = 0x1 | 0x2 | 0x4 | 0x60 | 0x100; // EOP RS ICRC, IPv4 with checksum, TCP
    let qw1 = (cmd << 4) | (7 << 16) | (5 << 23) | (5 << 30) | ((f.len() as u64) << 34);
    d.bus.mem_write(tx_ring(0) + 16, &[BUFS.to_le_bytes(), qw1.to_le_bytes()].concat());
    d.bus.write32(QTX_TAIL1, 2);
    assert!(wait_done(&mut d, 0, 1), "EOP written back");
    let segs = cap.0.lock().unwrap().clone();
    assert_eq!(segs.len(), 4, "4000 bytes at MSS 1000");
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s.len(), 54 + 1000);
        assert_eq!(u16::from_be_bytes([s[16], s[17]]), 20 + 20 + 1000, "IPv4 total length");
        let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
        assert_eq!(seq, 0x1000 + 1000 * i as u32, "sequence advances by MSS");
        assert_ne!(u16::from_be_bytes([s[24], s[25]]), 0, "IPv4 checksum inserted");
        joined.extend_from_slice(&s[54..]);
    }
    assert_eq!(joined, payload);
    assert_eq!(stats(&mut d)[6], 4 * 1054, "tx_bytes counts what left");
}

/// CONFIG_VSI_QUEUES accepts any aligned ring address (the driver's memory is its business), but a ring outside
/// the DMA mappings disables its queue on first use; the other queue keeps working.
#[test]
fn rings_outside_guest_memory_disable_only_their_queue() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut d = dm::testbed(VfConfig::default());
    // Pair 0's rings end exactly at the end of guest memory; pair 1's lie past it.
    let base = dm::TESTBED_RAM - 0x2000;
    d.init_aq();
    d.request(OP_VERSION, &dm::msg_version(1, 1));
    d.request(OP_GET_VF_RESOURCES, &(CAP_L2 | CAP_RSS_PF).to_le_bytes());
    d.request(OP_CONFIG_IRQ_MAP, &dm::msg_irq_map(&[(1, 3, 3), (0, 0, 0)]));
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(2, base, 64, 2048, 1522)).status, 0);
    assert_eq!(d.request(OP_ENABLE_QUEUES, &dm::msg_queue_select(3, 3)).status, 0);
    d.bus.write32(QTX_TAIL1 + 4, 1);
    d.bus.write32(QRX_TAIL1 + 4, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(stats(&mut d)[11] >= 1, "TX queue 1 disabled and counted");
    // Queue 0 still transmits.
    d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
    let desc = [BUFS.to_le_bytes(), (0x30u64 | (60 << 34)).to_le_bytes()].concat();
    d.bus.mem_write(base, &desc);
    d.bus.write32(QTX_TAIL1, 1);
    let t = Instant::now();
    let done = loop {
        let mut b = [0u8; 8];
        d.bus.mem_read(base + 8, &mut b);
        if u64::from_le_bytes(b) & 0xf == 0xf {
            break true;
        }
        if t.elapsed() > Duration::from_secs(2) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(done, "queue 0 keeps working");
}

/// Guest memory whose device-side access to one address blocks until the test lets it go: the datapath worker
/// stopped mid-frame at a chosen point.
struct Trap {
    ram: std::sync::Arc<dm::Ram>,
    at: std::sync::Mutex<Option<Armed>>,
}

/// The trapped address, where to say it was hit, and where the release comes from.
type Armed = (u64, std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

impl Trap {
    fn spring(&self, addr: u64) {
        let hit = {
            let mut t = self.at.lock().unwrap();
            if t.as_ref().is_some_and(|(a, _, _)| *a == addr) {
                t.take()
            } else {
                None
            }
        };
        if let Some((_, entered, release)) = hit {
            entered.send(()).unwrap();
            let _ = release.recv();
        }
    }

    /// Arms the trap on `addr`: returns (entered, release).
    fn arm(&self, addr: u64) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (etx, erx) = std::sync::mpsc::channel();
        let (rtx, rrx) = std::sync::mpsc::channel();
        *self.at.lock().unwrap() = Some((addr, etx, rrx));
        (erx, rtx)
    }
}

impl device::mem::DmaTransport for Trap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.spring(addr);
        self.ram.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.spring(addr);
        self.ram.write(addr, data)
    }
}

/// Like `up(1)`, with the device's guest memory going through a [`Trap`].
fn up_trapped() -> (DriverModel<VfBus>, std::sync::Arc<Trap>) {
    use std::sync::{Arc, Mutex};
    let _ = env_logger::builder().is_test(true).try_init();
    let mem = device::mem::GuestMem::new();
    let ram = Arc::new(dm::Ram::new(dm::TESTBED_RAM));
    let trap = Arc::new(Trap { ram: ram.clone(), at: Mutex::new(None) });
    mem.map(0, dm::TESTBED_RAM, true, true, None).unwrap();
    mem.set_transport(Some(trap.clone()));
    let vf = device::I40eVf::new(VfConfig::default(), mem);
    let mut d = DriverModel::new(VfBus { vf, ram }, dm::AQ_BASE);
    assert!(d.wait_active(Duration::from_secs(2)));
    d.bring_up(1, dm::RINGS);
    (d, trap)
}

/// CONFIG_VSI_QUEUES shrinking the rings while the worker is mid-frame: the old ring's next index must not become
/// the new ring's head (it used to: TX then walked past the new ring, RX underflowed and killed the worker).
#[test]
fn reconfiguring_rings_mid_frame_starts_the_new_rings_at_zero() {
    const SEC: Duration = Duration::from_secs(2);
    // TX: 100 frames move the head to 100; the 101st blocks while its data is read.
    let (mut d, trap) = up_trapped();
    d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
    for i in 0..100 {
        put_desc(&mut d, 0, i, BUFS, 60, true);
    }
    d.bus.write32(QTX_TAIL1, 100);
    assert!(wait_done(&mut d, 0, 99));
    let (entered, release) = trap.arm(BUFS + 0x1000);
    put_desc(&mut d, 0, 100, BUFS + 0x1000, 60, true);
    d.bus.write32(QTX_TAIL1, 101);
    entered.recv_timeout(SEC).expect("worker reads the frame");
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, dm::RINGS, 64, 2048, 1522)).status, 0);
    d.bus.write32(QTX_TAIL1, 0);
    drop(release);
    std::thread::sleep(Duration::from_millis(50));
    put_desc(&mut d, 0, 0, BUFS, 60, true);
    d.bus.write32(QTX_TAIL1, 1);
    assert!(wait_done(&mut d, 0, 0), "the new TX ring starts at descriptor 0");
    assert_eq!(stats(&mut d)[11], 0, "no queue disabled");

    // RX: 100 frames move the head to 100; the 101st blocks while its buffer is written.
    let (mut d, trap) = up_trapped();
    post_rx(&mut d, 0, 0, 101);
    for _ in 0..100 {
        assert!(d.bus.vf.rx_port().receive(frame(OUR_MAC, 64)));
    }
    assert!(rx_wb(&mut d, 0, 99).is_some());
    let (entered, release) = trap.arm(BUFS + 0x8_0000 + 0x1000 * 100);
    d.bus.vf.rx_port().receive(frame(OUR_MAC, 64));
    entered.recv_timeout(SEC).expect("worker writes the frame");
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, dm::RINGS, 64, 2048, 1522)).status, 0);
    d.bus.write32(QRX_TAIL1, 0);
    drop(release);
    std::thread::sleep(Duration::from_millis(50));
    d.bus.mem_write(rx_ring(0), &[0u8; 64 * 32]); // the driver clears its new ring
    post_rx(&mut d, 0, 0, 8);
    let f = frame(OUR_MAC, 90);
    assert!(d.bus.vf.rx_port().receive(f.clone()));
    let (_, data) = rx_wb(&mut d, 0, 0).expect("the new RX ring starts at descriptor 0; the worker lives");
    assert_eq!(data, f);
}

/// A sink that holds the datapath worker inside the first transmit until released.
struct Stall {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl device::FrameSink for Stall {
    fn transmit(&self, _frame: &[u8]) {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv();
    }
}

/// While the worker is stuck (a slow DMA round trip), a receive flood and tail-register storms queue a bounded
/// amount of work; the excess frames count as rx_discards, and no kick is lost.
#[test]
fn floods_and_tail_storms_stay_bounded_while_the_worker_is_stuck() {
    let (mut d, _ev) = up(1);
    let (etx, erx) = std::sync::mpsc::channel();
    let (rtx, rrx) = std::sync::mpsc::channel::<()>();
    d.bus.vf.set_sink(std::sync::Arc::new(Stall { entered: etx.into(), release: rrx.into() }));
    d.bus.mem_write(BUFS, &frame([0x02, 9, 9, 9, 9, 9], 60));
    put_desc(&mut d, 0, 0, BUFS, 60, true);
    d.bus.write32(QTX_TAIL1, 1);
    erx.recv_timeout(Duration::from_secs(2)).expect("worker in transmit");
    let port = d.bus.vf.rx_port();
    for _ in 0..5000 {
        // Not our MAC: delivered frames are filtered silently, so rx_discards counts only the overflow.
        assert!(port.receive(frame([0x02, 7, 7, 7, 7, 7], 64)), "a full queue drops; false means the device is gone");
    }
    put_desc(&mut d, 0, 1, BUFS, 60, true);
    for _ in 0..1000 {
        d.bus.write32(QTX_TAIL1, 2);
        d.bus.write32(QRX_TAIL1, 4);
    }
    let queued = d.bus.vf.datapath_backlog();
    assert!(queued <= 4096 + 2, "{queued} messages queued: frames capped, one kick per queue and direction");
    drop(rtx);
    assert!(wait_done(&mut d, 0, 1), "the coalesced TX kick was served");
    let t = Instant::now();
    while stats(&mut d)[4] < 904 && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stats(&mut d)[4], 904, "5000 - 4096 frames dropped at the port");
    // Kicks still work after the storm.
    put_desc(&mut d, 0, 2, BUFS, 60, true);
    d.bus.write32(QTX_TAIL1, 3);
    assert!(wait_done(&mut d, 0, 2));
    post_rx(&mut d, 0, 0, 8);
    let f = frame(OUR_MAC, 70);
    assert!(port.receive(f.clone()));
    assert_eq!(rx_wb(&mut d, 0, 0).expect("received after the flood").1, f);
}

/// A frame over max_frame, or needing more buffers than the ring can ever hold, is dropped and counted instead of
/// blocking every frame behind it.
#[test]
fn undeliverable_rx_frames_are_dropped_not_stuck() {
    let (mut d, _ev) = up(1); // max_frame 1522
    post_rx(&mut d, 0, 0, 8);
    d.bus.vf.rx_port().receive(frame(OUR_MAC, 3000));
    let f = frame(OUR_MAC, 100);
    d.bus.vf.rx_port().receive(f.clone());
    assert_eq!(rx_wb(&mut d, 0, 0).expect("the frame behind the jumbo one").1, f);
    assert_eq!(stats(&mut d)[4], 1, "rx_discards");

    // 64 descriptors of 128 bytes: a 9000-byte frame (allowed by max_frame) needs 71 > 63 buffers.
    let (mut d, _ev) = up(1);
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, dm::RINGS, 64, 128, 9728)).status, 0);
    post_rx(&mut d, 0, 0, 63);
    d.bus.vf.rx_port().receive(frame(OUR_MAC, 9000));
    d.bus.vf.rx_port().receive(f.clone());
    assert_eq!(rx_wb(&mut d, 0, 0).expect("the frame behind the unfittable one").1, f);
    assert_eq!(stats(&mut d)[4], 1, "rx_discards");
}

/// A tail written before the queue is configured and enabled is latched, as hardware latches it: the frame goes out
/// once the queue is enabled, with no further tail write. (A failover master opens a re-plugged VF while it is still
/// registering, and the stack may post a frame that early; iavf's byte queue limits then stop the queue until
/// that first frame completes, so before this fix the VF passed nothing until the 5 s TX watchdog reset it.)
#[test]
fn a_tail_written_before_the_queue_is_enabled_is_processed_when_it_is() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut d = dm::testbed(VfConfig::default());
    d.init_aq();
    assert_eq!(d.request(OP_VERSION, &dm::msg_version(1, 1)).status, 0);
    assert_eq!(d.request(OP_GET_VF_RESOURCES, &(CAP_L2 | CAP_RSS_PF).to_le_bytes()).status, 0);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);
    impl device::FrameSink for Capture {
        fn transmit(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }
    d.bus.vf.set_sink(std::sync::Arc::new(Capture(sent.clone())));
    d.bus.mem_write(BUFS, &frame([0xff; 6], 80));
    put_desc(&mut d, 0, 0, BUFS, 80, true);
    d.bus.write32(QTX_TAIL1, 1); // before CONFIG_VSI_QUEUES
    std::thread::sleep(Duration::from_millis(50));
    assert!(sent.lock().unwrap().is_empty(), "an unconfigured queue transmitted");
    assert_eq!(d.request(OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, dm::RINGS, 512, 2048, 1522)).status, 0);
    assert_eq!(d.request(OP_ENABLE_QUEUES, &dm::msg_queue_select(1, 1)).status, 0);
    assert!(wait_done(&mut d, 0, 0), "the frame posted before the queue was enabled never completed");
    assert_eq!(sent.lock().unwrap().len(), 1);
}
