//! Leak cycles (issue 7): 10,000 clients, one after the other, each connecting, negotiating, mapping guest memory
//! with a memfd, installing MSI-X eventfds and leaving in one of four ways: a clean close, half a message then a
//! close, a pipeline of requests left unread then a close, or a half-close (the server answers, then closes). The
//! server must end where it started: the same number of open fds, and no more than 1 MiB more resident memory.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use client_tests::client::set_irqs_payload;
use client_tests::util::{eventfd, memfd};
use client_tests::*;

const CYCLES: usize = 10_000;
/// Cycles before the baseline is taken: the first clients grow the allocator's arenas, the log writer's buffers
/// and the server's reusable structures to their working size; only growth after that is a leak.
const WARM_UP: usize = 200;
const RSS_GROWTH_LIMIT_KIB: u64 = 1024;
const MEM_SIZE: u64 = 0x1_0000;
const IOVA: u64 = 0x10_0000;

fn map_payload() -> Vec<u8> {
    Payload::new().u32(32).u32(DMA_RW).u64(0).u64(IOVA).u64(MEM_SIZE).build()
}

fn msix_payload(n: u32) -> Vec<u8> {
    set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, n, &[])
}

fn read_payload() -> Vec<u8> {
    Payload::new().u64(0).u32(CONFIG).u32(4).build()
}

/// What every cycle does first: VERSION, DMA_MAP with the memfd, SET_IRQS with `efds` on MSI-X.
fn set_up(s: &ServerProcess, mem: &impl AsFd, efds: &[BorrowedFd<'_>], i: usize) -> Client {
    let mut c = s.connect();
    c.negotiate();
    let r = c.request(cmd::DMA_MAP, &map_payload(), &[mem.as_fd()]).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    assert_eq!(r.errno, None, "cycle {i}: DMA_MAP");
    let r = c.request(cmd::DEVICE_SET_IRQS, &msix_payload(efds.len() as u32), efds);
    assert_eq!(r.unwrap_or_else(|e| panic!("cycle {i}: {e}")).errno, None, "cycle {i}: SET_IRQS");
    c
}

/// One client's life; the way it leaves depends on `i`.
fn cycle(s: &ServerProcess, mem: &impl AsFd, efds: &[OwnedFd], i: usize) {
    let n = 1 + i % efds.len();
    let fds: Vec<BorrowedFd<'_>> = efds[..n].iter().map(|f| f.as_fd()).collect();
    let mut c = set_up(s, mem, &fds, i);
    match i % 4 {
        // A clean close.
        0 => drop(c),
        // Half a message (with an fd attached when it is a DMA_MAP), then a close.
        1 => {
            let m = message(c.fresh_id(), cmd::DMA_MAP, TYPE_COMMAND, &map_payload());
            let cut = 1 + (i / 4) % (m.len() - 1);
            let one = [mem.as_fd()];
            c.send_bytes(&m[..cut], if cut > HDR_SIZE { &one } else { &[] }).unwrap();
            drop(c);
        }
        // A pipeline left unread: reads, a map that overlaps (EEXIST, its fd closed), a SET_IRQS replacing the
        // eventfds; then a close.
        2 => {
            let mut bytes = Vec::new();
            for _ in 0..30 {
                bytes.extend(message(c.fresh_id(), cmd::REGION_READ, TYPE_COMMAND, &read_payload()));
            }
            c.send_bytes(&bytes, &[]).unwrap();
            c.send(cmd::DMA_MAP, &map_payload(), &[mem.as_fd()], false).unwrap();
            c.send(cmd::DEVICE_SET_IRQS, &msix_payload(n as u32), &fds, false).unwrap();
            drop(c);
        }
        // A half-close after a request: the server answers it, then closes.
        _ => {
            let id = c.send(cmd::REGION_READ, &read_payload(), &[], false).unwrap();
            c.shutdown_write();
            let h = c.until_close(Duration::from_secs(5)).unwrap_or_else(|| panic!("cycle {i}: not closed"));
            assert_eq!(h.iter().map(|h| h.id).collect::<Vec<_>>(), [id], "cycle {i}: replies before the close");
        }
    }
}

/// (open fds, VmRSS KiB) while a probe client is connected: being served, it proves every earlier session has
/// been torn down (one client at a time), and it holds the same resources each time it is measured.
fn measure(s: &ServerProcess) -> (usize, u64) {
    let mut c = s.connect();
    c.negotiate();
    assert_eq!(c.read32(CONFIG, 0), 0x154c_8086);
    (s.fd_count(), s.rss_kib())
}

#[test]
fn ten_thousand_client_cycles_leak_no_fds_and_no_memory() {
    let mut s = ServerProcess::start();
    let mem = memfd(MEM_SIZE);
    let efds: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
    let t = Instant::now();
    for i in 0..WARM_UP {
        cycle(&s, &mem, &efds, i);
    }
    let (fds0, rss0) = measure(&s);
    for i in WARM_UP..CYCLES {
        cycle(&s, &mem, &efds, i);
    }
    let (fds1, rss1) = measure(&s);
    let elapsed = t.elapsed();
    s.assert_alive();
    println!(
        "leak: {CYCLES} cycles in {elapsed:.1?}; after {WARM_UP} warm-up cycles: {fds0} fds, VmRSS {rss0} KiB; \
         at the end: {fds1} fds, VmRSS {rss1} KiB ({:+} KiB)",
        rss1 as i64 - rss0 as i64
    );
    assert_eq!(s.log().matches(" connected (").count(), CYCLES + 3, "every cycle was a session of its own");
    assert_eq!(fds1, fds0, "the server's open fds after {CYCLES} cycles");
    assert!(
        rss1 <= rss0 + RSS_GROWTH_LIMIT_KIB,
        "the server's VmRSS grew from {rss0} KiB to {rss1} KiB over {} cycles",
        CYCLES - WARM_UP
    );
}
