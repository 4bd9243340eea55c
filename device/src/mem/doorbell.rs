//! `--doorbells mmap`: BAR0's first page (the 16 QTX_TAIL registers) in a memfd the client maps directly, so the
//! guest's tail stores land in shared memory with no message; the datapath worker polls it. Trapped accesses to
//! the page use it too, so both ways see one value.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::nic::regs::QTX_TAIL1;

/// The size of BAR0's first page, which holds the 16 QTX_TAIL registers (0x0000-0x003F).
pub const DOORBELL_PAGE: u64 = 0x1000;

pub struct DoorbellPage {
    region: MmapRegion<()>,
    /// The datapath worker is polling (set under the device lock).
    pub(crate) polling: AtomicBool,
}

impl DoorbellPage {
    pub fn new() -> io::Result<Self> {
        let fd = rustix::fs::memfd_create("vfu-i40evf-doorbells", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, DOORBELL_PAGE)?;
        let region = MmapRegion::build(
            Some(FileOffset::new(File::from(fd), 0)),
            DOORBELL_PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(format!("mapping the doorbell page: {e}")))?;
        Ok(DoorbellPage { region, polling: AtomicBool::new(false) })
    }

    /// The memfd the client maps (offset 0).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.file_offset().expect("built with a file").file().as_fd()
    }

    /// `offset + out.len()` is within the page.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let _ = self.region.as_volatile_slice().read_slice(out, offset as usize);
    }

    /// `offset + data.len()` is within the page.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let _ = self.region.as_volatile_slice().write_slice(data, offset as usize);
    }

    pub fn tail(&self, q: u16) -> u32 {
        let at = (QTX_TAIL1 + 4 * u64::from(q)) as usize;
        u32::from_le(self.region.as_volatile_slice().load::<u32>(at, Ordering::Acquire).unwrap_or(0))
    }

    pub fn set_tail(&self, q: u16, v: u32) {
        self.write(QTX_TAIL1 + 4 * u64::from(q), &v.to_le_bytes());
    }

    /// Power-on contents: all zero.
    pub fn clear(&self) {
        self.write(0, &[0u8; DOORBELL_PAGE as usize]);
    }
}
