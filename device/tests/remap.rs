//! The remap IRQ on the device (docs/remap-irq.md): the doorbell pages are offered only after the client enables
//! the IRQ, stores through the mapping start work on every ring kind, a revocation is served through the stale
//! mapping until the acknowledgement (and once more after it), and nothing survives the client.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::remap::IRQ_INDEX;
use device::{IrqAction, IrqData, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel, VfBus};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, VolatileMemory};

const BUFS: u64 = 0x30_0000;

/// The client's side of the IRQ: a socket pair stands in for the eventfd (each signal is 8 bytes).
fn enable(d: &mut DriverModel<VfBus>) -> UnixStream {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    d.bus.vf.set_irqs(IRQ_INDEX, IrqAction::Trigger, 0, 1, IrqData::Eventfd(vec![a.into()])).unwrap();
    b
}

fn signals(s: &mut UnixStream) -> Vec<u64> {
    std::thread::sleep(Duration::from_millis(5));
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect()
}

fn ack(d: &mut DriverModel<VfBus>) {
    d.bus.vf.set_irqs(IRQ_INDEX, IrqAction::Unmask, 0, 1, IrqData::None).unwrap();
}

/// Maps the doorbell pages as a client does after re-querying REGION_INFO (one mapping from BAR0 offset 0).
fn map(d: &DriverModel<VfBus>) -> MmapRegion<()> {
    let info = d.bus.vf.region_info(0).unwrap();
    assert_eq!(info.mmap_areas, vec![(0, 0x1000), (0x2000, 0x1000), (0x7000, 0x1000)]);
    let m = d.bus.vf.region_mmap(0).unwrap();
    MmapRegion::build(
        Some(vm_memory::FileOffset::new(File::from(m.fd), m.offset)),
        0x8000,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap()
}

fn store(page: &MmapRegion<()>, off: u64, v: u32) {
    page.as_volatile_slice().store(v.to_le(), off as usize, Ordering::Release).unwrap();
}

fn up() -> DriverModel<VfBus> {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut d = dm::testbed(VfConfig::default());
    d.bring_up(1, dm::RINGS);
    d
}

/// Writes a TX frame at slot `i` (without moving the tail).
fn put_frame(d: &mut DriverModel<VfBus>, i: u64) {
    let mut f = vec![0x02, 9, 9, 9, 9, 9, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.resize(60, 0xab);
    d.bus.mem_write(BUFS + 0x800 * i, &f);
    let qw1 = 0x30 | (60u64 << 34);
    d.bus.mem_write(dm::RINGS + 16 * i, &[(BUFS + 0x800 * i).to_le_bytes(), qw1.to_le_bytes()].concat());
}

fn tx_done(d: &mut DriverModel<VfBus>, i: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let mut b = [0u8; 8];
        d.bus.mem_read(dm::RINGS + 16 * i + 8, &mut b);
        if u64::from_le_bytes(b) & 0xf == 0xf {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn the_fast_path_is_offered_after_enable_and_carries_every_doorbell_kind() {
    let mut d = up();
    assert!(d.bus.vf.region_info(0).unwrap().mmap_areas.is_empty(), "nothing before the client asks");
    let info = d.bus.vf.irq_info(IRQ_INDEX).unwrap();
    assert_eq!((info.count, info.cap_type, info.remap_regions), (1, Some((1, 0)), Some(1)));
    assert!(info.eventfd && info.maskable && info.automasked);
    let mut irq = enable(&mut d);
    assert_eq!(signals(&mut irq), vec![1], "region 0's layout changed");
    let page = map(&d);
    ack(&mut d);
    let trapped = d.bus.vf.stats().trapped_doorbells;

    // TX: a tail stored in the page is found by the poller.
    put_frame(&mut d, 0);
    store(&page, QTX_TAIL1, 1);
    assert!(tx_done(&mut d, 0), "TX tail through the mapping");

    // RX: a frame waits for a buffer; a tail stored in the page releases it.
    let mut f = d.bus.vf.mac().to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    f.resize(64, 0x5a);
    d.bus.vf.rx_port().receive(f.clone());
    std::thread::sleep(Duration::from_millis(20));
    let rx_ring = dm::RINGS + 0x1000;
    d.bus.mem_write(rx_ring, &[(BUFS + 0x10000u64).to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat());
    store(&page, QRX_TAIL1, 1);
    let t = Instant::now();
    while d.bus.vf.stats().queues[0].rx_frames == 0 {
        assert!(t.elapsed() < Duration::from_secs(2), "RX tail through the mapping");
        std::thread::sleep(Duration::from_millis(1));
    }

    assert_eq!(d.bus.vf.stats().trapped_doorbells, trapped, "no tail write came as a message");

    // ARQ: with no buffer free, a reply waits; an ARQT stored in the page releases it.
    while d.recv(Duration::from_millis(20)).is_some() {} // events delivered earlier (link up)
    let head = d.bus.read32(VF_ARQH1);
    store(&page, VF_ARQT1, head);
    d.send(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    assert!(d.recv(Duration::from_millis(50)).is_none(), "no ARQ buffer free: the reply waits");
    store(&page, VF_ARQT1, (head + dm::AQ_LEN - 1) % dm::AQ_LEN);
    assert_eq!(d.recv(Duration::from_secs(2)).expect("ARQT through the mapping").status, 0);
}

#[test]
fn revocation_limps_along_until_the_ack_and_looks_once_more_after_it() {
    let mut d = up();
    let mut irq = enable(&mut d);
    assert_eq!(signals(&mut irq), vec![1]);
    let page = map(&d);
    ack(&mut d);
    d.bus.vf.fast_path(false); // RUNNING -> PRE_COPY
    assert_eq!(signals(&mut irq), vec![1], "revoked");
    assert!(d.bus.vf.region_info(0).unwrap().mmap_areas.is_empty());
    // Stores into the stale mapping before the client acknowledges: all served.
    for i in 0..4 {
        put_frame(&mut d, i);
        store(&page, QTX_TAIL1, i as u32 + 1);
        assert!(tx_done(&mut d, i), "frame {i} through the stale mapping");
    }
    // A store right before the ack (the client's last one before munmap): the final look finds it.
    put_frame(&mut d, 4);
    store(&page, QTX_TAIL1, 5);
    ack(&mut d);
    assert!(tx_done(&mut d, 4), "the store made just before the ack");
    // Back to RUNNING: offered again.
    d.bus.vf.fast_path(true);
    assert_eq!(signals(&mut irq), vec![1], "offered again");
    assert_eq!(d.bus.vf.region_info(0).unwrap().mmap_areas.len(), 3);
}

#[test]
fn reset_keeps_the_irq_and_a_new_client_gets_new_pages() {
    let mut d = up();
    let mut irq = enable(&mut d);
    assert_eq!(signals(&mut irq), vec![1]);
    let page = map(&d);
    d.bus.vf.fast_path(false);
    assert_eq!(signals(&mut irq), Vec::<u64>::new(), "masked until the offer is acknowledged");
    store(&page, QTX_TAIL1 + 4, 7);
    d.bus.vf.reset(); // DEVICE_RESET mid-handshake
    assert_eq!(d.bus.read32(QTX_TAIL1 + 4), 0, "power-on registers, in the pages too");
    d.bus.vf.fast_path(true); // the reset ends the migration state
    ack(&mut d);
    assert_eq!(signals(&mut irq), vec![1], "the layout changed twice while masked: told once after the ack");

    d.bus.vf.client_gone();
    assert!(d.bus.vf.region_info(0).unwrap().mmap_areas.is_empty(), "the next client starts without the IRQ");
    store(&page, QTX_TAIL1 + 4, 9); // the departed client's leftover mapping
    assert_eq!(d.bus.read32(QTX_TAIL1 + 4), 0, "reaches nothing of the next client's device");
}

#[test]
fn the_remap_irq_is_not_triggerable_and_absent_in_trap_mode() {
    let mut d = up();
    assert_eq!(d.bus.vf.num_irqs(), 6);
    assert_eq!(
        d.bus.vf.set_irqs(IRQ_INDEX, IrqAction::Trigger, 0, 1, IrqData::None),
        Err(device::Errno::EINVAL),
        "only the device signals it"
    );
    let trap = dm::testbed(VfConfig { doorbells: device::Doorbells::Trap, ..Default::default() });
    assert_eq!(trap.bus.vf.num_irqs(), 5);
    assert!(trap.bus.vf.irq_info(IRQ_INDEX).is_none());
}
