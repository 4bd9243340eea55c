//! Guest memory as the reference VMM owns it: one memfd per VM, read and written with pread/pwrite (std's
//! `FileExt`), so the VMM needs no mapping and no `unsafe`; the servers mmap the same fd and see every byte.
//!
//! Every write the "vCPU" (the driver model) makes marks its pages in a guest-dirty bitmap *after* the bytes have
//! landed, as a real VMM's KVM dirty log would record them: a copy that takes-and-clears the bitmap and then reads
//! the page either sees the write or finds the bit set again on its next pass.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::util::memfd;

/// The page size of both dirty logs (the device's DMA logging and the guest's).
pub const PAGE: u64 = 4096;

/// Largest run of pages copied with one pread/pwrite pair.
const RUN_PAGES: u64 = 256;

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// A VM's guest memory: a memfd of `size` bytes at guest physical (and IOVA) 0.
pub struct GuestRam {
    file: File,
    size: u64,
    dirty: Vec<AtomicU64>,
}

impl GuestRam {
    /// `size` zero bytes; a multiple of [`PAGE`].
    pub fn new(size: u64) -> GuestRam {
        assert!(size > 0 && size.is_multiple_of(PAGE), "guest memory of {size} bytes is not whole pages");
        let words = (size / PAGE).div_ceil(64) as usize;
        GuestRam { file: memfd(size), size, dirty: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE
    }

    fn check(&self, addr: u64, len: usize) -> io::Result<()> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest access {addr:#x}+{len:#x} outside {:#x} bytes of memory", self.size),
            )),
        }
    }

    /// The vCPU's read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(addr, buf.len())?;
        self.file.read_exact_at(buf, addr)
    }

    /// The vCPU's write: the bytes, then the guest-dirty bits of every page they touched.
    pub fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.write_untracked(addr, data)?;
        if !data.is_empty() {
            for p in addr / PAGE..=(addr + data.len() as u64 - 1) / PAGE {
                self.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// The VMM's own write (a migration copy into the destination): not a guest write, not tracked.
    pub fn write_untracked(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.check(addr, data.len())?;
        self.file.write_all_at(data, addr)
    }

    /// The pages the guest wrote since the last call, ascending; clears them.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (i, w) in self.dirty.iter().enumerate() {
            let bits = w.swap(0, Ordering::SeqCst);
            push_bits(bits, i as u64 * 64, &mut pages);
        }
        pages
    }
}

impl AsFd for GuestRam {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Appends page `first + n` for every bit n set in `bits`.
pub fn push_bits(mut bits: u64, first: u64, out: &mut Vec<u64>) {
    while bits != 0 {
        let n = bits.trailing_zeros();
        out.push(first + u64::from(n));
        bits &= bits - 1;
    }
}

/// What a copy moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub pages: u64,
    pub bytes: u64,
    /// Zero pages a first pass did not send (the destination's fresh memory is zero already).
    pub zero_skipped: u64,
}

/// Copies `pages` (ascending, distinct) from `src` to `dst`, contiguous runs in one pread/pwrite each.
pub fn copy_pages(src: &GuestRam, dst: &GuestRam, pages: &[u64]) -> io::Result<Copied> {
    let mut c = Copied::default();
    let mut buf = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        let mut n = 1;
        while i + n < pages.len() && pages[i + n] == first + n as u64 && (n as u64) < RUN_PAGES {
            n += 1;
        }
        buf.resize(n * PAGE as usize, 0);
        src.read(first * PAGE, &mut buf)?;
        dst.write_untracked(first * PAGE, &buf)?;
        c.pages += n as u64;
        c.bytes += buf.len() as u64;
        i += n;
    }
    Ok(c)
}

/// The first pass: every page of `src` that is not zero, into a fresh (zero) `dst`.
pub fn copy_all(src: &GuestRam, dst: &GuestRam) -> io::Result<Copied> {
    let mut c = Copied::default();
    let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
    let mut at = 0;
    while at < src.size {
        let len = (src.size - at).min(buf.len() as u64) as usize;
        src.read(at, &mut buf[..len])?;
        let mut run: Option<usize> = None; // start of a run of non-zero pages within the chunk
        let npages = len / PAGE as usize;
        for p in 0..=npages {
            let nonzero = p < npages && buf[p * PAGE as usize..(p + 1) * PAGE as usize] != ZERO_PAGE[..];
            match (nonzero, run) {
                (true, None) => run = Some(p),
                (false, Some(s)) => {
                    let bytes = &buf[s * PAGE as usize..p * PAGE as usize];
                    dst.write_untracked(at + (s as u64) * PAGE, bytes)?;
                    c.pages += (p - s) as u64;
                    c.bytes += bytes.len() as u64;
                    run = None;
                }
                _ => {}
            }
            if p < npages && !nonzero {
                c.zero_skipped += 1;
            }
        }
        at += len as u64;
    }
    Ok(c)
}

/// The pages on which `a` and `b` differ, ascending.
pub fn diff_pages(a: &GuestRam, b: &GuestRam) -> io::Result<Vec<u64>> {
    assert_eq!(a.size, b.size, "comparing memories of different sizes");
    let chunk = (RUN_PAGES * PAGE) as usize;
    let (mut x, mut y) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut out = Vec::new();
    let mut at = 0;
    while at < a.size {
        let len = (a.size - at).min(chunk as u64) as usize;
        a.read(at, &mut x[..len])?;
        b.read(at, &mut y[..len])?;
        if x[..len] != y[..len] {
            for (p, (pa, pb)) in x[..len].chunks(PAGE as usize).zip(y[..len].chunks(PAGE as usize)).enumerate() {
                if pa != pb {
                    out.push(at / PAGE + p as u64);
                }
            }
        }
        at += len as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_pages_after_landing_and_copies_move_them() {
        let a = GuestRam::new(64 * PAGE);
        let b = GuestRam::new(64 * PAGE);
        a.write(PAGE - 2, &[1, 2, 3, 4]).unwrap();
        a.write(10 * PAGE, &[9]).unwrap();
        assert_eq!(a.take_dirty(), vec![0, 1, 10]);
        assert!(a.take_dirty().is_empty(), "taking clears");
        assert_eq!(diff_pages(&a, &b).unwrap(), vec![0, 1, 10]);
        let c = copy_pages(&a, &b, &[0, 1]).unwrap();
        assert_eq!((c.pages, c.bytes), (2, 2 * PAGE));
        assert_eq!(diff_pages(&a, &b).unwrap(), vec![10]);
        let c = copy_all(&a, &GuestRam::new(64 * PAGE)).unwrap();
        assert_eq!((c.pages, c.zero_skipped), (3, 61));
        assert!(a.write(64 * PAGE - 1, &[0, 0]).is_err(), "past the end");
        let mut out = Vec::new();
        push_bits(0b1010_0001, 64, &mut out);
        assert_eq!(out, vec![64, 69, 71]);
    }
}
