//! Guest memory as the device reaches it: the client's DMA mappings.
//!
//! Memory that came with an fd is mmap'd through `vm-memory`, whose bounds-checked volatile accessors mean this
//! crate needs no `unsafe` to touch memory the guest writes concurrently. Memory that came without an fd (QEMU's
//! plain `-m` RAM) is reached through a [`DmaTransport`] the server provides (DMA_READ/DMA_WRITE messages). Every
//! access is checked against the mappings and their permissions; nothing a guest puts in a descriptor can reach
//! memory outside them. Every device write marks the pages it touches in the region's dirty bitmap.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dirty::PageBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::fault::Faults;
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
    Mapped(Mapped),
    Remote,
}

/// A region's window into an mmap of the client's file.
struct Mapped {
    map: Arc<MmapRegion<()>>,
    /// Where the region starts in `map`.
    base: usize,
    /// `map` is the whole-file mapping [`Table::files`] keeps under this key, shared with other regions.
    shared: Option<FileKey>,
}

/// A client file as the kernel knows it (the fd numbers differ with every message), and the access mapped.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    prot: i32,
}

/// A whole-file mapping and what the fstat that made it said.
struct FileMap {
    map: Arc<MmapRegion<()>>,
    /// Sealed against shrinking (seals are never removed, so no need to ask again).
    sealed: bool,
}

struct Region {
    size: u64,
    readable: bool,
    writable: bool,
    backing: Backing,
    /// Only while dirty logging is on, and only for memory the device writes directly (fd-backed).
    log: Option<RegionLog>,
}

/// A region's dirty bitmaps while logging: what REPORT harvests, and (with the audit) every page written since
/// logging started.
struct RegionLog {
    dirty: PageBitmap,
    ever: Option<PageBitmap>,
    /// `--dirty-log descriptors`: `dirty` holds the pages derived from descriptors, not the writes.
    derived: bool,
}

impl RegionLog {
    /// A device write.
    #[inline]
    fn mark(&self, addr: u64, len: u64, faults: Option<&Faults>) {
        if !self.derived {
            match faults {
                Some(f) if f.dirty_miss_active() => self.mark_missing(addr, len, f),
                _ => self.dirty.mark(addr, len),
            }
        }
        if let Some(e) = &self.ever {
            e.mark(addr, len); // the audit's record stays true: it is what catches the missing pages
        }
    }

    /// dirty-miss: page by page, each page newly dirtied since the last report counts, and every Nth is left out.
    #[cold]
    fn mark_missing(&self, addr: u64, len: u64, f: &Faults) {
        if len == 0 {
            return;
        }
        let size = self.dirty.page_size();
        let (first, last) = (addr / size, (addr + (len - 1)) / size);
        for page in first..=last {
            if self.dirty.is_dirty(page) {
                continue;
            }
            if f.miss_dirty_page() {
                log::debug!("dirty-miss fault: page {:#x} left out of the dirty log", page * size);
                continue;
            }
            let a = (page * size).max(addr);
            self.dirty.mark(a, 1);
        }
    }
}

/// Dirty logging as DMA_LOGGING_START set it up.
struct LogState {
    page_size: u64,
    /// Ranges to log, sorted and disjoint; empty means everything.
    ranges: Vec<(u64, u64)>,
    audit: bool,
    derived: bool,
    /// Bitmaps of regions unmapped while logging: what the device wrote there is still reported.
    retired: Vec<RegionLog>,
}

impl LogState {
    fn covers(&self, iova: u64, size: u64) -> bool {
        self.ranges.is_empty() || self.ranges.iter().any(|&(a, l)| a < iova + size && iova < a + l)
    }

    fn new_log(&self, iova: u64, size: u64) -> Option<RegionLog> {
        self.covers(iova, size).then(|| RegionLog {
            dirty: PageBitmap::new(iova, size, self.page_size),
            ever: self.audit.then(|| PageBitmap::new(iova, size, self.page_size)),
            derived: self.derived,
        })
    }

    /// Whether `[iova, iova + len)` lies inside the logged ranges.
    fn contains(&self, iova: u64, len: u64) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        let mut at = iova;
        for &(a, l) in &self.ranges {
            if a <= at && at < a + l {
                at = a + l;
                if at >= iova + len {
                    return true;
                }
            }
        }
        false
    }
}

/// Ranges DMA_LOGGING_START may name, at most.
pub const MAX_LOG_RANGES: usize = 4096;
/// Bitmaps of regions unmapped while logging that are kept for REPORT, at most.
const MAX_RETIRED: usize = 4096;

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
    log: Option<LogState>,
    /// `--dirty-log descriptors` (see [`GuestMem::set_derived_log`]).
    derived: bool,
    /// dirty-miss (see [`GuestMem::set_faults`]).
    faults: Option<Arc<Faults>>,
    /// Bytes of fd-backed (mmap'd) regions, kept as regions come and go so DMA_MAP's limit check is O(1).
    mapped_bytes: u64,
    /// One mapping per client file and access, shared by every region mapped from it: a VMM that maps guest RAM
    /// page by page (a vIOMMU) costs one mmap and one open fd per file, not per region (an fd per region ran into
    /// the usual 1,024 open-file limit, a VMA per region into vm.max_map_count).
    files: HashMap<FileKey, FileMap>,
    /// Bytes of the mappings in `files` (address space only; bounded like `mapped_bytes`).
    file_bytes: u64,
}

impl Table {
    fn find(&self, addr: u64) -> Option<(u64, &Region)> {
        let (&iova, r) = self.regions.range(..=addr).next_back()?;
        (addr - iova < r.size).then_some((iova, r))
    }
}

/// An mmap past the end of the file would SIGBUS the server on first access, so the file must cover the mapping.
/// Returns the file's key and size.
fn check_file(file: &File, offset: u64, size: u64, iova: u64, prot: i32) -> Result<(FileKey, u64), Errno> {
    let st = rustix::fs::fstat(file).map_err(|e| Errno(e.raw_os_error()))?;
    let end = offset.checked_add(size).ok_or(Errno::EINVAL)?;
    let file_size = u64::try_from(st.st_size).unwrap_or(0);
    if file_size < end {
        log::warn!("DMA_MAP {iova:#x}+{size:#x}: fd offset {offset:#x} + size runs past the file's {file_size} bytes");
        return Err(Errno::EINVAL);
    }
    if !offset.is_multiple_of(PAGE_SIZE) {
        log::warn!("DMA_MAP {iova:#x}+{size:#x}: fd offset {offset:#x} is not page aligned");
        return Err(Errno::EINVAL);
    }
    Ok((FileKey { dev: st.st_dev, ino: st.st_ino, prot }, file_size))
}

/// A file the client can still shrink could SIGBUS the server later; that needs an F_SEAL_SHRINK seal, which QEMU's
/// memfd backend sets by default, so its absence is only logged.
fn sealed(file: &File, iova: u64, size: u64) -> bool {
    let sealed = rustix::fs::fcntl_get_seals(file).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK));
    if !sealed {
        // Once per process at info: a client that does not seal maps every region that way, and a log line per
        // DMA_MAP cost more than the mapping.
        static SAID: AtomicBool = AtomicBool::new(false);
        if SAID.swap(true, Ordering::Relaxed) {
            log::debug!("DMA_MAP {iova:#x}+{size:#x}: the client's file is not sealed against shrinking");
        } else {
            log::info!(
                "DMA_MAP {iova:#x}+{size:#x}: the client's file is not sealed against shrinking (said once; later \
                 ones at debug level)"
            );
        }
    }
    sealed
}

fn mmap(file: File, offset: u64, len: u64, prot: i32, iova: u64, size: u64) -> Result<MmapRegion<()>, Errno> {
    let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    MmapRegion::build(Some(FileOffset::new(file, offset)), len, prot, libc::MAP_SHARED | libc::MAP_NORESERVE).map_err(
        |e| {
            log::warn!("DMA_MAP {iova:#x}+{size:#x}: mmap failed: {e}");
            match e {
                vm_memory::mmap::MmapRegionError::Mmap(io) => Errno(io.raw_os_error().unwrap_or(libc::EINVAL)),
                _ => Errno::EINVAL,
            }
        },
    )
}

/// Called for a region's mapping about to be dropped: when it is the last user of a whole-file mapping (the other
/// reference is `files`'), that mapping goes too.
fn release(t: &mut Table, m: &Mapped) {
    if let Some(k) = m.shared {
        if Arc::strong_count(&m.map) == 2 && t.files.get(&k).is_some_and(|f| Arc::ptr_eq(&f.map, &m.map)) {
            t.files.remove(&k);
            t.file_bytes -= m.map.size() as u64;
        }
    }
}

/// Keeps what the device wrote into a region that goes away while logging, for the next REPORT.
fn retire(t: &mut Table, r: Region) {
    if let Backing::Mapped(m) = &r.backing {
        t.mapped_bytes -= r.size;
        release(t, m);
    }
    let (Some(log), Some(l)) = (t.log.as_mut(), r.log) else { return };
    if l.dirty.count() == 0 && l.ever.as_ref().is_none_or(|e| e.count() == 0) {
        return;
    }
    if log.retired.len() >= MAX_RETIRED {
        log::warn!("DMA logging: {MAX_RETIRED} unmapped regions' bitmaps kept already; dropping the oldest");
        log.retired.remove(0);
    }
    log.retired.push(l);
}

/// The set of DMA mappings, shared by the server (which changes it) and device workers (which use it).
#[derive(Clone, Default)]
pub struct GuestMem {
    table: Arc<RwLock<Table>>,
    /// Logging is on and reports derived pages: the engines' cheap check before deriving.
    deriving: Arc<AtomicBool>,
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
        let overlaps = |t: &Table| t.regions.range(..end).next_back().is_some_and(|(&a, r)| a + r.size > iova);
        if overlaps(&self.rd()) {
            return Err(Errno(libc::EEXIST)); // before any mmap
        }
        let backing = match file {
            Some((file, offset)) => Backing::Mapped(self.map_file(file, offset, iova, size, readable, writable)?),
            None => Backing::Remote,
        };
        let mut t = self.wr();
        if let Backing::Mapped(m) = &backing {
            // Checked again under the write lock: the checks above ran without it.
            let full = t.mapped_bytes.saturating_add(size) > MAX_MAPPED_BYTES;
            if full || overlaps(&t) {
                release(&mut t, m);
                return Err(Errno(if full { libc::ENOMEM } else { libc::EEXIST }));
            }
            t.mapped_bytes += size;
        } else if overlaps(&t) {
            return Err(Errno(libc::EEXIST));
        }
        // Only memory we write directly is tracked here; the client tracks what it writes for our DMA messages.
        let log = match (&t.log, &backing) {
            (Some(l), Backing::Mapped(_)) => l.new_log(iova, size),
            _ => None,
        };
        t.regions.insert(iova, Region { size, readable, writable, backing, log });
        Ok(())
    }

    /// The region's window into the client's file: into the file's shared whole-file mapping when there is one
    /// that covers it (no mmap, and the fd is closed), else into a new whole-file mapping, else (the file is too
    /// big to map whole within [`MAX_MAPPED_BYTES`]) into a mapping of the region alone.
    fn map_file(
        &self,
        file: File,
        offset: u64,
        iova: u64,
        size: u64,
        readable: bool,
        writable: bool,
    ) -> Result<Mapped, Errno> {
        let prot = (if readable { libc::PROT_READ } else { 0 }) | (if writable { libc::PROT_WRITE } else { 0 });
        let (key, file_size) = check_file(&file, offset, size, iova, prot)?;
        let base = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
        {
            let t = self.rd();
            if t.mapped_bytes.saturating_add(size) > MAX_MAPPED_BYTES {
                log::warn!("DMA_MAP {iova:#x}+{size:#x}: fd-backed mappings would exceed {MAX_MAPPED_BYTES:#x} bytes");
                return Err(Errno(libc::ENOMEM));
            }
            if let Some(f) = t.files.get(&key) {
                if offset + size <= f.map.size() as u64 {
                    if !f.sealed {
                        sealed(&file, iova, size);
                    }
                    return Ok(Mapped { map: f.map.clone(), base, shared: Some(key) });
                }
            }
        }
        let is_sealed = sealed(&file, iova, size);
        let whole = self.rd().file_bytes.saturating_add(file_size) <= MAX_MAPPED_BYTES;
        if !whole {
            let map = mmap(file, offset, size, prot, iova, size)?;
            return Ok(Mapped { map: Arc::new(map), base: 0, shared: None });
        }
        let map = Arc::new(mmap(file, 0, file_size, prot, iova, size)?);
        let mut t = self.wr();
        // Another thread may have mapped the same file meanwhile, or the file grew past the one mapped before:
        // keep the newest (regions hold on to theirs).
        if let Some(old) = t.files.insert(key, FileMap { map: map.clone(), sealed: is_sealed }) {
            t.file_bytes -= old.map.size() as u64;
        }
        t.file_bytes += file_size;
        Ok(Mapped { map, base, shared: Some(key) })
    }

    /// Removes the mapping that is exactly `[iova, iova + size)`. In-flight accesses to mapped memory finish
    /// before this returns (they hold the read lock), so the caller may reply to the client right after.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<(), Errno> {
        let mut t = self.wr();
        match t.regions.get(&iova) {
            Some(r) if r.size == size => {
                let r = t.regions.remove(&iova).expect("present");
                retire(&mut t, r);
                Ok(())
            }
            _ => Err(Errno(libc::ENOENT)),
        }
    }

    pub fn unmap_all(&self) {
        let mut t = self.wr();
        let regions = std::mem::take(&mut t.regions);
        for r in regions.into_values() {
            retire(&mut t, r);
        }
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

    /// The faults the dirty log obeys (dirty-miss: every Nth page the device newly dirties is left out of
    /// REPORT). Shared by every clone of this memory.
    pub fn set_faults(&self, faults: Arc<Faults>) {
        self.wr().faults = Some(faults);
    }

    /// Installs (or with `None` removes) the transport for fd-less mappings.
    pub fn set_transport(&self, transport: Option<Arc<dyn DmaTransport>>) {
        self.wr().transport = transport;
    }

    // ---- dirty logging (DMA_LOGGING_START / STOP / REPORT) ------------------------------------------------

    /// Starts logging device writes at `page_size` granularity (a power of two up to 1 GiB; smaller than 4 KiB gets
    /// 4 KiB) over `ranges` (empty: everything). Returns the page size chosen. With `audit`,
    /// every page written while logging is also remembered apart from what REPORT clears. Bitmaps exist only from
    /// here to [`GuestMem::stop_logging`], for fd-backed mappings (the client tracks what it writes for our
    /// DMA_WRITE messages).
    pub fn start_logging(&self, page_size: u64, ranges: &[(u64, u64)], audit: bool) -> Result<u64, Errno> {
        // Not a power of two (0 included) is a malformed request, not a hint to round: EINVAL.
        if !page_size.is_power_of_two() || page_size > 1 << 30 {
            log::warn!("DMA logging: page size {page_size:#x} is not a power of two up to 1 GiB");
            return Err(Errno::EINVAL);
        }
        let page_size = page_size.max(PAGE_SIZE);
        if ranges.len() > MAX_LOG_RANGES {
            log::warn!("DMA logging: {} ranges, at most {MAX_LOG_RANGES}", ranges.len());
            return Err(Errno::EINVAL);
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable();
        for (i, &(a, l)) in sorted.iter().enumerate() {
            let end = a.checked_add(l);
            if l == 0 || end.is_none() || sorted.get(i + 1).is_some_and(|&(b, _)| end.is_some_and(|e| b < e)) {
                log::warn!("DMA logging: range {a:#x}+{l:#x} is empty, wraps or overlaps the next");
                return Err(Errno::EINVAL);
            }
        }
        let mut t = self.wr();
        if t.log.is_some() {
            log::warn!("DMA logging is already on");
            return Err(Errno::EBUSY);
        }
        let state = LogState { page_size, ranges: sorted, audit, derived: t.derived, retired: Vec::new() };
        self.deriving.store(t.derived, Ordering::Release);
        for (&iova, r) in t.regions.iter_mut() {
            if matches!(r.backing, Backing::Mapped(_)) {
                r.log = state.new_log(iova, r.size);
            }
        }
        t.log = Some(state);
        Ok(page_size)
    }

    /// Stops logging and drops every bitmap; false if logging was off.
    pub fn stop_logging(&self) -> bool {
        let mut t = self.wr();
        self.deriving.store(false, Ordering::Release);
        for r in t.regions.values_mut() {
            r.log = None;
        }
        t.log.take().is_some()
    }

    /// `--dirty-log descriptors`: from the next DMA_LOGGING_START on, REPORT returns the pages marked with
    /// [`GuestMem::mark_derived`] (what descriptors let the device write, docs/remap-irq.md) instead of the
    /// device's writes; the audit still records the writes.
    pub fn set_derived_log(&self, on: bool) {
        self.wr().derived = on;
    }

    /// `--dirty-log descriptors` was chosen.
    pub fn derived_log(&self) -> bool {
        self.rd().derived
    }

    /// Logging is on and reports derived pages.
    pub fn deriving(&self) -> bool {
        self.deriving.load(Ordering::Acquire)
    }

    /// Marks `[addr, addr + len)` as pages the device may write (derived logging; parts outside fd-backed logged
    /// mappings are ignored).
    pub fn mark_derived(&self, addr: u64, len: u64) {
        let t = self.rd();
        if !t.log.as_ref().is_some_and(|l| l.derived) || len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        for (&iova, r) in t.regions.range(..end).rev().take_while(|(&a, r)| a + r.size > addr) {
            if let Some(l) = &r.log {
                let a = addr.max(iova);
                l.dirty.mark(a, end.min(iova + r.size) - a);
            }
        }
    }

    /// Reads fd-backed memory only (no DMA message, so never waits for the client): for code that holds locks the
    /// protocol thread needs.
    pub fn read_local(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let t = self.rd();
        let (iova, r) = t.find(addr).ok_or(MemError::Unmapped(addr))?;
        let off = addr - iova;
        let Backing::Mapped(m) = &r.backing else { return Err(MemError::Unmapped(addr)) };
        if !r.readable || off + buf.len() as u64 > r.size {
            return Err(MemError::Unmapped(addr));
        }
        let s = m.map.get_slice(m.base + off as usize, buf.len()).map_err(|_| MemError::Unmapped(addr))?;
        s.copy_to(buf);
        Ok(())
    }

    /// The page size logging runs at, if it is on.
    pub fn logging(&self) -> Option<u64> {
        self.rd().log.as_ref().map(|l| l.page_size)
    }

    /// The pages the device wrote in `[iova, iova + len)` since the last report, one bit per `page_size` unit (bit n
    /// = word n / 64, bit n % 64), clearing what it reports. `iova` and `len` must be multiples of `page_size` (a
    /// power of two, at least 4 KiB) and lie inside the logged ranges; the range may span several mappings and
    /// holes (zeros). A logged page only partly inside the range is reported but not cleared, so nothing is lost.
    pub fn report(&self, iova: u64, len: u64, page_size: u64) -> Result<Vec<u64>, Errno> {
        let t = self.rd();
        let Some(log) = &t.log else {
            log::warn!("DMA logging REPORT while logging is off");
            return Err(Errno::EINVAL);
        };
        let end = iova.checked_add(len);
        if !page_size.is_power_of_two()
            || page_size < PAGE_SIZE
            || len == 0
            || end.is_none()
            || !iova.is_multiple_of(page_size)
            || !len.is_multiple_of(page_size)
        {
            log::warn!("DMA logging REPORT {iova:#x}+{len:#x} at page size {page_size:#x}: not page aligned");
            return Err(Errno::EINVAL);
        }
        if !log.contains(iova, len) {
            log::warn!("DMA logging REPORT {iova:#x}+{len:#x} reaches outside the logged ranges");
            return Err(Errno::EINVAL);
        }
        let end = iova + len;
        let nbits = len / page_size;
        let mut out = vec![0u64; nbits.div_ceil(64) as usize];
        let lp = log.page_size;
        let (lo, hi) = (iova / lp, end.div_ceil(lp));
        // Logged pages wholly inside the range are cleared as reported; the (at most two) partial ones are not.
        let (full_lo, full_hi) = (iova.div_ceil(lp), end / lp);
        let base = iova / page_size;
        // Same page size (the usual case): whole words move into the output, shifted into place.
        let same = lp == page_size;
        let mut put_word = |first: u64, bits: u64| {
            if same {
                // `first` may lie below the range (bits below it are masked off already).
                let (off, bits) = match first.checked_sub(base) {
                    Some(o) => (o, bits),
                    None => (0, bits >> (base - first)),
                };
                let (w, sh) = ((off / 64) as usize, off % 64);
                out[w] |= bits << sh;
                if sh != 0 && w + 1 < out.len() {
                    out[w + 1] |= bits >> (64 - sh);
                }
                return;
            }
            let mut b = bits;
            while b != 0 {
                let p = first + u64::from(b.trailing_zeros());
                b &= b - 1;
                let a = (p * lp).max(iova);
                let z = ((p + 1) * lp).min(end);
                for bit in (a - iova) / page_size..=(z - 1 - iova) / page_size {
                    out[(bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
        };
        // Regions are disjoint and sorted: walking back from the end, the first one that ends before `iova` ends
        // the overlap.
        let logs =
            t.regions.range(..end).rev().take_while(|(&a, r)| a + r.size > iova).filter_map(|(_, r)| r.log.as_ref());
        for l in logs.chain(log.retired.iter()) {
            if full_lo < full_hi {
                l.dirty.drain_words(full_lo..full_hi, true, &mut put_word);
                l.dirty.drain_words(lo..full_lo, false, &mut put_word);
                l.dirty.drain_words(full_hi..hi, false, &mut put_word);
            } else {
                l.dirty.drain_words(lo..hi, false, &mut put_word);
            }
        }
        Ok(out)
    }

    /// With the audit on: every logged page (absolute page number at the logging page size) the device wrote
    /// since logging started, sorted.
    pub fn written_pages(&self) -> Vec<u64> {
        let t = self.rd();
        let Some(log) = &t.log else { return Vec::new() };
        let mut pages = Vec::new();
        let regions = t.regions.values().filter_map(|r| r.log.as_ref());
        for e in regions.chain(log.retired.iter()).filter_map(|l| l.ever.as_ref()) {
            e.drain(0..u64::MAX, false, |p| pages.push(p));
        }
        pages.sort_unstable();
        pages.dedup();
        pages
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

    /// Copies segment by segment; a buffer may span adjacent mappings. The common case, a range inside one mapping
    /// the device may touch directly, costs one read lock and one lookup: the mapping found for the bounds and
    /// permission check is the one copied through. Mapped memory is copied under the read lock; the lock is never
    /// held while waiting for the client.
    fn access(&self, addr: u64, dir: Dir<'_>) -> Result<(), MemError> {
        self.batch().access(addr, dir)
    }

    /// Several accesses in program order under one read lock (an engine's descriptor read, buffer copy and
    /// writeback): what one [`GuestMem::read`] or [`GuestMem::write`] costs in locking, paid once. Hold it for
    /// one frame, never while waiting: DMA_MAP and DMA_UNMAP wait for it.
    pub fn batch(&self) -> Batch<'_> {
        Batch { mem: self, t: None }
    }

    /// A range over more than one mapping, or through the transport: checks that mappings cover the whole range
    /// with the needed permission, so a bad range fails before any byte is copied, then copies mapping by mapping
    /// (looking each up again: the transport is called without the lock, and the table may change meanwhile).
    #[cold]
    fn access_spanning(&self, addr: u64, end: u64, mut dir: Dir<'_>) -> Result<(), MemError> {
        let write = matches!(dir, Dir::Write(_));
        {
            let t = self.rd();
            let mut at = addr;
            while at < end {
                let (iova, r) = t.find(at).ok_or(MemError::Unmapped(at))?;
                if !(if write { r.writable } else { r.readable }) {
                    return Err(MemError::Denied(at));
                }
                at = iova + r.size;
            }
        }
        let total = (end - addr) as usize;
        let mut done = 0usize;
        while done < total {
            let at = addr + done as u64;
            let t = self.rd();
            let (iova, r) = t.find(at).ok_or(MemError::Unmapped(at))?;
            let off = at - iova;
            let n = usize::try_from(r.size - off).unwrap_or(usize::MAX).min(total - done);
            if !(if write { r.writable } else { r.readable }) {
                return Err(MemError::Denied(at));
            }
            match &r.backing {
                Backing::Mapped(m) => {
                    let part = match &mut dir {
                        Dir::Read(b) => Dir::Read(&mut b[done..done + n]),
                        Dir::Write(d) => Dir::Write(&d[done..done + n]),
                    };
                    copy_mapped(&t, r, m, off, at, part)?;
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

/// See [`GuestMem::batch`]. The read lock is taken at the first access and given up only for an access that
/// needs the slow path (one spanning mappings, or through the transport, which must not be called under it).
pub struct Batch<'m> {
    mem: &'m GuestMem,
    t: Option<RwLockReadGuard<'m, Table>>,
}

impl Batch<'_> {
    pub fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.access(addr, Dir::Read(buf))
    }

    /// Becomes visible after every earlier write of the batch (a descriptor's status qword goes last).
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        std::sync::atomic::fence(Ordering::Release);
        self.access(addr, Dir::Write(data))
    }

    /// The common case, a range inside one mapping the device may touch directly, costs one lookup: the mapping
    /// found for the bounds and permission check is the one copied through, under the read lock.
    fn access(&mut self, addr: u64, dir: Dir<'_>) -> Result<(), MemError> {
        let write = matches!(dir, Dir::Write(_));
        let total = match &dir {
            Dir::Read(b) => b.len(),
            Dir::Write(d) => d.len(),
        };
        let end = addr.checked_add(total as u64).ok_or(MemError::Unmapped(addr))?;
        if total == 0 {
            return Ok(()); // touches nothing, so needs no mapping
        }
        let mem = self.mem;
        let t = self.t.get_or_insert_with(|| mem.rd());
        let (iova, r) = t.find(addr).ok_or(MemError::Unmapped(addr))?;
        if !(if write { r.writable } else { r.readable }) {
            return Err(MemError::Denied(addr));
        }
        if end - iova <= r.size {
            if let Backing::Mapped(m) = &r.backing {
                return copy_mapped(t, r, m, addr - iova, addr, dir);
            }
        }
        self.t = None;
        mem.access_spanning(addr, end, dir)
    }
}

/// Copies `dir` at offset `off` of mapped region `r` (guest address `at`), which the caller checked covers it with
/// the needed permission, under the table's read lock `t`; a write marks the pages it touched.
#[inline]
fn copy_mapped(t: &Table, r: &Region, m: &Mapped, off: u64, at: u64, dir: Dir<'_>) -> Result<(), MemError> {
    let n = match &dir {
        Dir::Read(b) => b.len(),
        Dir::Write(d) => d.len(),
    };
    let s = m.map.get_slice(m.base + off as usize, n).map_err(|_| MemError::Unmapped(at))?;
    match dir {
        Dir::Read(b) => {
            s.copy_to(b);
        }
        Dir::Write(d) => {
            s.copy_from(d);
            if let Some(l) = &r.log {
                l.mark(at, n as u64, t.faults.as_deref());
            }
        }
    }
    Ok(())
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
        assert_eq!(m.start_logging(4096, &[], false), Ok(4096));
        m.write(0x10000 + 100, b"hello").unwrap();
        let mut got = [0u8; 5];
        peer.seek(SeekFrom::Start(100)).unwrap();
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        peer.seek(SeekFrom::Start(4000)).unwrap();
        peer.write_all(b"xyz").unwrap();
        assert_eq!(m.read_u32(0x10000 + 4000).unwrap() & 0xffffff, u32::from_le_bytes(*b"xyz\0"));
        assert!(matches!(m.write(0x10000 + 2 * PAGE_SIZE - 2, b"abc"), Err(MemError::Unmapped(_))));
        assert_eq!(m.report(0x10000, 2 * PAGE_SIZE, 4096).unwrap(), vec![1], "a failed write touches nothing");
        m.write(0x10000 + PAGE_SIZE, b"x").unwrap();
        assert!(matches!(m.read(0xfff0, &mut [0u8; 32]), Err(MemError::Unmapped(0xfff0))));
        assert_eq!(m.report(0x10000, 2 * PAGE_SIZE, 4096).unwrap(), vec![2]);
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
    fn regions_of_one_file_share_one_mapping_until_the_last_goes() {
        let m = GuestMem::new();
        let f = memfd(8 * PAGE_SIZE);
        let mut peer = f.try_clone().unwrap();
        // Three regions from three fds of one file (as a vIOMMU maps RAM page by page), out of order.
        for (i, page) in [5u64, 1, 3].into_iter().enumerate() {
            let iova = 0x10_0000 + i as u64 * 0x10_0000;
            m.map(iova, PAGE_SIZE, true, true, Some((f.try_clone().unwrap(), page * PAGE_SIZE))).unwrap();
        }
        // Read-only regions get a mapping of their own.
        m.map(0x90_0000, PAGE_SIZE, true, false, Some((f.try_clone().unwrap(), PAGE_SIZE))).unwrap();
        let files = |m: &GuestMem| {
            let t = m.rd();
            (t.files.len(), t.file_bytes)
        };
        assert_eq!(files(&m), (2, 16 * PAGE_SIZE));
        m.write(0x20_0000 + 8, b"page one").unwrap(); // the second region: file page 1
        let mut got = [0u8; 8];
        peer.seek(SeekFrom::Start(PAGE_SIZE + 8)).unwrap();
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"page one", "each region is its own window into the file");
        m.read(0x90_0008, &mut got).unwrap();
        assert_eq!(&got, b"page one", "the read-only window sees the same page");
        assert!(matches!(m.read(0x10_0000 + PAGE_SIZE, &mut got), Err(MemError::Unmapped(_))), "bounded by region");
        // A failed DMA_MAP leaves no mapping behind, an unaligned offset is refused.
        assert_eq!(
            m.map(0x10_0000, PAGE_SIZE, true, true, Some((f.try_clone().unwrap(), 0))),
            Err(Errno(libc::EEXIST))
        );
        assert_eq!(m.map(0xa0_0000, PAGE_SIZE, true, true, Some((f.try_clone().unwrap(), 8))), Err(Errno::EINVAL));
        m.unmap(0x90_0000, PAGE_SIZE).unwrap();
        m.unmap(0x10_0000, PAGE_SIZE).unwrap();
        m.unmap(0x30_0000, PAGE_SIZE).unwrap();
        assert_eq!(files(&m), (1, 8 * PAGE_SIZE), "one region still uses the file");
        m.read(0x20_0008, &mut got).unwrap();
        assert_eq!(&got, b"page one");
        m.unmap_all();
        assert_eq!(files(&m), (0, 0), "the last region took the mapping with it");
    }

    #[test]
    fn a_file_too_big_to_map_whole_maps_the_region_alone() {
        let m = GuestMem::new();
        let huge = memfd(MAX_MAPPED_BYTES + PAGE_SIZE); // sparse: nothing is allocated
        m.map(0, PAGE_SIZE, true, true, Some((huge.try_clone().unwrap(), MAX_MAPPED_BYTES))).unwrap();
        m.write(8, b"far").unwrap();
        let mut got = [0u8; 3];
        m.read(8, &mut got).unwrap();
        assert_eq!(&got, b"far");
        assert_eq!(m.rd().files.len(), 0);
        m.unmap(0, PAGE_SIZE).unwrap();
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

    #[test]
    fn dirty_logging_reports_exactly_what_the_device_wrote() {
        let m = GuestMem::new();
        let (a, b) = (0x10_0000u64, 0x10_4000u64);
        m.map(a, 0x4000, true, true, Some((memfd(0x4000), 0))).unwrap();
        m.map(b, 0x4000, true, true, Some((memfd(0x4000), 0))).unwrap();
        m.map(0x20_0000, 0x4000, true, true, None).unwrap();
        m.write(a, b"before logging").unwrap();
        assert_eq!(m.report(a, 0x1000, 4096), Err(Errno::EINVAL), "logging is off");
        assert_eq!(m.start_logging(512, &[(a, 0x8000), (0x20_0000, 0x4000)], true), Ok(4096), "4 KiB at least");
        assert_eq!(m.start_logging(4096, &[], false), Err(Errno::EBUSY));
        for bad in [0, 3000, 6144, 2 << 30] {
            assert_eq!(GuestMem::new().start_logging(bad, &[], false), Err(Errno::EINVAL), "page size {bad}");
        }
        assert_eq!(m.report(a, 0x8000, 4096).unwrap(), vec![0], "nothing written since the start");
        m.write(b - 2, &[1; 4]).unwrap(); // spans the two mappings: pages 3 and 4 of the range
        m.write(b + 0x3000, &[1]).unwrap(); // page 7
        assert_eq!(m.report(a, 0x8000, 4096).unwrap(), vec![0b1001_1000]);
        assert_eq!(m.report(a, 0x8000, 4096).unwrap(), vec![0], "a report clears what it reports");
        m.write(a + 0x1000, &[1]).unwrap();
        assert_eq!(m.report(a, 0x8000, 8192).unwrap(), vec![0b0001], "coarser report pages coalesce");
        m.write(a + 0x2000, &[1]).unwrap();
        assert_eq!(m.report(a + 0x2000, 0x1000, 4096).unwrap(), vec![1], "a sub-range");
        // Outside the logged ranges, unaligned, or wrapping: refused.
        assert_eq!(m.report(a - 0x1000, 0x2000, 4096), Err(Errno::EINVAL));
        assert_eq!(m.report(a + 1, 0x1000, 4096), Err(Errno::EINVAL));
        assert_eq!(m.report(a, 0x1000, 3000), Err(Errno::EINVAL));
        // fd-less memory is the client's to track: always zero here.
        m.write(0x20_0000, &[1]).unwrap_or(());
        assert_eq!(m.report(0x20_0000, 0x4000, 4096).unwrap(), vec![0]);
        // What the device wrote into a mapping that goes away is still reported.
        m.write(b + 0x1000, &[1]).unwrap();
        m.unmap(b, 0x4000).unwrap();
        assert_eq!(m.report(a, 0x8000, 4096).unwrap(), vec![1 << 5]);
        // The audit remembers every page written while logging, whatever was reported.
        let pages: Vec<u64> = m.written_pages();
        assert_eq!(pages, vec![0x101, 0x102, 0x103, 0x104, 0x105, 0x107]);
        assert!(m.stop_logging());
        assert!(!m.stop_logging());
        assert!(m.written_pages().is_empty());
    }

    #[test]
    fn larger_logging_pages_replicate_and_keep_partial_pages() {
        let m = GuestMem::new();
        m.map(0, 0x40_0000, true, true, Some((memfd(0x40_0000), 0))).unwrap();
        assert_eq!(m.start_logging(0x20_0000, &[], false), Ok(0x20_0000));
        m.write(0x1000, &[1]).unwrap();
        // A 4 KiB report of the first 8 KiB: the 2 MiB logged page is only partly inside, so it is reported for
        // both 4 KiB pages and kept.
        assert_eq!(m.report(0, 0x2000, 4096).unwrap(), vec![0b11]);
        assert_eq!(m.report(0, 0x40_0000, 0x20_0000).unwrap(), vec![0b01], "then cleared by a whole report");
        assert_eq!(m.report(0, 0x40_0000, 0x20_0000).unwrap(), vec![0]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

        /// Reports at any page size over any aligned sub-range agree with a naive model of the logged pages, which
        /// a report clears only where it covers them entirely.
        #[test]
        fn reports_match_a_model(
            log_shift in 12u32..15,
            writes in proptest::collection::vec((0u64..0x10_0000, 1u64..9000), 0..40),
            reports in proptest::collection::vec((0u64..64, 1u64..64, 12u32..15), 1..6),
        ) {
            let m = GuestMem::new();
            m.map(0x10_0000, 0x8_0000, true, true, Some((memfd(0x8_0000), 0))).unwrap();
            m.map(0x18_0000, 0x8_0000, true, true, Some((memfd(0x8_0000), 0))).unwrap();
            let lp = 1u64 << log_shift;
            proptest::prop_assert_eq!(m.start_logging(lp, &[], false), Ok(lp));
            let mut model = std::collections::BTreeSet::new();
            for (off, len) in writes {
                let len = len.min(0x10_0000 - off);
                m.write(0x10_0000 + off, &vec![1u8; len as usize]).unwrap();
                for p in (0x10_0000 + off) / lp..=(0x10_0000 + off + len - 1) / lp {
                    model.insert(p);
                }
            }
            for (start, n, shift) in reports {
                let ps = 1u64 << shift;
                let iova = 0x10_0000 + (start * 0x4000) / ps * ps;
                let len = (n * ps).min(0x20_0000 - iova) / ps * ps;
                if len == 0 {
                    continue;
                }
                let got = m.report(iova, len, ps).unwrap();
                let mut want = vec![0u64; (len / ps).div_ceil(64) as usize];
                for bit in 0..len / ps {
                    let (a, b) = (iova + bit * ps, iova + (bit + 1) * ps);
                    if (a / lp..b.div_ceil(lp)).any(|p| model.contains(&p)) {
                        want[(bit / 64) as usize] |= 1 << (bit % 64);
                    }
                }
                proptest::prop_assert_eq!(&got, &want, "report {:#x}+{:#x} at {:#x} (logging {:#x})", iova, len, ps, lp);
                model.retain(|&p| !(p * lp >= iova && (p + 1) * lp <= iova + len));
            }
        }
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
