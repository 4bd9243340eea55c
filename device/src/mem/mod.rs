//! Guest memory as the device reaches it: the client's DMA mappings.
//!
//! Memory that came with an fd is mmap'd through `vm-memory`, whose bounds-checked volatile accessors mean this
//! crate needs no `unsafe` to touch memory the guest writes concurrently. Memory that came without an fd (QEMU's
//! plain `-m` RAM) is reached through a [`DmaTransport`] the server provides (DMA_READ/DMA_WRITE messages). Every
//! access is checked against the mappings and their permissions; nothing a guest puts in a descriptor can reach
//! memory outside them. Every device write marks the pages it touches in the region's dirty bitmap.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dirty::PageBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::vfio::Errno;

pub mod doorbell;

pub const PAGE_SIZE: u64 = 4096;
/// The most memory all fd-backed mappings together may cover: bounds their dirty bitmaps (32 MiB at this size),
/// which a hostile client could otherwise make the server allocate without limit.
pub const MAX_MAPPED_BYTES: u64 = 1 << 40;

/// Access to guest memory the client did not share with an fd. Calls block the calling device worker (never the
/// protocol thread) until the client answers.
pub trait DmaTransport: Send + Sync {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()>;
}

#[derive(Debug)]
pub enum MemError {
    /// No mapping covers this address.
    Unmapped(u64),
    /// The mapping covering this address does not allow the access.
    Denied(u64),
    /// The client did not complete a DMA message.
    Transport(u64, io::Error),
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Unmapped(a) => write!(f, "address {a:#x} is not in any DMA mapping"),
            MemError::Denied(a) => write!(f, "DMA mapping at {a:#x} does not permit this access"),
            MemError::Transport(a, e) => write!(f, "DMA message for {a:#x} failed: {e}"),
        }
    }
}

impl std::error::Error for MemError {}

enum Backing {
    Mapped(MmapRegion<()>),
    Remote,
}

struct Region {
    size: u64,
    readable: bool,
    writable: bool,
    backing: Backing,
    dirty: PageBitmap,
}

/// A DMA mapping as listed by [`GuestMem::mappings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub iova: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    pub has_fd: bool,
}

#[derive(Default)]
struct Table {
    regions: BTreeMap<u64, Region>,
    transport: Option<Arc<dyn DmaTransport>>,
}

impl Table {
    fn find(&self, addr: u64) -> Option<(u64, &Region)> {
        let (&iova, r) = self.regions.range(..=addr).next_back()?;
        (addr - iova < r.size).then_some((iova, r))
    }
}

/// An mmap past the end of the file would SIGBUS the server on first access, so the file must cover the mapping.
/// A file the client can still shrink could do the same later; that needs an F_SEAL_SHRINK seal, which QEMU's
/// memfd backend sets by default, so its absence is only logged.
fn check_file(file: &File, offset: u64, size: u64, iova: u64) -> Result<(), Errno> {
    let st = rustix::fs::fstat(file).map_err(|e| Errno(e.raw_os_error()))?;
    let end = offset.checked_add(size).ok_or(Errno::EINVAL)?;
    if u64::try_from(st.st_size).unwrap_or(0) < end {
        log::warn!(
            "DMA_MAP {iova:#x}+{size:#x}: fd offset {offset:#x} + size runs past the file's {} bytes",
            st.st_size
        );
        return Err(Errno::EINVAL);
    }
    let sealed = rustix::fs::fcntl_get_seals(file).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK));
    if !sealed {
        log::info!("DMA_MAP {iova:#x}+{size:#x}: the client's file is not sealed against shrinking");
    }
    Ok(())
}

/// The set of DMA mappings, shared by the server (which changes it) and device workers (which use it).
#[derive(Clone, Default)]
pub struct GuestMem {
    table: Arc<RwLock<Table>>,
}

enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl GuestMem {
    pub fn new() -> Self {
        Self::default()
    }

    fn rd(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wr(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a mapping. `file` is `Some((fd, offset))` when the client shared the memory. Overlap is EEXIST.
    pub fn map(
        &self,
        iova: u64,
        size: u64,
        readable: bool,
        writable: bool,
        file: Option<(File, u64)>,
    ) -> Result<(), Errno> {
        let end = iova.checked_add(size).ok_or(Errno::EINVAL)?;
        if size == 0 {
            return Err(Errno::EINVAL);
        }
        let backing = match file {
            Some((file, offset)) => {
                let len = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
                check_file(&file, offset, size, iova)?;
                let mapped: u64 = self
                    .rd()
                    .regions
                    .values()
                    .filter(|r| matches!(r.backing, Backing::Mapped(_)))
                    .map(|r| r.size)
                    .sum();
                if mapped.saturating_add(size) > MAX_MAPPED_BYTES {
                    log::warn!(
                        "DMA_MAP {iova:#x}+{size:#x}: fd-backed mappings would exceed {MAX_MAPPED_BYTES:#x} bytes"
                    );
                    return Err(Errno(libc::ENOMEM));
                }
                let prot = (if readable { libc::PROT_READ } else { 0 }) | (if writable { libc::PROT_WRITE } else { 0 });
                let region = MmapRegion::build(
                    Some(FileOffset::new(file, offset)),
                    len,
                    prot,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
                .map_err(|e| {
                    log::warn!("DMA_MAP {iova:#x}+{size:#x}: mmap failed: {e}");
                    match e {
                        vm_memory::mmap::MmapRegionError::Mmap(io) => Errno(io.raw_os_error().unwrap_or(libc::EINVAL)),
                        _ => Errno::EINVAL,
                    }
                })?;
                Backing::Mapped(region)
            }
            None => Backing::Remote,
        };
        let mut t = self.wr();
        let overlaps_prev = t.regions.range(..end).next_back().is_some_and(|(&a, r)| a + r.size > iova);
        if overlaps_prev {
            return Err(Errno(libc::EEXIST));
        }
        // Only memory we write directly is tracked here; the client tracks what it writes for our DMA messages.
        let tracked = if matches!(backing, Backing::Mapped(_)) { size } else { 0 };
        let dirty = PageBitmap::new(tracked, PAGE_SIZE);
        t.regions.insert(iova, Region { size, readable, writable, backing, dirty });
        Ok(())
    }

    /// Removes the mapping that is exactly `[iova, iova + size)`. In-flight accesses to mapped memory finish
    /// before this returns (they hold the read lock), so the caller may reply to the client right after.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<(), Errno> {
        let mut t = self.wr();
        match t.regions.get(&iova) {
            Some(r) if r.size == size => {
                t.regions.remove(&iova);
                Ok(())
            }
            _ => Err(Errno(libc::ENOENT)),
        }
    }

    pub fn unmap_all(&self) {
        self.wr().regions.clear();
    }

    pub fn len(&self) -> usize {
        self.rd().regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn mappings(&self) -> Vec<Mapping> {
        self.rd()
            .regions
            .iter()
            .map(|(&iova, r)| Mapping {
                iova,
                size: r.size,
                readable: r.readable,
                writable: r.writable,
                has_fd: matches!(r.backing, Backing::Mapped(_)),
            })
            .collect()
    }

    /// Installs (or with `None` removes) the transport for fd-less mappings.
    pub fn set_transport(&self, transport: Option<Arc<dyn DmaTransport>>) {
        self.wr().transport = transport;
    }

    /// Dirty pages of the mapping at `iova` since the last call, one bit per page (and clears them).
    pub fn take_dirty(&self, iova: u64) -> Option<Vec<u64>> {
        self.rd().regions.get(&iova).map(|r| r.dirty.take())
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.access(addr, Dir::Read(buf))
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.access(addr, Dir::Write(data))
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), MemError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Checks that mappings cover the whole range with the needed permission, so a bad range fails before any byte
    /// is copied.
    fn check(&self, addr: u64, len: usize, write: bool) -> Result<(), MemError> {
        let t = self.rd();
        let end = addr.checked_add(len as u64).ok_or(MemError::Unmapped(addr))?;
        let mut at = addr;
        while at < end {
            let (iova, r) = t.find(at).ok_or(MemError::Unmapped(at))?;
            if !(if write { r.writable } else { r.readable }) {
                return Err(MemError::Denied(at));
            }
            at = iova + r.size;
        }
        Ok(())
    }

    /// Copies segment by segment; a buffer may span adjacent mappings. Mapped memory is copied under the read lock;
    /// the lock is never held while waiting for the client.
    fn access(&self, addr: u64, mut dir: Dir<'_>) -> Result<(), MemError> {
        let total = match &dir {
            Dir::Read(b) => b.len(),
            Dir::Write(d) => d.len(),
        };
        self.check(addr, total, matches!(dir, Dir::Write(_)))?;
        let mut done = 0usize;
        while done < total {
            let at = addr.checked_add(done as u64).ok_or(MemError::Unmapped(addr))?;
            let t = self.rd();
            let (iova, r) = t.find(at).ok_or(MemError::Unmapped(at))?;
            let off = at - iova;
            let n = usize::try_from(r.size - off).unwrap_or(usize::MAX).min(total - done);
            let allowed = match dir {
                Dir::Read(_) => r.readable,
                Dir::Write(_) => r.writable,
            };
            if !allowed {
                return Err(MemError::Denied(at));
            }
            match &r.backing {
                Backing::Mapped(m) => {
                    let s = m.get_slice(off as usize, n).map_err(|_| MemError::Unmapped(at))?;
                    match &mut dir {
                        Dir::Read(b) => {
                            s.copy_to(&mut b[done..done + n]);
                        }
                        Dir::Write(d) => {
                            s.copy_from(&d[done..done + n]);
                            r.dirty.mark(off, n as u64);
                        }
                    }
                }
                Backing::Remote => {
                    let tr = t.transport.clone().ok_or(MemError::Unmapped(at))?;
                    drop(t);
                    let res = match &mut dir {
                        Dir::Read(b) => tr.read(at, &mut b[done..done + n]),
                        Dir::Write(d) => tr.write(at, &d[done..done + n]),
                    };
                    res.map_err(|e| MemError::Transport(at, e))?;
                }
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::Mutex;

    fn memfd(size: u64) -> File {
        let f = tempfile();
        f.set_len(size).unwrap();
        f
    }

    fn tempfile() -> File {
        let path =
            std::env::temp_dir().join(format!("vfu-mem-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn mapped_read_write_and_bounds() {
        let m = GuestMem::new();
        let f = memfd(2 * PAGE_SIZE);
        let mut peer = f.try_clone().unwrap();
        m.map(0x10000, 2 * PAGE_SIZE, true, true, Some((f, 0))).unwrap();
        m.write(0x10000 + 100, b"hello").unwrap();
        let mut got = [0u8; 5];
        peer.seek(SeekFrom::Start(100)).unwrap();
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        peer.seek(SeekFrom::Start(4000)).unwrap();
        peer.write_all(b"xyz").unwrap();
        assert_eq!(m.read_u32(0x10000 + 4000).unwrap() & 0xffffff, u32::from_le_bytes(*b"xyz\0"));
        assert!(matches!(m.write(0x10000 + 2 * PAGE_SIZE - 2, b"abc"), Err(MemError::Unmapped(_))));
        assert_eq!(m.take_dirty(0x10000).unwrap(), vec![1], "a failed write touches nothing");
        m.write(0x10000 + PAGE_SIZE, b"x").unwrap();
        assert!(matches!(m.read(0xfff0, &mut [0u8; 32]), Err(MemError::Unmapped(0xfff0))));
        assert_eq!(m.take_dirty(0x10000).unwrap(), vec![2]);
    }

    #[test]
    fn files_must_cover_the_mapping_and_totals_are_capped() {
        let m = GuestMem::new();
        let f = memfd(PAGE_SIZE);
        assert_eq!(m.map(0, 2 * PAGE_SIZE, true, true, Some((f, 0))), Err(Errno::EINVAL), "past end of file");
        let f = memfd(2 * PAGE_SIZE);
        assert_eq!(m.map(0, 2 * PAGE_SIZE, true, true, Some((f, PAGE_SIZE))), Err(Errno::EINVAL), "offset + size");
        let huge = memfd(MAX_MAPPED_BYTES + PAGE_SIZE); // sparse: nothing is allocated
        assert_eq!(m.map(0, MAX_MAPPED_BYTES + PAGE_SIZE, true, true, Some((huge, 0))), Err(Errno(libc::ENOMEM)));
        // Fd-less mappings get no bitmap, so they are not capped beyond the map count.
        m.map(1 << 50, 1 << 48, true, true, None).unwrap();
        assert!(m.is_empty() || m.len() == 1);
    }

    #[test]
    fn overlap_exact_unmap_and_permissions() {
        let m = GuestMem::new();
        m.map(0x2000, 0x2000, true, false, None).unwrap();
        assert_eq!(m.map(0x3000, 0x2000, true, true, None), Err(Errno(libc::EEXIST)));
        assert_eq!(m.map(0x1000, 0x2000, true, true, None), Err(Errno(libc::EEXIST)));
        m.map(0x1000, 0x1000, true, true, None).unwrap();
        assert!(matches!(m.write(0x2000, b"x"), Err(MemError::Denied(0x2000))));
        assert_eq!(m.unmap(0x2000, 0x1000), Err(Errno(libc::ENOENT)));
        m.unmap(0x2000, 0x2000).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.map(u64::MAX - 10, 100, true, true, None), Err(Errno::EINVAL));
    }

    struct Fake(Mutex<Vec<u8>>);
    impl DmaTransport for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let v = self.0.lock().unwrap();
            buf.copy_from_slice(&v[addr as usize..addr as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap()[addr as usize..addr as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn remote_and_spanning_access() {
        let m = GuestMem::new();
        let fake = Arc::new(Fake(Mutex::new(vec![0; 0x3000])));
        m.map(0x1000, 0x1000, true, true, None).unwrap();
        let f = memfd(PAGE_SIZE);
        m.map(0x2000, 0x1000, true, true, Some((f, 0))).unwrap();
        assert!(matches!(m.read(0x1000, &mut [0u8; 4]), Err(MemError::Unmapped(0x1000))), "no transport yet");
        m.set_transport(Some(fake.clone()));
        let data: Vec<u8> = (0..64).collect();
        m.write(0x2000 - 32, &data).unwrap();
        assert_eq!(&fake.0.lock().unwrap()[0x2000 - 32..0x2000], &data[..32]);
        let mut back = [0u8; 64];
        m.read(0x2000 - 32, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
    }
}
