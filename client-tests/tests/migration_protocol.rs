//! vfio-user migration v2 at the protocol level, over the real socket with the raw client, held to
//! docs/migration.md (the state machine, its errors, disconnects, DMA logging) and docs/migration-stream.md (what a
//! destination refuses). Every expectation is an exact errno and an exact state.
//!
//! Guest memory that the device writes directly is a memfd shared with the server (and, for a migration, with
//! both servers: the memory a VMM would copy is simply the same pages). The iavf driver model (testkit) runs the
//! admin queue in it where a test needs device writes.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use client_tests::util::{eventfd, eventfd_wait, held_atq_dma_read, memfd};
use client_tests::{
    cmd, le_u16, le_u32, le_u64, Client, Payload, Reply, ServerProcess, BAR0, BAR3, CONFIG, DMA_RW, IRQ_ACTION_TRIGGER,
    IRQ_DATA_EVENTFD, IRQ_MSIX,
};
use device::nic::regs::*;
use device::nic::virtchnl::{CAP_L2, OP_GET_VF_RESOURCES, OP_VERSION};
use testkit::{msg_version, Bus, DriverModel, AREA};

const EINVAL: i32 = libc::EINVAL;
const E2BIG: i32 = libc::E2BIG;
const EBUSY: i32 = libc::EBUSY;
const ENOTTY: i32 = libc::ENOTTY;

// DEVICE_FEATURE flags and features (linux/vfio.h).
const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const PROBE: u32 = 1 << 18;
const MIGRATION: u32 = 1;
const MIG_STATE: u32 = 2;
const LOG_START: u32 = 6;
const LOG_STOP: u32 = 7;
const LOG_REPORT: u32 = 8;

// enum vfio_device_mig_state.
const ERROR: u32 = 0;
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const PRE_COPY: u32 = 6;
const STATES: [u32; 5] = [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY];
/// Values no client may request: ERROR, the P2P states (not offered), and no state at all.
const NOT_REQUESTABLE: [u32; 7] = [ERROR, 5, 7, 8, 9, 0x102, u32::MAX];

/// docs/migration-stream.md: the record bound, and what one resuming session accepts.
const MAX_RECORD: usize = 4 << 20;
const MAX_RESUME: usize = 8 << 20;
const OPTIONAL: u16 = 1;

/// Guest memory for the admin queue: the driver model's area (ATQ ring, ARQ ring, 32 + 32 buffers).
const IOVA: u64 = 0x40_0000;
const MEM: u64 = 0x8_0000;
/// Pages (at 4 KiB, from IOVA) the device writes for one admin queue exchange in slot `n`: the ATQ ring, the ARQ
/// ring and ARQ buffer `n` (testkit's layout: rings at 0 and 0x1000, then 32 ATQ buffers, then the ARQ's).
const ATQ_RING_PAGE: u64 = 0;
const ARQ_RING_PAGE: u64 = 1;
const ARQ_BUF0_PAGE: u64 = 2 + 32;
const ARQ_BUF1_PAGE: u64 = ARQ_BUF0_PAGE + 1;
const _: () = assert!(AREA <= MEM);

const SILENCE: Duration = Duration::from_millis(300);

fn name(s: u32) -> String {
    match s {
        ERROR => "ERROR".into(),
        STOP => "STOP".into(),
        RUNNING => "RUNNING".into(),
        STOP_COPY => "STOP_COPY".into(),
        RESUMING => "RESUMING".into(),
        PRE_COPY => "PRE_COPY".into(),
        other => format!("state {other:#x}"),
    }
}

/// Whether the device runs in `s` (a register write takes effect at once) rather than holding writes.
fn runs(s: u32) -> bool {
    matches!(s, RUNNING | PRE_COPY)
}

// ---- DEVICE_FEATURE: MIG_DEVICE_STATE --------------------------------------------------------------------------

fn feature(c: &mut Client, argsz: u32, flags: u32, data: &[u8]) -> Reply {
    c.call(cmd::DEVICE_FEATURE, &Payload::new().u32(argsz).u32(flags).bytes(data).build(), &[])
}

fn state_payload(state: u32) -> Vec<u8> {
    Payload::new().u32(16).u32(SET | MIG_STATE).u32(state).u32(u32::MAX).build()
}

fn request_state(c: &mut Client, state: u32) -> Reply {
    c.call(cmd::DEVICE_FEATURE, &state_payload(state), &[])
}

/// SET MIG_DEVICE_STATE must succeed and its reply carry {argsz 16, flags, the new state, data_fd -1}.
#[track_caller]
fn check_state_reply(r: &Reply, state: u32, what: &str) {
    assert_eq!(r.errno, None, "{what}: SET {} failed", name(state));
    assert_eq!(r.payload.len(), 16, "{what}: reply length");
    assert_eq!(
        (r.u32_at(0), r.u32_at(4), r.u32_at(8), r.u32_at(12)),
        (16, SET | MIG_STATE, state, u32::MAX),
        "{what}: reply {{argsz, flags, device_state, data_fd}}"
    );
}

#[track_caller]
fn set_state(c: &mut Client, state: u32, what: &str) {
    let r = request_state(c, state);
    check_state_reply(&r, state, what);
}

#[track_caller]
fn refuse_state(c: &mut Client, state: u32, errno: i32, what: &str) {
    request_state(c, state).assert_errno(errno, &format!("{what}: SET {}", name(state)));
}

#[track_caller]
fn get_state(c: &mut Client) -> u32 {
    let r = feature(c, 16, GET | MIG_STATE, &[]);
    assert_eq!(r.errno, None, "GET MIG_DEVICE_STATE failed");
    assert_eq!(r.payload.len(), 16, "GET MIG_DEVICE_STATE reply length");
    assert_eq!((r.u32_at(0), r.u32_at(4), r.u32_at(12)), (16, GET | MIG_STATE, u32::MAX), "GET reply fields");
    r.u32_at(8)
}

#[track_caller]
fn assert_state(c: &mut Client, want: u32, what: &str) {
    let got = get_state(c);
    assert_eq!(got, want, "{what}: GET MIG_DEVICE_STATE says {}, expected {}", name(got), name(want));
}

/// DEVICE_RESET, which ends any migration: RUNNING.
#[track_caller]
fn reset(c: &mut Client) {
    c.reset().ok("DEVICE_RESET");
    assert_state(c, RUNNING, "after DEVICE_RESET");
}

/// From RUNNING to `state` (ERROR through a RESUMING -> STOP with nothing to load).
#[track_caller]
fn go(c: &mut Client, state: u32) {
    match state {
        RUNNING => {}
        ERROR => {
            set_state(c, RESUMING, "RUNNING -> RESUMING");
            refuse_state(c, STOP, EINVAL, "RESUMING -> STOP with nothing to load");
            assert_state(c, ERROR, "a failed load");
        }
        s => set_state(c, s, &format!("RUNNING -> {}", name(s))),
    }
}

/// A fresh device (DEVICE_RESET) in `state`.
#[track_caller]
fn enter(c: &mut Client, state: u32) {
    reset(c);
    go(c, state);
}

// ---- MIG_DATA_READ / MIG_DATA_WRITE ----------------------------------------------------------------------------

fn data_read(c: &mut Client, argsz: u32, size: u32) -> Reply {
    c.call(cmd::MIG_DATA_READ, &Payload::new().u32(argsz).u32(size).build(), &[])
}

/// One MIG_DATA_READ of up to `size` bytes, its reply checked: {argsz 8 + n, n, n bytes}.
#[track_caller]
fn read_chunk(c: &mut Client, size: u32) -> Vec<u8> {
    let r = data_read(c, 8 + size, size);
    assert_eq!(r.errno, None, "MIG_DATA_READ of {size} bytes failed");
    let n = r.u32_at(4);
    assert!(n <= size, "MIG_DATA_READ returned {n} bytes for {size}");
    assert_eq!(r.u32_at(0), 8 + n, "MIG_DATA_READ reply argsz");
    assert_eq!(r.payload.len(), 8 + n as usize, "MIG_DATA_READ reply length");
    r.payload[8..].to_vec()
}

/// Reads until a short read ends the stream.
#[track_caller]
fn read_stream(c: &mut Client, chunk: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let d = read_chunk(c, chunk);
        let short = d.len() < chunk as usize;
        out.extend_from_slice(&d);
        if short {
            return out;
        }
    }
}

fn data_write(c: &mut Client, data: &[u8]) -> Reply {
    let p = Payload::new().u32(8 + data.len() as u32).u32(data.len() as u32).bytes(data).build();
    c.call(cmd::MIG_DATA_WRITE, &p, &[])
}

#[track_caller]
fn write_stream(c: &mut Client, data: &[u8], chunk: usize, what: &str) {
    for (i, part) in data.chunks(chunk).enumerate() {
        let r = data_write(c, part);
        assert_eq!(r.errno, None, "{what}: MIG_DATA_WRITE {i} ({} bytes) failed", part.len());
        assert!(r.payload.is_empty(), "{what}: MIG_DATA_WRITE reply has a payload");
    }
}

// ---- the stream, as docs/migration-stream.md describes it (an independent reading) --------------------------

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |crc, &b| t[usize::from((crc as u8) ^ b)] ^ (crc >> 8))
}

struct Record {
    version: u16,
    kind: u16,
    /// (type, flags, body)
    sections: Vec<(u16, u16, Vec<u8>)>,
}

/// Takes one whole record apart, checking magic, length and checksum.
#[track_caller]
fn parse_record(b: &[u8]) -> Record {
    assert!(b.len() >= 20, "record of {} bytes", b.len());
    assert_eq!(&b[..8], b"VFU-I40E", "magic");
    let len = le_u32(b, 12) as usize;
    assert_eq!(len, b.len(), "record length field");
    assert_eq!(crc32c(&b[..len - 4]), le_u32(b, len - 4), "record checksum (CRC32C)");
    let mut sections = Vec::new();
    let mut at = 16;
    while at < len - 4 {
        let n = le_u32(b, at + 4) as usize;
        sections.push((le_u16(b, at), le_u16(b, at + 2), b[at + 8..at + 8 + n].to_vec()));
        at += 8 + n;
    }
    assert_eq!(at, len - 4, "sections end at the checksum");
    Record { version: le_u16(b, 8), kind: le_u16(b, 10), sections }
}

fn build_record(r: &Record) -> Vec<u8> {
    let mut b = b"VFU-I40E".to_vec();
    b.extend_from_slice(&r.version.to_le_bytes());
    b.extend_from_slice(&r.kind.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    for (t, f, body) in &r.sections {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&f.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body);
    }
    let len = (b.len() + 4) as u32;
    b[12..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A state record with its sections edited.
fn edited(state: &[u8], edit: impl FnOnce(&mut Vec<(u16, u16, Vec<u8>)>)) -> Vec<u8> {
    let mut r = parse_record(state);
    edit(&mut r.sections);
    build_record(&r)
}

// ---- device state as the client sees it -------------------------------------------------------------------------

const SNAP_REGS: [u64; 12] = [
    VF_ATQBAL1,
    VF_ATQBAH1,
    VF_ATQLEN1,
    VF_ATQH1,
    VF_ATQT1,
    VF_ARQBAL1,
    VF_ARQBAH1,
    VF_ARQLEN1,
    VF_ARQH1,
    VF_ARQT1,
    VFINT_ITR01,
    VFINT_ITRN1,
];

/// Registers, config space, the MSI-X table and PBA, labelled; reads without side effects (no ICR0).
fn snapshot(c: &mut Client) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = SNAP_REGS.iter().map(|&r| (format!("BAR0 {r:#x}"), c.read32(BAR0, r))).collect();
    let cfg = c.read_bytes(CONFIG, 0, 256);
    v.extend((0..64).map(|i| (format!("config {:#x}", 4 * i), le_u32(&cfg, 4 * i))));
    let table = c.read_bytes(BAR3, 0, 5 * 16);
    v.extend((0..20).map(|i| (format!("MSI-X table {:#x}", 4 * i), le_u32(&table, 4 * i))));
    v.push(("MSI-X PBA".into(), c.read32(BAR3, client_tests::MSIX_PBA_OFFSET)));
    v
}

/// Writes values that depend on `seed` into registers, config space and the MSI-X table (with `aq`, also the
/// admin queue registers, which a running driver owns otherwise).
fn scribble(c: &mut Client, seed: u32, aq: bool) {
    if aq {
        c.write32(BAR0, VF_ATQBAL1, 0x0010_0000 * seed + 0x1000);
        c.write32(BAR0, VF_ATQBAH1, seed);
        c.write32(BAR0, VF_ATQLEN1, 8 * seed);
        c.write32(BAR0, VF_ARQBAL1, 0x0020_0000 * seed);
        c.write32(BAR0, VF_ARQLEN1, 4 * seed);
    }
    c.write32(BAR0, VFINT_ITR01, seed);
    c.write32(BAR0, VFINT_ITRN1, seed + 1);
    c.write32(CONFIG, 4, if seed % 2 == 1 { 6 } else { 2 });
    for v in 0..2u32 {
        c.write32(BAR3, u64::from(16 * v), 0xfee0_0000 | (seed << 12) | (v << 4));
        c.write32(BAR3, u64::from(16 * v + 8), 0x40 + 2 * seed + v);
    }
}

#[track_caller]
fn assert_same(got: &[(String, u32)], want: &[(String, u32)], what: &str) {
    let diffs: Vec<String> = got
        .iter()
        .zip(want)
        .filter(|(g, w)| g != w)
        .map(|(g, w)| format!("{}: {:#x}, expected {:#x}", g.0, g.1, w.1))
        .collect();
    assert!(diffs.is_empty(), "{what}: {} differences: {diffs:?}", diffs.len());
}

/// The migration flow of docs/migration.md between two connected servers; the destination may be in any state
/// that reaches RESUMING. Returns the source's state as read in STOP_COPY (which the destination then shows).
#[track_caller]
fn migrate(src: &mut Client, dst: &mut Client, what: &str) -> Vec<(String, u32)> {
    set_state(src, PRE_COPY, &format!("{what}: source RUNNING -> PRE_COPY"));
    let compat = read_stream(src, 4096);
    assert_eq!(parse_record(&compat).kind, 1, "{what}: PRE_COPY data is the compat record");
    set_state(dst, RESUMING, &format!("{what}: destination -> RESUMING"));
    write_stream(dst, &compat, 4096, what);
    set_state(src, STOP_COPY, &format!("{what}: source PRE_COPY -> STOP_COPY"));
    let snap = snapshot(src);
    let state = read_stream(src, 4096);
    assert_eq!(parse_record(&state).kind, 2, "{what}: STOP_COPY data is the state record");
    write_stream(dst, &state, 4096, what);
    set_state(dst, STOP, &format!("{what}: destination RESUMING -> STOP loads"));
    assert_same(&snapshot(dst), &snap, &format!("{what}: destination after the load"));
    set_state(dst, RUNNING, &format!("{what}: destination STOP -> RUNNING"));
    snap
}

// ---- DMA logging ------------------------------------------------------------------------------------------------

fn start_payload(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = Payload::new().u64(page_size).u32(ranges.len() as u32).u32(0);
    for &(a, l) in ranges {
        p = p.u64(a).u64(l);
    }
    p.build()
}

fn log_start(c: &mut Client, page_size: u64, ranges: &[(u64, u64)]) -> Reply {
    let data = start_payload(page_size, ranges);
    feature(c, 8 + data.len() as u32, SET | LOG_START, &data)
}

/// START that must succeed with `chosen` as the page size, the rest of the request echoed.
#[track_caller]
fn start_logging(c: &mut Client, page_size: u64, ranges: &[(u64, u64)], chosen: u64) {
    let r = log_start(c, page_size, ranges);
    assert_eq!(r.errno, None, "DMA_LOGGING_START at page size {page_size:#x} failed");
    let data = start_payload(chosen, ranges);
    assert_eq!(r.payload.len(), 8 + data.len(), "START reply length");
    assert_eq!((r.u32_at(0), r.u32_at(4)), (8 + data.len() as u32, SET | LOG_START), "START reply argsz, flags");
    assert_eq!(r.u64_at(8), chosen, "START reply: the page size chosen for {page_size:#x}");
    assert_eq!(&r.payload[8..], &data[..], "START reply: the request with the chosen page size");
}

#[track_caller]
fn stop_logging(c: &mut Client) {
    let r = feature(c, 8, SET | LOG_STOP, &[]);
    assert_eq!(r.errno, None, "DMA_LOGGING_STOP failed");
    assert_eq!(r.payload, Payload::new().u32(8).u32(SET | LOG_STOP).build(), "STOP reply echoes the request");
}

fn report_argsz(len: u64, page: u64) -> u32 {
    (8 + 24 + 8 * len.checked_div(page).unwrap_or(0).div_ceil(64)) as u32
}

fn log_report_with(c: &mut Client, argsz: u32, iova: u64, len: u64, page: u64) -> Reply {
    feature(c, argsz, GET | LOG_REPORT, &Payload::new().u64(iova).u64(len).u64(page).build())
}

fn log_report(c: &mut Client, iova: u64, len: u64, page: u64) -> Reply {
    log_report_with(c, report_argsz(len, page), iova, len, page)
}

/// A REPORT that must succeed: its bitmap, the reply's layout checked.
#[track_caller]
fn report(c: &mut Client, iova: u64, len: u64, page: u64) -> Vec<u64> {
    let r = log_report(c, iova, len, page);
    assert_eq!(r.errno, None, "DMA_LOGGING_REPORT {iova:#x}+{len:#x} at {page:#x} failed");
    let argsz = report_argsz(len, page);
    assert_eq!(r.payload.len(), argsz as usize, "REPORT reply length");
    assert_eq!((r.u32_at(0), r.u32_at(4)), (argsz, GET | LOG_REPORT), "REPORT reply argsz, flags");
    assert_eq!((r.u64_at(8), r.u64_at(16), r.u64_at(24)), (iova, len, page), "REPORT reply echoes the request");
    let bits: Vec<u64> = r.payload[32..].chunks(8).map(|w| le_u64(w, 0)).collect();
    let nbits = len / page;
    if !nbits.is_multiple_of(64) {
        assert_eq!(bits.last().unwrap() >> (nbits % 64), 0, "bits past the range are zero");
    }
    bits
}

/// The numbers of the set bits.
fn set_bits(bits: &[u64]) -> Vec<u64> {
    (0..64 * bits.len() as u64).filter(|&i| bits[(i / 64) as usize] & (1 << (i % 64)) != 0).collect()
}

/// The driver model's view: BAR0 through the socket, guest memory straight from the memfd the server maps.
struct MemBus {
    c: Client,
    mem: File,
}

impl Bus for MemBus {
    fn read32(&mut self, off: u64) -> u32 {
        self.c.read32(BAR0, off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.c.write32(BAR0, off, v)
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.c.region_write(CONFIG, off, &v.to_le_bytes()).ok("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.mem.read_exact_at(buf, addr - IOVA).expect("guest memory read");
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.mem.write_all_at(data, addr - IOVA).expect("guest memory write");
    }
}

/// A driver model over `c` with the admin queue initialised in `mem` (mapped at IOVA).
fn driver(mut c: Client, mem: &File) -> DriverModel<MemBus> {
    c.dma_map(IOVA, MEM, DMA_RW, Some((mem.as_fd(), 0))).ok("DMA_MAP the memfd");
    let mut d = DriverModel::new(MemBus { c, mem: mem.try_clone().expect("dup memfd") }, IOVA);
    assert!(d.wait_active(Duration::from_secs(2)), "VFGEN_RSTAT never read VFACTIVE");
    d.init_aq();
    d
}

/// One virtchnl request and its reply, waiting for the ATQ descriptor's write-back too.
#[track_caller]
fn exchange(d: &mut DriverModel<MemBus>, op: u32, msg: &[u8]) {
    let r = d.request(op, msg);
    assert_eq!(r.status, 0, "virtchnl op {op} failed");
    let desc = d.wait_atq_done(Duration::from_secs(2)).expect("ATQ descriptor completed");
    assert_eq!(desc.flags & 1, 1, "ATQ descriptor written back with DD");
}

// ---- 1. the state machine --------------------------------------------------------------------------------------

/// The kinds of the whole records in `stream` (which must end on a record boundary).
#[track_caller]
fn record_kinds(stream: &[u8]) -> Vec<u16> {
    let mut kinds = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let len = le_u32(stream, at + 12) as usize;
        kinds.push(parse_record(&stream[at..at + len]).kind);
        at += len;
    }
    kinds
}

/// What a state does besides its number: which data transfers it allows (in a saving state, the records its
/// stream holds: `kinds`), and whether register writes apply.
#[track_caller]
fn check_behaviour(c: &mut Client, state: u32, kinds: &[u16], what: &str) {
    let r = data_read(c, 8 + 4096, 4096);
    match state {
        PRE_COPY | STOP_COPY => {
            assert_eq!(r.errno, None, "{what}: MIG_DATA_READ in {}", name(state));
            assert!(r.payload.len() < 8 + 4096, "{what}: the stream is shorter than 4 KiB");
            assert_eq!(record_kinds(&r.payload[8..]), kinds, "{what}: the records in the stream");
        }
        _ => r.assert_errno(EINVAL, &format!("{what}: MIG_DATA_READ in {}", name(state))),
    }
    let w = data_write(c, &[]);
    if state == RESUMING {
        assert_eq!(w.errno, None, "{what}: an empty MIG_DATA_WRITE in RESUMING");
    } else {
        w.assert_errno(EINVAL, &format!("{what}: MIG_DATA_WRITE in {}", name(state)));
    }
    let before = c.read32(BAR0, VF_ARQBAL1);
    c.write32(BAR0, VF_ARQBAL1, 0x00ab_c000);
    let after = c.read32(BAR0, VF_ARQBAL1);
    if runs(state) {
        assert_eq!(after, 0x00ab_c000, "{what}: a register write in {} takes effect", name(state));
    } else {
        assert_eq!(after, before, "{what}: a register write in {} is held", name(state));
    }
    assert_state(c, state, &format!("{what}: after the checks"));
}

#[test]
fn every_state_pair_takes_an_allowed_path() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    // This device's own state record: leaving RESUMING passes RESUMING -> STOP, which must load something.
    set_state(&mut c, STOP_COPY, "RUNNING -> STOP_COPY (through STOP)");
    let record = read_stream(&mut c, 4096);
    assert_eq!(parse_record(&record).kind, 2);
    for from in STATES {
        for to in STATES {
            let what = format!("{} -> {}", name(from), name(to));
            enter(&mut c, from);
            if from == RESUMING && to != RESUMING {
                write_stream(&mut c, &record, 4096, &what);
            }
            if (from, to) == (STOP_COPY, PRE_COPY) {
                // The one arc the uapi forbids outright; nothing changes, the saving session included.
                refuse_state(&mut c, to, EINVAL, &what);
                assert_state(&mut c, STOP_COPY, &what);
                check_behaviour(&mut c, STOP_COPY, &[2], &what);
                continue;
            }
            set_state(&mut c, to, &what);
            assert_state(&mut c, to, &what);
            // PRE_COPY's compat record, unread, stays ahead of the state record in the same session.
            let kinds: &[u16] = match (from, to) {
                (_, PRE_COPY) => &[1],
                (PRE_COPY, STOP_COPY) => &[1, 2],
                (_, STOP_COPY) => &[2],
                _ => &[],
            };
            check_behaviour(&mut c, to, kinds, &what);
        }
    }
    // A same-state request in RESUMING keeps the session: what was written before it still counts.
    enter(&mut c, RESUMING);
    write_stream(&mut c, &record[..100], 4096, "first part");
    set_state(&mut c, RESUMING, "RESUMING -> RESUMING");
    write_stream(&mut c, &record[100..], 4096, "the rest");
    set_state(&mut c, STOP, "RESUMING -> STOP loads the record written across the same-state request");
    s.assert_alive();
}

#[test]
fn unrequestable_states_and_malformed_requests_change_nothing() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    // MIGRATION: GET only; STOP_COPY | PRE_COPY, no P2P.
    let r = feature(&mut c, 16, GET | MIGRATION, &[]).ok("GET MIGRATION");
    assert_eq!(r.payload.len(), 16);
    assert_eq!((r.u32_at(0), r.u32_at(4), r.u64_at(8)), (16, GET | MIGRATION, 1 | 4), "MIGRATION flags");
    feature(&mut c, 15, GET | MIGRATION, &[]).assert_errno(EINVAL, "GET MIGRATION, argsz 15");
    feature(&mut c, 16, SET | MIGRATION, &[0; 8]).assert_errno(EINVAL, "SET MIGRATION");
    // GET MIG_DEVICE_STATE: a larger argsz is fine (the reply says 16), a smaller one is not.
    let r = feature(&mut c, 64, GET | MIG_STATE, &[]).ok("GET with argsz 64");
    assert_eq!((r.payload.len(), r.u32_at(0), r.u32_at(8)), (16, 16, RUNNING));
    feature(&mut c, 15, GET | MIG_STATE, &[]).assert_errno(EINVAL, "GET MIG_DEVICE_STATE, argsz 15");
    feature(&mut c, 8, GET | MIG_STATE, &[]).assert_errno(EINVAL, "GET MIG_DEVICE_STATE, argsz 8");

    for from in STATES.into_iter().chain([ERROR]) {
        enter(&mut c, from);
        let what = format!("in {}", name(from));
        for bad in NOT_REQUESTABLE {
            refuse_state(&mut c, bad, EINVAL, &what);
            assert_state(&mut c, from, &format!("{what}, after a request for {}", name(bad)));
        }
        let other = if from == STOP { RUNNING } else { STOP };
        let p = Payload::new().u32(other).u32(u32::MAX).build();
        feature(&mut c, 15, SET | MIG_STATE, &p).assert_errno(EINVAL, &format!("{what}: SET with argsz 15"));
        feature(&mut c, 16, SET | MIG_STATE, &[1, 0]).assert_errno(EINVAL, &format!("{what}: SET, 2 data bytes"));
        feature(&mut c, 16, GET | SET | MIG_STATE, &p).assert_errno(EINVAL, &format!("{what}: GET | SET"));
        // PROBE answers without doing anything.
        let r = feature(&mut c, 16, PROBE | SET | MIG_STATE, &p).ok("PROBE SET MIG_DEVICE_STATE");
        assert_eq!(r.payload, Payload::new().u32(16).u32(PROBE | SET | MIG_STATE).bytes(&p).build(), "PROBE echo");
        assert_state(&mut c, from, &format!("{what}, after the malformed and probing requests"));
        if from == ERROR {
            // Nothing leaves ERROR but DEVICE_RESET: no state request, no data transfer.
            for to in STATES {
                refuse_state(&mut c, to, EINVAL, "from ERROR");
                assert_state(&mut c, ERROR, &format!("ERROR, after a request for {}", name(to)));
            }
            data_read(&mut c, 8 + 64, 64).assert_errno(EINVAL, "MIG_DATA_READ in ERROR");
            data_write(&mut c, b"VFU-I40E").assert_errno(EINVAL, "MIG_DATA_WRITE in ERROR");
            assert_state(&mut c, ERROR, "ERROR, after the data transfers");
        }
    }
    reset(&mut c);
    set_state(&mut c, PRE_COPY, "RUNNING -> PRE_COPY after leaving ERROR with DEVICE_RESET");
    assert_eq!(parse_record(&read_stream(&mut c, 4096)).kind, 1);
    s.assert_alive();
}

// ---- 2. MIG_DATA_READ / MIG_DATA_WRITE rules -------------------------------------------------------------------

#[test]
fn mig_data_read_and_write_rules() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    for st in [RUNNING, STOP, RESUMING, ERROR] {
        enter(&mut c, st);
        data_read(&mut c, 8 + 64, 64).assert_errno(EINVAL, &format!("MIG_DATA_READ in {}", name(st)));
        assert_state(&mut c, st, "after a refused MIG_DATA_READ");
    }
    for st in [RUNNING, STOP, STOP_COPY, PRE_COPY, ERROR] {
        enter(&mut c, st);
        data_write(&mut c, b"VFU-I40E").assert_errno(EINVAL, &format!("MIG_DATA_WRITE in {}", name(st)));
        assert_state(&mut c, st, "after a refused MIG_DATA_WRITE");
        if matches!(st, PRE_COPY | STOP_COPY) {
            let rec = read_stream(&mut c, 4096);
            assert_eq!(&rec[..8], b"VFU-I40E", "the saving session is untouched: its record reads from byte 0");
        }
    }

    // Read bounds, in PRE_COPY: none of these consumes anything.
    enter(&mut c, PRE_COPY);
    let max = 1u32 << 20; // the client's and the server's max_data_xfer_size
    data_read(&mut c, 8 + max + 1, max + 1).assert_errno(E2BIG, "MIG_DATA_READ of max_data_xfer_size + 1");
    data_read(&mut c, u32::MAX, u32::MAX).assert_errno(E2BIG, "MIG_DATA_READ of 4 GiB");
    data_read(&mut c, 8 + 99, 100).assert_errno(EINVAL, "MIG_DATA_READ with argsz < 8 + size");
    data_read(&mut c, 7, 0).assert_errno(EINVAL, "MIG_DATA_READ with argsz 7");
    let p = Payload::new().u32(8 + 16).u32(16).u32(0).build();
    c.call(cmd::MIG_DATA_READ, &p, &[]).assert_errno(EINVAL, "MIG_DATA_READ payload of 12 bytes");
    c.call(cmd::MIG_DATA_READ, &[24, 0, 0, 0], &[]).assert_errno(EINVAL, "MIG_DATA_READ payload of 4 bytes");
    // The compat record in 16-byte pieces: a short read ends it, then every read returns nothing.
    let mut compat = Vec::new();
    loop {
        let d = read_chunk(&mut c, 16);
        compat.extend_from_slice(&d);
        if d.len() < 16 {
            break;
        }
    }
    let rec = parse_record(&compat);
    assert_eq!((rec.version, rec.kind), (1, 1), "PRE_COPY data: one version-1 compat record");
    assert!(compat.len() < 4096, "compat record of {} bytes", compat.len());
    for size in [16, 4096, max] {
        assert_eq!(read_chunk(&mut c, size).len(), 0, "a read after the end of the compat record");
    }
    let r = data_read(&mut c, u32::MAX, 64).ok("argsz beyond what the reply needs");
    assert_eq!((r.u32_at(0), r.u32_at(4), r.payload.len()), (8, 0, 8));
    // STOP_COPY: the state record from its start, in odd pieces, then nothing.
    set_state(&mut c, STOP_COPY, "PRE_COPY -> STOP_COPY");
    let state = read_stream(&mut c, 100);
    assert_eq!(parse_record(&state).kind, 2, "STOP_COPY data: the state record");
    assert_eq!(read_chunk(&mut c, 4096).len(), 0, "a read after the end of the state record");

    // Write framing, in RESUMING: a malformed write changes nothing, the session goes on.
    enter(&mut c, RESUMING);
    let p = Payload::new().u32(8 + 9).u32(9).bytes(&state[..8]).build();
    c.call(cmd::MIG_DATA_WRITE, &p, &[]).assert_errno(EINVAL, "MIG_DATA_WRITE size 9 with 8 bytes");
    let p = Payload::new().u32(8 + 7).u32(7).bytes(&state[..8]).build();
    c.call(cmd::MIG_DATA_WRITE, &p, &[]).assert_errno(EINVAL, "MIG_DATA_WRITE size 7 with 8 bytes");
    c.call(cmd::MIG_DATA_WRITE, &[8, 0, 0, 0], &[]).assert_errno(EINVAL, "MIG_DATA_WRITE payload of 4 bytes");
    assert_state(&mut c, RESUMING, "after malformed writes");
    data_write(&mut c, &[]).ok("an empty MIG_DATA_WRITE");
    let log_at = s.log().len();
    write_stream(&mut c, &compat, 7, "compat record in 7-byte writes");
    write_stream(&mut c, &state, 13, "state record in 13-byte writes");
    // Each record is checked once, when it is complete, however many writes follow it (no re-parsing of the
    // whole stream on every write: 8 MiB of small records would otherwise cost quadratic time).
    let checks = s.log()[log_at..].matches("the source's identity matches this device").count();
    assert_eq!(checks, 1, "compat record checks for one compat record");
    set_state(&mut c, STOP, "RESUMING -> STOP: the malformed writes left no trace");
    set_state(&mut c, RUNNING, "STOP -> RUNNING");

    // The client's max_data_xfer_size bounds a read too.
    drop(c);
    let mut c = s.connect();
    c.version(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096,"pgsizes":4096}}"#).ok("VERSION");
    set_state(&mut c, PRE_COPY, "RUNNING -> PRE_COPY");
    data_read(&mut c, 8 + 4097, 4097).assert_errno(E2BIG, "MIG_DATA_READ over the client's 4096");
    assert_eq!(&read_chunk(&mut c, 4096), &compat, "a read of exactly the client's max");
    // And the server's.
    let mut s2 = ServerProcess::start_with(&["--max-data-xfer-size", "4096"]);
    let mut c2 = s2.connect_negotiated();
    set_state(&mut c2, PRE_COPY, "RUNNING -> PRE_COPY");
    data_read(&mut c2, 8 + 4097, 4097).assert_errno(E2BIG, "MIG_DATA_READ over the server's 4096");
    assert_eq!(read_chunk(&mut c2, 4096).len(), compat.len(), "a read of exactly the server's max");
    s.assert_alive();
    s2.assert_alive();
}

// ---- 3. what a destination refuses -------------------------------------------------------------------------------

/// A stream to feed a destination: each write with the errno it must get (None: success), and what the server's
/// log must say when it refuses the stream.
struct BadStream {
    name: &'static str,
    writes: Vec<(Vec<u8>, Option<i32>)>,
    log: Vec<String>,
}

fn says(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A source in STOP_COPY: its compat and state records.
fn records_of(s: &ServerProcess, seed: u32) -> (Vec<u8>, Vec<u8>) {
    let mut c = s.connect_negotiated();
    scribble(&mut c, seed, true);
    set_state(&mut c, PRE_COPY, "source -> PRE_COPY");
    let compat = read_stream(&mut c, 4096);
    set_state(&mut c, STOP_COPY, "source -> STOP_COPY");
    let state = read_stream(&mut c, 4096);
    (compat, state)
}

#[test]
fn bad_streams_fail_resuming_to_stop_and_leave_the_device_as_it_was() {
    let mut src_s = ServerProcess::start_with(&[]);
    let mut dst_s = ServerProcess::start_with(&[]);
    let mut mac_s = ServerProcess::start_with(&["--mac", "02:00:00:00:00:99", "--link-speed", "40000"]);
    let mut q_s = ServerProcess::start_with(&["--queues", "2"]);
    let (compat, state) = records_of(&src_s, 1);
    let (mac_compat, _) = records_of(&mac_s, 1);
    let (q_compat, q_state) = records_of(&q_s, 1);
    let mut dst = dst_s.connect_negotiated();

    let flipped = {
        let mut s = state.clone();
        s[state.len() / 2] ^= 0x40;
        s
    };
    let too_long = {
        let mut s = state.clone();
        s[12..16].copy_from_slice(&(MAX_RECORD as u32 + 1).to_le_bytes());
        s
    };
    let v2 = {
        let mut c = compat.clone();
        c[8..10].copy_from_slice(&2u16.to_le_bytes());
        c
    };
    // Two records of exactly MAX_RECORD bytes, valid as far as a write checks (kind state, an optional section
    // filling it): together exactly the 8 MiB a session accepts.
    let big = build_record(&Record {
        version: 1,
        kind: 2,
        sections: vec![(999, OPTIONAL, vec![0x5a; MAX_RECORD - 16 - 8 - 4])],
    });
    assert_eq!(big.len(), MAX_RECORD);
    let mut eight_mib: Vec<(Vec<u8>, Option<i32>)> =
        [&big, &big].iter().flat_map(|r| r.chunks(1 << 20).map(|c| (c.to_vec(), None)).collect::<Vec<_>>()).collect();
    assert_eq!(eight_mib.iter().map(|w| w.0.len()).sum::<usize>(), MAX_RESUME);
    eight_mib.push((vec![0], Some(E2BIG)));
    eight_mib.push((compat.clone(), Some(EINVAL)));

    let ok = |b: &[u8]| (b.to_vec(), None);
    let bad = |b: &[u8], e: i32| (b.to_vec(), Some(e));
    let cases = vec![
        BadStream { name: "nothing written", writes: vec![], log: says(&["no state record"]) },
        BadStream { name: "a compat record only", writes: vec![ok(&compat)], log: says(&["no state record"]) },
        BadStream {
            name: "cut inside the state record's header",
            writes: vec![ok(&compat), ok(&state[..10])],
            log: says(&["truncated"]),
        },
        BadStream {
            name: "cut inside a section",
            writes: vec![ok(&compat), ok(&state[..state.len() / 2])],
            log: says(&["truncated"]),
        },
        BadStream {
            name: "the checksum missing",
            writes: vec![ok(&compat), ok(&state[..state.len() - 4])],
            log: says(&["truncated"]),
        },
        BadStream {
            name: "a whole state record, then a cut one",
            writes: vec![ok(&compat), ok(&state), ok(&compat[..20])],
            log: says(&["truncated"]),
        },
        BadStream {
            name: "a flipped byte",
            writes: vec![ok(&compat), bad(&flipped, EINVAL), bad(&state, EINVAL)],
            log: says(&["checksum mismatch"]),
        },
        BadStream {
            name: "a length field over 4 MiB",
            writes: vec![ok(&compat), bad(&too_long[..16], EINVAL), bad(&state, EINVAL)],
            log: vec![format!("record of {} bytes is over the {MAX_RECORD}-byte limit", MAX_RECORD + 1)],
        },
        BadStream { name: "more than 8 MiB", writes: eight_mib, log: vec![format!("more than {MAX_RESUME} bytes")] },
        BadStream {
            name: "a source with another MAC and link speed",
            writes: vec![bad(&mac_compat, EINVAL), bad(&state, EINVAL)],
            log: says(&["MAC 02:00:00:00:00:99, this device's is 02:00:00:15:4c:01", "link speed 40000 Mbps"]),
        },
        BadStream {
            name: "a source with another queue count",
            writes: vec![bad(&q_compat, EINVAL), bad(&q_state, EINVAL)],
            log: says(&["2 queue pairs, this device has 4"]),
        },
        BadStream {
            name: "another queue count, state record only",
            writes: vec![ok(&q_state)],
            log: says(&["2 queue pairs, this device has 4"]),
        },
        BadStream {
            name: "a version-2 header",
            writes: vec![bad(&v2, EINVAL), bad(&state, EINVAL)],
            log: says(&["stream version 2 is newer"]),
        },
        BadStream {
            name: "an unknown required section",
            writes: vec![ok(&compat), ok(&edited(&state, |s| s.push((999, 0, vec![1, 2, 3]))))],
            log: says(&["section type 999 is unknown and not optional"]),
        },
        BadStream {
            name: "a repeated section",
            writes: vec![ok(&edited(&state, |s| {
                let config = s.iter().find(|x| x.0 == 2).expect("CONFIG section").clone();
                s.push(config);
            }))],
            log: says(&["section type 2 appears twice"]),
        },
        BadStream {
            name: "a missing section",
            writes: vec![ok(&edited(&state, |s| s.retain(|x| x.0 != 11)))],
            log: says(&["no link section"]),
        },
        BadStream { name: "garbage", writes: vec![bad(&[0xa5; 100], EINVAL)], log: says(&["bad magic"]) },
        BadStream { name: "garbage shorter than a header", writes: vec![ok(&[0xa5; 7])], log: says(&["truncated"]) },
    ];

    for case in &cases {
        let what = case.name;
        reset(&mut dst);
        scribble(&mut dst, 2, true);
        let before = snapshot(&mut dst);
        let log_at = dst_s.log().len();
        set_state(&mut dst, RESUMING, what);
        for (i, (data, want)) in case.writes.iter().enumerate() {
            let r = data_write(&mut dst, data);
            match want {
                None => assert_eq!(r.errno, None, "{what}: write {i} ({} bytes)", data.len()),
                Some(e) => r.assert_errno(*e, &format!("{what}: write {i} ({} bytes)", data.len())),
            }
        }
        assert_state(&mut dst, RESUMING, &format!("{what}: refused writes leave RESUMING"));
        refuse_state(&mut dst, STOP, EINVAL, &format!("{what}: RESUMING"));
        assert_state(&mut dst, ERROR, what);
        assert_same(&snapshot(&mut dst), &before, &format!("{what}: the device after the failed load"));
        let log = dst_s.log();
        let new = log.get(log_at..).unwrap_or_default();
        for words in &case.log {
            assert!(new.contains(words), "{what}: the log does not say {words:?}:\n{new}");
        }
        reset(&mut dst);
    }

    // After all that, DEVICE_RESET has left nothing behind: a good stream loads, and the destination shows the
    // source's state (which differed from its own).
    // (A new connection resets the source; the state the records carry is seed 1's again.)
    let mut src = src_s.connect_negotiated();
    scribble(&mut src, 1, true);
    let want = snapshot(&mut src);
    reset(&mut dst);
    scribble(&mut dst, 2, true);
    assert_ne!(snapshot(&mut dst), want, "source and destination differ before the migration");
    set_state(&mut dst, RESUMING, "good stream");
    write_stream(&mut dst, &compat, 4096, "good compat");
    write_stream(&mut dst, &state, 4096, "good state");
    set_state(&mut dst, STOP, "RESUMING -> STOP with a good stream");
    assert_same(&snapshot(&mut dst), &want, "the destination after the load");
    set_state(&mut dst, RUNNING, "STOP -> RUNNING");
    assert_same(&snapshot(&mut dst), &want, "the destination running");
    for s in [&mut src_s, &mut dst_s, &mut mac_s, &mut q_s] {
        s.assert_alive();
    }
}

// ---- 4. and 5. whole migrations ----------------------------------------------------------------------------------

#[test]
fn a_to_b_to_a_with_a_live_admin_queue() {
    let mut a_s = ServerProcess::start_with(&[]);
    let mut b_s = ServerProcess::start_with(&[]);
    let mem = memfd(MEM);
    let mut b = b_s.connect_negotiated();
    b.dma_map(IOVA, MEM, DMA_RW, Some((mem.as_fd(), 0))).ok("B maps the same guest memory");
    scribble(&mut b, 2, false);
    let mut d = driver(a_s.connect_negotiated(), &mem);
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    scribble(&mut d.bus.c, 1, false);

    let on_a = migrate(&mut d.bus.c, &mut b, "A -> B");
    std::mem::swap(&mut d.bus.c, &mut b); // the driver now talks to B; `b` holds A
    assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 1, "B continues A's admin queue");
    exchange(&mut d, OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes());
    assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 2);
    assert_state(&mut b, STOP_COPY, "A stays stopped");
    scribble(&mut d.bus.c, 3, false);

    // Back: A goes STOP_COPY -> RESUMING (through STOP), and takes B's state.
    let on_b = migrate(&mut d.bus.c, &mut b, "B -> A");
    assert_ne!(on_a, on_b, "B changed the state before migrating it back");
    std::mem::swap(&mut d.bus.c, &mut b);
    assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 2, "A continues B's admin queue");
    exchange(&mut d, OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes());
    assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 3);
    assert_state(&mut d.bus.c, RUNNING, "A");
    assert_state(&mut b, STOP_COPY, "B");
    a_s.assert_alive();
    b_s.assert_alive();
}

#[test]
fn migration_through_stop_without_pre_copy() {
    let mut src_s = ServerProcess::start_with(&[]);
    let mut dst_s = ServerProcess::start_with(&[]);
    let mut src = src_s.connect_negotiated();
    let mut dst = dst_s.connect_negotiated();
    scribble(&mut src, 1, true);
    scribble(&mut dst, 2, true);
    assert_ne!(snapshot(&mut src), snapshot(&mut dst));

    set_state(&mut src, STOP, "RUNNING -> STOP");
    set_state(&mut src, STOP_COPY, "STOP -> STOP_COPY");
    let want = snapshot(&mut src);
    let stream = read_stream(&mut src, 256);
    assert_eq!(le_u32(&stream, 12) as usize, stream.len(), "without PRE_COPY the stream is the state record alone");
    assert_eq!(parse_record(&stream).kind, 2);
    set_state(&mut dst, RESUMING, "RUNNING -> RESUMING");
    write_stream(&mut dst, &stream, 7, "state record in 7-byte writes");
    set_state(&mut dst, STOP, "RESUMING -> STOP");
    assert_same(&snapshot(&mut dst), &want, "destination after the load");
    set_state(&mut dst, RUNNING, "STOP -> RUNNING");
    assert_same(&snapshot(&mut dst), &want, "destination running");

    // RUNNING -> STOP_COPY in one request (through STOP), straight into RESUMING -> RUNNING in one request
    // (through STOP, which loads).
    set_state(&mut src, RUNNING, "STOP_COPY -> RUNNING");
    scribble(&mut src, 3, true);
    set_state(&mut src, STOP_COPY, "RUNNING -> STOP_COPY");
    let want = snapshot(&mut src);
    let stream = read_stream(&mut src, 4096);
    set_state(&mut dst, RESUMING, "RUNNING -> RESUMING");
    write_stream(&mut dst, &stream, 4096, "state record");
    set_state(&mut dst, RUNNING, "RESUMING -> RUNNING");
    assert_same(&snapshot(&mut dst), &want, "destination after RESUMING -> RUNNING");
    src_s.assert_alive();
    dst_s.assert_alive();
}

/// One stream per saving session (vfio-user: "PRE_COPY -> STOP_COPY: continue to transfer migration data"):
/// what PRE_COPY produced and the VMM did not read yet comes before the state record, not dropped.
#[test]
fn unread_pre_copy_data_stays_ahead_of_the_state_record() {
    let mut src_s = ServerProcess::start_with(&[]);
    let mut dst_s = ServerProcess::start_with(&[]);
    let mut src = src_s.connect_negotiated();
    let mut dst = dst_s.connect_negotiated();
    scribble(&mut src, 1, true);
    set_state(&mut src, PRE_COPY, "RUNNING -> PRE_COPY");
    let compat = read_stream(&mut src, 4096);
    set_state(&mut src, RUNNING, "PRE_COPY -> RUNNING");
    for read_first in [0, 16, compat.len()] {
        let what = format!("{read_first} bytes of the compat record read in PRE_COPY");
        set_state(&mut src, PRE_COPY, &what);
        let head = read_chunk(&mut src, read_first as u32);
        set_state(&mut src, STOP_COPY, &what);
        let want = snapshot(&mut src);
        let rest = read_stream(&mut src, 4096);
        let stream = [head, rest].concat();
        assert_eq!(&stream[..compat.len()], &compat[..], "{what}: the stream starts with the whole compat record");
        assert_eq!(parse_record(&stream[compat.len()..]).kind, 2, "{what}: then the state record, and no more");
        // The stream as read loads.
        reset(&mut dst);
        set_state(&mut dst, RESUMING, &what);
        write_stream(&mut dst, &stream, 4096, &what);
        set_state(&mut dst, STOP, &format!("{what}: RESUMING -> STOP"));
        assert_same(&snapshot(&mut dst), &want, &what);
        set_state(&mut src, RUNNING, &what);
    }
    src_s.assert_alive();
    dst_s.assert_alive();
}

// ---- 6. aborting, and DEVICE_RESET ---------------------------------------------------------------------------

#[test]
fn abort_from_each_state_back_to_running() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    c.write32(BAR0, VF_ATQBAL1, 0x1111_1000);

    // PRE_COPY -> RUNNING: the device ran throughout.
    set_state(&mut c, PRE_COPY, "RUNNING -> PRE_COPY");
    c.write32(BAR0, VF_ARQBAL1, 0x2222_2000);
    assert_eq!(c.read32(BAR0, VF_ARQBAL1), 0x2222_2000, "PRE_COPY runs: a write takes effect");
    let first = read_chunk(&mut c, 16);
    set_state(&mut c, RUNNING, "PRE_COPY -> RUNNING");
    assert_state(&mut c, RUNNING, "aborted PRE_COPY");
    data_read(&mut c, 8 + 16, 16).assert_errno(EINVAL, "MIG_DATA_READ after the abort");
    assert_eq!((c.read32(BAR0, VF_ATQBAL1), c.read32(BAR0, VF_ARQBAL1)), (0x1111_1000, 0x2222_2000));
    set_state(&mut c, PRE_COPY, "a new PRE_COPY");
    let compat = read_stream(&mut c, 4096);
    assert_eq!(&compat[..16], &first[..], "a new session starts at the beginning again");
    set_state(&mut c, RUNNING, "PRE_COPY -> RUNNING");

    // STOP_COPY -> RUNNING (through STOP): nothing lost, the write held while stopped is applied.
    set_state(&mut c, STOP_COPY, "RUNNING -> STOP_COPY");
    c.write32(BAR0, VF_ATQBAL1, 0x3333_3000);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x1111_1000, "STOP_COPY: the write is held");
    read_chunk(&mut c, 16);
    set_state(&mut c, RUNNING, "STOP_COPY -> RUNNING");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x3333_3000, "the held write is applied on RUNNING");
    assert_eq!(c.read32(BAR0, VF_ARQBAL1), 0x2222_2000, "a register written before is still there");
    data_read(&mut c, 8 + 16, 16).assert_errno(EINVAL, "MIG_DATA_READ after the abort");

    // STOP -> RUNNING: writes held in order, the last one wins.
    set_state(&mut c, STOP, "RUNNING -> STOP");
    c.write32(BAR0, VF_ATQBAL1, 0x4444_4000);
    c.write32(BAR0, VF_ATQBAL1, 0x5555_5000);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x3333_3000, "STOP: writes are held");
    set_state(&mut c, RUNNING, "STOP -> RUNNING");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x5555_5000, "held writes applied in order");

    // RESUMING: leaving it passes RESUMING -> STOP, which loads the stream. With nothing written that fails:
    // SET RUNNING gets EINVAL and the device is in ERROR with its state as it was; DEVICE_RESET is the way out.
    set_state(&mut c, RESUMING, "RUNNING -> RESUMING");
    refuse_state(&mut c, RUNNING, EINVAL, "RESUMING with an empty stream");
    assert_state(&mut c, ERROR, "RESUMING -> RUNNING with an empty stream");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x5555_5000, "state unchanged in ERROR");
    reset(&mut c);
    // The same with part of a stream written: DEVICE_RESET aborts a destination.
    set_state(&mut c, RESUMING, "RUNNING -> RESUMING");
    write_stream(&mut c, &compat[..10], 4096, "part of a compat record");
    reset(&mut c);
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0, "DEVICE_RESET: power-on state");
    // With a complete stream, RESUMING -> RUNNING is a migration: it loads and runs.
    c.write32(BAR0, VF_ATQBAL1, 0x6666_6000);
    set_state(&mut c, STOP_COPY, "RUNNING -> STOP_COPY");
    let record = read_stream(&mut c, 4096);
    set_state(&mut c, RUNNING, "STOP_COPY -> RUNNING");
    c.write32(BAR0, VF_ATQBAL1, 0x7777_7000);
    set_state(&mut c, RESUMING, "RUNNING -> RESUMING");
    write_stream(&mut c, &record, 4096, "a state record");
    set_state(&mut c, RUNNING, "RESUMING -> RUNNING with a state record");
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x6666_6000, "the record's state");
    s.assert_alive();
}

#[test]
fn device_reset_ends_migration_in_every_state() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    set_state(&mut c, STOP_COPY, "RUNNING -> STOP_COPY");
    let record = read_stream(&mut c, 4096);
    for st in [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY, ERROR] {
        let what = format!("DEVICE_RESET in {}", name(st));
        reset(&mut c);
        c.write32(BAR0, VF_ATQBAL1, 0x0abc_d000);
        go(&mut c, st);
        c.write32(BAR0, VF_ARQBAL1, 0x0123_4000); // held unless the device runs
        match st {
            PRE_COPY | STOP_COPY => assert_eq!(read_chunk(&mut c, 16).len(), 16),
            RESUMING => write_stream(&mut c, &record[..10], 4096, &what),
            _ => {}
        }
        c.reset().ok(&what);
        assert_state(&mut c, RUNNING, &what);
        assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0, "{what}: power-on registers");
        assert_eq!(c.read32(BAR0, VF_ARQBAL1), 0, "{what}: a held write is dropped, not applied after the reset");
        data_read(&mut c, 8 + 16, 16).assert_errno(EINVAL, &format!("{what}: no saving session left"));
        data_write(&mut c, &[]).assert_errno(EINVAL, &format!("{what}: no resuming session left"));
        c.write32(BAR0, VF_ATQBAL1, 0x0fed_c000);
        assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0x0fed_c000, "{what}: the device runs");
        // New sessions start clean: nothing of a half-read or half-written stream is left over.
        set_state(&mut c, RESUMING, &what);
        write_stream(&mut c, &record, 4096, &what);
        set_state(&mut c, STOP, &format!("{what}: a whole record loads in a new session"));
        set_state(&mut c, PRE_COPY, &what);
        assert_eq!(parse_record(&read_stream(&mut c, 4096)).kind, 1, "{what}: a new PRE_COPY from byte 0");
    }
    s.assert_alive();
}

// ---- 7. a client that leaves mid-migration ---------------------------------------------------------------------

#[test]
fn client_disconnect_mid_migration() {
    let mut s = ServerProcess::start();
    let mem = memfd(0x10000);
    for st in [RUNNING, PRE_COPY, STOP, STOP_COPY, RESUMING, ERROR] {
        let what = format!("a client that left in {}", name(st));
        let mut a = s.connect_negotiated();
        reset(&mut a);
        a.write32(BAR0, VF_ATQBAL1, 0x0101_0000);
        a.dma_map(IOVA, 0x10000, DMA_RW, Some((mem.as_fd(), 0))).ok("DMA_MAP");
        start_logging(&mut a, 4096, &[], 4096);
        go(&mut a, st);
        match st {
            PRE_COPY | STOP_COPY => assert_eq!(read_chunk(&mut a, 16).len(), 16),
            RESUMING => write_stream(&mut a, b"VFU-I40E", 4096, &what),
            _ => {}
        }
        drop(a);

        // The next client gets a freshly reset device, whatever the last one left it in.
        let mut b = s.connect_negotiated();
        assert_state(&mut b, RUNNING, &what);
        assert_eq!(b.read32(BAR0, VF_ATQBAL1), 0, "{what}: power-on registers");
        // Logging ended with its client: REPORT is refused until this client starts it (no EBUSY).
        log_report(&mut b, IOVA, 0x10000, 4096).assert_errno(EINVAL, &format!("{what}: REPORT"));
        start_logging(&mut b, 4096, &[], 4096);
        stop_logging(&mut b);
        // And so did the data sessions.
        data_read(&mut b, 8 + 16, 16).assert_errno(EINVAL, &format!("{what}: MIG_DATA_READ"));
        data_write(&mut b, &[]).assert_errno(EINVAL, &format!("{what}: MIG_DATA_WRITE"));
        b.write32(BAR0, VF_ATQBAL1, 0x0202_0000);
        assert_eq!(b.read32(BAR0, VF_ATQBAL1), 0x0202_0000, "{what}: the new device runs");
        drop(b);
    }

    // A stop still under way (a device worker waits for the client's DMA reply) when the client leaves.
    let mut a = s.connect_negotiated();
    let _held = held_atq_dma_read(&mut a, 0x30_0000);
    a.send(cmd::DEVICE_FEATURE, &state_payload(STOP), &[], false).expect("send SET STOP");
    assert!(a.replies_within(SILENCE).expect("pump").is_empty(), "SET STOP answered before the device stopped");
    drop(a);
    let mut b = s.connect_negotiated();
    assert_state(&mut b, RUNNING, "a client after one that left during RUNNING -> STOP: a reset device");
    set_state(&mut b, STOP, "RUNNING -> STOP");
    set_state(&mut b, RUNNING, "STOP -> RUNNING");
    s.assert_alive();
}

// ---- 8. DMA logging ---------------------------------------------------------------------------------------------

#[test]
fn dma_logging_protocol_rules() {
    let mut s = ServerProcess::start();
    let mut c = s.connect_negotiated();
    // PROBE, with GET, SET, both or neither: success only if every method named is supported; nothing happens.
    for (f, get, set) in [
        (MIGRATION, true, false),
        (MIG_STATE, true, true),
        (LOG_START, false, true),
        (LOG_STOP, false, true),
        (LOG_REPORT, true, false),
    ] {
        for (flags, ok) in [(PROBE | GET, get), (PROBE | SET, set), (PROBE | GET | SET, get && set), (PROBE, true)] {
            let r = feature(&mut c, 8, flags | f, &[]);
            let what = format!("feature {f} flags {flags:#x}");
            if ok {
                assert_eq!(r.errno, None, "{what}");
                assert_eq!(r.payload, Payload::new().u32(8).u32(flags | f).build(), "{what}: echo");
            } else {
                r.assert_errno(EINVAL, &what);
            }
        }
    }
    for f in [0, 3, 4, 5, 9, 10, 0xffff] {
        feature(&mut c, 8, PROBE | GET | f, &[]).assert_errno(ENOTTY, &format!("PROBE feature {f}"));
        feature(&mut c, 64, GET | f, &[]).assert_errno(ENOTTY, &format!("GET feature {f}"));
    }
    feature(&mut c, 8, (1 << 19) | PROBE | LOG_START, &[]).assert_errno(EINVAL, "unknown flag bit");
    feature(&mut c, 24, LOG_START, &start_payload(4096, &[])).assert_errno(EINVAL, "neither GET, SET nor PROBE");
    feature(&mut c, 24, GET | LOG_START, &start_payload(4096, &[])).assert_errno(EINVAL, "GET START");
    feature(&mut c, 32, SET | LOG_REPORT, &[0; 24]).assert_errno(EINVAL, "SET REPORT");
    assert_state(&mut c, RUNNING, "after the probes");
    log_report(&mut c, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT before START (the probes started nothing)");

    // Page sizes: a power of two; below 4 KiB the device logs at 4 KiB; at most 1 GiB.
    let r = [(IOVA, 0x10000)];
    for (ask, got) in [(512, 4096), (4096, 4096), (8192, 8192), (2 << 20, 2 << 20), (1 << 30, 1 << 30)] {
        start_logging(&mut c, ask, &r, got);
        stop_logging(&mut c);
    }
    for ask in [3000, 0, 6144, 1 << 31, u64::MAX] {
        log_start(&mut c, ask, &r).assert_errno(EINVAL, &format!("START at page size {ask:#x}"));
        log_report(&mut c, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT after a refused START");
    }
    // Ranges: none (all memory) and a few are fine, so are adjacent ones; empty, wrapping, overlapping, too many
    // or miscounted ones are not.
    for ranges in [
        vec![],
        vec![(IOVA, 0x10000)],
        vec![(IOVA, 0x1000), (IOVA + 0x1000, 0x1000), (0x1_0000_0000, 0x20_0000)],
        (0..4096u64).map(|i| (i * 0x2000, 0x1000)).collect(),
    ] {
        start_logging(&mut c, 4096, &ranges, 4096);
        stop_logging(&mut c);
    }
    for (why, ranges) in [
        ("overlapping", vec![(0x10000, 0x2000), (0x11000, 0x1000)]),
        ("overlapping, given in reverse", vec![(0x11000, 0x1000), (0x10000, 0x2000)]),
        ("the same twice", vec![(0x10000, 0x1000), (0x10000, 0x1000)]),
        ("empty", vec![(0x10000, 0)]),
        ("wrapping", vec![(u64::MAX - 0xfff, 0x2000)]),
        ("4097 of them", (0..4097u64).map(|i| (i * 0x2000, 0x1000)).collect()),
    ] {
        log_start(&mut c, 4096, &ranges).assert_errno(EINVAL, &format!("START with ranges {why}"));
    }
    let mut miscounted = start_payload(4096, &[(IOVA, 0x1000)]);
    miscounted[8..12].copy_from_slice(&2u32.to_le_bytes());
    feature(&mut c, 8 + 32, SET | LOG_START, &miscounted).assert_errno(EINVAL, "num_ranges 2, one range");
    feature(&mut c, 8 + 8, SET | LOG_START, &4096u64.to_le_bytes()).assert_errno(EINVAL, "START without num_ranges");
    // argsz must hold the reply, which is the request (SET's data echoed).
    let one = start_payload(4096, &[(IOVA, 0x10000)]);
    feature(&mut c, 8 + 32 - 1, SET | LOG_START, &one).assert_errno(EINVAL, "START with argsz one short");
    feature(&mut c, 8, SET | LOG_START, &one).assert_errno(EINVAL, "START with argsz 8");
    log_report(&mut c, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT after refused STARTs");
    let r = feature(&mut c, 4096, SET | LOG_START, &one).ok("START with a larger argsz");
    assert_eq!((r.payload.len(), r.u32_at(0)), (8 + 32, 8 + 32), "the reply's argsz is the reply's size");
    feature(&mut c, 7, SET | LOG_STOP, &[]).assert_errno(EINVAL, "STOP with argsz 7");
    assert_eq!(report(&mut c, IOVA, 0x10000, 4096), vec![0], "still logging after the refused STOP");
    stop_logging(&mut c);

    // START twice: EBUSY, the first one stays in force.
    let two = [(IOVA, 0x10000), (IOVA + 0x20000, 0x4000)];
    start_logging(&mut c, 4096, &two, 4096);
    log_start(&mut c, 4096, &[]).assert_errno(EBUSY, "START while logging");
    log_start(&mut c, 8192, &[(IOVA, 0x1000)]).assert_errno(EBUSY, "START while logging, other arguments");
    assert_eq!(report(&mut c, IOVA, 0x10000, 4096), vec![0], "nothing mapped, nothing written");
    assert_eq!(report(&mut c, IOVA + 0x20000, 0x4000, 4096), vec![0], "the second range");
    assert_eq!(report(&mut c, IOVA, 0x10000, 0x10000), vec![0], "a report page larger than the logging page");
    // REPORT: page aligned, inside the logged ranges, a power-of-two page of at least 4 KiB.
    for (why, iova, len, page) in [
        ("an unaligned address", IOVA + 0x800, 0x1000, 4096),
        ("an unaligned length", IOVA, 0x1800, 4096),
        ("an empty range", IOVA, 0, 4096),
        ("an address unaligned to the report page", IOVA + 0x1000, 0x2000, 0x2000),
        ("page size 3000", IOVA, 0x10000, 3000),
        ("page size 0", IOVA, 0x10000, 0),
        ("page size 2048", IOVA, 0x10000, 2048),
        ("a start outside the ranges", IOVA - 0x1000, 0x2000, 4096),
        ("an end outside the ranges", IOVA, 0x11000, 4096),
        ("the hole between two ranges", IOVA, 0x24000, 4096),
        ("a wrapping range", u64::MAX - 0xfff, 0x2000, 4096),
    ] {
        log_report(&mut c, iova, len, page).assert_errno(EINVAL, &format!("REPORT with {why}"));
    }
    // argsz must hold the bitmap; the request's data is exactly {iova, length, page_size}.
    let need = report_argsz(0x10000, 4096);
    log_report_with(&mut c, need - 1, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT argsz one short");
    log_report_with(&mut c, 8, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT argsz 8");
    let p = Payload::new().u64(IOVA).u64(0x10000).build();
    feature(&mut c, need, GET | LOG_REPORT, &p).assert_errno(EINVAL, "REPORT with 16 data bytes");
    let p = Payload::new().u64(IOVA).u64(0x10000).u64(4096).u64(0).build();
    feature(&mut c, need, GET | LOG_REPORT, &p).assert_errno(EINVAL, "REPORT with 32 data bytes");
    let r = log_report_with(&mut c, need + 100, IOVA, 0x10000, 4096).ok("REPORT with a larger argsz");
    assert_eq!(r.u32_at(0), need, "the reply's argsz is what it needs");
    // STOP, then REPORT: EINVAL; STOP again is harmless; START works again.
    stop_logging(&mut c);
    log_report(&mut c, IOVA, 0x10000, 4096).assert_errno(EINVAL, "REPORT after STOP");
    stop_logging(&mut c);

    // The bitmap must fit the client's max_data_xfer_size (1 MiB here): 8 Mi pages is the most.
    start_logging(&mut c, 4096, &[], 4096);
    let most = 4096u64 << 23;
    assert_eq!(report(&mut c, 0, most, 4096).len(), 1 << 17, "a 1 MiB bitmap");
    log_report(&mut c, 0, most + 64 * 4096, 4096).assert_errno(E2BIG, "a bitmap one word over 1 MiB");
    assert_eq!(report(&mut c, 0, most + 64 * 4096, 8192).len(), (1 << 16) + 1, "the same range at 8 KiB fits");
    drop(c);
    // A client with a 4 KiB max_data_xfer_size: 32 Ki pages.
    let mut c = s.connect();
    c.version(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096,"pgsizes":4096}}"#).ok("VERSION");
    log_report(&mut c, 0, 0x1000, 4096).assert_errno(EINVAL, "the last client's logging ended with it");
    start_logging(&mut c, 4096, &[], 4096);
    assert_eq!(report(&mut c, 0, 4096 << 15, 4096).len(), 512, "a 4 KiB bitmap");
    log_report(&mut c, 0, (4096 << 15) + 4096, 4096).assert_errno(E2BIG, "a bitmap over 4 KiB");
    s.assert_alive();
}

#[test]
fn dma_logging_reports_exactly_the_pages_the_device_wrote() {
    let mut s = ServerProcess::start();
    let mem = memfd(MEM);
    let mut c = s.connect_negotiated();
    // Logged: the guest memory and the unmapped hole after it (a report may cover both).
    let span = 2 * MEM;
    start_logging(&mut c, 4096, &[(IOVA, span)], 4096);
    let words = (span / 4096 / 64) as usize;
    let mut d = driver(c, &mem);
    assert_eq!(report(&mut d.bus.c, IOVA, span, 4096), vec![0; words], "the driver's own writes are not logged");

    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    let bits = report(&mut d.bus.c, IOVA, span, 4096);
    assert_eq!(set_bits(&bits), vec![ATQ_RING_PAGE, ARQ_RING_PAGE, ARQ_BUF0_PAGE], "ATQ ring, ARQ ring, ARQ buffer 0");
    assert_eq!(report(&mut d.bus.c, IOVA, span, 4096), vec![0; words], "a report clears what it reports");

    // Reports at 8 KiB combine pairs of pages: both rings in bit 0, ARQ buffer 1 (page 35) in bit 17.
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    let bits = report(&mut d.bus.c, IOVA, span, 8192);
    assert_eq!(set_bits(&bits), vec![0, ARQ_BUF1_PAGE / 2], "coalesced at 8 KiB");
    assert_eq!(report(&mut d.bus.c, IOVA, span, 4096), vec![0; words], "the coarse report cleared them");
    // A sub-range sees only its own pages.
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    assert_eq!(report(&mut d.bus.c, IOVA + 0x1000, 0x1000, 4096), vec![1], "the ARQ ring page alone");
    let bits = report(&mut d.bus.c, IOVA, span, 4096);
    assert_eq!(set_bits(&bits), vec![ATQ_RING_PAGE, ARQ_BUF0_PAGE + 2], "the rest, not the page reported already");

    // Logging at 2 MiB: one logged page holds all of it; a 4 KiB report replicates its bit.
    stop_logging(&mut d.bus.c);
    start_logging(&mut d.bus.c, 2 << 20, &[(IOVA, 2 << 20)], 2 << 20);
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    assert_eq!(report(&mut d.bus.c, IOVA, 2 << 20, 4096), vec![u64::MAX; 8], "every 4 KiB page of the 2 MiB one");
    assert_eq!(report(&mut d.bus.c, IOVA, 2 << 20, 2 << 20), vec![0], "and cleared");
    // What the device wrote into memory unmapped before the report is still reported.
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    d.bus.c.dma_unmap(IOVA, MEM, 0).ok("DMA_UNMAP while logging");
    assert_eq!(report(&mut d.bus.c, IOVA, 2 << 20, 2 << 20), vec![1], "writes to memory unmapped since");
    assert_eq!(report(&mut d.bus.c, IOVA, 2 << 20, 2 << 20), vec![0], "and cleared");
    s.assert_alive();
}

// ---- 9. STOP means frozen -------------------------------------------------------------------------------------

#[test]
fn stop_freezes_the_device() {
    let mut s = ServerProcess::start();
    let mem = memfd(MEM);
    let mut c = s.connect_negotiated();
    start_logging(&mut c, 4096, &[(IOVA, MEM)], 4096);
    let mut d = driver(c, &mem);
    exchange(&mut d, OP_VERSION, &msg_version(1, 1));
    let words = (MEM / 4096 / 64) as usize;
    report(&mut d.bus.c, IOVA, MEM, 4096);

    // A request posted while the device is stopped (its ATQT write is held) is not looked at until RUNNING.
    set_state(&mut d.bus.c, STOP, "RUNNING -> STOP");
    d.send(OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes());
    let until = Instant::now() + SILENCE;
    while Instant::now() < until {
        assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 1, "ATQH moved while stopped");
        assert_eq!(d.bus.c.read32(BAR0, VF_ARQH1), 1, "ARQH moved while stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut desc = [0u8; 32];
    mem.read_exact_at(&mut desc, 32).unwrap();
    assert_eq!(le_u16(&desc, 0) & 1, 0, "the descriptor is not done");
    assert_eq!(report(&mut d.bus.c, IOVA, MEM, 4096), vec![0; words], "the device wrote nothing while stopped");
    set_state(&mut d.bus.c, RUNNING, "STOP -> RUNNING");
    let r = d.recv(Duration::from_secs(2)).expect("the request is answered once the device runs");
    assert_eq!((r.op, r.status), (OP_GET_VF_RESOURCES, 0));
    assert_eq!(d.bus.c.read32(BAR0, VF_ATQH1), 2);

    // No interrupt while stopped: a software interrupt asked for then fires once the device runs.
    let efd = eventfd();
    let flags = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER;
    d.bus.c.set_irqs(flags, IRQ_MSIX, 0, 1, &[], &[efd.as_fd()]).ok("SET_IRQS vector 0");
    set_state(&mut d.bus.c, STOP, "RUNNING -> STOP");
    d.bus.c.write32(BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG);
    assert_eq!(eventfd_wait(&efd, SILENCE), 0, "an interrupt while stopped");
    set_state(&mut d.bus.c, RUNNING, "STOP -> RUNNING");
    assert_eq!(eventfd_wait(&efd, Duration::from_secs(2)), 1, "the interrupt once running");

    // The STOP reply waits while a worker is in the middle of a descriptor (its DMA read unanswered); the
    // commands sent behind it wait too, and are answered after it, in order.
    let mut c = d.bus.c;
    stop_logging(&mut c);
    let ring = 0x30_0000;
    let read = held_atq_dma_read(&mut c, ring);
    c.held.push(read); // answered by release_held below
    let set = c.send(cmd::DEVICE_FEATURE, &state_payload(STOP), &[], false).unwrap();
    let get = c.send(cmd::DEVICE_FEATURE, &Payload::new().u32(16).u32(GET | MIG_STATE).build(), &[], false).unwrap();
    assert!(c.replies_within(SILENCE).unwrap().is_empty(), "a reply came while the device could not stop");
    c.release_held().unwrap(); // the worker reads its descriptor, completes it (DMA_WRITE), then parks
    let r = c.recv_next_reply().expect("the SET STOP reply");
    assert_eq!(r.hdr.id, set, "the SET STOP reply first");
    check_state_reply(&r, STOP, "SET STOP after the worker finished");
    assert!(c.dma.writes >= 1, "the descriptor was written back before the STOP reply: {:?}", c.dma);
    let r = c.recv_next_reply().expect("the GET reply");
    assert_eq!((r.hdr.id, r.errno, r.u32_at(8)), (get, None, STOP), "the GET sent behind it, answered after");
    let dma = c.dma.clone();
    c.pump(SILENCE).unwrap();
    assert_eq!((c.dma.reads, c.dma.writes), (dma.reads, dma.writes), "no DMA after the STOP reply");
    let desc = c.guest_read(ring, 32);
    assert_eq!(le_u16(&desc, 0) & 1, 1, "the descriptor in progress was finished");
    set_state(&mut c, RUNNING, "STOP -> RUNNING");
    s.assert_alive();
}
