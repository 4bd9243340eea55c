//! Small helpers for tests: eventfds and memfds, all through rustix (no `unsafe`), and a way to make the device
//! send a DMA request (for tests of how the server takes the client's replies to it).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::EventfdFlags;
use rustix::fs::MemfdFlags;

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).expect("eventfd")
}

/// Reads (and resets) an eventfd's counter; 0 when it was not signalled.
pub fn eventfd_take(fd: &impl AsFd) -> u64 {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        Ok(n) => panic!("short eventfd read: {n}"),
        Err(rustix::io::Errno::AGAIN) => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// Waits up to `timeout` for an eventfd to be signalled; returns the counter (0 if it never was).
pub fn eventfd_wait(fd: &impl AsFd, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = eventfd_take(fd);
        if n != 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A memfd of `size` zero bytes (read and write it with `std::os::unix::fs::FileExt`).
pub fn memfd(size: u64) -> File {
    let fd = rustix::fs::memfd_create("vfu-guest", MemfdFlags::CLOEXEC).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// LEN.CRIT of the admin queue length registers: the device marks a queue it cannot use.
pub const AQ_CRIT: u32 = 1 << 30;

/// Makes the device's admin-queue worker read a descriptor from fd-less guest memory at `ring` (mapped here,
/// after a DEVICE_RESET and an unmap of everything) and returns its DMA_READ request, unanswered. `c.hold_dma`
/// stays set, so later DMA requests are held too.
pub fn held_atq_dma_read(c: &mut crate::Client, ring: u64) -> crate::client::Msg {
    use crate::reg::*;
    use crate::*;
    c.reset().ok("DEVICE_RESET: an earlier request may have left the admin queue stalled");
    c.dma_unmap(0, 0, UNMAP_ALL).ok("unmap all");
    c.dma_map(ring, 0x1000, DMA_RW, None).ok("map the ring without an fd");
    c.guest_write(ring, &aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0));
    c.write32(BAR0, VF_ATQBAL1, ring as u32);
    c.write32(BAR0, VF_ATQBAH1, (ring >> 32) as u32);
    c.enable_bus_master();
    c.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    c.write32(BAR0, VF_ATQH1, 0);
    c.hold_dma = true;
    c.posted_write(BAR0, VF_ATQT1, &1u32.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.held.is_empty() {
        assert!(Instant::now() < deadline, "the device never asked for its descriptor");
        c.pump(Duration::from_millis(2)).expect("serving the server");
    }
    let m = c.held.remove(0);
    assert_eq!((m.hdr.cmd, m.hdr.msg_type()), (cmd::DMA_READ, TYPE_COMMAND), "{:?}", m.hdr);
    assert_eq!((le_u64(&m.payload, 0), le_u64(&m.payload, 8)), (ring, 32), "the descriptor read");
    m
}

/// Waits (<= `within`) for the admin queue to be marked critically broken (LEN.CRIT), as the device does when it
/// cannot read a descriptor; panics otherwise.
#[track_caller]
pub fn wait_atq_stalled(c: &mut crate::Client, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while c.read32(crate::BAR0, crate::reg::VF_ATQLEN1) & AQ_CRIT == 0 {
        assert!(Instant::now() < deadline, "{what}: the admin queue did not stall within {within:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
