//! `--doorbells mmap`: BAR0's doorbell pages (TX tails, RX tails, ARQ tail) are a memfd the client maps; the
//! datapath worker polls them. The remap IRQ's handshake is in `remap.rs`, trapped doorbells in `datapath.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use device::mem::GuestMem;
use device::nic::regs::*;
use device::nic::virtchnl::OP_GET_STATS;
use device::{Doorbells, I40eVf, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel, VfBus};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

const BUFS: u64 = 0x30_0000;

fn mmap_cfg() -> VfConfig {
    VfConfig { doorbells: Doorbells::Mmap, ..Default::default() }
}

/// Maps BAR0's doorbell pages the way a client does: the fd and offset from `region_mmap`, shared (one mapping
/// from BAR0 offset 0 to the end of the last page, so offsets are BAR0 offsets).
fn map_page(vf: &I40eVf) -> MmapRegion<()> {
    let m = vf.region_mmap(0).expect("BAR0 offers an mmap fd in mmap mode");
    let file = File::from(m.fd);
    MmapRegion::build(
        Some(FileOffset::new(file, m.offset)),
        0x8000,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap()
}

fn store(page: &MmapRegion<()>, off: usize, v: u32) {
    page.as_volatile_slice().store(v.to_le(), off, Ordering::Release).unwrap();
}

fn load(page: &MmapRegion<()>, off: usize) -> u32 {
    u32::from_le(page.as_volatile_slice().load::<u32>(off, Ordering::Acquire).unwrap())
}

fn qw1(d: &mut DriverModel<VfBus>, i: u64) -> u64 {
    let mut b = [0u8; 8];
    d.bus.mem_read(dm::RINGS + 16 * i + 8, &mut b);
    u64::from_le_bytes(b)
}

fn wait_done(d: &mut DriverModel<VfBus>, i: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if qw1(d, i) & 0xf == 0xf {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn put_frame(d: &mut DriverModel<VfBus>, slot: u64, len: u64) {
    let mut f = vec![0x02, 9, 9, 9, 9, 9, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.resize(len as usize, 0xab);
    d.bus.mem_write(BUFS + 0x800 * slot, &f);
    let qw1 = 0x30 | (len << 34); // EOP | RS, data descriptor
    let desc = [(BUFS + 0x800 * slot).to_le_bytes(), qw1.to_le_bytes()].concat();
    d.bus.mem_write(dm::RINGS + 16 * slot, &desc);
}

#[test]
fn a_tail_stored_in_the_shared_page_completes_the_frame() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut d = dm::testbed(mmap_cfg());
    d.bring_up(1, dm::RINGS);
    d.bus.write32(VFINT_DYN_CTLN1, DYN_INTENA); // a trapped write after ENABLE_QUEUES, as iavf makes
    let page = map_page(&d.bus.vf);
    put_frame(&mut d, 0, 60);
    store(&page, QTX_TAIL1 as usize, 1); // a plain store: no region_write
    assert!(wait_done(&mut d, 0), "the poller saw the tail and completed the frame");
    put_frame(&mut d, 1, 80);
    put_frame(&mut d, 2, 90);
    store(&page, QTX_TAIL1 as usize, 3);
    assert!(wait_done(&mut d, 1) && wait_done(&mut d, 2));
    assert_eq!(d.bus.read32(QTX_TAIL1), 3, "a trapped read sees the stored tail");
    let r = d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    assert_eq!(u64::from_le_bytes(r.payload[48..56].try_into().unwrap()), 230, "tx_bytes");
}

#[test]
fn region_info_offers_the_doorbell_pages_from_the_start_only_in_mmap_mode() {
    let vf = I40eVf::new(mmap_cfg(), GuestMem::new());
    let info = vf.region_info(0).unwrap();
    let areas = vec![(0, 0x1000), (0x2000, 0x1000), (0x7000, 0x1000)];
    assert_eq!((info.size, info.read, info.write, info.mmap_areas.clone()), (0x10000, true, true, areas));
    let m = vf.region_mmap(0).unwrap();
    assert_eq!(m.offset, 0);
    let len = File::from(m.fd).metadata().unwrap().len();
    assert_eq!(len, 0x8000, "the memfd mirrors BAR0 up to the last doorbell page");
    assert!(vf.region_mmap(3).is_none() && vf.region_info(3).unwrap().mmap_areas.is_empty());

    for doorbells in [Doorbells::Remap, Doorbells::Trap] {
        let vf = I40eVf::new(VfConfig { doorbells, ..Default::default() }, GuestMem::new());
        assert!(vf.region_info(0).unwrap().mmap_areas.is_empty(), "{doorbells:?}: not before the remap IRQ");
    }
}

#[test]
fn trapped_accesses_to_the_page_and_the_mapping_see_one_value() {
    let mut vf = I40eVf::new(mmap_cfg(), GuestMem::new());
    let page = map_page(&vf);
    vf.region_write(0, QTX_TAIL1 + 4, &7u32.to_le_bytes()).unwrap();
    assert_eq!(load(&page, 4), 7, "a trapped tail write lands in the page");
    vf.region_write(0, 0x800, &0xdead_beefu32.to_le_bytes()).unwrap();
    assert_eq!(load(&page, 0x800), 0xdead_beef, "the whole page is memory, not only the registers");
    store(&page, VF_ARQH1 as usize, 0x55);
    let mut b = [0u8; 4];
    vf.region_read(0, VF_ARQH1, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x55, "the ARQ page too");
    vf.region_write(0, QRX_TAIL1 + 8, &9u32.to_le_bytes()).unwrap();
    assert_eq!(load(&page, QRX_TAIL1 as usize + 8), 9, "and the RX tail page");
    store(&page, 8, 0x1234_5678);
    let mut b = [0u8; 6];
    vf.region_read(0, 0xffe, &mut b).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b, [0; 6], "a read across the page end: memory, then the register file");
    let mut b = [0u8; 2];
    vf.region_read(0, 9, &mut b).unwrap();
    assert_eq!(b, [0x56, 0x34], "a trapped read sees a direct store");
    assert_eq!(vf.region_write(0, 2, &[0; 4]), Err(device::Errno::EINVAL), "still dword-only");
    vf.reset();
    assert_eq!((load(&page, 4), load(&page, 8), load(&page, 0x800)), (0, 0, 0), "reset clears the pages");
    assert_eq!(load(&page, VF_ARQH1 as usize), 0);
}

/// Per-write cost of a doorbell on each path, against this device with a minimal vfio-user loop on a socketpair
/// (the server's own path is the same: read the message, `region_write`, reply unless no_reply). Run with
/// `cargo test --release -p device --test doorbells -- --ignored --nocapture`.
#[test]
#[ignore]
fn per_write_cost() {
    const N: u32 = 200_000;
    let (mut client, mut server) = UnixStream::pair().unwrap();
    let mut vf = I40eVf::new(VfConfig::default(), GuestMem::new());
    let page_vf = I40eVf::new(mmap_cfg(), GuestMem::new());
    let page = map_page(&page_vf);
    let srv = std::thread::spawn(move || {
        let mut msg = [0u8; 36];
        while server.read_exact(&mut msg).is_ok() {
            let off = u64::from_le_bytes(msg[16..24].try_into().unwrap());
            vf.region_write(0, off, &msg[32..36]).unwrap();
            let flags = u32::from_le_bytes(msg[8..12].try_into().unwrap());
            if flags & (1 << 4) == 0 {
                let mut reply = [0u8; 16];
                reply[..4].copy_from_slice(&msg[..4]);
                reply[4..8].copy_from_slice(&16u32.to_le_bytes());
                reply[8..12].copy_from_slice(&1u32.to_le_bytes());
                server.write_all(&reply).unwrap();
            }
        }
    });
    let msg = |id: u16, no_reply: bool, v: u32| {
        let mut m = Vec::with_capacity(36);
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&10u16.to_le_bytes()); // REGION_WRITE
        m.extend_from_slice(&36u32.to_le_bytes());
        m.extend_from_slice(&(if no_reply { 1u32 << 4 } else { 0 }).to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&QTX_TAIL1.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes()); // region 0
        m.extend_from_slice(&4u32.to_le_bytes());
        m.extend_from_slice(&v.to_le_bytes());
        m
    };
    let mut reply = [0u8; 16];
    let t = Instant::now();
    for i in 0..N {
        client.write_all(&msg(i as u16, true, i % 512)).unwrap();
    }
    let sent = t.elapsed();
    client.write_all(&msg(0, false, 0)).unwrap(); // a non-posted write as a barrier: all were applied
    client.read_exact(&mut reply).unwrap();
    let posted = t.elapsed();
    let t = Instant::now();
    for i in 0..N / 4 {
        client.write_all(&msg(i as u16, false, i % 512)).unwrap();
        client.read_exact(&mut reply).unwrap();
    }
    let non_posted = t.elapsed() / (N / 4);
    let t = Instant::now();
    for i in 0..N * 10 {
        store(&page, QTX_TAIL1 as usize, i % 512);
    }
    let stored = t.elapsed() / (N * 10);
    drop(client);
    srv.join().unwrap();
    println!(
        "posted REGION_WRITE: {:?}/write to send, {:?}/write applied; non-posted REGION_WRITE: {non_posted:?}/write; \
         memory store: {stored:?}/write",
        sent / N,
        posted / N
    );
}
