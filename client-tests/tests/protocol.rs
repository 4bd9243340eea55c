//! Our raw client against `vfu-i40evf`: every command's happy path, the admin queue's DMA in both directions,
//! one test per validation rule of docs/protocol.md (`rule_*`), disconnect/reconnect and pipelining.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use client_tests::client::{parse_version_reply, set_irqs_payload, write_multi_payload};
use client_tests::reg::*;
use client_tests::util::{eventfd, eventfd_take, eventfd_wait, memfd};
use client_tests::*;
use serde_json::json;

const EINVAL: i32 = libc::EINVAL;
const SILENCE: Duration = Duration::from_millis(250);
const FD_SETTLE: Duration = Duration::from_secs(2);

fn setup() -> (ServerProcess, Client) {
    let s = ServerProcess::start();
    let c = s.connect_negotiated();
    (s, c)
}

/// A successful request on the same connection after a rejected one.
#[track_caller]
fn still_works(c: &mut Client, what: &str) {
    let r = c.region_read(CONFIG, 0, 4);
    assert_eq!(r.errno, None, "{what}: the good request after it failed");
    assert_eq!(le_u32(&r.payload, 16), 0x154c_8086, "{what}: the good request after it");
    assert!(c.stray_replies.is_empty(), "{what}: replies to unknown ids: {:?}", c.stray_replies);
}

/// Sends `payload` as `cmd` (with `fds`) and asserts the error reply.
#[track_caller]
fn expect_err(c: &mut Client, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>], errno: i32, what: &str) {
    let r = c.request(cmd, payload, fds).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    r.assert_errno(errno, what);
    still_works(c, what);
}

fn eventfds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| eventfd()).collect()
}

fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

fn read_payload(offset: u64, region: u32, count: u32) -> Vec<u8> {
    Payload::new().u64(offset).u32(region).u32(count).build()
}

fn write_payload(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    Payload::new().u64(offset).u32(region).u32(count).bytes(data).build()
}

fn map_payload(argsz: u32, flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    Payload::new().u32(argsz).u32(flags).u64(offset).u64(iova).u64(size).build()
}

fn unmap_payload(argsz: u32, flags: u32, iova: u64, size: u64) -> Vec<u8> {
    Payload::new().u32(argsz).u32(flags).u64(iova).u64(size).build()
}

// ------------------------------------------------------------------------------------------------------------
// Happy paths
// ------------------------------------------------------------------------------------------------------------

#[test]
fn version_reply_fields() {
    let mut s = ServerProcess::start();
    let mut c = s.connect();
    let r = c.version(QEMU_LIKE_CAPS).ok("VERSION");
    assert!(r.fds.is_empty());
    let (ver, caps) = parse_version_reply(&r);
    assert_eq!(ver, (0, 0), "major.minor");
    let whole: serde_json::Value = serde_json::from_slice(&r.payload[4..r.payload.len() - 1]).unwrap();
    assert_eq!(
        whole,
        json!({"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,
            "max_dma_maps":65535,"write_multiple":true}}),
        "exact reply JSON (no twin_socket, no migration)"
    );
    assert_eq!(caps["write_multiple"], json!(true));
    drop(c);

    // write_multiple only when offered; minor in the reply <= the client's.
    let mut c = s.connect();
    let r = c.version_raw(0, 1, b"{\"capabilities\":{\"max_msg_fds\":16}}\0").ok("VERSION 0.1");
    let (ver, caps) = parse_version_reply(&r);
    assert_eq!(ver, (0, 0));
    assert_eq!(caps["write_multiple"], json!(false), "write_multiple not offered");
    assert!(caps.get("twin_socket").is_none() && caps.get("migration").is_none());
    still_works(&mut c, "after VERSION 0.1");
    drop(c);

    // JSON is optional: a bare 4-byte VERSION is valid.
    let mut c = s.connect();
    let r = c.version_raw(0, 0, &[]).ok("VERSION without JSON");
    let (_, caps) = parse_version_reply(&r);
    assert_eq!(caps["write_multiple"], json!(false));
    still_works(&mut c, "after bare VERSION");
    s.assert_alive();
}

#[test]
fn device_get_info() {
    let (mut s, mut c) = setup();
    let r = c.device_info().ok("DEVICE_GET_INFO");
    assert_eq!(r.payload.len(), 16);
    assert_eq!(r.u32_at(0), 16, "argsz");
    assert_eq!(r.u32_at(4), DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, "flags");
    assert_eq!(r.u32_at(8), NUM_REGIONS, "num_regions");
    assert_eq!(r.u32_at(12), NUM_IRQS, "num_irqs");
    assert!(r.fds.is_empty());
    s.assert_alive();
}

fn region_size(i: u32) -> u64 {
    match i {
        0 => 65536,
        3 => 16384,
        7 => 4096,
        _ => 0,
    }
}

#[test]
fn region_info_all_regions() {
    let (mut s, mut c) = setup();
    for i in 0..NUM_REGIONS {
        let r = c.region_info(i, 32).ok("REGION_INFO");
        assert_eq!(r.payload.len(), 32, "region {i}: fixed part only for argsz 32");
        let (argsz, flags, index, size) = (r.u32_at(0), r.u32_at(4), r.u32_at(8), r.u64_at(16));
        assert!(argsz >= 32, "region {i}: argsz {argsz}");
        assert_eq!(index, i);
        assert_eq!(size, region_size(i), "region {i} size");
        if size == 0 {
            assert_eq!(flags & (REGION_FLAG_READ | REGION_FLAG_WRITE), 0, "region {i}: empty region flags {flags:#x}");
        } else {
            assert_eq!(flags & (REGION_FLAG_READ | REGION_FLAG_WRITE), 3, "region {i} flags {flags:#x}");
        }
        let r = if argsz > 32 {
            // Capabilities: retry with the size the server asked for.
            let r = c.region_info(i, argsz).ok("REGION_INFO retry");
            assert_eq!(r.payload.len(), argsz as usize, "region {i}: full reply");
            assert_ne!(r.u32_at(4) & REGION_FLAG_CAPS, 0);
            assert!(r.u32_at(12) >= 32, "cap_offset");
            r
        } else {
            assert_eq!(flags & REGION_FLAG_CAPS, 0, "region {i}: CAPS without room for them");
            r
        };
        let mmap = r.u32_at(4) & REGION_FLAG_MMAP != 0;
        assert_eq!(r.fds.len(), usize::from(mmap), "region {i}: fds with MMAP={mmap}");
    }
    s.assert_alive();
}

#[test]
fn region_info_argsz_too_small_returns_needed_size() {
    let (mut s, mut c) = setup();
    for i in [BAR0, BAR3, CONFIG, 1] {
        let small = c.region_info(i, 32).ok("REGION_INFO argsz 32");
        let needed = small.u32_at(0);
        assert_eq!(small.payload.len(), 32, "fixed part only");
        let big = c.region_info(i, 4096).ok("REGION_INFO argsz 4096");
        assert_eq!(big.u32_at(0), needed, "region {i}: reply argsz is the size needed, not the client's buffer");
        assert_eq!(big.payload.len(), needed as usize, "region {i}: reply length = needed");
        assert_eq!(big.u64_at(16), region_size(i));
    }
    s.assert_alive();
}

#[test]
fn region_io_fds_count_zero() {
    let (mut s, mut c) = setup();
    for (i, argsz) in [(BAR0, 16), (BAR3, 1024), (CONFIG, 16)] {
        let r = c.region_io_fds(i, argsz).ok("GET_REGION_IO_FDS");
        assert_eq!(r.payload.len(), 16, "region {i}");
        assert_eq!(r.u32_at(0), 16, "argsz needed");
        assert_eq!(r.u32_at(8), i, "index");
        assert_eq!(r.u32_at(12), 0, "count");
        assert!(r.fds.is_empty());
    }
    s.assert_alive();
}

#[test]
fn irq_info_all_indexes() {
    let (mut s, mut c) = setup();
    let want = [(IRQ_INTX, 0), (IRQ_MSI, 0), (IRQ_MSIX, 5), (IRQ_ERR, 1), (IRQ_REQ, 1)];
    for (i, count) in want {
        let r = c.irq_info(i).ok("IRQ_INFO");
        assert_eq!(r.payload.len(), 16);
        assert_eq!(r.u32_at(0), 16, "argsz");
        assert_eq!(r.u32_at(8), i, "index");
        assert_eq!(r.u32_at(12), count, "index {i} count");
        let flags = r.u32_at(4);
        match i {
            IRQ_MSIX => assert_eq!(flags & 3, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE, "MSI-X flags {flags:#x}"),
            IRQ_ERR | IRQ_REQ => assert_ne!(flags & IRQ_INFO_EVENTFD, 0, "index {i} flags {flags:#x}"),
            _ => {}
        }
    }
    s.assert_alive();
}

#[test]
fn config_space_identity_and_bar_sizing() {
    let (mut s, mut c) = setup();
    assert_eq!(c.read32(CONFIG, 0), 0x154c_8086, "vendor:device");
    assert_eq!(c.read32(CONFIG, 8) >> 8, 0x02_0000, "class code");
    assert_eq!(c.read32(CONFIG, 0x2c) & 0xffff, 0x8086, "subsystem vendor");
    assert_eq!(c.read_bytes(CONFIG, 0x34, 1), [0x70], "capability pointer");
    assert_eq!(c.read_bytes(CONFIG, 0x70, 1), [0x11], "MSI-X capability");
    assert_eq!(c.read32(CONFIG, 0x10), 0x0000_000c, "BAR0 64-bit prefetchable");
    c.write32(CONFIG, 0x10, 0xffff_ffff);
    assert_eq!(c.read32(CONFIG, 0x10), 0xffff_000c, "BAR0 sizing: 64 KiB");
    c.write32(CONFIG, 0x1c, 0xffff_ffff);
    assert_eq!(c.read32(CONFIG, 0x1c), 0xffff_c00c, "BAR3 sizing: 16 KiB");
    c.write32(CONFIG, 0x10, 0xfe00_0000);
    assert_eq!(c.read32(CONFIG, 0x10), 0xfe00_000c);
    // Config space takes byte writes (cache line size is a scratch register).
    let r = c.region_write(CONFIG, 0x0c, &[0x10]).ok("config byte write");
    assert_eq!((r.u64_at(0), r.u32_at(8), r.u32_at(12)), (0x0c, CONFIG, 1));
    assert_eq!(c.read_bytes(CONFIG, 0x0c, 1), [0x10]);
    s.assert_alive();
}

#[test]
fn bar0_register_write_readback() {
    let (mut s, mut c) = setup();
    assert_eq!(c.read32(BAR0, VFGEN_RSTAT), RSTAT_VFACTIVE, "VFGEN_RSTAT");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0);
    c.write32(BAR0, VF_ATQBAL1, 0x1234_5000);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1234_5000);
    assert_eq!(c.read_bytes(BAR0, VF_ATQBAL1 + 1, 2), [0x50, 0x34], "sub-dword read");
    assert_eq!(c.read32(BAR0, 0x9000), 0, "unimplemented offset reads 0");
    let all = c.read_bytes(BAR0, 0, 65536);
    assert_eq!(le_u32(&all, VF_ATQBAL1 as usize), 0x1234_5000, "whole-BAR read");
    s.assert_alive();
}

#[test]
fn posted_writes_get_no_reply_and_apply_in_order() {
    let (mut s, mut c) = setup();
    c.posted_write(BAR0, VF_ATQBAL1, &0xabcd_0000u32.to_le_bytes());
    c.posted_write(BAR0, VF_ARQBAL1, &0x1111_0000u32.to_le_bytes());
    c.posted_write(BAR0, VF_ATQBAL1, &0xabcd_1000u32.to_le_bytes());
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0xabcd_1000, "read after posted writes");
    assert_eq!(c.read32(BAR0, VF_ARQBAL1), 0x1111_0000);
    let extra = c.replies_within(SILENCE).unwrap();
    assert!(extra.is_empty(), "posted writes got replies: {:?}", extra.iter().map(|m| m.hdr).collect::<Vec<_>>());
    assert!(c.stray_replies.is_empty(), "replies to posted writes: {:?}", c.stray_replies);
    s.assert_alive();
}

#[test]
fn region_write_multi() {
    let (mut s, mut c) = setup();
    let a = 0x0001_0000u32.to_le_bytes();
    let b = 0x0002_0000u32.to_le_bytes();
    let r = c.write_multi(&[(BAR0, VF_ATQBAL1, &a), (BAR0, VF_ARQBAL1, &b), (CONFIG, 0x0c, &[0x20])]).ok("MULTI");
    assert_eq!(r.payload.len(), 8, "reply is wr_cnt");
    assert_eq!(r.u64_at(0), 3);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x0001_0000);
    assert_eq!(c.read32(BAR0, VF_ARQBAL1), 0x0002_0000);
    assert_eq!(c.read_bytes(CONFIG, 0x0c, 1), [0x20]);
    // 200 entries is the maximum; applied in order.
    let vals: Vec<[u8; 4]> = (0..200u32).map(|i| (i * 0x1000).to_le_bytes()).collect();
    let entries: Vec<(u32, u64, &[u8])> = vals.iter().map(|v| (BAR0, VF_ATQBAL1, &v[..])).collect();
    let r = c.write_multi(&entries).ok("MULTI 200");
    assert_eq!(r.u64_at(0), 200);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 199 * 0x1000);
    s.assert_alive();
}

fn set_msix_eventfds(c: &mut Client, efds: &[OwnedFd]) {
    let r = c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, efds.len() as u32, &[], &borrow(efds));
    let r = r.ok("SET_IRQS eventfds");
    assert!(r.payload.is_empty(), "SET_IRQS reply is header only");
}

#[test]
fn msix_swint_signals_vector0_eventfd() {
    let (mut s, mut c) = setup();
    let efds = eventfds(5);
    set_msix_eventfds(&mut c, &efds);
    c.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    assert_eq!(eventfd_wait(&efds[0], Duration::from_secs(1)), 1, "vector 0 signalled");
    for (v, e) in efds.iter().enumerate().skip(1) {
        assert_eq!(eventfd_take(e), 0, "vector {v} not signalled");
    }
    assert_eq!(c.read32(BAR0, VFINT_ICR01), 1 << 31, "ICR0 shows SWINT");
    // DYN_CTLN1(0) drives vector 1.
    c.write32(BAR0, 0x3800, DYN_INTENA | DYN_SWINT_TRIG);
    assert_eq!(eventfd_wait(&efds[1], Duration::from_secs(1)), 1, "vector 1 signalled");
    assert_eq!(eventfd_take(&efds[0]), 0);
    s.assert_alive();
}

fn pba(c: &mut Client) -> u32 {
    c.read32(BAR3, MSIX_PBA_OFFSET)
}

#[test]
fn msix_mask_sets_pba_and_unmask_delivers() {
    let (mut s, mut c) = setup();
    let efds = eventfds(5);
    set_msix_eventfds(&mut c, &efds);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_MASK, IRQ_MSIX, 0, 1, &[], &[]).ok("MASK");
    c.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(eventfd_take(&efds[0]), 0, "masked vector must not signal");
    assert_eq!(pba(&mut c) & 1, 1, "PBA bit 0 pending");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[], &[]).ok("UNMASK");
    assert_eq!(eventfd_wait(&efds[0], Duration::from_secs(1)), 1, "unmask delivers the pending interrupt");
    assert_eq!(pba(&mut c) & 1, 0, "PBA clear after delivery");

    // The same with DATA_BOOL: mask only vector 1 of 0..2.
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_MASK, IRQ_MSIX, 0, 2, &[0, 1], &[]).ok("MASK bool");
    c.write32(BAR0, 0x3800, DYN_INTENA | DYN_SWINT_TRIG);
    c.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    assert_eq!(eventfd_wait(&efds[0], Duration::from_secs(1)), 1, "vector 0 not masked");
    assert_eq!(eventfd_take(&efds[1]), 0, "vector 1 masked");
    assert_eq!(pba(&mut c) & 3, 2, "PBA bit 1 pending");
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_UNMASK, IRQ_MSIX, 1, 1, &[1], &[]).ok("UNMASK bool");
    assert_eq!(eventfd_wait(&efds[1], Duration::from_secs(1)), 1);
    assert_eq!(pba(&mut c) & 3, 0);
    s.assert_alive();
}

#[test]
fn msix_trigger_data_none_and_bool_and_disable() {
    let (mut s, mut c) = setup();
    let efds = eventfds(5);
    set_msix_eventfds(&mut c, &efds);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 1, 1, &[], &[]).ok("TRIGGER none");
    let counts: Vec<u64> = efds.iter().map(eventfd_take).collect();
    assert_eq!(counts, [0, 1, 0, 0, 0], "DATA_NONE trigger of vector 1");
    c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 2, 3, &[1, 0, 1], &[]).ok("TRIGGER bool");
    let counts: Vec<u64> = efds.iter().map(eventfd_take).collect();
    assert_eq!(counts, [0, 0, 1, 0, 1], "DATA_BOOL trigger of vectors 2 and 4");
    // De-assign vector 3 (EVENTFD with no fds), then DATA_NONE + TRIGGER count 0 disables the whole index.
    c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 3, 1, &[], &[]).ok("de-assign");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[], &[]).ok("TRIGGER all");
    let counts: Vec<u64> = efds.iter().map(eventfd_take).collect();
    assert_eq!(counts, [1, 1, 1, 0, 1], "vector 3 de-assigned");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 0, &[], &[]).ok("disable index");
    c.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[], &[]).ok("TRIGGER after disable");
    std::thread::sleep(Duration::from_millis(50));
    let counts: Vec<u64> = efds.iter().map(eventfd_take).collect();
    assert_eq!(counts, [0, 0, 0, 0, 0], "disabled index signals nothing");
    s.assert_alive();
}

#[test]
fn err_and_req_eventfds() {
    let (mut s, mut c) = setup();
    for idx in [IRQ_ERR, IRQ_REQ] {
        let e = eventfd();
        c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[e.as_fd()]).ok("set eventfd");
        c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[]).ok("trigger");
        assert_eq!(eventfd_wait(&e, Duration::from_secs(1)), 1, "index {idx} DATA_NONE trigger");
        c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, idx, 0, 1, &[1], &[]).ok("trigger bool");
        assert_eq!(eventfd_wait(&e, Duration::from_secs(1)), 1, "index {idx} DATA_BOOL trigger");
        c.set_irqs(IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, idx, 0, 1, &[0], &[]).ok("trigger bool 0");
        assert_eq!(eventfd_take(&e), 0, "index {idx} BOOL false does not fire");
        c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[]).ok("de-assign");
        c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, idx, 0, 1, &[], &[]).ok("trigger");
        assert_eq!(eventfd_take(&e), 0, "index {idx} de-assigned");
    }
    s.assert_alive();
}

#[test]
fn device_reset_restores_power_on_state() {
    let (mut s, mut c) = setup();
    c.write32(BAR0, VF_ATQBAL1, 0x1234_5000);
    c.enable_bus_master();
    c.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    c.write32(CONFIG, 0x04, 0x6);
    c.write32(CONFIG, 0x10, 0xfe00_0000);
    assert_eq!(c.read32(CONFIG, 0x04) & 0xffff, 0x6);
    let r = c.reset().ok("DEVICE_RESET");
    assert!(r.payload.is_empty());
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0, "ATQBAL");
    assert_eq!(c.read32(BAR0, VF_ATQLEN1), 0, "ATQLEN");
    assert_eq!(c.read32(BAR0, VFGEN_RSTAT), RSTAT_VFACTIVE, "VFGEN_RSTAT");
    assert_eq!(c.read32(CONFIG, 0x04) & 0xffff, 0, "PCI command");
    assert_eq!(c.read32(CONFIG, 0x10), 0xc, "BAR0 address");
    assert_eq!(c.read32(CONFIG, 0), 0x154c_8086);
    s.assert_alive();
}

#[test]
fn dma_map_with_and_without_fd_and_unmap_exact_and_all() {
    let (mut s, mut c) = setup();
    let base = s.fd_count();
    let mem = memfd(2 << 20);
    let r = c.dma_map(0x10_0000, 1 << 20, DMA_RW, Some((mem.as_fd(), 1 << 20))).ok("DMA_MAP memfd");
    assert!(r.payload.is_empty(), "DMA_MAP reply is header only");
    c.dma_map(0x20_0000, 0x1_0000, DMA_RW, None).ok("DMA_MAP fd-less");
    c.dma_map(0x30_0000, 0x1000, DMA_READ_FLAG, None).ok("DMA_MAP read-only");
    c.dma_map(0x40_0000, 0x1000, DMA_WRITE_FLAG, Some((mem.as_fd(), 0))).ok("DMA_MAP write-only memfd");

    let r = c.dma_unmap(0x10_0000, 1 << 20, 0).ok("DMA_UNMAP exact");
    assert_eq!(r.payload, unmap_payload(24, 0, 0x10_0000, 1 << 20), "DMA_UNMAP reply echoes the request");
    c.dma_unmap(0x10_0000, 1 << 20, 0).assert_errno(libc::ENOENT, "second unmap");
    c.dma_map(0x10_0000, 1 << 20, DMA_RW, Some((mem.as_fd(), 0))).ok("re-map after unmap");

    let r = c.dma_unmap(0, 0, UNMAP_ALL).ok("DMA_UNMAP ALL");
    assert_eq!(r.payload, unmap_payload(24, UNMAP_ALL, 0, 0), "DMA_UNMAP ALL reply echoes the request");
    for (iova, size) in [(0x10_0000, 1 << 20), (0x20_0000, 0x1_0000), (0x30_0000, 0x1000), (0x40_0000, 0x1000)] {
        c.dma_unmap(iova, size, 0).assert_errno(libc::ENOENT, "unmap after ALL");
    }
    c.dma_map(0x20_0000, 0x1_0000, DMA_RW, None).ok("map again after ALL");
    c.dma_unmap(0x20_0000, 0x1_0000, 0).ok("unmap");
    assert_eq!(s.wait_fd_count(base, FD_SETTLE), base, "server fd count back to baseline after unmapping");
    s.assert_alive();
}

const RING: u64 = 0x1_0000_0000; // above 4 GiB: ATQBAH matters

/// Programs the ATQ at `ring` with one descriptor, rings the doorbell with a posted write (as QEMU does) and
/// polls ATQH until the device consumed it (serving DMA requests meanwhile).
fn run_admin_queue(c: &mut Client, ring: u64) {
    c.write32(BAR0, VF_ATQBAL1, ring as u32);
    c.write32(BAR0, VF_ATQBAH1, (ring >> 32) as u32);
    c.enable_bus_master();
    c.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    c.write32(BAR0, VF_ATQH1, 0);
    c.posted_write(BAR0, VF_ATQT1, &1u32.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = c.read32(BAR0, VF_ATQH1);
        if h == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "ATQH stuck at {h}; DMA served: {:?}", c.dma);
        c.pump(Duration::from_millis(2)).unwrap();
    }
}

#[track_caller]
fn assert_completed(desc: &[u8]) {
    assert_eq!(le_u16(desc, 2), AQ_OP_QUEUE_SHUTDOWN, "opcode preserved");
    let flags = le_u16(desc, 0);
    assert_eq!(flags & (AQ_FLAG_DD | AQ_FLAG_CMP | AQ_FLAG_ERR), AQ_FLAG_DD | AQ_FLAG_CMP, "flags {flags:#x}");
}

#[test]
fn admin_queue_dma_through_messages_without_fd() {
    let (mut s, mut c) = setup();
    c.dma_map(RING, 0x1000, DMA_RW, None).ok("DMA_MAP fd-less");
    c.guest_write(RING, &aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0));
    run_admin_queue(&mut c, RING);
    assert_completed(&c.guest_read(RING, 32));
    assert!(c.dma.reads >= 1, "DMA_READ served: {:?}", c.dma);
    assert!(c.dma.writes >= 1, "DMA_WRITE served: {:?}", c.dma);
    assert_eq!((c.dma.faults, c.dma.malformed), (0, 0), "{:?}", c.dma);
    assert!(c.unexpected_requests.is_empty(), "{:?}", c.unexpected_requests);
    s.assert_alive();
}

#[test]
fn commands_are_served_while_a_dma_request_is_outstanding() {
    let (mut s, mut c) = setup();
    c.dma_map(RING, 0x1000, DMA_RW, None).ok("DMA_MAP fd-less");
    c.guest_write(RING, &aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0));
    c.write32(BAR0, VF_ATQBAL1, RING as u32);
    c.write32(BAR0, VF_ATQBAH1, (RING >> 32) as u32);
    c.enable_bus_master();
    c.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    c.hold_dma = true;
    c.posted_write(BAR0, VF_ATQT1, &1u32.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.held.is_empty() {
        assert!(Instant::now() < deadline, "no DMA_READ request arrived");
        c.pump(Duration::from_millis(5)).unwrap();
    }
    // The server waits for our DMA reply, yet answers commands meanwhile.
    for _ in 0..5 {
        assert_eq!(c.read32(BAR0, VF_ATQH1), 0, "descriptor not done before its DMA completes");
        still_works(&mut c, "command while a DMA request is outstanding");
    }
    let held = &c.held[0].hdr;
    assert_eq!((held.cmd, held.flags & FLAG_TYPE_MASK), (cmd::DMA_READ, TYPE_COMMAND), "{held:?}");
    c.release_held().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.read32(BAR0, VF_ATQH1) != 1 {
        assert!(Instant::now() < deadline, "ATQ did not complete after releasing DMA: {:?}", c.dma);
        c.pump(Duration::from_millis(2)).unwrap();
    }
    assert_completed(&c.guest_read(RING, 32));
    s.assert_alive();
}

#[test]
fn admin_queue_dma_direct_with_memfd() {
    let (mut s, mut c) = setup();
    let mem: File = memfd(0x2000);
    mem.write_all_at(&aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0), 0x1000).unwrap();
    c.dma_map(RING, 0x1000, DMA_RW, Some((mem.as_fd(), 0x1000))).ok("DMA_MAP memfd at file offset 0x1000");
    run_admin_queue(&mut c, RING);
    let mut d = [0u8; 32];
    mem.read_exact_at(&mut d, 0x1000).unwrap();
    assert_completed(&d);
    let mut first = [0u8; 32];
    mem.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0; 32], "file offset honoured: page 0 of the memfd untouched");
    assert_eq!((c.dma.reads, c.dma.writes), (0, 0), "no DMA messages for fd-backed memory");
    s.assert_alive();
}

#[test]
fn dma_chunks_respect_client_max_data_xfer_size() {
    let mut s = ServerProcess::start();
    let mut c = s.connect();
    c.version(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":16,"pgsizes":4096}}"#).ok("VERSION");
    c.max_xfer = 16;
    c.dma_map(RING, 0x1000, DMA_RW, None).ok("DMA_MAP fd-less");
    c.guest_write(RING, &aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0));
    run_admin_queue(&mut c, RING);
    assert_completed(&c.guest_read(RING, 32));
    assert!(c.dma.reads >= 2 && c.dma.writes >= 2, "32-byte descriptor in 16-byte chunks: {:?}", c.dma);
    assert!(c.dma.max_chunk <= 16, "chunk of {} bytes > client's max_data_xfer_size 16", c.dma.max_chunk);
    assert_eq!(c.dma.malformed, 0);
    s.assert_alive();
}

#[test]
fn disconnect_drops_client_resources_and_the_next_client_gets_a_reset_device() {
    let mut s = ServerProcess::start();
    let mut a = s.connect_negotiated();
    let base = s.fd_count();
    let mem = memfd(0x10000);
    a.dma_map(0x10_0000, 0x10000, DMA_RW, Some((mem.as_fd(), 0))).ok("map memfd");
    a.dma_map(0x20_0000, 0x10000, DMA_RW, None).ok("map fd-less");
    let efds = eventfds(5);
    set_msix_eventfds(&mut a, &efds);
    let err = eventfd();
    a.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_ERR, 0, 1, &[], &[err.as_fd()]).ok("ERR eventfd");
    assert!(s.fd_count() >= base + 6, "server holds the eventfds");
    a.write32(BAR0, VF_ATQBAL1, 0x00c0_ffee & !0xf);
    drop(a);

    let mut b = s.connect_negotiated();
    assert_eq!(s.wait_fd_count(base, FD_SETTLE), base, "fds of the first client closed");
    assert_eq!(b.read32(BAR0, VF_ATQBAL1), 0, "a new client gets a freshly reset device");
    b.dma_map(0x10_0000, 0x10000, DMA_RW, None).ok("old mapping gone: same range maps again");
    b.dma_map(0x20_0000, 0x10000, DMA_RW, None).ok("old fd-less mapping gone");
    b.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    b.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[], &[]).ok("trigger");
    b.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_ERR, 0, 1, &[], &[]).ok("trigger ERR");
    std::thread::sleep(Duration::from_millis(50));
    for e in efds.iter().chain([&err]) {
        assert_eq!(eventfd_take(e), 0, "old client's eventfd signalled after disconnect");
    }
    s.assert_alive();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (mut s, mut c) = setup();
    let mut ids = vec![
        c.send(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[], false).unwrap(),
        c.send(cmd::REGION_WRITE, &write_payload(VF_ATQBAL1, BAR0, 4, &0x5000u32.to_le_bytes()), &[], false).unwrap(),
        c.send(cmd::REGION_READ, &read_payload(VF_ATQBAL1, BAR0, 4), &[], false).unwrap(),
        c.send(cmd::DEVICE_GET_INFO, &Payload::new().u32(16).u32(0).u32(0).u32(0).build(), &[], false).unwrap(),
        c.send(cmd::REGION_READ, &read_payload(0, 9, 4), &[], false).unwrap(),
    ];
    c.posted_write(BAR0, VF_ATQBAL1, &0x6000u32.to_le_bytes());
    ids.push(c.send(cmd::REGION_READ, &read_payload(VF_ATQBAL1, BAR0, 4), &[], false).unwrap());
    ids.push(
        c.send(cmd::DEVICE_GET_IRQ_INFO, &Payload::new().u32(16).u32(0).u32(2).u32(0).build(), &[], false).unwrap(),
    );
    let replies: Vec<Reply> = ids.iter().map(|_| c.recv_next_reply().expect("pipelined reply")).collect();
    let got: Vec<u16> = replies.iter().map(|r| r.hdr.id).collect();
    assert_eq!(got, ids, "replies in request order");
    assert_eq!(le_u32(&replies[0].payload, 16), 0x154c_8086);
    assert_eq!(replies[1].errno, None);
    assert_eq!(le_u32(&replies[2].payload, 16), 0x5000);
    assert_eq!(replies[3].u32_at(8), NUM_REGIONS);
    replies[4].assert_errno(EINVAL, "bad region in the pipeline");
    assert_eq!(le_u32(&replies[5].payload, 16), 0x6000, "posted write applied in order");
    assert_eq!(replies[6].u32_at(12), 5);
    s.assert_alive();
}

#[test]
fn sigterm_removes_socket_and_exits_zero() {
    let mut s = ServerProcess::start_with(&["--mac", "02:11:22:33:44:55", "-v"]);
    let mut c = s.connect_negotiated();
    still_works(&mut c, "server started with --mac");
    let sock = s.socket_path().to_path_buf();
    let st = s.terminate();
    assert!(st.success(), "exit status after SIGTERM: {st}");
    assert!(!sock.exists(), "socket removed on SIGTERM");
}

// ------------------------------------------------------------------------------------------------------------
// Validation rules (docs/protocol.md), one test per row
// ------------------------------------------------------------------------------------------------------------

#[test]
fn rule_header_size_below_16_closes_connection() {
    let mut s = ServerProcess::start();
    for (size, negotiated) in [(8u32, true), (0, true), (15, false)] {
        let mut c = if negotiated { s.connect_negotiated() } else { s.connect() };
        let h = Header { id: c.fresh_id(), cmd: cmd::REGION_READ, size, flags: 0, errno: 0 };
        c.send_bytes(&h.to_bytes(), &[]).unwrap();
        assert!(c.closed_within(Duration::from_secs(5)), "size {size}: connection not closed");
        s.assert_alive();
        let mut n = s.connect_negotiated();
        still_works(&mut n, "new connection after a closed one");
    }
    s.assert_alive();
}

#[test]
fn rule_oversized_message_is_drained_with_e2big() {
    let (mut s, mut c) = setup();
    let limit = 16 + MAX_DATA_XFER as u32 + 4096;
    // Far over the limit, then exactly one byte over it: both drained, E2BIG.
    for (size, what) in [(16 + 2 * MAX_DATA_XFER as u32, "2 MiB message"), (limit + 1, "limit + 1 byte")] {
        let payload = vec![0u8; size as usize - 16];
        let id = c.send_with_header(cmd::REGION_WRITE, 0, 0, Some(size), &payload, &[]).expect("sending");
        c.recv_reply(id).expect("reply").assert_errno(libc::E2BIG, what);
        still_works(&mut c, what);
    }
    // At the limit the message is parsed normally: this REGION_WRITE's count (4) does not match its payload.
    let mut p = write_payload(0x0c, CONFIG, 4, &[0; 4]);
    p.resize(limit as usize - 16, 0);
    expect_err(&mut c, cmd::REGION_WRITE, &p, &[], EINVAL, "message of exactly the limit");
    s.assert_alive();
}

#[test]
fn rule_unknown_command_enosys() {
    let (mut s, mut c) = setup();
    for n in [0u16, 14, 19, 100, 0xffff] {
        expect_err(&mut c, n, &[1, 2, 3, 4, 5, 6, 7, 8], &[], libc::ENOSYS, &format!("command {n}"));
    }
    s.assert_alive();
}

#[test]
fn rule_bad_header_flags_einval() {
    let (mut s, mut c) = setup();
    let p = read_payload(0, CONFIG, 4);
    for (flags, what) in [
        (1 << 6, "unknown flag bit 6"),
        (1 << 31, "unknown flag bit 31"),
        (2, "message type 2"),
        (0xf, "message type 15"),
        (FLAG_ERROR, "error bit on a command"),
    ] {
        let id = c.send_with_header(cmd::REGION_READ, flags, 0, None, &p, &[]).unwrap();
        let r = c.recv_reply(id).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        r.assert_errno(EINVAL, what);
        still_works(&mut c, what);
    }
    s.assert_alive();
}

#[test]
fn rule_reply_without_matching_request_einval() {
    let (mut s, mut c) = setup();
    for (cmd, flags, payload) in [
        (cmd::DMA_READ, TYPE_REPLY, Payload::new().u64(0).u64(4).u32(0).build()),
        (cmd::DMA_WRITE, TYPE_REPLY | FLAG_ERROR, vec![]),
        (cmd::REGION_READ, TYPE_REPLY, vec![]),
    ] {
        let id = c.send_with_header(cmd, flags, 0, None, &payload, &[]).unwrap();
        c.recv_reply(id).expect("an answer to a stray reply").assert_errno(EINVAL, &format!("stray reply {cmd}"));
    }
    // With no_reply it is dropped silently, like any posted message.
    let id = c.fresh_id();
    c.send_bytes(&message(id, cmd::DMA_READ, TYPE_REPLY | FLAG_NO_REPLY, &[]), &[]).unwrap();
    let got = c.replies_within(SILENCE).unwrap();
    assert!(got.is_empty(), "server answered a no_reply message: {:?}", got.iter().map(|m| m.hdr).collect::<Vec<_>>());
    still_works(&mut c, "after unmatched replies");
    s.assert_alive();
}

#[test]
fn rule_command_before_version_or_second_version_einval() {
    let mut s = ServerProcess::start();
    let mut c = s.connect();
    for (n, p) in [
        (cmd::DEVICE_GET_INFO, Payload::new().u32(16).u32(0).u32(0).u32(0).build()),
        (cmd::REGION_READ, read_payload(0, CONFIG, 4)),
        (cmd::DMA_MAP, map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000)),
        (cmd::DEVICE_RESET, vec![]),
    ] {
        c.request(n, &p, &[]).expect("reply").assert_errno(EINVAL, &format!("command {n} before VERSION"));
    }
    c.negotiate();
    still_works(&mut c, "VERSION after rejected commands");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("the DMA_MAP before VERSION must not have mapped");
    c.version(QEMU_LIKE_CAPS).assert_errno(EINVAL, "second VERSION");
    still_works(&mut c, "after a second VERSION");
    s.assert_alive();
}

#[test]
fn rule_bad_version_payload_einval() {
    let mut s = ServerProcess::start();
    let with_nul = |j: &str| {
        let mut v = j.as_bytes().to_vec();
        v.push(0);
        v
    };
    let caps = with_nul(QEMU_LIKE_CAPS);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty payload", vec![]),
        ("2-byte payload", vec![0, 0]),
        ("3-byte payload", vec![0, 0, 0]),
        ("major 1", Payload::new().u16(1).u16(0).bytes(&caps).build()),
        ("major 0xffff", Payload::new().u16(0xffff).u16(0).bytes(&caps).build()),
        ("JSON not NUL-terminated", Payload::new().u16(0).u16(0).bytes(QEMU_LIKE_CAPS.as_bytes()).build()),
        ("not JSON", Payload::new().u16(0).u16(0).bytes(b"not json\0").build()),
        ("capabilities a number", Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":5}"#)).build()),
        ("capabilities an array", Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":[1]}"#)).build()),
        (
            "max_msg_fds a string",
            Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":{"max_msg_fds":"16"}}"#)).build(),
        ),
        (
            "max_data_xfer_size a bool",
            Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":{"max_data_xfer_size":true}}"#)).build(),
        ),
        (
            "pgsizes a string",
            Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":{"pgsizes":"4096"}}"#)).build(),
        ),
        (
            "write_multiple a number",
            Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":{"write_multiple":1}}"#)).build(),
        ),
        (
            "max_dma_maps a string",
            Payload::new().u16(0).u16(0).bytes(&with_nul(r#"{"capabilities":{"max_dma_maps":"x"}}"#)).build(),
        ),
    ];
    for (what, p) in cases {
        let mut c = s.connect();
        c.request(cmd::VERSION, &p, &[]).unwrap_or_else(|e| panic!("{what}: no reply: {e}")).assert_errno(EINVAL, what);
        // The connection is still waiting for a good VERSION.
        let r = c.version(QEMU_LIKE_CAPS);
        assert_eq!(r.errno, None, "{what}: good VERSION after the bad one");
        still_works(&mut c, what);
    }
    s.assert_alive();
}

#[test]
fn rule_unexpected_or_too_many_fds_einval_and_closed() {
    let (mut s, mut c) = setup();
    let base = s.fd_count();
    let e = eventfd();
    let m = memfd(0x1000);
    let many = eventfds(17);
    c.write32(BAR0, VF_ATQBAL1, 0x1000);
    let cases: Vec<(&str, u16, Vec<u8>, Vec<BorrowedFd<'_>>)> = vec![
        ("REGION_READ + eventfd, memfd", cmd::REGION_READ, read_payload(0, CONFIG, 4), vec![e.as_fd(), m.as_fd()]),
        (
            "GET_INFO + eventfd",
            cmd::DEVICE_GET_INFO,
            Payload::new().u32(16).u32(0).u32(0).u32(0).build(),
            vec![e.as_fd()],
        ),
        (
            "REGION_WRITE + memfd",
            cmd::REGION_WRITE,
            write_payload(VF_ATQBAL1, BAR0, 4, &0x2000u32.to_le_bytes()),
            vec![m.as_fd()],
        ),
        ("DMA_UNMAP + memfd", cmd::DMA_UNMAP, unmap_payload(24, UNMAP_ALL, 0, 0), vec![m.as_fd()]),
        (
            "IRQ_INFO + eventfd",
            cmd::DEVICE_GET_IRQ_INFO,
            Payload::new().u32(16).u32(0).u32(2).u32(0).build(),
            vec![e.as_fd()],
        ),
        ("DEVICE_RESET + eventfd", cmd::DEVICE_RESET, vec![], vec![e.as_fd()]),
        (
            "SET_IRQS DATA_NONE + eventfd",
            cmd::DEVICE_SET_IRQS,
            set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]),
            vec![e.as_fd()],
        ),
        (
            "SET_IRQS with 17 fds",
            cmd::DEVICE_SET_IRQS,
            set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[]),
            borrow(&many),
        ),
        ("DMA_MAP with 17 fds", cmd::DMA_MAP, map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000), borrow(&many)),
    ];
    for (what, n, p, fds) in &cases {
        expect_err(&mut c, *n, p, fds, EINVAL, what);
    }
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1000, "rejected REGION_WRITE with an fd was applied");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("rejected DMA_MAP must not have mapped");
    assert_eq!(s.wait_fd_count(base, FD_SETTLE), base, "server kept fds of rejected requests");
    s.assert_alive();
}

#[test]
fn rule_short_payload_or_small_argsz_einval() {
    let (mut s, mut c) = setup();
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("DMA_MAP 24 bytes", cmd::DMA_MAP, map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000)[..24].to_vec()),
        ("DMA_UNMAP 16 bytes", cmd::DMA_UNMAP, unmap_payload(24, 0, 0x10_0000, 0x1000)[..16].to_vec()),
        ("GET_INFO empty", cmd::DEVICE_GET_INFO, vec![]),
        ("GET_INFO 4 bytes", cmd::DEVICE_GET_INFO, Payload::new().u32(16).build()),
        ("GET_INFO argsz 8", cmd::DEVICE_GET_INFO, Payload::new().u32(8).u32(0).u32(0).u32(0).build()),
        ("REGION_INFO 16 bytes", cmd::DEVICE_GET_REGION_INFO, Payload::new().u32(32).u32(0).u32(0).u32(0).build()),
        (
            "REGION_INFO argsz 16",
            cmd::DEVICE_GET_REGION_INFO,
            Payload::new().u32(16).u32(0).u32(0).u32(0).u64(0).u64(0).build(),
        ),
        ("REGION_IO_FDS 12 bytes", cmd::DEVICE_GET_REGION_IO_FDS, Payload::new().u32(16).u32(0).u32(0).build()),
        ("REGION_IO_FDS argsz 8", cmd::DEVICE_GET_REGION_IO_FDS, Payload::new().u32(8).u32(0).u32(0).u32(0).build()),
        ("IRQ_INFO 8 bytes", cmd::DEVICE_GET_IRQ_INFO, Payload::new().u32(16).u32(0).build()),
        ("IRQ_INFO argsz 8", cmd::DEVICE_GET_IRQ_INFO, Payload::new().u32(8).u32(0).u32(2).u32(0).build()),
        ("SET_IRQS 16 bytes", cmd::DEVICE_SET_IRQS, Payload::new().u32(16).u32(0x21).u32(2).u32(0).build()),
        ("REGION_READ 12 bytes", cmd::REGION_READ, read_payload(0, CONFIG, 4)[..12].to_vec()),
        ("REGION_READ empty", cmd::REGION_READ, vec![]),
        ("REGION_WRITE 12 bytes", cmd::REGION_WRITE, read_payload(0x0c, CONFIG, 0)[..12].to_vec()),
        ("WRITE_MULTI 4 bytes", cmd::REGION_WRITE_MULTI, vec![1, 0, 0, 0]),
    ];
    for (what, n, p) in &cases {
        expect_err(&mut c, *n, p, &[], EINVAL, what);
    }
    s.assert_alive();
}

#[test]
fn rule_region_or_irq_index_out_of_range_einval() {
    let (mut s, mut c) = setup();
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        (
            "REGION_INFO 9",
            cmd::DEVICE_GET_REGION_INFO,
            Payload::new().u32(32).u32(0).u32(9).u32(0).u64(0).u64(0).build(),
        ),
        (
            "REGION_INFO 0xffffffff",
            cmd::DEVICE_GET_REGION_INFO,
            Payload::new().u32(32).u32(0).u32(u32::MAX).u32(0).u64(0).u64(0).build(),
        ),
        ("REGION_IO_FDS 9", cmd::DEVICE_GET_REGION_IO_FDS, Payload::new().u32(16).u32(0).u32(9).u32(0).build()),
        ("REGION_READ 9", cmd::REGION_READ, read_payload(0, 9, 4)),
        ("REGION_READ 0x80000000", cmd::REGION_READ, read_payload(0, 0x8000_0000, 4)),
        ("REGION_WRITE 9", cmd::REGION_WRITE, write_payload(0, 9, 4, &[0; 4])),
        ("IRQ_INFO 6", cmd::DEVICE_GET_IRQ_INFO, Payload::new().u32(16).u32(0).u32(6).u32(0).build()),
        ("IRQ_INFO 0xffffffff", cmd::DEVICE_GET_IRQ_INFO, Payload::new().u32(16).u32(0).u32(u32::MAX).u32(0).build()),
        ("SET_IRQS 6", cmd::DEVICE_SET_IRQS, set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 6, 0, 0, &[])),
    ];
    for (what, n, p) in &cases {
        expect_err(&mut c, *n, p, &[], EINVAL, what);
    }
    s.assert_alive();
}

#[test]
fn rule_dma_map_invalid_einval() {
    let (mut s, mut c) = setup();
    let base = s.fd_count();
    let m = memfd(0x4000);
    let m2 = memfd(0x4000);
    let iova = 0x10_0000;
    let cases: Vec<(&str, Vec<u8>, Vec<BorrowedFd<'_>>)> = vec![
        ("argsz 31", map_payload(31, DMA_RW, 0, iova, 0x1000), vec![]),
        ("argsz 33", map_payload(33, DMA_RW, 0, iova, 0x1000), vec![]),
        ("argsz 0", map_payload(0, DMA_RW, 0, iova, 0x1000), vec![m.as_fd()]),
        ("flags neither READ nor WRITE", map_payload(32, 0, 0, iova, 0x1000), vec![]),
        ("flags bit 2", map_payload(32, DMA_RW | 4, 0, iova, 0x1000), vec![m.as_fd()]),
        ("flags bit 31", map_payload(32, DMA_RW | 1 << 31, 0, iova, 0x1000), vec![]),
        ("size 0", map_payload(32, DMA_RW, 0, iova, 0), vec![]),
        ("unaligned address", map_payload(32, DMA_RW, 0, iova + 1, 0x1000), vec![]),
        ("unaligned size", map_payload(32, DMA_RW, 0, iova, 0x1001), vec![]),
        ("unaligned offset", map_payload(32, DMA_RW, 0x10, iova, 0x1000), vec![m.as_fd()]),
        ("address + size overflows", map_payload(32, DMA_RW, 0, 0xffff_ffff_ffff_f000, 0x2000), vec![]),
        ("two fds", map_payload(32, DMA_RW, 0, iova, 0x1000), vec![m.as_fd(), m2.as_fd()]),
    ];
    for (what, p, fds) in &cases {
        expect_err(&mut c, cmd::DMA_MAP, p, fds, EINVAL, what);
    }
    c.dma_map(iova, 0x1000, DMA_RW, None).ok("nothing was mapped by the rejected requests");
    c.dma_map(0xffff_ffff_ffff_e000, 0x1000, DMA_RW, None).ok("a mapping ending at the top of the space");
    c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
    assert_eq!(s.wait_fd_count(base, FD_SETTLE), base, "fds of rejected DMA_MAPs closed");
    s.assert_alive();
}

#[test]
fn rule_dma_map_overlap_eexist() {
    let (mut s, mut c) = setup();
    c.dma_map(0x10_0000, 0x1_0000, DMA_RW, None).ok("first mapping");
    let m = memfd(0x2_0000);
    for (what, iova, size, fd) in [
        ("identical", 0x10_0000u64, 0x1_0000u64, false),
        ("overlaps the end", 0x10_8000, 0x1_0000, false),
        ("overlaps the start", 0xf_8000, 0x1_0000, true),
        ("contains it", 0xf_0000, 0x3_0000, false),
        ("inside it", 0x10_4000, 0x1000, true),
    ] {
        let p = map_payload(32, DMA_RW, 0, iova, size);
        let fds = if fd { vec![m.as_fd()] } else { vec![] };
        expect_err(&mut c, cmd::DMA_MAP, &p, &fds, libc::EEXIST, what);
    }
    c.dma_map(0x11_0000, 0x1000, DMA_RW, None).ok("adjacent above");
    c.dma_map(0xf_f000, 0x1000, DMA_RW, Some((m.as_fd(), 0))).ok("adjacent below");
    c.dma_unmap(0x10_0000, 0x1_0000, 0).ok("original mapping intact");
    s.assert_alive();
}

#[test]
fn rule_dma_map_limit_enospc() {
    let (mut s, mut c) = setup();
    const BATCH: u32 = 512;
    let total: u32 = 65535;
    let mut i = 0u32;
    while i < total {
        let n = BATCH.min(total - i);
        let ids: Vec<u16> = (i..i + n)
            .map(|k| c.send(cmd::DMA_MAP, &map_payload(32, DMA_RW, 0, u64::from(k) * 0x1000, 0x1000), &[], false))
            .collect::<Result<_, _>>()
            .expect("send DMA_MAP");
        for id in ids {
            let r = c.recv_reply(id).expect("DMA_MAP reply");
            assert_eq!(r.errno, None, "DMA_MAP {} of 65535 failed", i + 1);
        }
        i += n;
    }
    expect_err(&mut c, cmd::DMA_MAP, &map_payload(32, DMA_RW, 0, 0x4000_0000, 0x1000), &[], libc::ENOSPC, "65536th");
    c.dma_unmap(0, 0x1000, 0).ok("unmap one");
    c.dma_map(0x4000_0000, 0x1000, DMA_RW, None).ok("a slot is free again");
    c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
    s.assert_alive();
}

#[test]
fn rule_dma_unmap_invalid_einval() {
    let (mut s, mut c) = setup();
    let (iova, size) = (0x10_0000u64, 0x2000u64);
    c.dma_map(iova, size, DMA_RW, None).ok("map");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("argsz 23", unmap_payload(23, 0, iova, size)),
        ("argsz 25", unmap_payload(25, 0, iova, size)),
        ("argsz 32", unmap_payload(32, 0, iova, size)),
        ("GET_DIRTY_BITMAP", unmap_payload(24, UNMAP_GET_DIRTY_BITMAP, iova, size)),
        ("unknown flag 4", unmap_payload(24, 4, iova, size)),
        ("unknown flag 0x80000000", unmap_payload(24, 1 << 31, iova, size)),
        ("ALL with address", unmap_payload(24, UNMAP_ALL, iova, 0)),
        ("ALL with size", unmap_payload(24, UNMAP_ALL, 0, size)),
        ("ALL with both", unmap_payload(24, UNMAP_ALL, iova, size)),
        ("ALL | GET_DIRTY_BITMAP", unmap_payload(24, UNMAP_ALL | UNMAP_GET_DIRTY_BITMAP, 0, 0)),
    ];
    for (what, p) in &cases {
        expect_err(&mut c, cmd::DMA_UNMAP, p, &[], EINVAL, what);
    }
    c.dma_unmap(iova, size, 0).ok("the mapping survived every rejected unmap");
    s.assert_alive();
}

#[test]
fn rule_dma_unmap_without_exact_mapping_enoent() {
    let (mut s, mut c) = setup();
    let (iova, size) = (0x10_0000u64, 0x2000u64);
    c.dma_map(iova, size, DMA_RW, None).ok("map");
    for (what, a, n) in [
        ("first half", iova, 0x1000u64),
        ("second half", iova + 0x1000, 0x1000),
        ("larger", iova, 0x3000),
        ("elsewhere", 0x20_0000, 0x1000),
        ("size 0", iova, 0),
    ] {
        expect_err(&mut c, cmd::DMA_UNMAP, &unmap_payload(24, 0, a, n), &[], libc::ENOENT, what);
    }
    c.dma_unmap(iova, size, 0).ok("exact unmap");
    s.assert_alive();
}

#[test]
fn rule_set_irqs_invalid_einval() {
    let (mut s, mut c) = setup();
    let base = s.fd_count();
    let e = eventfds(2);
    let m = memfd(0x1000);
    let none_trig = IRQ_DATA_NONE | IRQ_ACTION_TRIGGER;
    let efd_trig = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER;
    let p = |argsz: u32, flags: u32, index: u32, start: u32, count: u32, data: &[u8]| {
        set_irqs_payload(argsz, flags, index, start, count, data)
    };
    let one = vec![e[0].as_fd()];
    let cases: Vec<(&str, Vec<u8>, Vec<BorrowedFd<'_>>)> = vec![
        ("argsz 24 > payload", p(24, none_trig, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("argsz 20 < payload", p(20, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[1]), vec![]),
        ("two data types", p(20, IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("no data type", p(20, IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("no action", p(20, IRQ_DATA_NONE, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("two actions", p(20, IRQ_DATA_NONE | IRQ_ACTION_MASK | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("mask and unmask", p(20, IRQ_DATA_NONE | IRQ_ACTION_MASK | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("count 0 EVENTFD+TRIGGER", p(20, efd_trig, IRQ_MSIX, 0, 0, &[]), vec![]),
        ("count 0 NONE+MASK", p(20, IRQ_DATA_NONE | IRQ_ACTION_MASK, IRQ_MSIX, 0, 0, &[]), vec![]),
        ("count 0 BOOL+TRIGGER", p(20, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 0, &[]), vec![]),
        ("MSI-X start 4 count 2", p(20, none_trig, IRQ_MSIX, 4, 2, &[]), vec![]),
        ("MSI-X start 5 count 1", p(20, none_trig, IRQ_MSIX, 5, 1, &[]), vec![]),
        ("start + count overflows", p(20, none_trig, IRQ_MSIX, u32::MAX, 2, &[]), vec![]),
        ("ERR count 2", p(20, none_trig, IRQ_ERR, 0, 2, &[]), vec![]),
        ("INTx count 1 (index has 0)", p(20, none_trig, IRQ_INTX, 0, 1, &[]), vec![]),
        ("MSI eventfd (index has 0)", p(20, efd_trig, IRQ_MSI, 0, 1, &[]), one.clone()),
        ("BOOL 1 byte for count 2", p(21, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 2, &[1]), vec![]),
        ("BOOL 3 bytes for count 2", p(23, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 2, &[1, 1, 1]), vec![]),
        ("1 eventfd for count 2", p(20, efd_trig, IRQ_MSIX, 0, 2, &[]), one.clone()),
        ("2 eventfds for count 1", p(20, efd_trig, IRQ_MSIX, 0, 1, &[]), borrow(&e)),
        ("memfd as eventfd", p(20, efd_trig, IRQ_MSIX, 0, 1, &[]), vec![m.as_fd()]),
        ("MASK with EVENTFD", p(20, IRQ_DATA_EVENTFD | IRQ_ACTION_MASK, IRQ_MSIX, 0, 1, &[]), one.clone()),
        ("UNMASK with EVENTFD, no fds", p(20, IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK, IRQ_MSIX, 0, 1, &[]), vec![]),
        ("MASK on ERR", p(20, IRQ_DATA_NONE | IRQ_ACTION_MASK, IRQ_ERR, 0, 1, &[]), vec![]),
        ("UNMASK on REQ", p(20, IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IRQ_REQ, 0, 1, &[]), vec![]),
        ("BOOL MASK on ERR", p(21, IRQ_DATA_BOOL | IRQ_ACTION_MASK, IRQ_ERR, 0, 1, &[1]), vec![]),
    ];
    for (what, payload, fds) in &cases {
        expect_err(&mut c, cmd::DEVICE_SET_IRQS, payload, fds, EINVAL, what);
    }
    // None of the rejected requests installed an eventfd.
    c.set_irqs(none_trig, IRQ_MSIX, 0, 5, &[], &[]).ok("trigger all vectors");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!((eventfd_take(&e[0]), eventfd_take(&e[1])), (0, 0), "a rejected SET_IRQS installed an eventfd");
    assert_eq!(s.wait_fd_count(base, FD_SETTLE), base, "fds of rejected SET_IRQS closed");
    s.assert_alive();
}

#[test]
fn rule_region_access_out_of_bounds_einval() {
    let (mut s, mut c) = setup();
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("read count 0", cmd::REGION_READ, read_payload(0, CONFIG, 0)),
        ("read BAR0 past end", cmd::REGION_READ, read_payload(0xfffc, BAR0, 8)),
        ("read BAR0 at end", cmd::REGION_READ, read_payload(0x1_0000, BAR0, 4)),
        ("read offset overflow", cmd::REGION_READ, read_payload(u64::MAX - 1, BAR0, 4)),
        ("read config past end", cmd::REGION_READ, read_payload(4094, CONFIG, 4)),
        ("read BAR3 past end", cmd::REGION_READ, read_payload(0x4000, BAR3, 4)),
        ("read size-0 region 1", cmd::REGION_READ, read_payload(0, 1, 4)),
        ("read size-0 region 8", cmd::REGION_READ, read_payload(0, 8, 1)),
        ("write count 0", cmd::REGION_WRITE, write_payload(0x0c, CONFIG, 0, &[])),
        ("write BAR0 past end", cmd::REGION_WRITE, write_payload(0xfffc, BAR0, 8, &[0; 8])),
        ("write offset overflow", cmd::REGION_WRITE, write_payload(u64::MAX - 3, BAR0, 4, &[0; 4])),
        ("write config past end", cmd::REGION_WRITE, write_payload(4094, CONFIG, 4, &[0; 4])),
        ("write size-0 region 2", cmd::REGION_WRITE, write_payload(0, 2, 4, &[0; 4])),
    ];
    for (what, n, p) in &cases {
        expect_err(&mut c, *n, p, &[], EINVAL, what);
    }
    assert_eq!(c.read_bytes(BAR0, 0xfffc, 4), [0; 4], "last dword of BAR0 is readable");
    s.assert_alive();
}

#[test]
fn rule_region_access_count_over_max_e2big() {
    let (mut s, mut c) = setup();
    let over = MAX_DATA_XFER as u32 + 1;
    expect_err(&mut c, cmd::REGION_READ, &read_payload(0, CONFIG, over), &[], libc::E2BIG, "read 1 MiB + 1");
    expect_err(&mut c, cmd::REGION_READ, &read_payload(0, BAR0, u32::MAX), &[], libc::E2BIG, "read 4 GiB - 1");
    let data = vec![0u8; over as usize];
    expect_err(&mut c, cmd::REGION_WRITE, &write_payload(0, BAR0, over, &data), &[], libc::E2BIG, "write 1 MiB + 1");
    s.assert_alive();
}

#[test]
fn rule_region_write_bad_length_or_unaligned_bar0_einval() {
    let (mut s, mut c) = setup();
    c.write32(BAR0, VF_ATQBAL1, 0x1122_3340);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("count 4, 8 data bytes", write_payload(VF_ATQBAL1, BAR0, 4, &[0xff; 8])),
        ("count 8, 4 data bytes", write_payload(VF_ATQBAL1, BAR0, 8, &[0xff; 4])),
        ("count 4, no data", write_payload(VF_ATQBAL1, BAR0, 4, &[])),
        ("BAR0 offset +2", write_payload(VF_ATQBAL1 + 2, BAR0, 4, &[0xff; 4])),
        ("BAR0 offset +1", write_payload(VF_ATQBAL1 + 1, BAR0, 4, &[0xff; 4])),
        ("BAR0 count 2", write_payload(VF_ATQBAL1, BAR0, 2, &[0xff; 2])),
        ("BAR0 count 1", write_payload(VF_ATQBAL1, BAR0, 1, &[0xff])),
        ("BAR0 count 3", write_payload(VF_ATQBAL1, BAR0, 3, &[0xff; 3])),
    ];
    for (what, p) in &cases {
        expect_err(&mut c, cmd::REGION_WRITE, p, &[], EINVAL, what);
        assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1122_3340, "{what}: rejected write changed ATQBAL");
    }
    s.assert_alive();
}

#[test]
fn rule_write_multi_invalid_einval() {
    let mut s = ServerProcess::start();
    let v = 0xdead_0000u32.to_le_bytes();
    let good: (u32, u64, &[u8]) = (BAR0, VF_ATQBAL1, &v);

    // Not negotiated.
    let mut c = s.connect();
    c.version(r#"{"capabilities":{"max_msg_fds":16}}"#).ok("VERSION without write_multiple");
    expect_err(&mut c, cmd::REGION_WRITE_MULTI, &write_multi_payload(1, &[good]), &[], EINVAL, "not negotiated");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0, "rejected WRITE_MULTI was applied");
    let r = c.version(r#"{"capabilities":{"write_multiple":true}}"#);
    r.assert_errno(EINVAL, "second VERSION");
    drop(c);

    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x1122_3340);
    let many: Vec<(u32, u64, &[u8])> = vec![good; 201];
    let mut extra_byte = write_multi_payload(1, &[good]);
    extra_byte.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wr_cnt 0", write_multi_payload(0, &[])),
        ("wr_cnt 0 with an entry", write_multi_payload(0, &[good])),
        ("wr_cnt 201", write_multi_payload(201, &many)),
        ("wr_cnt 2, one entry", write_multi_payload(2, &[good])),
        ("wr_cnt 1, two entries", write_multi_payload(1, &[good, good])),
        ("payload one byte long", extra_byte),
        ("entry count 0", write_multi_payload(1, &[(BAR0, VF_ATQBAL1, &[])])),
        ("entry count 9", {
            let mut p = write_multi_payload(1, &[good]);
            p[8 + 12..8 + 16].copy_from_slice(&9u32.to_le_bytes());
            p
        }),
        ("entry past BAR0", write_multi_payload(1, &[(BAR0, 0x1_0000, &v)])),
        ("entry past config", write_multi_payload(1, &[(CONFIG, 4093, &v)])),
        ("entry region 9", write_multi_payload(1, &[(9, 0, &v)])),
        ("entry size-0 region 1", write_multi_payload(1, &[(1, 0, &v)])),
        ("good entry then a bad one", write_multi_payload(2, &[good, (BAR0, VF_ARQBAL1, &[])])),
        ("good entry then out of bounds", write_multi_payload(2, &[good, (CONFIG, 0x1000, &[1])])),
    ];
    for (what, p) in &cases {
        expect_err(&mut c, cmd::REGION_WRITE_MULTI, p, &[], EINVAL, what);
        assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1122_3340, "{what}: a rejected WRITE_MULTI applied an entry");
    }
    s.assert_alive();
}

#[test]
fn rule_device_reset_with_payload_einval() {
    let (mut s, mut c) = setup();
    c.write32(BAR0, VF_ATQBAL1, 0x1000);
    expect_err(&mut c, cmd::DEVICE_RESET, &[0; 4], &[], EINVAL, "RESET with 4 bytes");
    expect_err(&mut c, cmd::DEVICE_RESET, &[0; 1], &[], EINVAL, "RESET with 1 byte");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1000, "rejected RESET reset the device");
    c.reset().ok("RESET");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0);
    s.assert_alive();
}

#[test]
fn rule_device_feature_and_migration_data_validated() {
    let (mut s, mut c) = setup();
    // GET MIGRATION answers STOP_COPY | PRE_COPY; PROBE answers without acting.
    let r = c.call(cmd::DEVICE_FEATURE, &Payload::new().u32(24).u32(1 | 1 << 16).u64(0).build(), &[]).ok("GET");
    assert_eq!((r.u32_at(0), r.u64_at(8)), (16, 5), "argsz and migration flags");
    let probe_logging = Payload::new().u32(16).u32(6 | 1 << 17 | 1 << 18).build();
    let r = c.call(cmd::DEVICE_FEATURE, &probe_logging, &[]).ok("PROBE SET DMA_LOGGING_START");
    assert_eq!(r.payload, probe_logging, "a probe reply echoes the request");
    let probe_get_start = Payload::new().u32(16).u32(6 | 1 << 16 | 1 << 18).build();
    expect_err(&mut c, cmd::DEVICE_FEATURE, &probe_get_start, &[], EINVAL, "PROBE GET of a SET-only feature");
    expect_err(
        &mut c,
        cmd::DEVICE_FEATURE,
        &Payload::new().u32(16).u32(3 | 1 << 16).build(),
        &[],
        libc::ENOTTY,
        "feature 3",
    );
    expect_err(&mut c, cmd::DEVICE_FEATURE, &Payload::new().u32(8).u32(1 | 1 << 16).build(), &[], EINVAL, "argsz 8");
    // Migration data outside the states that allow it.
    let read = Payload::new().u32(8 + 4096).u32(4096).build();
    expect_err(&mut c, cmd::MIG_DATA_READ, &read, &[], EINVAL, "MIG_DATA_READ in RUNNING");
    let write = Payload::new().u32(12).u32(4).u32(0).build();
    expect_err(&mut c, cmd::MIG_DATA_WRITE, &write, &[], EINVAL, "MIG_DATA_WRITE in RUNNING");
    s.assert_alive();
}

#[test]
fn rule_no_reply_flag_suppresses_error_replies() {
    let (mut s, mut c) = setup();
    c.write32(BAR0, VF_ATQBAL1, 0x1000);
    c.send(cmd::REGION_READ, &read_payload(0, 9, 4), &[], true).unwrap();
    c.send(cmd::DMA_UNMAP, &unmap_payload(24, 0, 0x10_0000, 0x1000), &[], true).unwrap();
    c.send(0, &[], &[], true).unwrap();
    c.send(cmd::REGION_WRITE, &write_payload(VF_ATQBAL1 + 2, BAR0, 4, &[0xff; 4]), &[], true).unwrap();
    c.send(cmd::DEVICE_FEATURE, &Payload::new().u32(16).u32(1 | 1 << 16).build(), &[], true).unwrap();
    let got = c.replies_within(SILENCE).unwrap();
    assert!(got.is_empty(), "no_reply commands got replies: {:?}", got.iter().map(|m| m.hdr).collect::<Vec<_>>());
    still_works(&mut c, "after failed no_reply commands");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1000, "failed posted write was applied");
    s.assert_alive();
}

/// A client that sends requests but never reads the replies cannot make the server buffer without limit: the
/// server stops reading past 8 MiB of queued output, and resumes, losing nothing, once the client reads.
#[test]
fn a_client_that_does_not_read_replies_is_paused_not_buffered() {
    let (mut s, mut c) = setup();
    let n = 300u16; // 300 x 64 KiB replies = 19 MiB
    let ids: Vec<u16> =
        (0..n).map(|_| c.send(cmd::REGION_READ, &read_payload(0, BAR0, 65536), &[], false).unwrap()).collect();
    let t = Instant::now();
    while !s.log().contains("is not reading its replies") {
        assert!(t.elapsed() < Duration::from_secs(10), "the server never paused:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    for id in ids {
        let r = c.recv_reply(id).expect("every reply arrives once the client reads");
        assert_eq!((r.errno, r.payload.len()), (None, 16 + 65536));
    }
    still_works(&mut c, "after the pause");
    s.assert_alive();
}

/// A blocking eventfd whose counter is saturated would block the server's signal write forever; SET_IRQS makes
/// eventfds non-blocking, so triggering one just fails and the server keeps serving.
#[test]
fn a_saturated_blocking_eventfd_cannot_hang_the_server() {
    let (mut s, mut c) = setup();
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&efd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
    let r = c.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[], &[efd.as_fd()]);
    assert_eq!(r.errno, None);
    let r = c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[], &[]);
    assert_eq!(r.errno, None, "the software trigger returns");
    still_works(&mut c, "after signalling a saturated eventfd");
    s.assert_alive();
}
