//! Small fd helpers for tests: eventfds and memfds, all through rustix (no `unsafe`).

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
