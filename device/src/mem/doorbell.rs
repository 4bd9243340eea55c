//! The doorbell pages: BAR0's three pages the fast path maps (docs/remap-irq.md), kept in a memfd so a client can
//! map them. They are the only storage of their registers: trapped accesses and stores through a client's mapping
//! meet in the same words.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::nic::regs::{QRX_TAIL1, QTX_TAIL1, VF_ARQT1};

pub const PAGE: u64 = 0x1000;
/// BAR0 offsets of the pages: QTX_TAIL; QRX_TAIL and VFINT_ITRN; VF_ARQT, VF_ARQH, VF_ATQBAH, VF_ATQBAL.
pub const DOORBELL_PAGES: [u64; 3] = [QTX_TAIL1, QRX_TAIL1, VF_ARQT1 & !(PAGE - 1)];
/// The memfd mirrors BAR0 up to the last page, so a page's file offset is its BAR0 offset (sparse: the pages in
/// between are never touched and take no memory).
const FILE_SIZE: u64 = DOORBELL_PAGES[2] + PAGE;

pub struct DoorbellPages {
    region: MmapRegion<()>,
}

impl DoorbellPages {
    pub fn new() -> io::Result<Self> {
        let fd = rustix::fs::memfd_create("vfu-i40evf-doorbells", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, FILE_SIZE)?;
        let region = MmapRegion::build(
            Some(FileOffset::new(File::from(fd), 0)),
            FILE_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(format!("mapping the doorbell pages: {e}")))?;
        Ok(DoorbellPages { region })
    }

    /// Whether BAR0 offset `off` lies in a doorbell page.
    pub fn owns(off: u64) -> bool {
        DOORBELL_PAGES.iter().any(|&p| (p..p + PAGE).contains(&off))
    }

    /// The memfd a client maps; file offsets equal BAR0 offsets.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.file_offset().expect("built with a file").file().as_fd()
    }

    /// The 32-bit register at `off` (dword aligned, [`DoorbellPages::owns`]).
    pub fn get(&self, off: u64) -> u32 {
        u32::from_le(self.region.as_volatile_slice().load::<u32>(off as usize, Ordering::Acquire).unwrap_or(0))
    }

    pub fn set(&self, off: u64, v: u32) {
        let _ = self.region.as_volatile_slice().store(v.to_le(), off as usize, Ordering::Release);
    }

    /// Power-on contents: all zero.
    pub fn clear(&self) {
        let zero = [0u8; PAGE as usize];
        for p in DOORBELL_PAGES {
            let _ = self.region.as_volatile_slice().write_slice(&zero, p as usize);
        }
    }

    /// Every register of the pages, in BAR0 offset order.
    pub fn offsets() -> impl Iterator<Item = u64> {
        DOORBELL_PAGES.into_iter().flat_map(|p| (p..p + PAGE).step_by(4))
    }
}
