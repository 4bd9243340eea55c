//! The resource-limit flags of `vfu-i40evf` (server/src/main.rs) at the socket: what VERSION advertises, and what
//! a client meets when it goes past a limit. Bad flag values are tested in server/tests/cli.rs.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use client_tests::reg::*;
use client_tests::util::{held_atq_dma_read, memfd, wait_atq_stalled};
use client_tests::*;
use device::nic::regs::VF_ARQT1;
use device::nic::virtchnl::OP_VERSION;
use testkit::{msg_version, Bus, DriverModel, AQ_LEN};

fn read_payload(offset: u64, region: u32, count: u32) -> Vec<u8> {
    Payload::new().u64(offset).u32(region).u32(count).build()
}

fn write_payload(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    Payload::new().u64(offset).u32(region).u32(count).bytes(data).build()
}

fn map_payload(iova: u64, size: u64) -> Vec<u8> {
    Payload::new().u32(32).u32(DMA_RW).u64(0).u64(iova).u64(size).build()
}

#[track_caller]
fn expect_errno(c: &mut Client, cmd: u16, payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>], errno: i32, what: &str) {
    let r = c.request(cmd, payload, fds).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    r.assert_errno(errno, what);
}

#[track_caller]
fn still_works(c: &mut Client, what: &str) {
    let r = c.request(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[]);
    let r = r.unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    assert_eq!(r.errno, None, "{what}");
    assert_eq!(le_u32(&r.payload, 16), 0x154c_8086, "{what}");
}

// ------------------------------------------------------------------------------------------------------------
// --max-dma-regions
// ------------------------------------------------------------------------------------------------------------

#[test]
fn max_dma_regions_is_advertised_and_enforced_with_enospc() {
    let mut s = ServerProcess::start_with(&["--max-dma-regions", "4"]);
    let mut c = s.connect();
    let caps = c.negotiate();
    assert_eq!(caps["max_dma_maps"], 4, "VERSION advertises --max-dma-regions");
    let mem = memfd(0x4000);
    c.dma_map(0x10_0000, 0x1000, DMA_RW, Some((mem.as_fd(), 0))).ok("map 1 (memfd)");
    c.dma_map(0x20_0000, 0x1000, DMA_RW, None).ok("map 2");
    c.dma_map(0x30_0000, 0x1000, DMA_RW, Some((mem.as_fd(), 0x1000))).ok("map 3 (memfd)");
    c.dma_map(0x40_0000, 0x1000, DMA_RW, None).ok("map 4");
    let full = s.fd_count();
    expect_errno(&mut c, cmd::DMA_MAP, &map_payload(0x50_0000, 0x1000), &[], libc::ENOSPC, "the 5th map");
    let p = map_payload(0x50_0000, 0x1000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], libc::ENOSPC, "the 5th map, with a memfd");
    assert_eq!(s.wait_fd_count(full, Duration::from_secs(2)), full, "the rejected map's fd was closed");
    c.dma_unmap(0x20_0000, 0x1000, 0).ok("unmap one");
    c.dma_map(0x50_0000, 0x1000, DMA_RW, None).ok("a slot is free again");
    expect_errno(&mut c, cmd::DMA_MAP, &map_payload(0x60_0000, 0x1000), &[], libc::ENOSPC, "full again");
    c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
    for i in 0..4u64 {
        c.dma_map(0x100_0000 + i * 0x1000, 0x1000, DMA_RW, None).ok("4 maps after unmapping all");
    }
    drop(c);
    // The limit is per client: the next one starts with none.
    let mut c = s.connect_negotiated();
    for i in 0..4u64 {
        c.dma_map(0x100_0000 + i * 0x1000, 0x1000, DMA_RW, None).ok("the next client's 4 maps");
    }
    expect_errno(&mut c, cmd::DMA_MAP, &map_payload(0x200_0000, 0x1000), &[], libc::ENOSPC, "its 5th map");
    s.assert_alive();
}

// ------------------------------------------------------------------------------------------------------------
// Open files and mappings (RLIMIT_NOFILE, vm.max_map_count)
// ------------------------------------------------------------------------------------------------------------

/// Sets the server's open-file limit (soft and hard) from outside, as an administrator's prlimit would.
fn limit_open_files(s: &ServerProcess, n: u64) {
    let pid = rustix::process::Pid::from_raw(s.pid() as i32).expect("pid");
    let l = rustix::process::Rlimit { current: Some(n), maximum: Some(n) };
    rustix::process::prlimit(Some(pid), rustix::process::Resource::Nofile, l).expect("prlimit");
}

fn mapping_count(s: &ServerProcess) -> usize {
    std::fs::read_to_string(format!("/proc/{}/maps", s.pid())).expect("maps").lines().count()
}

/// A VMM behind a vIOMMU maps guest RAM page by page: thousands of DMA_MAPs of one memfd. They cost the server one
/// fd and one mmap for the file, not one per region (which ran into the open-file limit at about 1,000).
#[test]
fn dma_maps_of_one_file_share_one_fd_and_one_mapping() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    limit_open_files(&s, 128);
    let (fds, maps) = (s.fd_count(), mapping_count(&s));
    const N: u64 = 2000;
    let mem = memfd(N * 0x1000);
    for i in 0..N {
        let iova = 0x1_0000_0000 + i * 0x2000;
        c.dma_map(iova, 0x1000, DMA_RW, Some((mem.as_fd(), (N - 1 - i) * 0x1000))).ok(&format!("map {i}"));
    }
    assert!(s.fd_count() <= fds + 1, "{} fds for {N} regions of one file (from {fds})", s.fd_count());
    assert!(mapping_count(&s) <= maps + 1, "{} mappings for {N} regions (from {maps})", mapping_count(&s));
    still_works(&mut c, "after the maps");
    for i in (0..N).step_by(2) {
        c.dma_unmap(0x1_0000_0000 + i * 0x2000, 0x1000, 0).ok("unmap half");
    }
    assert!(s.fd_count() <= fds + 1, "half unmapped: still one fd");
    c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
    assert_eq!(s.wait_fd_count(fds, Duration::from_secs(2)), fds, "the last region took the file's fd with it");
    s.assert_alive();
}

/// A client that sends more distinct files than the server may keep open gets EMFILE for the one that did not fit
/// (the kernel drops an fd it cannot install), with a log line that names the limit; the connection goes on.
#[test]
fn a_server_at_its_open_file_limit_answers_emfile_and_goes_on() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    let room = 6;
    limit_open_files(&s, (s.fd_count() + room) as u64);
    let files: Vec<_> = (0..room + 2).map(|_| memfd(0x1000)).collect();
    let mut mapped = 0;
    let mut refused = None;
    for (i, f) in files.iter().enumerate() {
        let r = c.dma_map(0x10_0000 * (i as u64 + 1), 0x1000, DMA_RW, Some((f.as_fd(), 0)));
        match r.errno {
            None => mapped += 1,
            Some(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = refused.expect("some DMA_MAP past the open-file limit is refused");
    assert_eq!(e, libc::EMFILE, "DMA_MAP {i} at the limit: EMFILE");
    assert!(mapped >= room - 2, "only {mapped} files mapped with room for {room} fds");
    assert!(s.log().contains("open-file limit (RLIMIT_NOFILE)"), "the refusal names the limit");
    still_works(&mut c, "after the refusal");
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("unmap the first file");
    c.dma_map(0x10_0000 * (i as u64 + 1), 0x1000, DMA_RW, Some((files[i].as_fd(), 0))).ok("room again");
    s.assert_alive();
}

// ------------------------------------------------------------------------------------------------------------
// --max-data-xfer-size
// ------------------------------------------------------------------------------------------------------------

#[test]
fn max_data_xfer_size_is_advertised_and_bounds_counts_and_messages() {
    const XFER: u32 = 4096;
    const LIMIT: u32 = 16 + XFER + 4096; // the largest message accepted
    let mut s = ServerProcess::start_with(&["--max-data-xfer-size", "4096"]);
    let mut c = s.connect();
    let caps = c.negotiate();
    assert_eq!(caps["max_data_xfer_size"], XFER, "VERSION advertises --max-data-xfer-size");

    let data = c.read_bytes(BAR0, 0, XFER);
    assert_eq!(data.len(), XFER as usize, "a read of exactly max_data_xfer_size");
    for n in [XFER + 1, 8192, 1 << 20] {
        expect_errno(&mut c, cmd::REGION_READ, &read_payload(0, BAR0, n), &[], libc::E2BIG, &format!("read {n}"));
    }
    let p = write_payload(0, BAR3, XFER + 1, &vec![0; XFER as usize + 1]);
    expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], libc::E2BIG, "a 4097-byte write (a 4129-byte message)");
    still_works(&mut c, "after counts over the limit");

    // A message of exactly the limit is parsed: this REGION_WRITE's count (4) disagrees with its payload.
    let mut p = write_payload(0x0c, CONFIG, 4, &[0; 4]);
    p.resize(LIMIT as usize - 16, 0);
    expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], libc::EINVAL, "a message of exactly 8208 bytes");
    // One byte more, or a size fine under the default limit, is drained with E2BIG; the connection goes on.
    for size in [LIMIT + 1, 16 + (1 << 20)] {
        let id = c.send_with_header(cmd::REGION_WRITE, 0, 0, Some(size), &vec![0; size as usize - 16], &[]).unwrap();
        c.recv_reply(id).expect("reply").assert_errno(libc::E2BIG, &format!("a {size}-byte message"));
        still_works(&mut c, &format!("after a drained {size}-byte message"));
    }
    drop(c);

    // The limit holds before VERSION too.
    let mut c = s.connect();
    let mut json = QEMU_LIKE_CAPS.as_bytes().to_vec();
    json.resize(LIMIT as usize, b' ');
    json.push(0);
    let p = Payload::new().u16(0).u16(0).bytes(&json).build();
    expect_errno(&mut c, cmd::VERSION, &p, &[], libc::E2BIG, "a VERSION larger than the limit");
    c.negotiate();
    still_works(&mut c, "VERSION after an oversized one");
    s.assert_alive();
}

// ------------------------------------------------------------------------------------------------------------
// --idle-timeout-ms
// ------------------------------------------------------------------------------------------------------------

fn read_message(c: &mut Client) -> Vec<u8> {
    message(c.fresh_id(), cmd::REGION_READ, TYPE_COMMAND, &read_payload(0, CONFIG, 4))
}

#[test]
fn idle_timeout_closes_a_client_stuck_in_a_half_message_and_serves_the_next() {
    let mut s = ServerProcess::start_with(&["--idle-timeout-ms", "300"]);
    for (what, negotiated, cut) in [
        ("10 header bytes", true, 10),
        ("a header and half its payload", true, 24),
        ("10 bytes before VERSION", false, 10),
    ] {
        let mut c = if negotiated { s.connect_negotiated() } else { s.connect() };
        let m = read_message(&mut c);
        let t = Instant::now();
        c.send_bytes(&m[..cut], &[]).unwrap();
        let closed = c.until_close(Duration::from_secs(3));
        let after = t.elapsed();
        assert_eq!(closed, Some(vec![]), "{what}: the server should close the connection, silently");
        assert!(after >= Duration::from_millis(250), "{what}: closed after {after:?}, before the timeout");
        assert!(after < Duration::from_secs(1), "{what}: closed only after {after:?}");
        s.assert_serves_new_client(&format!("after a client timed out with {what}"));
    }

    // A client waiting behind a stuck one is served once the stuck one times out.
    let mut stuck = s.connect_negotiated();
    let m = read_message(&mut stuck);
    stuck.send_bytes(&m[..10], &[]).unwrap();
    let t = Instant::now();
    let mut next = s.connect();
    next.timeout = Duration::from_secs(3);
    next.negotiate();
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(1), "the waiting client was served after {waited:?}");
    still_works(&mut next, "the client that waited");
    assert!(stuck.until_close(Duration::from_millis(100)).is_some(), "the stuck client was closed");
    assert!(s.log().contains("--idle-timeout-ms"), "the close is logged with the flag that caused it");
    s.assert_alive();
}

#[test]
fn idle_timeout_spares_clients_idle_between_whole_messages_or_slow_but_moving() {
    let mut s = ServerProcess::start_with(&["--idle-timeout-ms", "300"]);
    let mut c = s.connect_negotiated();
    std::thread::sleep(Duration::from_secs(1));
    still_works(&mut c, "after 1 s idle between messages");

    // Whole messages pipelined, then 1 s without reading or writing.
    let ids: Vec<u16> =
        (0..3).map(|_| c.send(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[], false).unwrap()).collect();
    std::thread::sleep(Duration::from_secs(1));
    for id in ids {
        assert_eq!(c.recv_reply(id).expect("reply after idling").errno, None);
    }

    // A message trickled a byte at a time, 60 ms apart: 1.9 s in all, but never 300 ms without a byte.
    let m = read_message(&mut c);
    let id = u16::from_le_bytes([m[0], m[1]]);
    for b in &m {
        c.send_bytes(std::slice::from_ref(b), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
    let r = c.replies_within(Duration::from_secs(1)).expect("reading");
    assert_eq!(r.iter().map(|m| (m.hdr.id, m.hdr.flags)).collect::<Vec<_>>(), [(id, TYPE_REPLY)], "the slow request");
    still_works(&mut c, "after a slow request");
    s.assert_alive();
}

#[test]
fn without_idle_timeout_a_half_message_client_is_not_disconnected() {
    for args in [&[][..], &["--idle-timeout-ms", "0"][..], &["--idle-timeout-ms", "18446744073709551615"][..]] {
        let mut s = ServerProcess::start_with(args);
        let mut c = s.connect_negotiated();
        let m = read_message(&mut c);
        let id = u16::from_le_bytes([m[0], m[1]]);
        c.send_bytes(&m[..10], &[]).unwrap();
        assert_eq!(c.until_close(Duration::from_secs(1)), None, "{args:?}: a half-message client was disconnected");
        c.send_bytes(&m[10..], &[]).unwrap();
        let r = c.replies_within(Duration::from_secs(2)).expect("reading");
        assert_eq!(r.len(), 1, "{args:?}: one reply to the completed message");
        assert_eq!((r[0].hdr.id, r[0].hdr.flags, le_u32(&r[0].payload, 16)), (id, TYPE_REPLY, 0x154c_8086), "{args:?}");
        s.assert_alive();
    }
}

// ------------------------------------------------------------------------------------------------------------
// --max-arq-queued
// ------------------------------------------------------------------------------------------------------------

/// The iavf driver model over the socket, guest memory shared without an fd.
struct SocketBus(Client);

impl Bus for SocketBus {
    fn read32(&mut self, off: u64) -> u32 {
        self.0.read32(BAR0, off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.0.write32(BAR0, off, v)
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.0.region_write(CONFIG, off, &v.to_le_bytes()).ok("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.guest_read(addr, buf.len()));
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.0.guest_write(addr, data)
    }
}

/// Sends `n` virtchnl VERSION requests while the driver has taken every ARQ buffer back, then gives the buffers
/// back: returns how many replies the driver receives.
fn arq_replies_after_backlog(extra: &[&str], n: usize) -> (usize, ServerProcess) {
    let s = ServerProcess::start_with(extra);
    let mut c = s.connect_negotiated();
    c.dma_map(0, 4 << 20, DMA_RW, None).ok("guest memory without an fd");
    let mut d = DriverModel::new(SocketBus(c), 0x10_0000);
    assert!(d.wait_active(Duration::from_secs(2)));
    d.init_aq();
    d.bus.write32(VF_ARQT1, 0); // ARQH == ARQT: no buffer for the device to fill
    for i in 0..n {
        d.send(OP_VERSION, &msg_version(1, 1));
        assert!(d.wait_atq_done(Duration::from_secs(2)).is_some(), "request {i} was not consumed");
    }
    d.bus.write32(VF_ARQT1, AQ_LEN - 1);
    let mut got = 0;
    while let Some(m) = d.recv(Duration::from_millis(300)) {
        assert_eq!((m.op, m.status), (OP_VERSION, 0), "reply {got}");
        got += 1;
    }
    (got, s)
}

#[test]
fn max_arq_queued_bounds_the_pf_messages_held_for_a_driver_without_buffers() {
    let (got, mut s) = arq_replies_after_backlog(&[], 5);
    assert_eq!(got, 5, "by default 5 held replies are all delivered");
    s.assert_alive();
    let (got, mut s) = arq_replies_after_backlog(&["--max-arq-queued", "2"], 5);
    assert_eq!(got, 2, "with --max-arq-queued 2 only the 2 newest of 5 held replies remain");
    assert_eq!(s.log().matches("ARQ backlog full: dropped PF message").count(), 3, "the 3 oldest were dropped");
    s.assert_alive();
}

// ------------------------------------------------------------------------------------------------------------
// --max-pending-dma
// ------------------------------------------------------------------------------------------------------------

/// Takes the device worker's DMA timeout (10 s) once: a request the client never answers stays outstanding at the
/// server after the worker gave up on it, and with --max-pending-dma 1 that one fills the table.
#[test]
fn max_pending_dma_fails_device_dma_past_the_limit() {
    const RING: u64 = 0x1_0000_0000;
    let mut s = ServerProcess::start_with(&["--max-pending-dma", "1"]);
    let mut c = s.connect_negotiated();
    let stale = held_atq_dma_read(&mut c, RING);
    wait_atq_stalled(&mut c, Duration::from_secs(15), "the worker giving up on an unanswered DMA_READ");

    // The request is still outstanding: the next device access fails at once, without a message to the client.
    let phrase = "DMA requests unanswered by the client: failing another";
    c.reset().ok("DEVICE_RESET");
    c.write32(BAR0, VF_ATQBAL1, RING as u32);
    c.write32(BAR0, VF_ATQBAH1, (RING >> 32) as u32);
    c.enable_bus_master();
    c.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    c.posted_write(BAR0, VF_ATQT1, &1u32.to_le_bytes());
    wait_atq_stalled(&mut c, Duration::from_secs(2), "a device read past --max-pending-dma");
    c.pump(Duration::from_millis(50)).unwrap();
    assert!(c.held.is_empty(), "a DMA request past the limit reached the client: {:?}", c.held[0].hdr);
    assert_eq!(s.log().matches(phrase).count(), 1, "the refusal is logged");

    // Answering the stale request frees the slot: the next device read reaches the client.
    let (addr, count) = (le_u64(&stale.payload, 0), le_u64(&stale.payload, 8));
    let data = c.guest_read(addr, count as usize);
    let p = Payload::new().u64(addr).u64(count).bytes(&data).build();
    let h =
        Header { id: stale.hdr.id, cmd: cmd::DMA_READ, size: (HDR_SIZE + p.len()) as u32, flags: TYPE_REPLY, errno: 0 };
    let mut b = h.to_bytes().to_vec();
    b.extend(p);
    c.send_bytes(&b, &[]).unwrap();
    let again = held_atq_dma_read(&mut c, RING);
    assert_eq!(le_u64(&again.payload, 0), RING, "the next descriptor read");
    s.assert_alive();
}
