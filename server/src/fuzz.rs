//! Entry points for the fuzzers in `fuzz/` and for replaying their corpora as ordinary tests on stable: the message
//! framer, every request handler in-process (no socket), and region accesses into the device model. Not part of
//! the server's API.

use std::fs::File;
use std::os::fd::OwnedFd;

use device::fuzz::Input;
use device::mem::GuestMem;
use device::{I40eVf, VfConfig, VfioDevice};

use crate::conn::{Event, Framer, Incoming, READ_CHUNK};
use crate::handlers::{Ctx, Negotiated, Step};
use crate::limits::Limits;
use crate::migration::Migration;
use crate::wire::*;

/// Framing only: events and their payloads, not fds.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message(Header, Vec<u8>),
    Oversized(Header),
    End(Header),
}

/// Runs a framer over `stream` cut into the given read sizes; stops at the first event that ends a connection.
fn frame(stream: &[u8], cuts: &[usize], max_msg: usize, fd: Option<&File>) -> Vec<Seen> {
    let mut f = Framer::new(max_msg);
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < stream.len() {
        let n = cuts.get(i).copied().unwrap_or(READ_CHUNK).clamp(1, READ_CHUNK).min(stream.len() - at);
        i += 1;
        f.space()[..n].copy_from_slice(&stream[at..at + n]);
        let fds: Vec<OwnedFd> =
            fd.filter(|_| n % 3 == 0).map(|f| f.try_clone().expect("dup").into()).into_iter().collect();
        f.commit(n, fds, n % 7 == 0);
        at += n;
        assert!(f.capacity() <= max_msg + 2 * READ_CHUNK, "framer buffer grew to {}", f.capacity());
        while let Some(ev) = f.next_event() {
            match ev {
                Event::Message(Incoming { header, payload, .. }) => {
                    assert_eq!(payload.len() + HEADER_SIZE, header.size as usize);
                    assert!(header.size as usize <= max_msg);
                    out.push(Seen::Message(header, payload));
                }
                Event::Oversized(h) => {
                    assert!(h.size as usize > max_msg);
                    out.push(Seen::Oversized(h));
                }
                Event::Impossible(h) | Event::Corrupt(h) => {
                    out.push(Seen::End(h));
                    return out;
                }
            }
        }
    }
    out
}

/// The framer: the same byte stream cut into reads two ways (from the input, and whole) yields the same messages.
pub fn framer(data: &[u8]) {
    let mut inp = Input::new(data);
    let max_msg = HEADER_SIZE + usize::from(inp.u16() % 4096);
    let ncuts = usize::from(inp.u8());
    let cuts: Vec<usize> = (0..ncuts).map(|_| usize::from(inp.u16())).collect();
    let stream = inp.rest();
    let devnull = File::open("/dev/null").ok();
    let pieces = frame(stream, &cuts, max_msg, devnull.as_ref());
    let whole = frame(stream, &[], max_msg, None);
    assert_eq!(pieces, whole, "framing depends on how reads cut the stream");
}

fn memfd(size: u64) -> File {
    let fd = rustix::fs::memfd_create("vfu-fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// Every request handler in-process: a sequence of messages (command, flags, payload, fds) against a fresh device,
/// optionally negotiated first. Replies must be well-formed and bounded.
pub fn handlers(data: &[u8]) {
    let mut inp = Input::new(data);
    let mem = GuestMem::new();
    let mut dev = I40eVf::new(VfConfig::default(), mem.clone());
    let limits = Limits { max_dma_maps: 8, max_data_xfer: 64 << 10, ..Limits::default() };
    let first = inp.u8();
    let mut negotiated =
        (first & 1 == 1).then_some(Negotiated { client_max_xfer: 1 << 20, client_max_fds: 16, write_multiple: true });
    let mut mig = Migration::new(first & 2 != 0);
    while !inp.is_empty() {
        let cmd = u16::from(inp.u8() % 20);
        let flags = u32::from(inp.u8() & 0x31);
        let len = usize::from(inp.u16() % 2048);
        let payload = inp.bytes(len).to_vec();
        let nfds = inp.u8();
        let fds: Vec<OwnedFd> = match (cmd, nfds % 4) {
            (_, 0) => Vec::new(),
            (CMD_DEVICE_SET_IRQS, n) => (0..n)
                .map(|_| rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd"))
                .collect(),
            (_, _) => vec![memfd(u64::from(inp.u16()) * 4096).into()],
        };
        let header = Header { id: 1, cmd, size: (HEADER_SIZE + payload.len()) as u32, flags, errno: 0 };
        let mut m = Incoming { header, payload, fds, fds_truncated: nfds & 0x80 != 0 };
        let mut ctx = Ctx { device: &mut dev, mem: &mem, negotiated: &mut negotiated, limits: &limits, mig: &mut mig };
        match ctx.handle(&mut m) {
            Step::Reply(Ok(r)) => {
                assert!(r.payload.len() <= limits.max_msg(), "a {}-byte reply", r.payload.len());
                assert!(r.fds.len() <= 1, "a reply with {} fds", r.fds.len());
            }
            Step::Reply(Err(_)) => {}
            Step::Wait => {
                // In-process, nothing waits for a DMA reply, so the device stops promptly.
                let m = dev.migration().expect("only a migrating device waits");
                let t = std::time::Instant::now();
                while mig.poll(m, &mem).is_none() {
                    assert!(t.elapsed() < std::time::Duration::from_secs(10), "the device never stopped");
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        }
        assert!(mem.len() <= limits.max_dma_maps, "{} mappings past the limit", mem.len());
    }
}

/// Region accesses into the device model, within each region's bounds as the server guarantees.
pub fn region(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut dev =
        I40eVf::new(VfConfig { queue_pairs: 1 + u16::from(inp.u8() % 16), ..Default::default() }, GuestMem::new());
    while !inp.is_empty() {
        let (index, write) = (u32::from(inp.u8() % 10), inp.u8() & 1 == 1);
        let Some(info) = dev.region_info(index) else { continue };
        if info.size == 0 {
            continue;
        }
        let offset = inp.u64() % info.size;
        let count = (u64::from(inp.u16()) % 64 + 1).min(info.size - offset) as usize;
        if write {
            let d = inp.bytes(count).to_vec();
            let _ = dev.region_write(index, offset, &d);
        } else {
            let mut buf = vec![0u8; count];
            let _ = dev.region_read(index, offset, &mut buf);
        }
    }
}
