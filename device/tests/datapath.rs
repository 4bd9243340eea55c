//! TX rings: frames complete with the done descriptor type, queue vectors fire, stats count, and a hostile
//! driver's bad descriptors disable only its queue.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use device::driver_model::{self as dm, Bus, DriverModel, VfBus};
use device::regs::*;
use device::virtchnl::*;
use device::{irq, IrqAction, IrqData, VfConfig, VfioDevice};

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
