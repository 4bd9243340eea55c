//! The interface the server drives: one trait for what a vfio-user client sees behind the socket (regions, IRQs,
//! reset), and the small types it passes. Nothing here knows about sockets or message formats.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::stream::Extra;

/// An errno for the reply, with the reason already logged by whoever chose it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

pub type DevResult<T> = Result<T, Errno>;

/// A region as DEVICE_GET_REGION_INFO describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    pub read: bool,
    pub write: bool,
    /// Directly mappable areas (offset, size) within the region, backed by `RegionMmap::fd`.
    pub mmap_areas: Vec<(u64, u64)>,
}

/// The fd and offset a client mmaps for a region that offers mmap areas.
pub struct RegionMmap {
    pub fd: OwnedFd,
    pub offset: u64,
}

/// An interrupt index as DEVICE_GET_IRQ_INFO describes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    pub count: u32,
    pub eventfd: bool,
    pub maskable: bool,
    pub automasked: bool,
    pub noresize: bool,
    /// A device-specific index's (type, subtype), for the IRQ info capability chain.
    pub cap_type: Option<(u32, u32)>,
    /// The remap IRQ's capability: region indexes it may signal (docs/remap-irq.md).
    pub remap_regions: Option<u64>,
}

/// What SET_IRQS asks for, already validated for shape by the server.
#[derive(Debug)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

/// SET_IRQS data: the vectors `start..start + count` it applies to are implied by the variant's length, except
/// for `None`.
#[derive(Debug)]
pub enum IrqData {
    /// Applies to every vector in range.
    None,
    /// One flag per vector.
    Bool(Vec<bool>),
    /// One eventfd per vector; empty de-assigns every vector in range.
    Eventfd(Vec<OwnedFd>),
}

/// The device behind a vfio-user socket. Methods are called from the protocol thread and must never block on the
/// client: work that needs guest memory goes to the device's own workers.
pub trait VfioDevice: Send {
    fn num_regions(&self) -> u32;
    fn num_irqs(&self) -> u32;
    /// `None` for an index past `num_regions`.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// The mmap backing of a region that reports mmap areas.
    fn region_mmap(&self, _index: u32) -> Option<RegionMmap> {
        None
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// `offset + data.len()` is within the region (checked by the server).
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> DevResult<()>;
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DevResult<()>;
    /// `start + count` is within the index (checked by the server); `count` is 0 only for "disable the index".
    fn set_irqs(&mut self, index: u32, action: IrqAction, start: u32, count: u32, data: IrqData) -> DevResult<()>;
    /// DEVICE_RESET: back to power-on state.
    fn reset(&mut self);
    /// The client went away: forget everything it gave us (eventfds), keep device state.
    fn client_gone(&mut self);
    /// The device's migration support, if it has any.
    fn migration(&self) -> Option<&dyn Migratable> {
        None
    }
}

/// What vfio-user migration v2 needs from a device: a freeze that may take a moment (the server waits for it
/// without blocking), and its state as stream records (docs/migration-stream.md).
pub trait Migratable {
    /// Starts a freeze and returns at once; [`Migratable::is_paused`] says when it is complete.
    fn request_pause(&self);
    fn is_paused(&self) -> bool;
    fn resume(&self);
    /// Called (on a device thread) when a requested pause completes.
    fn set_pause_notifier(&self, notify: Arc<dyn Fn() + Send + Sync>);
    /// The migration state entered one in which the device must see every access (false: PRE_COPY, STOP_COPY,
    /// RESUMING) or may offer its fast path again (true: RUNNING). See docs/remap-irq.md.
    fn fast_path(&self, _allowed: bool) {}
    /// `--dirty-log descriptors`: runs `during` (DMA_LOGGING_START or a REPORT's harvest) while no device engine
    /// takes new descriptors, and returns the guest memory the device may still write through descriptors it was
    /// given before (the caller marks it afterwards). See docs/remap-irq.md.
    fn outstanding_dma(&self, during: &mut dyn FnMut()) -> Vec<(u64, u64)> {
        during();
        Vec::new()
    }
    /// The PRE_COPY record: what a destination must match.
    fn compat_record(&self) -> Vec<u8>;
    /// The STOP_COPY record, with the caller's extra sections; needs a complete pause.
    fn state_record(&self, extras: &[Extra]) -> Result<Vec<u8>, String>;
    /// Checks a compat record against this device (a destination refusing an incompatible source early).
    fn check_compat(&self, record: &[u8]) -> Result<(), String>;
    /// Loads a state record (needs a complete pause); returns the extra sections of `extra_kinds` it carried.
    /// On error nothing changed.
    fn load_record(&self, record: &[u8], extra_kinds: &[u16]) -> Result<Vec<Extra>, String>;
}
