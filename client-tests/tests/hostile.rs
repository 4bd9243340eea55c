//! The hostile-client catalogue (issue 7, "No client can wedge the server"): one named case per kind of bad
//! behaviour, each run against the real server binary over its UNIX socket.
//!
//! Every case asserts what the hostile client itself gets (the error reply docs/protocol.md documents, with its
//! errno, or a clean close of the connection, or, for posted messages, silence). After every case the runner
//! asserts that a fresh client is served (connect, VERSION, config-space read of 0x154c8086), that the server is
//! alive and has logged no panic, and that its open-fd count is back to the baseline it had before the group.
//!
//! The cases are grouped; each group is one #[test] with its own server, so groups run in parallel.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client_tests::client::{set_irqs_payload, write_multi_payload, Msg};
use client_tests::reg::*;
use client_tests::util::{eventfd, eventfd_take, held_atq_dma_read, memfd, wait_atq_stalled};
use client_tests::*;
use rustix::process::{kill_process, Pid, Signal};

const EINVAL: i32 = libc::EINVAL;
const E2BIG: i32 = libc::E2BIG;
const ENOSYS: i32 = libc::ENOSYS;
const ENOENT: i32 = libc::ENOENT;
const EEXIST: i32 = libc::EEXIST;
const ENOTTY: i32 = libc::ENOTTY;

/// How long the server gets to close a connection it should close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long we listen to be sure no reply comes.
const SILENCE: Duration = Duration::from_millis(200);
/// How long the server gets to close the fds of a client that left.
const FD_SETTLE: Duration = Duration::from_secs(5);
/// The largest message the server accepts with the default --max-data-xfer-size (docs/protocol.md).
const MAX_MSG: u32 = 16 + (1 << 20) + 4096;
/// Past this size the server answers E2BIG and closes the connection (docs/protocol.md).
const DRAIN_LIMIT: u32 = 16 + (64 << 20) + 4096;
/// Fd-less guest memory for admin-queue descriptors: the device reads them with DMA_READ messages.
const RING: u64 = 0x1_0000_0000;
/// The most fds one sendmsg can carry (SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;

// ------------------------------------------------------------------------------------------------------------
// The runner
// ------------------------------------------------------------------------------------------------------------

/// One hostile behaviour. `run` asserts what the hostile client gets; the runner asserts the aftermath.
struct Case {
    name: &'static str,
    run: fn(&ServerProcess),
}

/// `cases![f, g]`: cases named after their functions, so names are distinct by construction.
macro_rules! cases {
    ($($f:ident),* $(,)?) => { vec![$(Case { name: stringify!($f), run: $f }),*] };
}

/// The server's fd count with no client: measured once a client has come and gone and the count holds still.
fn idle_fd_count(s: &ServerProcess) -> usize {
    s.assert_serves_new_client("before the first case");
    let deadline = Instant::now() + FD_SETTLE;
    let (mut last, mut since) = (s.fd_count(), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let n = s.fd_count();
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(200) {
            return n;
        }
        assert!(Instant::now() < deadline, "the server's fd count never settled");
    }
}

fn run_group(group: &str, cases: Vec<Case>) {
    let mut s = ServerProcess::start();
    let base = idle_fd_count(&s);
    let t0 = Instant::now();
    for c in &cases {
        let t = Instant::now();
        (c.run)(&s);
        s.assert_serves_new_client(&format!("{group}/{}", c.name));
        s.assert_alive();
        let n = s.wait_fd_count(base, FD_SETTLE);
        assert_eq!(n, base, "{group}/{}: the server holds {n} fds after the case, {base} before", c.name);
        if t.elapsed() > Duration::from_secs(3) {
            eprintln!("{group}/{}: slow case ({:?})", c.name, t.elapsed());
        }
    }
    s.assert_alive();
    println!(
        "hostile/{group}: {} cases passed in {:.1?} (server fds back to {base} after each)",
        cases.len(),
        t0.elapsed()
    );
}

fn all_groups() -> Vec<(&'static str, Vec<Case>)> {
    vec![
        ("framing", framing_cases()),
        ("negotiation", negotiation_cases()),
        ("commands", command_cases()),
        ("dma", dma_cases()),
        ("fds", fd_cases()),
        ("pipelines", pipeline_cases()),
        ("processes", process_cases()),
    ]
}

#[test]
fn catalogue_has_at_least_60_distinct_cases() {
    let groups = all_groups();
    let names: Vec<&str> = groups.iter().flat_map(|(_, cs)| cs.iter().map(|c| c.name)).collect();
    let distinct: std::collections::HashSet<&str> = names.iter().copied().collect();
    assert_eq!(distinct.len(), names.len(), "duplicate case names");
    assert!(names.len() >= 60, "only {} cases", names.len());
    let per: Vec<String> = groups.iter().map(|(g, cs)| format!("{g} {}", cs.len())).collect();
    println!("hostile catalogue: {} cases ({})", names.len(), per.join(", "));
}

#[test]
fn framing() {
    run_group("framing", framing_cases());
}

#[test]
fn negotiation() {
    run_group("negotiation", negotiation_cases());
}

#[test]
fn commands() {
    run_group("commands", command_cases());
}

#[test]
fn dma() {
    run_group("dma", dma_cases());
}

#[test]
fn fds() {
    run_group("fds", fd_cases());
}

#[test]
fn pipelines() {
    run_group("pipelines", pipeline_cases());
}

#[test]
fn processes() {
    run_group("processes", process_cases());
}

// ------------------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------------------

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

/// The 16-byte request of DEVICE_GET_INFO, GET_REGION_IO_FDS and GET_IRQ_INFO.
fn info16(argsz: u32, index: u32) -> Vec<u8> {
    Payload::new().u32(argsz).u32(0).u32(index).u32(0).build()
}

fn region_info_payload(argsz: u32, index: u32) -> Vec<u8> {
    Payload::new().u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0).build()
}

fn version_payload(json: &[u8]) -> Vec<u8> {
    Payload::new().u16(0).u16(0).bytes(json).build()
}

fn nul(json: &str) -> Vec<u8> {
    let mut v = json.as_bytes().to_vec();
    v.push(0);
    v
}

fn good_caps() -> Vec<u8> {
    nul(QEMU_LIKE_CAPS)
}

fn eventfds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| eventfd()).collect()
}

fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// `n` copies of one fd in a single SCM_RIGHTS message.
fn copies(fd: &impl AsFd, n: usize) -> Vec<BorrowedFd<'_>> {
    vec![fd.as_fd(); n]
}

/// Deterministic garbage.
fn garbage(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `payload` as `cmd` with `fds` and asserts the error reply (header only, no fds) with `errno`.
#[track_caller]
fn expect_errno(c: &mut Client, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>], errno: i32, what: &str) {
    let r = c.request(cmd, payload, fds).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    r.assert_errno(errno, what);
}

/// Sends a message with arbitrary header fields and asserts the error reply to it.
#[track_caller]
fn expect_header_errno(
    c: &mut Client,
    cmd: u16,
    flags: u32,
    size: Option<u32>,
    payload: &[u8],
    errno: i32,
    what: &str,
) {
    let id = c.send_with_header(cmd, flags, 0, size, payload, &[]).unwrap_or_else(|e| panic!("{what}: send: {e}"));
    c.recv_reply(id).unwrap_or_else(|e| panic!("{what}: no reply: {e}")).assert_errno(errno, what);
}

/// A successful request on the same connection.
#[track_caller]
fn still_works(c: &mut Client, what: &str) {
    let r = c.request(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[]);
    let r = r.unwrap_or_else(|e| panic!("{what}: the good request after it got no reply: {e}"));
    assert_eq!(r.errno, None, "{what}: the good request after it failed");
    assert_eq!(le_u32(&r.payload, 16), 0x154c_8086, "{what}: the good request after it");
    assert!(c.stray_replies.is_empty(), "{what}: replies to ids never sent: {:?}", c.stray_replies);
}

/// The server closes the connection without sending anything.
#[track_caller]
fn expect_silent_close(c: &mut Client, what: &str) {
    match c.until_close(CLOSE_WAIT) {
        Some(h) => assert!(h.is_empty(), "{what}: the server sent {h:?} before closing"),
        None => panic!("{what}: the connection is still open after {CLOSE_WAIT:?}"),
    }
}

/// The server answers message `id` with `errno`, then closes the connection.
#[track_caller]
fn expect_error_then_close(c: &mut Client, id: u16, errno: i32, what: &str) {
    let h = c.until_close(CLOSE_WAIT).unwrap_or_else(|| panic!("{what}: the connection is still open"));
    assert_eq!(h.len(), 1, "{what}: expected exactly one reply before the close, got {h:?}");
    let got = (h[0].id, h[0].flags & (FLAG_TYPE_MASK | FLAG_ERROR), h[0].errno, h[0].size);
    assert_eq!(got, (id, TYPE_REPLY | FLAG_ERROR, errno as u32, 16), "{what}: the reply before the close");
}

/// No message arrives for a while.
#[track_caller]
fn expect_no_reply(c: &mut Client, what: &str) {
    let got = c.replies_within(SILENCE).unwrap_or_else(|e| panic!("{what}: {e}"));
    let hdrs: Vec<Header> = got.iter().map(|m| m.hdr).collect();
    assert!(hdrs.is_empty(), "{what}: replies to posted or swallowed messages: {hdrs:?}");
}

/// Sends a reply-typed message with the given id (a reply to the server's DMA request, or a stray one).
fn send_reply(c: &mut Client, id: u16, cmd: u16, flags: u32, errno: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let h = Header { id, cmd, size: (HDR_SIZE + payload.len()) as u32, flags: TYPE_REPLY | flags, errno };
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(payload);
    c.send_bytes(&b, fds).expect("sending a reply");
}

/// Waits for the server's answer to a reply-typed message we sent with `id` (not one of our commands).
#[track_caller]
fn expect_answer_to_reply(c: &mut Client, id: u16, errno: i32, what: &str) {
    let r = c.recv_reply(id).unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    r.assert_errno(errno, what);
    c.stray_replies.retain(|h| h.id != id);
}

/// Counts a phrase in the server log.
fn log_count(s: &ServerProcess, phrase: &str) -> usize {
    s.log().matches(phrase).count()
}

// ------------------------------------------------------------------------------------------------------------
// Framing: headers, sizes, flags, command numbers
// ------------------------------------------------------------------------------------------------------------

fn framing_cases() -> Vec<Case> {
    cases![
        half_header_then_half_close_at_every_byte,
        half_header_before_version_then_close_at_every_byte,
        half_dma_map_payload_then_half_close_at_every_byte,
        half_dma_map_payload_with_fd_then_close_at_every_byte,
        header_size_below_16_closes_the_connection,
        impossible_sizes_get_e2big_then_a_close,
        oversized_message_is_drained_with_e2big,
        oversized_header_then_a_hang_up_before_its_payload,
        size_field_shorter_than_the_payload_desynchronises_then_closes,
        size_field_longer_than_the_payload_swallows_the_next_message,
        unknown_header_flag_bits,
        message_types_other_than_command_and_reply,
        error_flag_on_a_command,
        unknown_command_numbers,
        posted_bad_messages_stay_silent,
        empty_payload_for_every_command,
        payload_one_byte_short_for_every_command,
        stray_replies_after_version,
    ]
}

fn half_header_then_half_close_at_every_byte(s: &ServerProcess) {
    for cut in 1..HDR_SIZE {
        let mut c = s.connect_negotiated();
        let h = Header { id: c.fresh_id(), cmd: cmd::REGION_READ, size: 32, flags: TYPE_COMMAND, errno: 0 };
        c.send_bytes(&h.to_bytes()[..cut], &[]).unwrap();
        c.shutdown_write();
        expect_silent_close(&mut c, &format!("{cut} header bytes then SHUT_WR"));
        drop(c);
        s.assert_serves_new_client(&format!("after {cut} header bytes"));
    }
}

fn half_header_before_version_then_close_at_every_byte(s: &ServerProcess) {
    for cut in 1..HDR_SIZE {
        let mut c = s.connect();
        let m = message(c.fresh_id(), cmd::VERSION, TYPE_COMMAND, &version_payload(&good_caps()));
        c.send_bytes(&m[..cut], &[]).unwrap();
        drop(c); // bytes and FIN together, before VERSION completed
        s.assert_serves_new_client(&format!("after {cut} bytes of a VERSION header"));
    }
}

fn half_dma_map_payload_then_half_close_at_every_byte(s: &ServerProcess) {
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    for cut in 0..p.len() {
        let mut c = s.connect_negotiated();
        let m = message(c.fresh_id(), cmd::DMA_MAP, TYPE_COMMAND, &p);
        c.send_bytes(&m[..HDR_SIZE + cut], &[]).unwrap();
        c.shutdown_write();
        expect_silent_close(&mut c, &format!("DMA_MAP with {cut} of 32 payload bytes"));
        drop(c);
        s.assert_serves_new_client(&format!("after {cut} DMA_MAP payload bytes"));
    }
}

fn half_dma_map_payload_with_fd_then_close_at_every_byte(s: &ServerProcess) {
    let mem = memfd(0x1000);
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    for cut in 0..p.len() {
        let mut c = s.connect_negotiated();
        let m = message(c.fresh_id(), cmd::DMA_MAP, TYPE_COMMAND, &p);
        c.send_bytes(&m[..HDR_SIZE + cut], &[mem.as_fd()]).unwrap();
        if cut % 2 == 0 {
            c.shutdown_write();
            expect_silent_close(&mut c, &format!("DMA_MAP + fd with {cut} payload bytes then SHUT_WR"));
        }
        drop(c);
        s.assert_serves_new_client(&format!("after {cut} DMA_MAP payload bytes with an fd"));
    }
}

fn header_size_below_16_closes_the_connection(s: &ServerProcess) {
    for (size, negotiated) in [(0u32, true), (1, true), (8, true), (15, true), (0, false), (15, false)] {
        let mut c = if negotiated { s.connect_negotiated() } else { s.connect() };
        let h = Header { id: c.fresh_id(), cmd: cmd::REGION_READ, size, flags: TYPE_COMMAND, errno: 0 };
        // A payload follows, as if the size were right: the server must not try to parse it.
        let mut b = h.to_bytes().to_vec();
        b.extend(read_payload(0, CONFIG, 4));
        c.send_bytes(&b, &[]).unwrap();
        expect_silent_close(&mut c, &format!("header size {size} (negotiated: {negotiated})"));
    }
}

fn impossible_sizes_get_e2big_then_a_close(s: &ServerProcess) {
    for (size, negotiated) in [(DRAIN_LIMIT + 1, true), (0x8000_0000, true), (u32::MAX, true), (u32::MAX, false)] {
        let mut c = if negotiated { s.connect_negotiated() } else { s.connect() };
        let id = c.send_with_header(cmd::REGION_WRITE, TYPE_COMMAND, 0, Some(size), &[0; 64], &[]).unwrap();
        expect_error_then_close(&mut c, id, E2BIG, &format!("size {size:#x} (negotiated: {negotiated})"));
    }
}

fn oversized_message_is_drained_with_e2big(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for size in [MAX_MSG + 1, MAX_MSG + 4096, 2 * MAX_MSG] {
        let payload = garbage(size as usize - HDR_SIZE, size);
        expect_header_errno(&mut c, cmd::REGION_WRITE, TYPE_COMMAND, None, &payload, E2BIG, &format!("{size} bytes"));
        still_works(&mut c, &format!("after a drained {size}-byte message"));
    }
}

fn oversized_header_then_a_hang_up_before_its_payload(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let id = c.send_with_header(cmd::REGION_WRITE, TYPE_COMMAND, 0, Some(MAX_MSG + 100_000), &[0; 100], &[]).unwrap();
    // The server answers on seeing the header, drains what follows, and sees the hang-up mid-drain.
    c.shutdown_write();
    expect_error_then_close(&mut c, id, E2BIG, "oversized header, 100 payload bytes, SHUT_WR");
}

fn size_field_shorter_than_the_payload_desynchronises_then_closes(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    // size 24: the server takes the 8-byte offset as the whole payload (EINVAL). The region and count fields
    // (07 00 00 00 04 00 00 00) then start the next header: id 7, command 0, size 4 once 8 more bytes arrive.
    let p = read_payload(0, CONFIG, 4);
    let id = c.send_with_header(cmd::REGION_READ, TYPE_COMMAND, 0, Some(24), &p, &[]).unwrap();
    c.recv_reply(id).expect("reply to the short-sized message").assert_errno(EINVAL, "8-byte REGION_READ");
    c.send_bytes(&[0; 8], &[]).unwrap();
    expect_silent_close(&mut c, "a header of size 4 made of the leftover bytes");
}

fn size_field_longer_than_the_payload_swallows_the_next_message(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    // Declares 32 bytes more than it carries; the next (valid) message becomes the rest of its payload.
    let first =
        c.send_with_header(cmd::REGION_READ, TYPE_COMMAND, 0, Some(16 + 16 + 32), &read_payload(0, CONFIG, 4), &[]);
    let second = c.send(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[], false).unwrap();
    let r = c.recv_reply(first.unwrap()).expect("reply to the long-sized message");
    r.assert_errno(EINVAL, "REGION_READ with a 48-byte payload");
    let got = c.replies_within(SILENCE).unwrap();
    assert!(got.iter().all(|m| m.hdr.id != second), "the swallowed message was answered");
    assert!(got.is_empty(), "unexpected messages: {:?}", got.iter().map(|m| m.hdr).collect::<Vec<_>>());
    still_works(&mut c, "after a message that swallowed the next one");
}

fn unknown_header_flag_bits(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let p = read_payload(0, CONFIG, 4);
    for bit in 6..32 {
        expect_header_errno(&mut c, cmd::REGION_READ, 1 << bit, None, &p, EINVAL, &format!("flag bit {bit}"));
    }
    expect_header_errno(&mut c, cmd::REGION_READ, 0xffff_ffc0, None, &p, EINVAL, "every unknown bit");
    still_works(&mut c, "after unknown flag bits");
}

fn message_types_other_than_command_and_reply(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let p = read_payload(0, CONFIG, 4);
    for t in 2..16 {
        expect_header_errno(&mut c, cmd::REGION_READ, t, None, &p, EINVAL, &format!("message type {t}"));
    }
    still_works(&mut c, "after bad message types");
}

fn error_flag_on_a_command(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let p = read_payload(0, CONFIG, 4);
    let id = c.send_with_header(cmd::REGION_READ, FLAG_ERROR, libc::EIO as u32, None, &p, &[]).unwrap();
    c.recv_reply(id).expect("reply").assert_errno(EINVAL, "error bit and errno on a command");
    // Posted, it is dropped silently.
    c.send_with_header(cmd::REGION_READ, FLAG_ERROR | FLAG_NO_REPLY, 1, None, &p, &[]).unwrap();
    expect_no_reply(&mut c, "posted command with the error bit");
    still_works(&mut c, "after error-flagged commands");
}

fn unknown_command_numbers(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let big = garbage(4096, 7);
    for n in [0u16, 14, 19, 20, 0x100, 0x7fff, 0x8000, 0xffff] {
        expect_errno(&mut c, n, &[], &[], ENOSYS, &format!("command {n}, empty"));
        expect_errno(&mut c, n, &big, &[], ENOSYS, &format!("command {n}, 4 KiB of garbage"));
    }
    still_works(&mut c, "after unknown commands");
}

fn posted_bad_messages_stay_silent(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x7000);
    c.send(0xffff, &garbage(100, 1), &[], true).unwrap();
    c.send(cmd::REGION_READ, &read_payload(0, 9, 4), &[], true).unwrap();
    c.send(cmd::DMA_UNMAP, &unmap_payload(24, 0, 0x7777_0000, 0x1000), &[], true).unwrap();
    c.send(cmd::DMA_MAP, &map_payload(32, 0, 0, 0x10_0000, 0x1000), &[], true).unwrap();
    c.send(cmd::REGION_WRITE, &write_payload(VF_ATQBAL1, BAR0, 4, &[0xff; 8]), &[], true).unwrap();
    c.send(cmd::MIG_DATA_READ, &[], &[], true).unwrap();
    c.send(cmd::VERSION, &version_payload(&good_caps()), &[], true).unwrap();
    expect_no_reply(&mut c, "posted bad messages");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x7000, "a rejected posted write was applied");
    still_works(&mut c, "after posted bad messages");
}

fn empty_payload_for_every_command(s: &ServerProcess) {
    let mut c = s.connect();
    expect_errno(&mut c, cmd::VERSION, &[], &[], EINVAL, "VERSION, empty");
    c.negotiate();
    for (n, errno) in [
        (cmd::VERSION, EINVAL),
        (cmd::DMA_MAP, EINVAL),
        (cmd::DMA_UNMAP, EINVAL),
        (cmd::DEVICE_GET_INFO, EINVAL),
        (cmd::DEVICE_GET_REGION_INFO, EINVAL),
        (cmd::DEVICE_GET_REGION_IO_FDS, EINVAL),
        (cmd::DEVICE_GET_IRQ_INFO, EINVAL),
        (cmd::DEVICE_SET_IRQS, EINVAL),
        (cmd::REGION_READ, EINVAL),
        (cmd::REGION_WRITE, EINVAL),
        (cmd::DMA_READ, EINVAL),
        (cmd::DMA_WRITE, EINVAL),
        (cmd::DIRTY_PAGES_RETIRED, ENOSYS),
        (cmd::REGION_WRITE_MULTI, EINVAL),
        (cmd::DEVICE_FEATURE, EINVAL),
        (cmd::MIG_DATA_READ, EINVAL),
        (cmd::MIG_DATA_WRITE, EINVAL),
    ] {
        expect_errno(&mut c, n, &[], &[], errno, &format!("command {n} with an empty payload"));
    }
    still_works(&mut c, "after empty payloads");
}

fn payload_one_byte_short_for_every_command(s: &ServerProcess) {
    let mut c = s.connect();
    expect_errno(&mut c, cmd::VERSION, &[0, 0, 0], &[], EINVAL, "VERSION, 3 bytes");
    c.negotiate();
    let cut = |mut p: Vec<u8>| {
        p.pop();
        p
    };
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (cmd::DMA_MAP, cut(map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000))),
        (cmd::DMA_UNMAP, cut(unmap_payload(24, UNMAP_ALL, 0, 0))),
        (cmd::DEVICE_GET_INFO, cut(info16(16, 0))),
        (cmd::DEVICE_GET_REGION_INFO, cut(region_info_payload(32, CONFIG))),
        (cmd::DEVICE_GET_REGION_IO_FDS, cut(info16(16, BAR0))),
        (cmd::DEVICE_GET_IRQ_INFO, cut(info16(16, IRQ_MSIX))),
        (cmd::DEVICE_SET_IRQS, cut(set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]))),
        (cmd::REGION_READ, cut(read_payload(0, CONFIG, 4))),
        (cmd::REGION_WRITE, cut(write_payload(0x0c, CONFIG, 0, &[]))),
        (cmd::REGION_WRITE_MULTI, cut(Payload::new().u64(1).build())),
    ];
    for (n, p) in &cases {
        expect_errno(&mut c, *n, p, &[], EINVAL, &format!("command {n} with {} bytes", p.len()));
    }
    still_works(&mut c, "after short payloads");
}

fn stray_replies_after_version(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let cases: Vec<(u16, u32, u32, Vec<u8>)> = vec![
        (cmd::DMA_READ, 0, 0, Payload::new().u64(RING).u64(4).u32(0).build()),
        (cmd::DMA_WRITE, FLAG_ERROR, libc::EFAULT as u32, vec![]),
        (cmd::REGION_READ, 0, 0, vec![]),
        (cmd::VERSION, 0, 0, version_payload(&good_caps())),
        (0xffff, FLAG_ERROR, u32::MAX, garbage(4096, 3)),
    ];
    for (i, (n, flags, errno, p)) in cases.iter().enumerate() {
        let id = 0x9000 + i as u16;
        send_reply(&mut c, id, *n, *flags, *errno, p, &[]);
        expect_answer_to_reply(&mut c, id, EINVAL, &format!("stray reply to command {n}"));
    }
    still_works(&mut c, "after stray replies");
}

// ------------------------------------------------------------------------------------------------------------
// Negotiation: commands before VERSION, hostile VERSION payloads
// ------------------------------------------------------------------------------------------------------------

fn negotiation_cases() -> Vec<Case> {
    cases![
        every_command_before_version,
        stray_reply_before_version,
        dma_map_with_fd_before_version,
        set_irqs_with_eventfds_before_version,
        second_and_later_versions,
        posted_version_negotiates_silently,
        version_with_deeply_nested_json,
        version_with_huge_numbers,
        version_with_u64_max_limits,
        version_with_non_utf8_json,
        version_with_embedded_nul_or_trailing_garbage,
        version_json_that_is_not_an_object,
        version_with_zero_sizes_or_no_4k_pages,
        version_json_padded_to_the_message_limit,
        version_over_the_message_limit,
        version_short_or_with_a_bad_major,
        version_with_wrong_types_for_known_keys,
    ]
}

fn every_command_before_version(s: &ServerProcess) {
    // A device state the rejected REGION_WRITE below would change.
    let mut a = s.connect_negotiated();
    a.region_write(CONFIG, 0x0c, &[0x11]).ok("cache line size");
    drop(a);

    let mut c = s.connect();
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (cmd::DMA_MAP, map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000)),
        (cmd::DMA_UNMAP, unmap_payload(24, UNMAP_ALL, 0, 0)),
        (cmd::DEVICE_GET_INFO, info16(16, 0)),
        (cmd::DEVICE_GET_REGION_INFO, region_info_payload(32, CONFIG)),
        (cmd::DEVICE_GET_REGION_IO_FDS, info16(16, BAR0)),
        (cmd::DEVICE_GET_IRQ_INFO, info16(16, IRQ_MSIX)),
        (cmd::DEVICE_SET_IRQS, set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[])),
        (cmd::REGION_READ, read_payload(0, CONFIG, 4)),
        (cmd::REGION_WRITE, write_payload(0x0c, CONFIG, 1, &[0x22])),
        (cmd::DMA_READ, Payload::new().u64(0).u64(4).build()),
        (cmd::DMA_WRITE, Payload::new().u64(0).u64(4).u32(0).build()),
        (cmd::DEVICE_RESET, vec![]),
        (cmd::REGION_WRITE_MULTI, write_multi_payload(1, &[(CONFIG, 0x0c, &[0x33])])),
        (cmd::DEVICE_FEATURE, Payload::new().u32(16).u32(1 | 1 << 16).build()),
        (cmd::MIG_DATA_READ, Payload::new().u32(16).u32(0).u64(4096).build()),
        (cmd::MIG_DATA_WRITE, Payload::new().u32(20).u32(0).u64(4).u32(0).build()),
        // "Any command before VERSION" includes numbers that are no command at all.
        (0, vec![]),
        (cmd::DIRTY_PAGES_RETIRED, vec![]),
        (19, vec![]),
        (0xffff, garbage(64, 9)),
    ];
    for (n, p) in &cases {
        expect_errno(&mut c, *n, p, &[], EINVAL, &format!("command {n} before VERSION"));
    }
    c.negotiate();
    still_works(&mut c, "VERSION after every command was rejected");
    // The connection's own reset cleared 0x11; a REGION_WRITE (0x22) or WRITE_MULTI (0x33) before VERSION would
    // show here.
    assert_eq!(c.read_bytes(CONFIG, 0x0c, 1), [0x00], "a REGION_WRITE or WRITE_MULTI before VERSION was applied");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("the DMA_MAP before VERSION must not have mapped");
}

fn stray_reply_before_version(s: &ServerProcess) {
    let mut c = s.connect();
    send_reply(&mut c, 0, cmd::DMA_READ, 0, 0, &Payload::new().u64(0).u64(4).u32(0).build(), &[]);
    expect_answer_to_reply(&mut c, 0, EINVAL, "DMA_READ reply before VERSION");
    send_reply(&mut c, 1, cmd::VERSION, 0, 0, &version_payload(&good_caps()), &[]);
    expect_answer_to_reply(&mut c, 1, EINVAL, "VERSION-typed reply before VERSION");
    c.negotiate();
    still_works(&mut c, "after stray replies before VERSION");
}

fn dma_map_with_fd_before_version(s: &ServerProcess) {
    let mem = memfd(0x10000);
    let mut c = s.connect();
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x10000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EINVAL, "DMA_MAP with a memfd before VERSION");
    c.negotiate();
    c.dma_map(0x10_0000, 0x10000, DMA_RW, None).ok("the rejected DMA_MAP must not have mapped");
}

fn set_irqs_with_eventfds_before_version(s: &ServerProcess) {
    let e = eventfds(5);
    let mut c = s.connect();
    let p = set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[]);
    expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &borrow(&e), EINVAL, "SET_IRQS with eventfds before VERSION");
    c.negotiate();
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[], &[]).ok("trigger every MSI-X vector");
    std::thread::sleep(Duration::from_millis(50));
    let counts: Vec<u64> = e.iter().map(eventfd_take).collect();
    assert_eq!(counts, [0; 5], "an eventfd sent before VERSION was installed");
}

fn second_and_later_versions(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for (p, what) in [
        (version_payload(&good_caps()), "the same VERSION again"),
        (version_payload(&nul(r#"{"capabilities":{"max_data_xfer_size":4096}}"#)), "a VERSION changing limits"),
        (vec![], "an empty VERSION"),
        (garbage(333, 4), "a garbage VERSION"),
    ] {
        expect_errno(&mut c, cmd::VERSION, &p, &[], EINVAL, what);
    }
    still_works(&mut c, "after repeated VERSIONs");
}

fn posted_version_negotiates_silently(s: &ServerProcess) {
    let mut c = s.connect();
    c.send(cmd::VERSION, &version_payload(&good_caps()), &[], true).unwrap();
    expect_no_reply(&mut c, "posted VERSION");
    still_works(&mut c, "a request after a posted VERSION");
    expect_errno(&mut c, cmd::VERSION, &version_payload(&good_caps()), &[], EINVAL, "VERSION after a posted one");
}

fn version_with_deeply_nested_json(s: &ServerProcess) {
    let mut c = s.connect();
    let nest = |open: &str, close: &str, depth: usize, inner: &str| {
        format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
    };
    let docs = [
        format!(r#"{{"capabilities":{{"x":{}}}}}"#, nest("[", "]", 129, "")),
        format!(r#"{{"capabilities":{{"x":{}}}}}"#, nest("[", "]", 300_000, "")),
        nest(r#"{"a":"#, "}", 100_000, "1"),
        format!(r#"{{"capabilities":{}}}"#, nest(r#"{"migration":"#, "}", 50_000, "{}")),
        // Unbalanced: opens only.
        "[".repeat(500_000),
    ];
    for d in &docs {
        let what = format!("JSON nested {} bytes deep", d.len());
        expect_errno(&mut c, cmd::VERSION, &version_payload(&nul(d)), &[], EINVAL, &what);
    }
    c.negotiate();
    still_works(&mut c, "after deeply nested JSON");
}

fn version_with_huge_numbers(s: &ServerProcess) {
    let mut c = s.connect();
    for key in ["max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"] {
        for v in ["1e400", "18446744073709551616", "-1", "1.5", "1e3", "123456789012345678901234567890", "-0.0"] {
            let j = format!(r#"{{"capabilities":{{"{key}":{v}}}}}"#);
            expect_errno(&mut c, cmd::VERSION, &version_payload(&nul(&j)), &[], EINVAL, &format!("{key}: {v}"));
        }
    }
    c.negotiate();
    still_works(&mut c, "after huge numbers");
}

fn version_with_u64_max_limits(s: &ServerProcess) {
    let mut c = s.connect();
    let m = u64::MAX;
    let j = format!(
        r#"{{"capabilities":{{"max_msg_fds":{m},"max_data_xfer_size":{m},"max_dma_maps":{m},"pgsizes":{m}}}}}"#
    );
    let r = c.request(cmd::VERSION, &version_payload(&nul(&j)), &[]).expect("VERSION reply").ok("u64::MAX limits");
    let (_, caps) = client_tests::client::parse_version_reply(&r);
    assert_eq!(caps["max_data_xfer_size"], 1 << 20, "the server's own limit, whatever the client offers");
    assert_eq!(caps["max_msg_fds"], 16);
    still_works(&mut c, "after u64::MAX limits");
}

fn version_with_non_utf8_json(s: &ServerProcess) {
    let mut c = s.connect();
    for bytes in [
        &b"{\"capabilities\":{\"\xff\xfe\":1}}\0"[..],
        b"{\"capabilities\":\"\xc3\x28\"}\0",
        b"\xff\xff\xff\xff\0",
        b"{\"capabilities\":{\"write_multiple\":true,\"\xed\xa0\x80\":0}}\0",
    ] {
        expect_errno(&mut c, cmd::VERSION, &version_payload(bytes), &[], EINVAL, &format!("{bytes:x?}"));
    }
    c.negotiate();
    still_works(&mut c, "after non-UTF-8 JSON");
}

fn version_with_embedded_nul_or_trailing_garbage(s: &ServerProcess) {
    let mut c = s.connect();
    for bytes in
        [&b"{}\0{}\0"[..], b"{\"capabilities\":{}}\0garbage", b"{\"capabilities\":{}} trailing\0", b"\0", b"\0\0\0\0"]
    {
        expect_errno(&mut c, cmd::VERSION, &version_payload(bytes), &[], EINVAL, &format!("{bytes:x?}"));
    }
    c.negotiate();
    still_works(&mut c, "after NULs and trailing garbage");
}

fn version_json_that_is_not_an_object(s: &ServerProcess) {
    let mut c = s.connect();
    for j in ["null", "\"capabilities\"", "42", "true", "[]", r#"{"capabilities":null}"#, r#"{"capabilities":"{}"}"#] {
        expect_errno(&mut c, cmd::VERSION, &version_payload(&nul(j)), &[], EINVAL, j);
    }
    c.negotiate();
    still_works(&mut c, "after non-object JSON");
}

fn version_with_zero_sizes_or_no_4k_pages(s: &ServerProcess) {
    let mut c = s.connect();
    for j in [
        r#"{"capabilities":{"max_data_xfer_size":0}}"#,
        r#"{"capabilities":{"pgsizes":0}}"#,
        r#"{"capabilities":{"pgsizes":8192}}"#,
    ] {
        expect_errno(&mut c, cmd::VERSION, &version_payload(&nul(j)), &[], EINVAL, j);
    }
    c.negotiate();
    still_works(&mut c, "after zero sizes");
}

fn version_json_padded_to_the_message_limit(s: &ServerProcess) {
    let mut c = s.connect();
    let mut json = QEMU_LIKE_CAPS.as_bytes().to_vec();
    json.resize(MAX_MSG as usize - HDR_SIZE - 4 - 1, b' ');
    json.push(0);
    let p = version_payload(&json);
    assert_eq!(p.len() + HDR_SIZE, MAX_MSG as usize);
    let r = c.request(cmd::VERSION, &p, &[]).expect("VERSION reply").ok("VERSION of exactly the size limit");
    let (_, caps) = client_tests::client::parse_version_reply(&r);
    assert_eq!(caps["write_multiple"], true, "the padded JSON was parsed");
    still_works(&mut c, "after a VERSION at the size limit");
}

fn version_over_the_message_limit(s: &ServerProcess) {
    let mut c = s.connect();
    let mut json = QEMU_LIKE_CAPS.as_bytes().to_vec();
    json.resize(MAX_MSG as usize - HDR_SIZE - 4, b' ');
    json.push(0);
    expect_errno(&mut c, cmd::VERSION, &version_payload(&json), &[], E2BIG, "VERSION one byte over the limit");
    c.negotiate();
    still_works(&mut c, "after an oversized VERSION");
}

fn version_short_or_with_a_bad_major(s: &ServerProcess) {
    let mut c = s.connect();
    for p in [vec![], vec![0], vec![0, 0], vec![0, 0, 0]] {
        expect_errno(&mut c, cmd::VERSION, &p, &[], EINVAL, &format!("VERSION of {} bytes", p.len()));
    }
    for major in [1u16, 2, 0x8000, 0xffff] {
        let p = Payload::new().u16(major).u16(0).bytes(&good_caps()).build();
        expect_errno(&mut c, cmd::VERSION, &p, &[], EINVAL, &format!("major {major}"));
    }
    // Any minor is fine; the reply says 0.0.
    let p = Payload::new().u16(0).u16(0xffff).bytes(&good_caps()).build();
    let r = c.request(cmd::VERSION, &p, &[]).expect("VERSION reply").ok("minor 0xffff");
    assert_eq!((r.u16_at(0), r.u16_at(2)), (0, 0), "reply version");
    still_works(&mut c, "after short VERSIONs");
}

fn version_with_wrong_types_for_known_keys(s: &ServerProcess) {
    let mut c = s.connect();
    for j in [
        r#"{"capabilities":{"migration":1}}"#,
        r#"{"capabilities":{"twin_socket":"x"}}"#,
        r#"{"capabilities":{"write_multiple":"yes"}}"#,
        r#"{"capabilities":{"max_msg_fds":[]}}"#,
        r#"{"capabilities":{"max_data_xfer_size":{}}}"#,
        r#"{"capabilities":{"max_dma_maps":null}}"#,
    ] {
        expect_errno(&mut c, cmd::VERSION, &version_payload(&nul(j)), &[], EINVAL, j);
    }
    c.negotiate();
    still_works(&mut c, "after wrong types");
}

// ------------------------------------------------------------------------------------------------------------
// Commands: region and IRQ indexes, offsets, argsz, WRITE_MULTI, feature and migration garbage
// ------------------------------------------------------------------------------------------------------------

fn command_cases() -> Vec<Case> {
    cases![
        region_read_index_out_of_range,
        region_write_index_out_of_range,
        region_info_index_out_of_range,
        region_io_fds_index_out_of_range,
        irq_info_index_out_of_range,
        set_irqs_index_out_of_range,
        region_read_offset_plus_count_wraps,
        region_write_offset_plus_count_wraps,
        region_count_over_max_data_xfer_size,
        region_write_count_and_payload_disagree,
        region_read_payload_longer_than_16,
        info_commands_with_argsz_too_small,
        info_commands_with_argsz_u32_max,
        set_irqs_argsz_disagrees_with_payload,
        set_irqs_start_plus_count_overflows,
        set_irqs_unknown_flag_bits,
        set_irqs_with_fds_that_are_not_eventfds,
        set_irqs_with_more_eventfds_than_vectors,
        write_multi_with_hostile_wr_cnt,
        write_multi_with_hostile_entries,
        device_feature_garbage,
        mig_data_read_garbage,
        mig_data_write_garbage,
        server_to_client_commands_sent_by_the_client,
        device_reset_with_a_payload,
    ]
}

/// A REGION_WRITE_MULTI entry: region, offset, data.
type MultiEntry<'a> = (u32, u64, &'a [u8]);

const BAD_REGIONS: [u32; 5] = [9, 10, 255, 0x8000_0000, u32::MAX];

fn region_read_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for r in BAD_REGIONS {
        expect_errno(&mut c, cmd::REGION_READ, &read_payload(0, r, 4), &[], EINVAL, &format!("read region {r}"));
    }
    still_works(&mut c, "after bad region reads");
}

fn region_write_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for r in BAD_REGIONS {
        let p = write_payload(0, r, 4, &[1; 4]);
        expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], EINVAL, &format!("write region {r}"));
    }
    still_works(&mut c, "after bad region writes");
}

fn region_info_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for r in BAD_REGIONS {
        let p = region_info_payload(32, r);
        expect_errno(&mut c, cmd::DEVICE_GET_REGION_INFO, &p, &[], EINVAL, &format!("REGION_INFO {r}"));
    }
    still_works(&mut c, "after bad REGION_INFO");
}

fn region_io_fds_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for r in BAD_REGIONS {
        let p = info16(16, r);
        expect_errno(&mut c, cmd::DEVICE_GET_REGION_IO_FDS, &p, &[], EINVAL, &format!("REGION_IO_FDS {r}"));
    }
    still_works(&mut c, "after bad REGION_IO_FDS");
}

fn irq_info_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for i in [6u32, 7, 0x8000_0000, u32::MAX] {
        expect_errno(&mut c, cmd::DEVICE_GET_IRQ_INFO, &info16(16, i), &[], EINVAL, &format!("IRQ_INFO {i}"));
    }
    still_works(&mut c, "after bad IRQ_INFO");
}

fn set_irqs_index_out_of_range(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    for i in [6u32, 7, u32::MAX] {
        let p = set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, i, 0, 1, &[]);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[], EINVAL, &format!("SET_IRQS index {i}"));
        let p = set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, i, 0, 1, &[]);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[e.as_fd()], EINVAL, &format!("SET_IRQS eventfd index {i}"));
        let p = set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, i, 0, 0, &[]);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[], EINVAL, &format!("SET_IRQS disable index {i}"));
    }
    still_works(&mut c, "after bad IRQ indexes");
}

const WRAPPING_ACCESSES: [(u64, u32, u32); 6] = [
    (u64::MAX, BAR0, 1),
    (u64::MAX - 3, BAR0, 4),
    (u64::MAX - 0xfff, BAR0, 0x1000),
    (0xffff_ffff_ffff_0000, BAR0, 0x1_0000),
    (1 << 63, CONFIG, 4),
    (u64::MAX - 1, CONFIG, 4),
];

fn region_read_offset_plus_count_wraps(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for (off, r, n) in WRAPPING_ACCESSES {
        expect_errno(&mut c, cmd::REGION_READ, &read_payload(off, r, n), &[], EINVAL, &format!("read {off:#x}+{n}"));
    }
    still_works(&mut c, "after wrapping reads");
}

fn region_write_offset_plus_count_wraps(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let before = c.read_bytes(CONFIG, 0, 64);
    for (off, r, n) in WRAPPING_ACCESSES {
        let p = write_payload(off, r, n, &vec![0xa5; n as usize]);
        expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], EINVAL, &format!("write {off:#x}+{n}"));
    }
    assert_eq!(c.read_bytes(CONFIG, 0, 64), before, "a wrapping write reached config space");
    still_works(&mut c, "after wrapping writes");
}

fn region_count_over_max_data_xfer_size(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for n in [(1u32 << 20) + 1, 1 << 24, u32::MAX] {
        expect_errno(&mut c, cmd::REGION_READ, &read_payload(0, BAR0, n), &[], E2BIG, &format!("read count {n}"));
    }
    let n = (1u32 << 20) + 1;
    let p = write_payload(0, BAR0, n, &vec![0; n as usize]);
    expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], E2BIG, "write count 1 MiB + 1");
    still_works(&mut c, "after over-large counts");
}

fn region_write_count_and_payload_disagree(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x3000);
    for (count, data) in [(u32::MAX, 4usize), (0, 4), (5, 4), (4, 5), (4, 0), (0x1_0000, 16)] {
        let p = write_payload(VF_ATQBAL1, BAR0, count, &vec![0xff; data]);
        expect_errno(&mut c, cmd::REGION_WRITE, &p, &[], EINVAL, &format!("count {count}, {data} data bytes"));
    }
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x3000, "a malformed write was applied");
    still_works(&mut c, "after count mismatches");
}

fn region_read_payload_longer_than_16(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for extra in [1usize, 8, 4096] {
        let mut p = read_payload(0, CONFIG, 4);
        p.extend(garbage(extra, extra as u32));
        expect_errno(&mut c, cmd::REGION_READ, &p, &[], EINVAL, &format!("REGION_READ with {extra} extra bytes"));
    }
    still_works(&mut c, "after long REGION_READs");
}

fn info_commands_with_argsz_too_small(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let cases: Vec<(u16, Vec<u8>, &str)> = vec![
        (cmd::DEVICE_GET_INFO, info16(0, 0), "GET_INFO argsz 0"),
        (cmd::DEVICE_GET_INFO, info16(15, 0), "GET_INFO argsz 15"),
        (cmd::DEVICE_GET_REGION_INFO, region_info_payload(31, CONFIG), "REGION_INFO argsz 31"),
        (cmd::DEVICE_GET_REGION_INFO, region_info_payload(0, CONFIG), "REGION_INFO argsz 0"),
        (cmd::DEVICE_GET_REGION_IO_FDS, info16(15, BAR0), "REGION_IO_FDS argsz 15"),
        (cmd::DEVICE_GET_IRQ_INFO, info16(8, IRQ_MSIX), "IRQ_INFO argsz 8"),
        (cmd::DEVICE_GET_IRQ_INFO, info16(u32::MAX, IRQ_MSIX)[..12].to_vec(), "IRQ_INFO 12-byte payload"),
    ];
    for (n, p, what) in &cases {
        expect_errno(&mut c, *n, p, &[], EINVAL, what);
    }
    still_works(&mut c, "after small argsz");
}

fn info_commands_with_argsz_u32_max(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    // A client's argsz is the room it has, never a size the server allocates.
    let r = c.call(cmd::DEVICE_GET_INFO, &info16(u32::MAX, 0), &[]).ok("GET_INFO argsz u32::MAX");
    assert_eq!((r.payload.len(), r.u32_at(0)), (16, 16));
    let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_payload(u32::MAX, CONFIG), &[]).ok("REGION_INFO");
    assert_eq!((r.payload.len(), r.u32_at(0), r.u32_at(8)), (32, 32, CONFIG), "config space has no capabilities");
    let r = c.call(cmd::DEVICE_GET_REGION_IO_FDS, &info16(u32::MAX, BAR0), &[]).ok("REGION_IO_FDS");
    assert_eq!((r.payload.len(), r.u32_at(12)), (16, 0));
    let r = c.call(cmd::DEVICE_GET_IRQ_INFO, &info16(u32::MAX, IRQ_MSIX), &[]).ok("IRQ_INFO");
    assert_eq!((r.payload.len(), r.u32_at(12)), (16, 5));
    still_works(&mut c, "after huge argsz");
}

fn set_irqs_argsz_disagrees_with_payload(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for argsz in [0u32, 19, 21, 4096, u32::MAX] {
        let p = set_irqs_payload(argsz, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 1, &[]);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[], EINVAL, &format!("SET_IRQS argsz {argsz}, 20 bytes"));
    }
    still_works(&mut c, "after argsz mismatches");
}

fn set_irqs_start_plus_count_overflows(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let none = IRQ_DATA_NONE | IRQ_ACTION_TRIGGER;
    let bool_ = IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER;
    let cases: Vec<(u32, u32, u32, Vec<u8>)> = vec![
        (none, u32::MAX, 2, vec![]),
        (none, 1, u32::MAX, vec![]),
        (none, u32::MAX, u32::MAX, vec![]),
        (none, 6, 0, vec![]),
        (bool_, 0, u32::MAX, vec![1]),
        (bool_, u32::MAX, 1, vec![1]),
        (IRQ_DATA_BOOL | IRQ_ACTION_MASK, 4, 0x8000_0000, vec![1; 16]),
    ];
    for (flags, start, count, data) in &cases {
        let p = set_irqs_payload(20 + data.len() as u32, *flags, IRQ_MSIX, *start, *count, data);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[], EINVAL, &format!("start {start} count {count}"));
    }
    still_works(&mut c, "after overflowing vector ranges");
}

fn set_irqs_unknown_flag_bits(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for bit in [6u32, 7, 16, 31] {
        let p = set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER | 1 << bit, IRQ_MSIX, 0, 1, &[]);
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &[], EINVAL, &format!("SET_IRQS flag bit {bit}"));
    }
    still_works(&mut c, "after unknown SET_IRQS flags");
}

fn set_irqs_with_fds_that_are_not_eventfds(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
    let (sock_a, _sock_b) = UnixStream::pair().unwrap();
    let null = File::open("/dev/null").unwrap();
    let dir = File::open("/").unwrap();
    let e = eventfds(2);
    let trig = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER;
    let one = set_irqs_payload(20, trig, IRQ_MSIX, 0, 1, &[]);
    let self_fd = c.as_fd().try_clone_to_owned().unwrap();
    for (fd, what) in [
        (mem.as_fd(), "a memfd"),
        (pipe_r.as_fd(), "a pipe's read end"),
        (pipe_w.as_fd(), "a pipe's write end"),
        (sock_a.as_fd(), "a UNIX socket"),
        (null.as_fd(), "/dev/null"),
        (dir.as_fd(), "a directory"),
        (self_fd.as_fd(), "the client's own connection"),
    ] {
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &one, &[fd], EINVAL, &format!("MSI-X vector 0 on {what}"));
    }
    let two = set_irqs_payload(20, trig, IRQ_MSIX, 0, 2, &[]);
    expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &two, &[e[0].as_fd(), mem.as_fd()], EINVAL, "eventfd + memfd");
    let err = set_irqs_payload(20, trig, IRQ_ERR, 0, 1, &[]);
    expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &err, &[pipe_w.as_fd()], EINVAL, "ERR on a pipe");
    // Nothing was installed: triggering signals no eventfd and writes nothing into the pipe.
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[], &[]).ok("trigger MSI-X");
    c.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IRQ_ERR, 0, 1, &[], &[]).ok("trigger ERR");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(eventfd_take(&e[0]), 0, "the eventfd of a rejected SET_IRQS was installed");
    rustix::io::ioctl_fionbio(&pipe_r, true).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(rustix::io::read(&pipe_r, &mut b), Err(rustix::io::Errno::AGAIN), "the server wrote into a pipe");
    still_works(&mut c, "after non-eventfd fds");
}

fn set_irqs_with_more_eventfds_than_vectors(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfds(16);
    let trig = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER;
    for (count, n) in [(5u32, 16usize), (1, 5), (5, 6), (4, 16)] {
        let p = set_irqs_payload(20, trig, IRQ_MSIX, 0, count, &[]);
        let what = format!("{n} eventfds for {count} vectors");
        expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &borrow(&e[..n]), EINVAL, &what);
    }
    still_works(&mut c, "after too many eventfds");
}

fn write_multi_with_hostile_wr_cnt(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x4000);
    let v = 0x5000u32.to_le_bytes();
    let good: (u32, u64, &[u8]) = (BAR0, VF_ATQBAL1, &v);
    let cases: Vec<(u64, Vec<MultiEntry<'_>>)> = vec![
        (u64::MAX, vec![]),
        (u64::MAX, vec![good]),
        (1 << 60, vec![good]),
        // 24 * wr_cnt wraps to 8 modulo 2^64: a length check done in wrapping arithmetic would pass.
        (0x0aaa_aaaa_aaaa_aaab, vec![]),
        (201, vec![good; 201]),
        (200, vec![good]),
        (0, vec![good]),
        (2, vec![good, good, good]),
    ];
    for (n, entries) in &cases {
        let p = write_multi_payload(*n, entries);
        let what = format!("wr_cnt {n:#x} with {} entries", entries.len());
        expect_errno(&mut c, cmd::REGION_WRITE_MULTI, &p, &[], EINVAL, &what);
    }
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x4000, "a rejected WRITE_MULTI applied an entry");
    still_works(&mut c, "after hostile wr_cnt");
}

fn write_multi_with_hostile_entries(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x4000);
    let v = 0x5000u32.to_le_bytes();
    let good: (u32, u64, &[u8]) = (BAR0, VF_ATQBAL1, &v);
    let with_count = |count: u32| {
        let mut p = write_multi_payload(2, &[good, good]);
        p[8 + 24 + 12..8 + 24 + 16].copy_from_slice(&count.to_le_bytes());
        p
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("offset wraps", write_multi_payload(2, &[good, (BAR0, u64::MAX - 3, &v)])),
        ("region u32::MAX", write_multi_payload(2, &[good, (u32::MAX, 0, &v)])),
        ("region 9", write_multi_payload(2, &[good, (9, 0, &v)])),
        ("count u32::MAX", with_count(u32::MAX)),
        ("count 9", with_count(9)),
        ("count 0", with_count(0)),
    ];
    for (what, p) in &cases {
        expect_errno(&mut c, cmd::REGION_WRITE_MULTI, p, &[], EINVAL, what);
        assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x4000, "{what}: the good first entry was applied");
    }
    still_works(&mut c, "after hostile entries");
}

fn device_feature_garbage(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for p in [vec![], vec![0xff], vec![0xff; 16], Payload::new().u32(u32::MAX).u32(u32::MAX).u64(u64::MAX).build()] {
        expect_errno(&mut c, cmd::DEVICE_FEATURE, &p, &[], EINVAL, &format!("DEVICE_FEATURE, {} bytes", p.len()));
    }
    // Random bytes: malformed (EINVAL) or a feature this device lacks (ENOTTY), either a clean error reply.
    let p = garbage(65536, 16);
    let r = c.request(cmd::DEVICE_FEATURE, &p, &[]).expect("a reply to DEVICE_FEATURE garbage");
    assert!(matches!(r.errno, Some(EINVAL) | Some(ENOTTY)), "DEVICE_FEATURE garbage: {:?}", r.errno);
    // An index no device has: ENOTTY, as the kernel answers.
    let unknown = Payload::new().u32(16).u32(0x1234 | 1 << 16).build();
    expect_errno(&mut c, cmd::DEVICE_FEATURE, &unknown, &[], ENOTTY, "DEVICE_FEATURE GET feature 0x1234");
    still_works(&mut c, "after DEVICE_FEATURE garbage");
}

fn mig_data_read_garbage(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for p in [vec![], Payload::new().u32(16).u32(0).u64(u64::MAX).build(), garbage(4096, 17)] {
        expect_errno(&mut c, cmd::MIG_DATA_READ, &p, &[], EINVAL, &format!("MIG_DATA_READ, {} bytes", p.len()));
    }
    still_works(&mut c, "after MIG_DATA_READ garbage");
}

fn mig_data_write_garbage(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for p in [
        vec![],
        Payload::new().u32(u32::MAX).u32(0).u64(u64::MAX).build(),
        Payload::new().u32(24).u32(0).u64(8).u64(0).build(),
        garbage(100_000, 18),
    ] {
        let what = format!("MIG_DATA_WRITE, {} bytes", p.len());
        expect_errno(&mut c, cmd::MIG_DATA_WRITE, &p, &[], EINVAL, &what);
    }
    still_works(&mut c, "after MIG_DATA_WRITE garbage");
}

fn server_to_client_commands_sent_by_the_client(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    expect_errno(&mut c, cmd::DMA_READ, &Payload::new().u64(0).u64(4).build(), &[], EINVAL, "DMA_READ command");
    let p = Payload::new().u64(0).u64(4).u32(0).build();
    expect_errno(&mut c, cmd::DMA_WRITE, &p, &[], EINVAL, "DMA_WRITE command");
    still_works(&mut c, "after client-sent DMA commands");
}

fn device_reset_with_a_payload(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x6000);
    for n in [1usize, 4, 4096] {
        expect_errno(&mut c, cmd::DEVICE_RESET, &garbage(n, 5), &[], EINVAL, &format!("RESET with {n} bytes"));
    }
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x6000, "a rejected RESET reset the device");
    still_works(&mut c, "after RESET with payloads");
}

// ------------------------------------------------------------------------------------------------------------
// DMA: maps and unmaps, and replies to the server's DMA requests
// ------------------------------------------------------------------------------------------------------------

fn dma_cases() -> Vec<Case> {
    cases![
        dma_map_iova_plus_size_wraps,
        dma_map_near_the_top_of_the_address_space,
        dma_map_fd_offset_plus_size_wraps,
        dma_map_beyond_the_end_of_the_file,
        dma_map_argsz_disagrees,
        dma_map_unaligned,
        dma_map_bad_flags,
        dma_map_overlapping,
        dma_map_with_two_fds,
        dma_map_with_fds_that_are_not_memory,
        dma_unmap_part_of_a_mapping,
        dma_unmap_a_superset_of_mappings,
        dma_unmap_iova_plus_size_wraps,
        dma_unmap_argsz_disagrees,
        dma_unmap_unknown_flags,
        dma_map_unmap_churn_with_fds,
        dma_reply_with_a_wrong_id,
        dma_reply_with_wrong_sizes,
        dma_reply_with_the_wrong_command,
        dma_error_reply,
        dma_reply_carrying_fds,
        dma_request_unanswered_then_close,
    ]
}

fn dma_map_iova_plus_size_wraps(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x2000);
    for (iova, size) in [(0xffff_ffff_ffff_f000u64, 0x2000u64), (1 << 63, 1 << 63), (0x1000, 0xffff_ffff_ffff_f000)] {
        let p = map_payload(32, DMA_RW, 0, iova, size);
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EINVAL, &format!("fd-less {iova:#x}+{size:#x}"));
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EINVAL, &format!("memfd {iova:#x}+{size:#x}"));
    }
    still_works(&mut c, "after wrapping maps");
}

fn dma_map_near_the_top_of_the_address_space(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let top = 0xffff_ffff_ffff_e000u64;
    let p = map_payload(32, DMA_RW, 0, top, 0x2000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EINVAL, "a mapping ending exactly at 2^64");
    c.dma_map(top, 0x1000, DMA_RW, None).ok("the last page but one");
    let p = map_payload(32, DMA_RW, 0, top - 0x1000, 0x2000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EEXIST, "overlapping the mapping near the top");
    c.dma_unmap(top, 0x1000, 0).ok("unmap near the top");
    // A huge fd-less mapping is only a table entry: it maps and unmaps.
    let p = map_payload(32, DMA_READ_FLAG, 0, 0, 0xffff_ffff_ffff_e000);
    c.call(cmd::DMA_MAP, &p, &[]).ok("an almost 2^64-byte fd-less mapping");
    let p = unmap_payload(24, 0, 0, 0xffff_ffff_ffff_e000);
    let r = c.call(cmd::DMA_UNMAP, &p, &[]).ok("unmap the huge mapping");
    assert_eq!(r.payload, p, "DMA_UNMAP echoes the request");
}

fn dma_map_fd_offset_plus_size_wraps(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x2000);
    for (offset, size) in [(0xffff_ffff_ffff_f000u64, 0x2000u64), (0xffff_ffff_ffff_e000, 0x3000), (1 << 63, 1 << 62)] {
        let p = map_payload(32, DMA_RW, offset, 0x10_0000, size);
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EINVAL, &format!("fd offset {offset:#x}+{size:#x}"));
    }
    still_works(&mut c, "after wrapping fd offsets");
}

fn dma_map_beyond_the_end_of_the_file(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x2000);
    for (offset, size) in [(0u64, 0x3000u64), (0x1000, 0x2000), (0x2000, 0x1000), (0, 1 << 40), (0, 1 << 62)] {
        let p = map_payload(32, DMA_RW, offset, 0x10_0000, size);
        let what = format!("memfd of 8 KiB at {offset:#x}+{size:#x}");
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EINVAL, &what);
    }
    c.dma_map(0x10_0000, 0x2000, DMA_RW, Some((mem.as_fd(), 0))).ok("the whole file maps");
}

fn dma_map_argsz_disagrees(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for argsz in [0u32, 24, 31, 33, 4096, u32::MAX] {
        let p = map_payload(argsz, DMA_RW, 0, 0x10_0000, 0x1000);
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EINVAL, &format!("DMA_MAP argsz {argsz}"));
    }
    let mut long = map_payload(40, DMA_RW, 0, 0x10_0000, 0x1000);
    long.extend([0; 8]);
    expect_errno(&mut c, cmd::DMA_MAP, &long, &[], EINVAL, "argsz 40 with 40 bytes");
    let mut long = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    long.push(0);
    expect_errno(&mut c, cmd::DMA_MAP, &long, &[], EINVAL, "argsz 32 with 33 bytes");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("nothing was mapped");
}

fn dma_map_unaligned(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x4000);
    for (offset, iova, size) in [
        (0u64, 0x10_0800u64, 0x1000u64),
        (0, 0x10_0000, 0x800),
        (0, 0x10_0000, 0x1001),
        (0x100, 0x10_0000, 0x1000),
        (0xfff, 0x10_0000, 0x1000),
    ] {
        let p = map_payload(32, DMA_RW, offset, iova, size);
        let what = format!("offset {offset:#x} iova {iova:#x} size {size:#x}");
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EINVAL, &what);
        if offset == 0 {
            expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EINVAL, &format!("fd-less {what}"));
        }
    }
    still_works(&mut c, "after unaligned maps");
}

fn dma_map_bad_flags(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for flags in [0u32, 4, DMA_RW | 4, 1 << 31, u32::MAX] {
        let p = map_payload(32, flags, 0, 0x10_0000, 0x1000);
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EINVAL, &format!("DMA_MAP flags {flags:#x}"));
    }
    still_works(&mut c, "after bad map flags");
}

fn dma_map_overlapping(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    // Large enough for every range below, so the fd-backed attempts fail on the overlap, not on the file size.
    let mem = memfd(0x100_0000);
    c.dma_map(0x10_0000, 0x1_0000, DMA_RW, None).ok("the mapping");
    for (iova, size, what) in [
        (0x10_0000u64, 0x1_0000u64, "the same range"),
        (0x10_8000, 0x1_0000, "its second half and beyond"),
        (0x0f_8000, 0x1_0000, "before it and its first half"),
        (0x10_1000, 0x1000, "a page inside it"),
        (0x0, 0x100_0000, "a superset"),
        (0x10_f000, 0x2000, "its last page and the next"),
    ] {
        let p = map_payload(32, DMA_RW, 0, iova, size);
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EEXIST, &format!("fd-less: {what}"));
        expect_errno(&mut c, cmd::DMA_MAP, &p, &[mem.as_fd()], EEXIST, &format!("memfd: {what}"));
    }
    c.dma_map(0x11_0000, 0x1000, DMA_RW, Some((mem.as_fd(), 0))).ok("adjacent after");
    c.dma_map(0x0f_f000, 0x1000, DMA_RW, None).ok("adjacent before");
    c.dma_unmap(0x10_0000, 0x1_0000, 0).ok("the original mapping is intact");
}

fn dma_map_with_two_fds(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let (a, b) = (memfd(0x1000), memfd(0x1000));
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[a.as_fd(), b.as_fd()], EINVAL, "two memfds");
    expect_errno(&mut c, cmd::DMA_MAP, &p, &copies(&a, 16), EINVAL, "16 copies of one memfd");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("nothing was mapped");
}

fn dma_map_with_fds_that_are_not_memory(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let (sock, _peer) = UnixStream::pair().unwrap();
    let null = File::open("/dev/null").unwrap();
    let zero = File::open("/dev/zero").unwrap();
    let self_fd = c.as_fd().try_clone_to_owned().unwrap();
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    for (fd, what) in [
        (e.as_fd(), "an eventfd"),
        (pipe_r.as_fd(), "a pipe"),
        (sock.as_fd(), "a socket"),
        (null.as_fd(), "/dev/null"),
        (zero.as_fd(), "/dev/zero"),
        (self_fd.as_fd(), "the client's own connection"),
    ] {
        let what = format!("DMA_MAP of {what}");
        let r = c.request(cmd::DMA_MAP, &p, &[fd]).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        r.assert_errno(EINVAL, &what);
    }
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("nothing was mapped");
}

fn dma_unmap_part_of_a_mapping(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x4000);
    c.dma_map(0x10_0000, 0x4000, DMA_RW, Some((mem.as_fd(), 0))).ok("map 16 KiB");
    for (iova, size) in
        [(0x10_0000u64, 0x1000u64), (0x10_1000, 0x2000), (0x10_3000, 0x1000), (0x10_0000, 0x3fff), (0x10_0001, 0x4000)]
    {
        let p = unmap_payload(24, 0, iova, size);
        expect_errno(&mut c, cmd::DMA_UNMAP, &p, &[], ENOENT, &format!("unmap {iova:#x}+{size:#x}"));
    }
    c.dma_unmap(0x10_0000, 0x4000, 0).ok("the whole mapping survived");
}

fn dma_unmap_a_superset_of_mappings(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("map a");
    c.dma_map(0x10_1000, 0x1000, DMA_RW, None).ok("map b");
    for (iova, size) in [(0x10_0000u64, 0x2000u64), (0x0f_f000, 0x3000), (0, 1 << 40), (0x10_0000, 0x1_0000)] {
        let p = unmap_payload(24, 0, iova, size);
        expect_errno(&mut c, cmd::DMA_UNMAP, &p, &[], ENOENT, &format!("unmap {iova:#x}+{size:#x}"));
    }
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("a survived");
    c.dma_unmap(0x10_1000, 0x1000, 0).ok("b survived");
}

fn dma_unmap_iova_plus_size_wraps(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("map");
    for (iova, size) in
        [(u64::MAX - 0xfff, 0x2000u64), (0x10_0000, u64::MAX), (u64::MAX, u64::MAX), (0x10_0000, 0xffff_ffff_fff0_0000)]
    {
        let p = unmap_payload(24, 0, iova, size);
        expect_errno(&mut c, cmd::DMA_UNMAP, &p, &[], ENOENT, &format!("unmap {iova:#x}+{size:#x}"));
    }
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("the mapping survived");
}

fn dma_unmap_argsz_disagrees(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("map");
    for argsz in [0u32, 16, 23, 25, 32, u32::MAX] {
        let p = unmap_payload(argsz, 0, 0x10_0000, 0x1000);
        expect_errno(&mut c, cmd::DMA_UNMAP, &p, &[], EINVAL, &format!("DMA_UNMAP argsz {argsz}"));
    }
    let mut long = unmap_payload(24, 0, 0x10_0000, 0x1000);
    long.extend([0; 8]);
    expect_errno(&mut c, cmd::DMA_UNMAP, &long, &[], EINVAL, "argsz 24 with 32 bytes (a dirty bitmap)");
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("the mapping survived");
}

fn dma_unmap_unknown_flags(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("map");
    for flags in [UNMAP_GET_DIRTY_BITMAP, 4, 1 << 31, u32::MAX, UNMAP_ALL | 4] {
        let p = unmap_payload(24, flags, 0x10_0000, 0x1000);
        expect_errno(&mut c, cmd::DMA_UNMAP, &p, &[], EINVAL, &format!("DMA_UNMAP flags {flags:#x}"));
    }
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("the mapping survived");
}

fn dma_map_unmap_churn_with_fds(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1_0000);
    for i in 0..300u64 {
        let iova = 0x10_0000 + (i % 4) * 0x1_0000;
        c.dma_map(iova, 0x1_0000, DMA_RW, Some((mem.as_fd(), 0))).ok("map");
        if i % 3 == 2 {
            c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
        } else {
            c.dma_unmap(iova, 0x1_0000, 0).ok("unmap");
        }
    }
}

fn held_dma_read(c: &mut Client) -> Msg {
    held_atq_dma_read(c, RING)
}

/// A well-formed DMA_READ reply to `req` from the client's model of guest memory.
fn dma_read_reply_payload(c: &mut Client, req: &Msg) -> Vec<u8> {
    let (addr, count) = (le_u64(&req.payload, 0), le_u64(&req.payload, 8));
    let data = c.guest_read(addr, count as usize);
    Payload::new().u64(addr).u64(count).bytes(&data).build()
}

/// The admin queue completes its descriptor (DD|CMP written back, ATQH advanced), the client serving DMA.
#[track_caller]
fn expect_atq_completes(c: &mut Client, what: &str) {
    c.release_held().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.read32(BAR0, VF_ATQH1) != 1 {
        assert!(Instant::now() < deadline, "{what}: the admin queue never completed; DMA {:?}", c.dma);
        c.pump(Duration::from_millis(2)).unwrap();
    }
    let d = c.guest_read(RING, 32);
    assert_eq!(le_u16(&d, 0) & (AQ_FLAG_DD | AQ_FLAG_CMP), AQ_FLAG_DD | AQ_FLAG_CMP, "{what}: descriptor flags");
}

/// The device's read failed: the admin queue is marked critically broken (LEN.CRIT) and did not advance.
#[track_caller]
fn expect_atq_stalls(c: &mut Client, what: &str) {
    wait_atq_stalled(c, Duration::from_secs(5), what);
    assert_eq!(c.read32(BAR0, VF_ATQH1), 0, "{what}: ATQH advanced past a descriptor it could not read");
}

fn dma_reply_with_a_wrong_id(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let req = held_dma_read(&mut c);
    let good = dma_read_reply_payload(&mut c, &req);
    for delta in [1u16, 0x100, 0x8000] {
        let id = req.hdr.id.wrapping_add(delta);
        send_reply(&mut c, id, cmd::DMA_READ, 0, 0, &good, &[]);
        expect_answer_to_reply(&mut c, id, EINVAL, &format!("a DMA_READ reply with id {id:#x}"));
    }
    // The real request is still waiting: answer it and the admin queue completes.
    send_reply(&mut c, req.hdr.id, cmd::DMA_READ, 0, 0, &good, &[]);
    expect_atq_completes(&mut c, "after replies with wrong ids");
    still_works(&mut c, "after replies with wrong ids");
}

/// Turns a well-formed DMA_READ reply payload into a malformed one.
type Mangle = fn(Vec<u8>) -> Vec<u8>;

fn dma_reply_with_wrong_sizes(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let variants: [(&str, Mangle); 6] = [
        ("data one byte short", |mut p| {
            p.pop();
            p
        }),
        ("data one byte long", |mut p| {
            p.push(0);
            p
        }),
        ("no data", |p| p[..16].to_vec()),
        ("8-byte payload", |p| p[..8].to_vec()),
        ("count field says 4096", |mut p| {
            p[8..16].copy_from_slice(&4096u64.to_le_bytes());
            p
        }),
        ("address field off by one page", |mut p| {
            let a = le_u64(&p, 0) + 0x1000;
            p[0..8].copy_from_slice(&a.to_le_bytes());
            p
        }),
    ];
    for (what, mangle) in variants {
        let req = held_dma_read(&mut c);
        let p = mangle(dma_read_reply_payload(&mut c, &req));
        send_reply(&mut c, req.hdr.id, cmd::DMA_READ, 0, 0, &p, &[]);
        // The reply matched our request, so it is consumed, not answered; the device's read fails.
        expect_atq_stalls(&mut c, what);
        expect_no_reply(&mut c, what);
        // The same id again matches nothing now.
        send_reply(&mut c, req.hdr.id, cmd::DMA_READ, 0, 0, &p, &[]);
        expect_answer_to_reply(&mut c, req.hdr.id, EINVAL, &format!("{what}: the same reply again"));
        c.hold_dma = false;
        still_works(&mut c, what);
    }
}

fn dma_reply_with_the_wrong_command(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for n in [cmd::DMA_WRITE, cmd::REGION_READ, 0xffff] {
        let req = held_dma_read(&mut c);
        let p = dma_read_reply_payload(&mut c, &req);
        send_reply(&mut c, req.hdr.id, n, 0, 0, &p, &[]);
        expect_atq_stalls(&mut c, &format!("DMA_READ answered as command {n}"));
        c.hold_dma = false;
        still_works(&mut c, "after a reply with the wrong command");
    }
}

fn dma_error_reply(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    for errno in [libc::EFAULT as u32, 0, u32::MAX] {
        let req = held_dma_read(&mut c);
        send_reply(&mut c, req.hdr.id, cmd::DMA_READ, FLAG_ERROR, errno, &garbage(40, errno), &[]);
        expect_atq_stalls(&mut c, &format!("DMA_READ failed by the client with errno {errno}"));
        expect_no_reply(&mut c, "an error reply to a DMA request");
        c.hold_dma = false;
        still_works(&mut c, "after an error reply");
    }
}

fn dma_reply_carrying_fds(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let req = held_dma_read(&mut c);
    let p = dma_read_reply_payload(&mut c, &req);
    let e = eventfds(3);
    send_reply(&mut c, req.hdr.id, cmd::DMA_READ, 0, 0, &p, &borrow(&e));
    // The reply is otherwise right: the read succeeds; the fds are closed (the runner checks the fd count).
    expect_atq_completes(&mut c, "a DMA_READ reply carrying 3 fds");
    still_works(&mut c, "after a reply carrying fds");
}

fn dma_request_unanswered_then_close(s: &ServerProcess) {
    let phrase = "and 1 outstanding DMA requests";
    let before = log_count(s, phrase);
    let mut c = s.connect_negotiated();
    let _req = held_dma_read(&mut c);
    drop(c);
    s.assert_serves_new_client("after a client left with a DMA request unanswered");
    assert_eq!(log_count(s, phrase), before + 1, "the server did not fail the outstanding request on disconnect");
}

// ------------------------------------------------------------------------------------------------------------
// Fds: floods, fds on messages that take none, fds split from their message
// ------------------------------------------------------------------------------------------------------------

fn fd_cases() -> Vec<Case> {
    cases![
        fd_flood_253_on_dma_map,
        fd_flood_253_on_a_command_that_takes_none,
        fd_flood_253_before_version,
        many_messages_each_with_16_fds,
        fds_on_version,
        fds_on_a_posted_write,
        fds_on_a_stray_reply,
        fds_on_unknown_commands,
        fds_on_feature_and_migration_commands,
        fds_on_an_oversized_message,
        fds_with_two_messages_in_one_write,
        fd_with_the_second_half_of_a_dma_map,
        fd_on_the_first_byte_of_a_byte_at_a_time_dma_map,
    ]
}

fn fd_flood_253_on_dma_map(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &copies(&mem, SCM_MAX_FD), EINVAL, "DMA_MAP with 253 fds");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("nothing was mapped");
}

fn fd_flood_253_on_a_command_that_takes_none(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    for (n, p) in [(cmd::REGION_READ, read_payload(0, CONFIG, 4)), (cmd::DEVICE_GET_INFO, info16(16, 0))] {
        expect_errno(&mut c, n, &p, &copies(&e, SCM_MAX_FD), EINVAL, &format!("command {n} with 253 fds"));
    }
    let p = set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[]);
    expect_errno(&mut c, cmd::DEVICE_SET_IRQS, &p, &copies(&e, SCM_MAX_FD), EINVAL, "SET_IRQS with 253 fds");
    still_works(&mut c, "after 253-fd floods");
}

fn fd_flood_253_before_version(s: &ServerProcess) {
    let mut c = s.connect();
    let e = eventfd();
    let p = version_payload(&good_caps());
    expect_errno(&mut c, cmd::VERSION, &p, &copies(&e, SCM_MAX_FD), EINVAL, "VERSION with 253 fds");
    c.negotiate();
    still_works(&mut c, "VERSION after a 253-fd flood");
}

fn many_messages_each_with_16_fds(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    let mem = memfd(0x1000);
    let set = set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, 5, &[]);
    let map = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    let mut ids = Vec::new();
    // Sent without reading a reply: 600 messages, 9600 fds in flight.
    for i in 0..600 {
        let id = match i % 3 {
            0 => c.send(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &copies(&e, 16), false),
            1 => c.send(cmd::DMA_MAP, &map, &copies(&mem, 16), false),
            _ => c.send(cmd::DEVICE_SET_IRQS, &set, &copies(&e, 16), false),
        };
        ids.push(id.unwrap());
    }
    for (i, id) in ids.into_iter().enumerate() {
        let r = c.recv_reply(id).unwrap_or_else(|e| panic!("message {i}: no reply: {e}"));
        r.assert_errno(EINVAL, &format!("message {i} with 16 fds"));
    }
    still_works(&mut c, "after 600 messages with 16 fds each");
    c.dma_map(0x10_0000, 0x1000, DMA_RW, None).ok("no DMA_MAP with 16 fds mapped");
}

fn fds_on_version(s: &ServerProcess) {
    let mut c = s.connect();
    let e = eventfd();
    let mem = memfd(0x1000);
    let p = version_payload(&good_caps());
    expect_errno(&mut c, cmd::VERSION, &p, &[e.as_fd(), mem.as_fd()], EINVAL, "VERSION with fds");
    c.negotiate();
    still_works(&mut c, "after VERSION with fds");
}

fn fds_on_a_posted_write(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    c.write32(BAR0, VF_ATQBAL1, 0x1000);
    let p = write_payload(VF_ATQBAL1, BAR0, 4, &0x2000u32.to_le_bytes());
    c.send(cmd::REGION_WRITE, &p, &[mem.as_fd()], true).unwrap();
    expect_no_reply(&mut c, "posted write with an fd");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1000, "a posted write carrying an fd was applied");
}

fn fds_on_a_stray_reply(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfds(4);
    send_reply(&mut c, 0x7777, cmd::DMA_READ, 0, 0, &Payload::new().u64(0).u64(4).u32(0).build(), &borrow(&e));
    expect_answer_to_reply(&mut c, 0x7777, EINVAL, "a stray reply carrying 4 eventfds");
    still_works(&mut c, "after a stray reply with fds");
}

fn fds_on_unknown_commands(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    // Two rules apply (unknown command: ENOSYS; fds where none belong: EINVAL); the fd rule is checked first.
    for n in [0u16, 14, 19, 0xffff] {
        expect_errno(&mut c, n, &[0; 16], &[e.as_fd()], EINVAL, &format!("command {n} with an fd"));
    }
    still_works(&mut c, "after unknown commands with fds");
}

fn fds_on_feature_and_migration_commands(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    for n in [cmd::DEVICE_FEATURE, cmd::MIG_DATA_READ, cmd::MIG_DATA_WRITE, cmd::DEVICE_RESET, cmd::DMA_UNMAP] {
        expect_errno(&mut c, n, &[0; 24], &copies(&mem, 3), EINVAL, &format!("command {n} with 3 fds"));
    }
    still_works(&mut c, "after feature and migration commands with fds");
}

fn fds_on_an_oversized_message(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    let e = eventfds(16);
    let p = vec![0u8; MAX_MSG as usize - HDR_SIZE + 1];
    let id = c.send_with_header(cmd::DMA_MAP, TYPE_COMMAND, 0, None, &p, &[mem.as_fd()]).unwrap();
    c.recv_reply(id).expect("reply").assert_errno(E2BIG, "oversized DMA_MAP with an fd");
    let id = c.send_with_header(cmd::DEVICE_SET_IRQS, TYPE_COMMAND, 0, None, &p, &borrow(&e)).unwrap();
    c.recv_reply(id).expect("reply").assert_errno(E2BIG, "oversized SET_IRQS with 16 fds");
    still_works(&mut c, "after oversized messages with fds");
}

fn fds_with_two_messages_in_one_write(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let e = eventfd();
    let (a, b) = (c.fresh_id(), c.fresh_id());
    let mut bytes = message(a, cmd::REGION_READ, TYPE_COMMAND, &read_payload(0, CONFIG, 4));
    bytes.extend(message(b, cmd::REGION_READ, TYPE_COMMAND, &read_payload(0, CONFIG, 4)));
    c.send_bytes(&bytes, &[e.as_fd()]).unwrap();
    // The fd is charged to exactly one of the two: that one fails, the other succeeds; neither is lost.
    let mut errs = Vec::new();
    for _ in 0..2 {
        let r = c.recv_next_reply().expect("a reply to each of the two messages");
        assert!([a, b].contains(&r.hdr.id), "reply to an unknown id {:?}", r.hdr);
        match r.errno {
            Some(e) => {
                r.assert_errno(EINVAL, "the message charged with the fd");
                errs.push(e);
            }
            None => assert_eq!(le_u32(&r.payload, 16), 0x154c_8086),
        }
    }
    assert_eq!(errs.len(), 1, "exactly one message carries the fd");
    c.stray_replies.clear();
    still_works(&mut c, "after two messages sharing one write with an fd");
}

fn fd_with_the_second_half_of_a_dma_map(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    let id = c.fresh_id();
    let m = message(id, cmd::DMA_MAP, TYPE_COMMAND, &map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000));
    c.send_bytes(&m[..24], &[]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.send_bytes(&m[24..], &[mem.as_fd()]).unwrap();
    // Fds belong to the message that holds the bytes they came with.
    let r = c.recv_next_reply().expect("reply");
    assert_eq!((r.hdr.id, r.errno), (id, None), "DMA_MAP whose fd came with its second half");
    c.stray_replies.clear();
    let p = map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000);
    expect_errno(&mut c, cmd::DMA_MAP, &p, &[], EEXIST, "the range is mapped");
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("unmap");
}

fn fd_on_the_first_byte_of_a_byte_at_a_time_dma_map(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mem = memfd(0x1000);
    let id = c.fresh_id();
    let m = message(id, cmd::DMA_MAP, TYPE_COMMAND, &map_payload(32, DMA_RW, 0, 0x10_0000, 0x1000));
    c.send_bytes(&m[..1], &[mem.as_fd()]).unwrap();
    for b in &m[1..] {
        c.send_bytes(std::slice::from_ref(b), &[]).unwrap();
    }
    let r = c.recv_next_reply().expect("reply");
    assert_eq!((r.hdr.id, r.errno), (id, None), "DMA_MAP sent a byte at a time, its fd with the first byte");
    c.stray_replies.clear();
    c.dma_unmap(0x10_0000, 0x1000, 0).ok("it was mapped");
}

// ------------------------------------------------------------------------------------------------------------
// Pipelines: thousands of requests without reading replies
// ------------------------------------------------------------------------------------------------------------

fn pipeline_cases() -> Vec<Case> {
    cases![
        pipeline_5000_mixed_requests_then_read_every_reply,
        pipeline_5000_requests_then_close_without_reading,
        pipeline_of_large_replies_unread_then_close,
        pipeline_10000_posted_writes_then_one_read,
        pipeline_then_half_close_gets_every_reply,
        pipeline_of_errors_unread_then_close,
    ]
}

/// Request `i` of a mixed pipeline: (command, payload, no_reply, expected errno or None for success).
fn mixed_request(i: usize) -> (u16, Vec<u8>, bool, Option<i32>) {
    match i % 6 {
        0 => (cmd::REGION_READ, read_payload(0, CONFIG, 4), false, None),
        1 => (cmd::REGION_READ, read_payload(0, 9, 4), false, Some(EINVAL)),
        2 => (cmd::DEVICE_GET_INFO, info16(16, 0), false, None),
        3 => (0x4242, vec![1, 2, 3], false, Some(ENOSYS)),
        4 => (cmd::REGION_WRITE, write_payload(VF_ATQBAL1, BAR0, 4, &((i as u32) << 12).to_le_bytes()), true, None),
        _ => (cmd::DMA_UNMAP, unmap_payload(24, 0, 0x7000_0000, 0x1000), false, Some(ENOENT)),
    }
}

/// One buffer holding `n` mixed requests; returns it and the (id, expected errno) of those that get replies.
fn mixed_pipeline(c: &mut Client, n: usize) -> (Vec<u8>, Vec<(u16, Option<i32>)>) {
    let mut bytes = Vec::new();
    let mut expect = Vec::new();
    for i in 0..n {
        let (n, p, posted, errno) = mixed_request(i);
        let id = c.fresh_id();
        bytes.extend(message(id, n, if posted { FLAG_NO_REPLY } else { 0 }, &p));
        if !posted {
            expect.push((id, errno));
        }
    }
    (bytes, expect)
}

fn pipeline_5000_mixed_requests_then_read_every_reply(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let (bytes, expect) = mixed_pipeline(&mut c, 5000);
    c.send_bytes(&bytes, &[]).unwrap();
    for (i, (id, errno)) in expect.iter().enumerate() {
        let r = c.recv_next_reply().unwrap_or_else(|e| panic!("reply {i} of {}: {e}", expect.len()));
        assert_eq!(r.hdr.id, *id, "reply {i} out of order");
        assert_eq!(r.errno, *errno, "reply {i} (id {id:#x})");
    }
    c.stray_replies.clear();
    let last = (0..5000u32).rev().find(|i| i % 6 == 4).unwrap();
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), last << 12, "the last posted write of the pipeline");
    still_works(&mut c, "after a 5000-request pipeline");
}

fn pipeline_5000_requests_then_close_without_reading(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let (bytes, _) = mixed_pipeline(&mut c, 5000);
    c.send_bytes(&bytes, &[]).unwrap();
    drop(c);
}

fn pipeline_of_large_replies_unread_then_close(s: &ServerProcess) {
    let phrase = "is not reading its replies";
    let before = log_count(s, phrase);
    let mut c = s.connect_negotiated();
    let mut bytes = Vec::new();
    for _ in 0..300 {
        bytes.extend(message(c.fresh_id(), cmd::REGION_READ, 0, &read_payload(0, BAR0, 65536)));
    }
    c.send_bytes(&bytes, &[]).unwrap();
    // 300 x 64 KiB of replies: the server must pause reading rather than buffer them all.
    let t = Instant::now();
    while log_count(s, phrase) == before {
        assert!(t.elapsed() < Duration::from_secs(10), "the server never paused the client");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
}

fn pipeline_10000_posted_writes_then_one_read(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mut bytes = Vec::new();
    for i in 0..10_000u32 {
        let p = write_payload(VF_ATQBAL1, BAR0, 4, &(i << 12).to_le_bytes());
        bytes.extend(message(c.fresh_id(), cmd::REGION_WRITE, FLAG_NO_REPLY, &p));
    }
    c.send_bytes(&bytes, &[]).unwrap();
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 9999 << 12, "the read after 10000 posted writes");
    expect_no_reply(&mut c, "10000 posted writes");
}

fn pipeline_then_half_close_gets_every_reply(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let (bytes, expect) = mixed_pipeline(&mut c, 2000);
    c.send_bytes(&bytes, &[]).unwrap();
    c.shutdown_write();
    // The server reads to the end of the stream, answers everything, then closes.
    let h = c.until_close(Duration::from_secs(20)).expect("the connection was never closed");
    let got: Vec<(u16, Option<i32>)> =
        h.iter().map(|h| (h.id, (h.flags & FLAG_ERROR != 0).then_some(h.errno as i32))).collect();
    assert_eq!(got.len(), expect.len(), "replies before the close");
    assert_eq!(got, expect, "every reply, in order, before the close");
}

fn pipeline_of_errors_unread_then_close(s: &ServerProcess) {
    let mut c = s.connect_negotiated();
    let mut bytes = Vec::new();
    for i in 0..3000u32 {
        bytes.extend(message(c.fresh_id(), cmd::REGION_READ, 0, &read_payload(u64::MAX - u64::from(i), BAR0, 4)));
    }
    c.send_bytes(&bytes, &[]).unwrap();
    let first = c.recv_next_reply().expect("the first error reply");
    first.assert_errno(EINVAL, "the first of 3000 bad reads");
    drop(c); // 2999 error replies left unread
}

// ------------------------------------------------------------------------------------------------------------
// Processes and concurrency: SIGKILL mid-request, many clients at once
// ------------------------------------------------------------------------------------------------------------

fn process_cases() -> Vec<Case> {
    cases![
        sigkill_mid_header,
        sigkill_mid_payload_with_an_fd,
        sigkill_with_an_unread_pipeline,
        concurrent_32_clients_are_served_in_turn,
        connect_storm_while_the_server_is_busy,
        a_queued_client_that_sent_everything_and_half_closed_is_answered,
    ]
}

/// A child process, killed by PID with SIGKILL if still running when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = kill_process(Pid::from_child(&self.0), Signal::KILL);
            let _ = self.0.wait();
        }
    }
}

/// Runs `half-writer` (src/bin/half-writer.rs) in `mode`, waits until it has written, then kills it by PID.
fn kill_half_writer(s: &ServerProcess, mode: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_half-writer"))
        .arg(s.socket_path())
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning half-writer");
    let out = child.stdout.take().unwrap();
    let mut g = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("reading half-writer's stdout");
    assert_eq!(line.trim(), "ready", "half-writer {mode} did not get ready");
    kill_process(Pid::from_child(&g.0), Signal::KILL).expect("SIGKILL");
    let st = g.0.wait().expect("waitpid");
    assert_eq!(st.signal(), Some(libc::SIGKILL), "half-writer {mode}: {st}");
}

fn sigkill_mid_header(s: &ServerProcess) {
    for n in [1, 8, 15] {
        kill_half_writer(s, &format!("header:{n}"));
        s.assert_serves_new_client(&format!("after a client was killed {n} bytes into a header"));
    }
}

fn sigkill_mid_payload_with_an_fd(s: &ServerProcess) {
    for n in [0, 13, 31] {
        kill_half_writer(s, &format!("payload:{n}"));
        s.assert_serves_new_client(&format!("after a client was killed {n} bytes into a DMA_MAP payload"));
    }
}

fn sigkill_with_an_unread_pipeline(s: &ServerProcess) {
    kill_half_writer(s, "pipeline:3000");
}

fn concurrent_32_clients_are_served_in_turn(s: &ServerProcess) {
    let path = s.socket_path().to_path_buf();
    let t = Instant::now();
    let results: Vec<Result<u32, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let path = path.clone();
                sc.spawn(move || -> Result<u32, String> {
                    let mut c = Client::connect(&path).map_err(|e| format!("client {i}: connect: {e}"))?;
                    c.timeout = Duration::from_secs(30);
                    let r = c.request(cmd::VERSION, &version_payload(&good_caps()), &[]);
                    let r = r.map_err(|e| format!("client {i}: VERSION: {e}"))?;
                    if r.errno.is_some() {
                        return Err(format!("client {i}: VERSION failed: {:?}", r.errno));
                    }
                    let r = c.request(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[]);
                    let r = r.map_err(|e| format!("client {i}: REGION_READ: {e}"))?;
                    Ok(le_u32(&r.payload, 16))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client thread panicked")).collect()
    });
    for r in results {
        assert_eq!(r, Ok(0x154c_8086));
    }
    assert!(t.elapsed() < Duration::from_secs(20), "32 clients took {:?}", t.elapsed());
}

/// Connects without blocking; None when the listen backlog is full.
fn connect_nonblocking(path: &std::path::Path) -> Option<OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    match rustix::net::connect(&fd, &SocketAddrUnix::new(path).expect("socket path")) {
        Ok(()) => Some(fd),
        Err(rustix::io::Errno::AGAIN) => None,
        Err(e) => panic!("connect: {e}"),
    }
}

fn connect_storm_while_the_server_is_busy(s: &ServerProcess) {
    let mut busy = s.connect_negotiated();
    // While one client is served, thousands of others connect (as many as the listen backlog takes, up to 4000);
    // half of them send part of a header; all hang up before they are served. The server then meets them one
    // after the other, each already gone.
    let mut queued = 0;
    for i in 0..4000 {
        let Some(fd) = connect_nonblocking(s.socket_path()) else { break };
        if i % 2 == 0 {
            rustix::io::write(&fd, &[1, 0, 1, 0, 20]).expect("write");
        }
        queued += 1;
    }
    assert!(queued >= 100, "only {queued} connections fit in the listen backlog");
    still_works(&mut busy, "the served client during the storm");
    drop(busy);
    let t = Instant::now();
    let mut c = s.connect();
    c.timeout = Duration::from_secs(30);
    c.negotiate();
    still_works(&mut c, &format!("the first live client after {queued} dead ones"));
    assert!(t.elapsed() < Duration::from_secs(20), "{queued} dead connections took {:?} to clear", t.elapsed());
}

fn a_queued_client_that_sent_everything_and_half_closed_is_answered(s: &ServerProcess) {
    let busy = s.connect_negotiated();
    let mut c = s.connect();
    let v = c.send(cmd::VERSION, &version_payload(&good_caps()), &[], false).unwrap();
    let r = c.send(cmd::REGION_READ, &read_payload(0, CONFIG, 4), &[], false).unwrap();
    c.shutdown_write();
    std::thread::sleep(Duration::from_millis(50));
    drop(busy);
    c.recv_reply(v).expect("VERSION reply").ok("VERSION of the queued client");
    let r = c.recv_reply(r).expect("REGION_READ reply").ok("REGION_READ of the queued client");
    assert_eq!(le_u32(&r.payload, 16), 0x154c_8086);
    expect_silent_close(&mut c, "the queued client's half-close");
}
