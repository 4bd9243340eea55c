//! One handler per client command, each with its validation. Handlers return the reply payload (and fds) or an
//! errno; the caller turns that into a reply. Nothing a client sends can make a handler panic: every field is
//! read through `Reader`, and every offset/count is checked with overflow-safe arithmetic before use.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use device::mem::GuestMem;
use device::{Errno, IrqAction, IrqData, VfioDevice};
use serde_json::{json, Value};
use vfio_bindings::bindings::vfio::*;

use crate::conn::Incoming;
use crate::limits::Limits;
use crate::migration::{MigState, Migration, Progress};
use crate::wire::*;

pub const MAX_MSG_FDS: usize = 16;
/// The largest data transfer a client may ask us to honour (QEMU's own ceiling).
const CLIENT_XFER_CEILING: u64 = 64 << 20;
const PAGE: u64 = 4096;
const MAX_WRITE_MULTI: u64 = 200;

pub const E2BIG: Errno = Errno(libc::E2BIG);
pub const ENOTTY: Errno = Errno(libc::ENOTTY);
pub const ENOSYS: Errno = Errno(libc::ENOSYS);
pub const ENOSPC: Errno = Errno(libc::ENOSPC);

/// What VERSION settled.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub client_max_xfer: usize,
    pub client_max_fds: usize,
    pub write_multiple: bool,
}

#[derive(Default)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl From<Writer> for Reply {
    fn from(w: Writer) -> Self {
        Reply { payload: w.0, fds: Vec::new() }
    }
}

pub type HResult = Result<Reply, Errno>;

/// What a handler did: a reply now, or (a migration transition waiting for the device to stop) later, from the
/// event loop.
pub enum Step {
    Reply(HResult),
    Wait,
}

impl From<HResult> for Step {
    fn from(r: HResult) -> Self {
        Step::Reply(r)
    }
}

/// DEVICE_FEATURE flags and feature indexes (vfio uapi).
pub mod feature {
    pub const MASK: u32 = 0xffff;
    pub const GET: u32 = 1 << 16;
    pub const SET: u32 = 1 << 17;
    pub const PROBE: u32 = 1 << 18;
    pub const MIGRATION: u32 = 1;
    pub const MIG_DEVICE_STATE: u32 = 2;
    pub const DMA_LOGGING_START: u32 = 6;
    pub const DMA_LOGGING_STOP: u32 = 7;
    pub const DMA_LOGGING_REPORT: u32 = 8;
    /// VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY.
    pub const MIGRATION_FLAGS: u64 = 1 | 4;
}

/// The reply to MIG_DEVICE_STATE: argsz, flags, the state, data_fd (unused in vfio-user: -1).
pub fn mig_state_reply(flags: u32, state: MigState) -> Reply {
    Writer::default().u32(16).u32(flags).u32(state as u32).u32(u32::MAX).into()
}

/// Logs why a request is rejected and yields its errno.
macro_rules! reject {
    ($errno:expr, $($arg:tt)*) => {{
        log::warn!($($arg)*);
        return Err($errno);
    }};
}

pub struct Ctx<'a, D: VfioDevice> {
    pub device: &'a mut D,
    pub mem: &'a GuestMem,
    pub negotiated: &'a mut Option<Negotiated>,
    pub limits: &'a Limits,
    pub mig: &'a mut Migration,
}

impl<D: VfioDevice> Ctx<'_, D> {
    /// Checks that apply to every command, then dispatches.
    pub fn handle(&mut self, msg: &mut Incoming) -> Step {
        if msg.header.cmd == CMD_DEVICE_FEATURE && self.negotiated.is_some() && self.common_checks(msg).is_ok() {
            return self.device_feature(&msg.payload);
        }
        self.handle_plain(msg).into()
    }

    fn common_checks(&self, msg: &Incoming) -> Result<(), Errno> {
        let h = msg.header;
        let name = command_name(h.cmd);
        if h.has_unknown_flags() || h.flags & FLAG_ERROR != 0 {
            reject!(Errno::EINVAL, "{name}: bad header flags {:#x}", h.flags);
        }
        if msg.fds_truncated && msg.fds.len() < MAX_MSG_FDS {
            // The kernel installs what fits and drops the rest: this process is at its open-file limit.
            reject!(
                Errno(libc::EMFILE),
                "{name}: the kernel dropped fds sent with it: the server is at its open-file limit (RLIMIT_NOFILE)"
            );
        }
        if msg.fds_truncated || msg.fds.len() > MAX_MSG_FDS {
            reject!(Errno::EINVAL, "{name}: more than {MAX_MSG_FDS} fds");
        }
        if !msg.fds.is_empty() && !matches!(h.cmd, CMD_DMA_MAP | CMD_DEVICE_SET_IRQS) {
            reject!(Errno::EINVAL, "{name}: takes no fds but {} came with it (closed)", msg.fds.len());
        }
        Ok(())
    }

    fn handle_plain(&mut self, msg: &mut Incoming) -> HResult {
        let h = msg.header;
        let name = command_name(h.cmd);
        self.common_checks(msg)?;
        if self.negotiated.is_none() && h.cmd != CMD_VERSION {
            reject!(Errno::EINVAL, "{name} before VERSION");
        }
        let p = &msg.payload;
        match h.cmd {
            CMD_VERSION => self.version(p),
            CMD_DMA_MAP => self.dma_map(p, std::mem::take(&mut msg.fds)),
            CMD_DMA_UNMAP => self.dma_unmap(p),
            CMD_DEVICE_GET_INFO => self.device_info(p),
            CMD_DEVICE_GET_REGION_INFO => self.region_info(p),
            CMD_DEVICE_GET_REGION_IO_FDS => self.region_io_fds(p),
            CMD_DEVICE_GET_IRQ_INFO => self.irq_info(p),
            CMD_DEVICE_SET_IRQS => self.set_irqs(p, std::mem::take(&mut msg.fds)),
            CMD_REGION_READ => self.region_read(p),
            CMD_REGION_WRITE => self.region_write(p),
            CMD_REGION_WRITE_MULTI => self.region_write_multi(p),
            CMD_DEVICE_RESET => self.reset(p),
            CMD_DEVICE_FEATURE => reject!(Errno::EINVAL, "DEVICE_FEATURE: not dispatched"),
            CMD_MIG_DATA_READ => self.mig_data_read(p),
            CMD_MIG_DATA_WRITE => self.mig_data_write(p),
            CMD_DMA_READ | CMD_DMA_WRITE => reject!(Errno::EINVAL, "{name} is a server-to-client command"),
            c => reject!(ENOSYS, "unknown command {c}"),
        }
    }

    fn version(&mut self, p: &[u8]) -> HResult {
        if self.negotiated.is_some() {
            reject!(Errno::EINVAL, "VERSION: already negotiated");
        }
        let mut r = Reader::new(p);
        let (Some(major), Some(minor)) = (r.u16(), r.u16()) else {
            reject!(Errno::EINVAL, "VERSION: payload of {} bytes is too short", p.len());
        };
        if major != 0 {
            reject!(Errno::EINVAL, "VERSION: major {major} not supported (only 0)");
        }
        let n = parse_caps(r.rest())?;
        log::info!(
            "client speaks vfio-user {major}.{minor}; its max_data_xfer_size {} max_msg_fds {} write_multiple {}",
            n.client_max_xfer,
            n.client_max_fds,
            n.write_multiple
        );
        let caps = json!({"capabilities": {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": self.limits.max_data_xfer,
            "pgsizes": PAGE,
            "max_dma_maps": self.limits.max_dma_maps,
            "write_multiple": n.write_multiple,
        }});
        *self.negotiated = Some(n);
        let mut s = caps.to_string().into_bytes();
        s.push(0);
        Ok(Writer::default().u16(0).u16(0).bytes(&s).into())
    }

    fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> HResult {
        let mut r = Reader::new(p);
        let (argsz, flags, offset, addr, size) = (r.u32(), r.u32(), r.u64(), r.u64(), r.u64());
        let (Some(argsz), Some(flags), Some(offset), Some(addr), Some(size)) = (argsz, flags, offset, addr, size)
        else {
            reject!(Errno::EINVAL, "DMA_MAP: payload of {} bytes, need 32", p.len());
        };
        let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
        if argsz != 32 || p.len() != 32 {
            reject!(Errno::EINVAL, "DMA_MAP: argsz {argsz} / payload {} (both must be 32)", p.len());
        }
        if flags & !rw != 0 || flags == 0 {
            reject!(Errno::EINVAL, "DMA_MAP: flags {flags:#x} (need READ and/or WRITE, nothing else)");
        }
        if size == 0 || addr % PAGE != 0 || size % PAGE != 0 || addr.checked_add(size).is_none() {
            reject!(Errno::EINVAL, "DMA_MAP: range {addr:#x}+{size:#x} is empty, unaligned or wraps");
        }
        if fds.len() > 1 {
            reject!(Errno::EINVAL, "DMA_MAP: {} fds, at most 1", fds.len());
        }
        let file = match fds.pop() {
            Some(_) if offset % PAGE != 0 => reject!(Errno::EINVAL, "DMA_MAP: fd offset {offset:#x} not page aligned"),
            Some(fd) => Some((File::from(fd), offset)),
            None => None,
        };
        if self.mem.len() >= self.limits.max_dma_maps {
            reject!(ENOSPC, "DMA_MAP: already {} mappings (--max-dma-regions)", self.limits.max_dma_maps);
        }
        let has_fd = file.is_some();
        self.mem
            .map(addr, size, flags & VFIO_DMA_MAP_FLAG_READ != 0, flags & VFIO_DMA_MAP_FLAG_WRITE != 0, file)
            .inspect_err(|e| log::warn!("DMA_MAP {addr:#x}+{size:#x}: {e}"))?;
        log::debug!("DMA_MAP {addr:#x}+{size:#x} flags {flags:#x} {}", if has_fd { "mmap'd" } else { "via messages" });
        Ok(Reply::default())
    }

    fn dma_unmap(&mut self, p: &[u8]) -> HResult {
        let mut r = Reader::new(p);
        let (Some(argsz), Some(flags), Some(addr), Some(size)) = (r.u32(), r.u32(), r.u64(), r.u64()) else {
            reject!(Errno::EINVAL, "DMA_UNMAP: payload of {} bytes, need 24", p.len());
        };
        if argsz != 24 || p.len() != 24 {
            reject!(Errno::EINVAL, "DMA_UNMAP: argsz {argsz} / payload {} (both must be 24)", p.len());
        }
        if flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            reject!(Errno::EINVAL, "DMA_UNMAP: flags {flags:#x} not supported");
        }
        if flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            if addr != 0 || size != 0 {
                reject!(Errno::EINVAL, "DMA_UNMAP: ALL with address {addr:#x} size {size:#x}");
            }
            log::debug!("DMA_UNMAP all ({} mappings)", self.mem.len());
            self.mem.unmap_all();
        } else {
            self.mem.unmap(addr, size).inspect_err(|_| log::warn!("DMA_UNMAP {addr:#x}+{size:#x}: no such mapping"))?;
            log::debug!("DMA_UNMAP {addr:#x}+{size:#x}");
        }
        Ok(Writer::default().bytes(p).into())
    }

    fn device_info(&mut self, p: &[u8]) -> HResult {
        fixed_argsz(p, 16, "DEVICE_GET_INFO")?;
        Ok(Writer::default()
            .u32(16)
            .u32(VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET)
            .u32(self.device.num_regions())
            .u32(self.device.num_irqs())
            .into())
    }

    fn region_info(&mut self, p: &[u8]) -> HResult {
        let argsz = fixed_argsz(p, 32, "DEVICE_GET_REGION_INFO")?;
        let index = Reader::new(&p[8..]).u32().unwrap_or(u32::MAX);
        let Some(info) = self.device.region_info(index) else {
            reject!(Errno::EINVAL, "DEVICE_GET_REGION_INFO: no region {index}");
        };
        let mut flags = 0;
        if info.read {
            flags |= VFIO_REGION_INFO_FLAG_READ;
        }
        if info.write {
            flags |= VFIO_REGION_INFO_FLAG_WRITE;
        }
        let mmap = if info.mmap_areas.is_empty() { None } else { self.device.region_mmap(index) };
        let mut caps = Writer::default();
        let mut offset = 0;
        if let Some(m) = &mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
            offset = m.offset;
            caps = caps.u16(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16).u16(1).u32(0);
            caps = caps.u32(info.mmap_areas.len() as u32).u32(0);
            for &(o, s) in &info.mmap_areas {
                caps = caps.u64(o).u64(s);
            }
        }
        let needed = 32 + caps.0.len() as u32;
        let fits = argsz >= needed;
        let cap_offset = if fits && !caps.0.is_empty() { 32 } else { 0 };
        // CAPS only when the chain is in this reply: QEMU 11.1.3 rejects CAPS with cap_offset 0, and retries on
        // argsz alone.
        if cap_offset != 0 {
            flags |= VFIO_REGION_INFO_FLAG_CAPS;
        }
        let mut w = Writer::default().u32(needed).u32(flags).u32(index).u32(cap_offset).u64(info.size).u64(offset);
        let mut fds = Vec::new();
        if fits {
            w = w.bytes(&caps.0);
            if let Some(m) = mmap {
                fds.push(m.fd);
            }
        }
        Ok(Reply { payload: w.0, fds })
    }

    fn region_io_fds(&mut self, p: &[u8]) -> HResult {
        fixed_argsz(p, 16, "DEVICE_GET_REGION_IO_FDS")?;
        let index = Reader::new(&p[8..]).u32().unwrap_or(u32::MAX);
        if self.device.region_info(index).is_none() {
            reject!(Errno::EINVAL, "DEVICE_GET_REGION_IO_FDS: no region {index}");
        }
        // No ioeventfds are offered: every region reports zero sub-regions.
        Ok(Writer::default().u32(16).u32(0).u32(index).u32(0).into())
    }

    /// The 16-byte vfio_irq_info, or for an index with capabilities (docs/remap-irq.md) the 24-byte form and its
    /// chain when the client's argsz has room for them.
    fn irq_info(&mut self, p: &[u8]) -> HResult {
        let argsz = fixed_argsz(p, 16, "DEVICE_GET_IRQ_INFO")?;
        let index = Reader::new(&p[8..]).u32().unwrap_or(u32::MAX);
        let Some(i) = self.device.irq_info(index) else {
            reject!(Errno::EINVAL, "DEVICE_GET_IRQ_INFO: no IRQ index {index}");
        };
        let mut chain = Vec::new();
        if let Some((ty, sub)) = i.cap_type {
            chain.push((VFU_IRQ_INFO_CAP_TYPE, Writer::default().u32(ty).u32(sub).0));
        }
        if let Some(regions) = i.remap_regions {
            chain.push((VFU_IRQ_INFO_CAP_REMAP_REGIONS, Writer::default().u64(regions).0));
        }
        let mut caps = Writer::default();
        for (k, (id, body)) in chain.iter().enumerate() {
            let end = 24 + caps.0.len() + 8 + body.len();
            let next = if k + 1 < chain.len() { end as u32 } else { 0 };
            caps = caps.u16(*id).u16(1).u32(next).bytes(body);
        }
        let flags = [
            (i.eventfd, VFIO_IRQ_INFO_EVENTFD),
            (i.maskable, VFIO_IRQ_INFO_MASKABLE),
            (i.automasked, VFIO_IRQ_INFO_AUTOMASKED),
            (i.noresize, VFIO_IRQ_INFO_NORESIZE),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, f)| acc | f);
        if caps.0.is_empty() {
            return Ok(Writer::default().u32(16).u32(flags).u32(index).u32(i.count).into());
        }
        let needed = 24 + caps.0.len() as u32;
        if argsz < needed {
            return Ok(Writer::default().u32(needed).u32(flags).u32(index).u32(i.count).into());
        }
        let w = Writer::default().u32(needed).u32(flags | VFU_IRQ_INFO_FLAG_CAPS).u32(index).u32(i.count);
        Ok(w.u32(24).u32(0).bytes(&caps.0).into())
    }

    fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> HResult {
        let mut r = Reader::new(p);
        let (Some(argsz), Some(flags), Some(index), Some(start), Some(count)) =
            (r.u32(), r.u32(), r.u32(), r.u32(), r.u32())
        else {
            reject!(Errno::EINVAL, "SET_IRQS: payload of {} bytes, need 20", p.len());
        };
        let data = r.rest();
        if argsz as usize != p.len() {
            reject!(Errno::EINVAL, "SET_IRQS: argsz {argsz} but payload {}", p.len());
        }
        let dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let atype = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0
            || dtype.count_ones() != 1
            || atype.count_ones() != 1
        {
            reject!(Errno::EINVAL, "SET_IRQS: flags {flags:#x} need exactly one data type and one action");
        }
        let Some(info) = self.device.irq_info(index) else {
            reject!(Errno::EINVAL, "SET_IRQS: no IRQ index {index}");
        };
        let action = match atype {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            _ => IrqAction::Trigger,
        };
        if count == 0 {
            if dtype != VFIO_IRQ_SET_DATA_NONE || atype != VFIO_IRQ_SET_ACTION_TRIGGER || start > info.count {
                reject!(Errno::EINVAL, "SET_IRQS: count 0 is only DATA_NONE|TRIGGER (disable) ({flags:#x})");
            }
            if !data.is_empty() || !fds.is_empty() {
                reject!(Errno::EINVAL, "SET_IRQS: disable carries no data");
            }
            log::debug!("SET_IRQS: index {index} disabled");
            self.device.set_irqs(index, IrqAction::Trigger, 0, 0, IrqData::None)?;
            return Ok(Reply::default());
        }
        if start.checked_add(count).is_none_or(|end| end > info.count) {
            reject!(Errno::EINVAL, "SET_IRQS: vectors {start}+{count} past index {index}'s {}", info.count);
        }
        if !matches!(action, IrqAction::Trigger) && (!info.maskable || dtype == VFIO_IRQ_SET_DATA_EVENTFD) {
            reject!(Errno::EINVAL, "SET_IRQS: mask/unmask needs a maskable index and NONE/BOOL data ({flags:#x})");
        }
        let irq_data = match dtype {
            VFIO_IRQ_SET_DATA_NONE if data.is_empty() && fds.is_empty() => IrqData::None,
            VFIO_IRQ_SET_DATA_BOOL if data.len() == count as usize && fds.is_empty() => {
                IrqData::Bool(data.iter().map(|&b| b != 0).collect())
            }
            VFIO_IRQ_SET_DATA_EVENTFD if data.is_empty() && (fds.is_empty() || fds.len() == count as usize) => {
                if let Some(bad) = fds.iter().find(|f| !is_eventfd(f)) {
                    reject!(Errno::EINVAL, "SET_IRQS: fd {} is not an eventfd", bad.as_raw_fd());
                }
                // A blocking eventfd at its maximum count would block our signal write under the device lock
                // forever; non-blocking, such a write just fails (the interrupt is already pending client-side).
                for fd in &fds {
                    let fl = rustix::fs::fcntl_getfl(fd).map_err(|e| Errno(e.raw_os_error()))?;
                    rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)
                        .map_err(|e| Errno(e.raw_os_error()))?;
                }
                IrqData::Eventfd(fds)
            }
            _ => reject!(
                Errno::EINVAL,
                "SET_IRQS: data type {dtype:#x} with {} data bytes and {} fds for {count} vectors",
                data.len(),
                fds.len()
            ),
        };
        log::debug!("SET_IRQS: index {index} vectors {start}+{count} {action:?} {irq_data:?}");
        self.device.set_irqs(index, action, start, count, irq_data)?;
        Ok(Reply::default())
    }

    /// Validates a region access and returns the region's index.
    fn check_access(&self, name: &str, region: u32, offset: u64, count: u32, write: bool) -> Result<(), Errno> {
        if count as usize > self.limits.max_data_xfer {
            reject!(E2BIG, "{name}: {count} bytes exceeds max_data_xfer_size {}", self.limits.max_data_xfer);
        }
        let Some(info) = self.device.region_info(region) else {
            reject!(Errno::EINVAL, "{name}: no region {region}");
        };
        let in_bounds = offset.checked_add(u64::from(count)).is_some_and(|end| end <= info.size);
        if count == 0 || !in_bounds || !(if write { info.write } else { info.read }) {
            reject!(Errno::EINVAL, "{name}: region {region} offset {offset:#x} count {count} (size {:#x})", info.size);
        }
        Ok(())
    }

    fn region_read(&mut self, p: &[u8]) -> HResult {
        let mut r = Reader::new(p);
        let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "REGION_READ: payload of {} bytes, need 16", p.len());
        };
        if p.len() != 16 {
            reject!(Errno::EINVAL, "REGION_READ: payload of {} bytes, need 16", p.len());
        }
        self.check_access("REGION_READ", region, offset, count, false)?;
        let mut w = Writer(Vec::with_capacity(16 + count as usize)).u64(offset).u32(region).u32(count);
        w.0.resize(16 + count as usize, 0);
        self.device.region_read(region, offset, &mut w.0[16..])?;
        Ok(w.into())
    }

    fn region_write(&mut self, p: &[u8]) -> HResult {
        let mut r = Reader::new(p);
        let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "REGION_WRITE: payload of {} bytes, need 16 + data", p.len());
        };
        let data = r.rest();
        if data.len() != count as usize {
            reject!(Errno::EINVAL, "REGION_WRITE: count {count} but {} data bytes", data.len());
        }
        self.check_access("REGION_WRITE", region, offset, count, true)?;
        self.device.region_write(region, offset, data)?;
        Ok(Writer::default().u64(offset).u32(region).u32(count).into())
    }

    fn region_write_multi(&mut self, p: &[u8]) -> HResult {
        if !self.negotiated.as_ref().is_some_and(|n| n.write_multiple) {
            reject!(Errno::EINVAL, "REGION_WRITE_MULTI: write_multiple was not negotiated");
        }
        let mut r = Reader::new(p);
        let Some(n) = r.u64() else {
            reject!(Errno::EINVAL, "REGION_WRITE_MULTI: payload of {} bytes", p.len());
        };
        if n == 0 || n > MAX_WRITE_MULTI || p.len() as u64 != 8 + 24 * n {
            reject!(Errno::EINVAL, "REGION_WRITE_MULTI: wr_cnt {n} with {} payload bytes", p.len());
        }
        let mut writes = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (offset, region, count, data) = (r.u64(), r.u32(), r.u32(), r.bytes(8));
            let (Some(offset), Some(region), Some(count), Some(data)) = (offset, region, count, data) else {
                reject!(Errno::EINVAL, "REGION_WRITE_MULTI: truncated entry");
            };
            if count > 8 {
                reject!(Errno::EINVAL, "REGION_WRITE_MULTI: entry count {count} > 8");
            }
            self.check_access("REGION_WRITE_MULTI", region, offset, count, true)?;
            writes.push((region, offset, &data[..count as usize]));
        }
        for (region, offset, data) in writes {
            self.device.region_write(region, offset, data)?;
        }
        Ok(Writer::default().u64(n).into())
    }

    fn reset(&mut self, p: &[u8]) -> HResult {
        if !p.is_empty() {
            reject!(Errno::EINVAL, "DEVICE_RESET: unexpected {} payload bytes", p.len());
        }
        self.device.reset();
        if let Some(m) = self.device.migration() {
            self.mig.reset(m);
        }
        Ok(Reply::default())
    }

    /// DEVICE_FEATURE: migration (v2) and DMA logging; any other feature gets ENOTTY, as from the kernel.
    fn device_feature(&mut self, p: &[u8]) -> Step {
        self.feature(p).unwrap_or_else(|e| Step::Reply(Err(e)))
    }

    fn feature(&mut self, p: &[u8]) -> Result<Step, Errno> {
        use feature::*;
        let mut r = Reader::new(p);
        let (Some(argsz), Some(flags)) = (r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "DEVICE_FEATURE: payload of {} bytes, need 8", p.len());
        };
        let data = r.rest();
        let (index, get, set, probe) = (flags & MASK, flags & GET != 0, flags & SET != 0, flags & PROBE != 0);
        if flags & !(MASK | GET | SET | PROBE) != 0 || (get && set && !probe) || !(get || set || probe) {
            reject!(Errno::EINVAL, "DEVICE_FEATURE: flags {flags:#x}: one of GET, SET (or PROBE with either)");
        }
        let (can_get, can_set) = match index {
            MIGRATION | DMA_LOGGING_REPORT => (true, false),
            MIG_DEVICE_STATE => (true, true),
            DMA_LOGGING_START | DMA_LOGGING_STOP => (false, true),
            _ => reject!(ENOTTY, "DEVICE_FEATURE: feature {index} is not supported"),
        };
        let Some(dev) = self.device.migration() else {
            reject!(ENOTTY, "DEVICE_FEATURE: this device does not migrate");
        };
        if (get && !can_get) || (set && !can_set) {
            reject!(
                Errno::EINVAL,
                "DEVICE_FEATURE: feature {index} does not support {}",
                if get { "GET" } else { "SET" }
            );
        }
        if probe {
            return Ok(Step::Reply(Ok(Writer::default().bytes(p).into())));
        }
        let fixed = |need: u32, what: &str| -> Result<(), Errno> {
            if argsz < need {
                reject!(Errno::EINVAL, "DEVICE_FEATURE {what}: argsz {argsz}, the reply needs {need}");
            }
            Ok(())
        };
        Ok(Step::Reply(match index {
            MIGRATION => {
                fixed(16, "MIGRATION")?;
                Ok(Writer::default().u32(16).u32(flags).u64(MIGRATION_FLAGS).into())
            }
            MIG_DEVICE_STATE if get => {
                fixed(16, "MIG_DEVICE_STATE")?;
                Ok(mig_state_reply(flags, self.mig.state()))
            }
            MIG_DEVICE_STATE => {
                fixed(16, "MIG_DEVICE_STATE")?;
                let Some(raw) = Reader::new(data).u32() else {
                    reject!(Errno::EINVAL, "MIG_DEVICE_STATE SET: {} data bytes, need 8", data.len());
                };
                let target = match MigState::from_u32(raw) {
                    Some(MigState::Error) | None => {
                        reject!(Errno::EINVAL, "MIG_DEVICE_STATE SET: state {raw} cannot be requested (P2P states and ERROR are not offered)")
                    }
                    Some(t) => t,
                };
                match self.mig.set_state(target, dev, self.mem)? {
                    Progress::Done => Ok(mig_state_reply(flags, self.mig.state())),
                    Progress::Waiting => return Ok(Step::Wait),
                }
            }
            DMA_LOGGING_START => {
                // The reply is the request (with the page size chosen): argsz must hold it.
                fixed(p.len() as u32, "DMA_LOGGING_START")?;
                self.logging_start(flags, data)
            }
            DMA_LOGGING_STOP => {
                fixed(p.len() as u32, "DMA_LOGGING_STOP")?;
                if !self.mem.stop_logging() {
                    log::info!("DMA_LOGGING_STOP while logging was off");
                } else {
                    log::info!("DMA logging stopped");
                }
                Ok(Writer::default().bytes(p).into())
            }
            _ => self.logging_report(argsz, flags, data),
        }))
    }

    /// Runs a logging step; with `--dirty-log descriptors` (docs/remap-irq.md), inside the device's window, then
    /// marks the pages of descriptors still outstanding so the next REPORT has them.
    fn derived<R>(&mut self, step: impl FnOnce(&GuestMem) -> R) -> R {
        let Some(dev) = self.device.migration().filter(|_| self.mem.derived_log()) else { return step(self.mem) };
        let mem = self.mem;
        let mut step = Some(step);
        let mut out = None;
        let ranges = dev.outstanding_dma(&mut || out = step.take().map(|f| f(mem)));
        if mem.deriving() {
            for (a, l) in ranges {
                mem.mark_derived(a, l);
            }
        }
        out.expect("the device ran the step")
    }

    fn logging_start(&mut self, flags: u32, data: &[u8]) -> HResult {
        let mut r = Reader::new(data);
        let (Some(page_size), Some(n), Some(_)) = (r.u64(), r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "DMA_LOGGING_START: {} data bytes, need 16 + 16 per range", data.len());
        };
        if n as usize > device::mem::MAX_LOG_RANGES || data.len() != 16 + 16 * n as usize {
            reject!(Errno::EINVAL, "DMA_LOGGING_START: {n} ranges in {} data bytes", data.len());
        }
        let ranges: Vec<(u64, u64)> = (0..n).map(|_| (r.u64().unwrap_or(0), r.u64().unwrap_or(0))).collect();
        let audit = self.mig.audit_enabled();
        let chosen = self.derived(|mem| mem.start_logging(page_size, &ranges, audit))?;
        log::info!(
            "DMA logging started: {} pages, {}",
            chosen,
            if n == 0 { "all memory".to_string() } else { format!("{n} ranges") }
        );
        Ok(Writer::default().u32(8 + data.len() as u32).u32(flags).u64(chosen).bytes(&data[8..]).into())
    }

    fn logging_report(&mut self, argsz: u32, flags: u32, data: &[u8]) -> HResult {
        let mut r = Reader::new(data);
        let (Some(iova), Some(len), Some(page_size)) = (r.u64(), r.u64(), r.u64()) else {
            reject!(Errno::EINVAL, "DMA_LOGGING_REPORT: {} data bytes, need 24", data.len());
        };
        if data.len() != 24 || page_size == 0 {
            reject!(Errno::EINVAL, "DMA_LOGGING_REPORT: {} data bytes / page size {page_size}", data.len());
        }
        let words = (len / page_size).div_ceil(64);
        let need = 8 + 24 + 8 * words;
        let max = self.negotiated.as_ref().map_or(1 << 20, |n| n.client_max_xfer) as u64;
        if 8 * words > max {
            reject!(
                E2BIG,
                "DMA_LOGGING_REPORT: a {}-byte bitmap exceeds the client's max_data_xfer_size {max}",
                8 * words
            );
        }
        if u64::from(argsz) < need {
            reject!(Errno::EINVAL, "DMA_LOGGING_REPORT: argsz {argsz}, the bitmap needs {need}");
        }
        let bits = self.derived(|mem| mem.report(iova, len, page_size))?;
        self.mig.stats.reports += 1;
        self.mig.stats.dirty_pages_reported += bits.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
        let mut w = Writer(Vec::with_capacity(need as usize)).u32(need as u32).u32(flags).bytes(data);
        for b in bits {
            w = w.u64(b);
        }
        Ok(w.into())
    }

    fn mig_data_read(&mut self, p: &[u8]) -> HResult {
        let mut r = Reader::new(p);
        let (Some(argsz), Some(size)) = (r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "MIG_DATA_READ: payload of {} bytes, need 8", p.len());
        };
        let max = self.negotiated.as_ref().map_or(1 << 20, |n| n.client_max_xfer).min(self.limits.max_data_xfer);
        if p.len() != 8 || size as usize > max {
            reject!(
                if p.len() != 8 { Errno::EINVAL } else { E2BIG },
                "MIG_DATA_READ: size {size} (at most {max}), payload {}",
                p.len()
            );
        }
        if (argsz as u64) < 8 + u64::from(size) {
            reject!(Errno::EINVAL, "MIG_DATA_READ: argsz {argsz} < 8 + size {size}");
        }
        let data = self.mig.read(size as usize)?;
        Ok(Writer(Vec::with_capacity(8 + data.len()))
            .u32(8 + data.len() as u32)
            .u32(data.len() as u32)
            .bytes(data)
            .into())
    }

    fn mig_data_write(&mut self, p: &[u8]) -> HResult {
        let mut r = Reader::new(p);
        let (Some(_argsz), Some(size)) = (r.u32(), r.u32()) else {
            reject!(Errno::EINVAL, "MIG_DATA_WRITE: payload of {} bytes, need 8 + data", p.len());
        };
        let data = r.rest();
        if data.len() != size as usize {
            reject!(Errno::EINVAL, "MIG_DATA_WRITE: size {size} but {} data bytes", data.len());
        }
        let Some(dev) = self.device.migration() else {
            reject!(ENOTTY, "MIG_DATA_WRITE: this device does not migrate");
        };
        self.mig.write(data, dev)?;
        Ok(Reply::default())
    }
}

/// Checks a request that starts with argsz and has a fixed part of `min` bytes; returns argsz.
fn fixed_argsz(p: &[u8], min: u32, name: &str) -> Result<u32, Errno> {
    let argsz = Reader::new(p).u32();
    match argsz {
        Some(a) if p.len() >= min as usize && a >= min => Ok(a),
        _ => reject!(Errno::EINVAL, "{name}: payload {} bytes / argsz {argsz:?}, need {min}", p.len()),
    }
}

/// Parses VERSION's optional NUL-terminated JSON. Unknown keys are ignored, known keys must have the right type.
fn parse_caps(json: &[u8]) -> Result<Negotiated, Errno> {
    // The spec's defaults for a client that names neither.
    let mut n = Negotiated { client_max_xfer: 1 << 20, client_max_fds: 1, write_multiple: false };
    if json.is_empty() {
        return Ok(n);
    }
    let Some((&0, text)) = json.split_last() else {
        reject!(Errno::EINVAL, "VERSION: capabilities are not NUL-terminated");
    };
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => reject!(Errno::EINVAL, "VERSION: capabilities are not JSON: {e}"),
    };
    let Some(obj) = v.as_object() else {
        reject!(Errno::EINVAL, "VERSION: capabilities JSON is not an object");
    };
    let Some(caps) = obj.get("capabilities") else {
        return Ok(n);
    };
    let Some(caps) = caps.as_object() else {
        reject!(Errno::EINVAL, "VERSION: \"capabilities\" is not an object");
    };
    let num = |k: &str| -> Result<Option<u64>, Errno> {
        match caps.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x)),
                None => reject!(Errno::EINVAL, "VERSION: \"{k}\" is not a non-negative integer"),
            },
        }
    };
    if let Some(x) = num("max_msg_fds")? {
        n.client_max_fds = x.min(253) as usize;
    }
    if let Some(x) = num("max_data_xfer_size")? {
        if x == 0 {
            reject!(Errno::EINVAL, "VERSION: max_data_xfer_size 0");
        }
        n.client_max_xfer = x.min(CLIENT_XFER_CEILING) as usize;
    }
    if let Some(x) = num("pgsizes")? {
        if x & PAGE == 0 {
            reject!(Errno::EINVAL, "VERSION: pgsizes {x:#x} lacks 4 KiB pages");
        }
    }
    num("max_dma_maps")?;
    match caps.get("write_multiple") {
        None => {}
        Some(Value::Bool(b)) => n.write_multiple = *b,
        Some(_) => reject!(Errno::EINVAL, "VERSION: \"write_multiple\" is not a boolean"),
    }
    for k in ["migration", "twin_socket"] {
        if caps.get(k).is_some_and(|v| !v.is_object()) {
            reject!(Errno::EINVAL, "VERSION: \"{k}\" is not an object");
        }
    }
    Ok(n)
}

/// SET_IRQS must not turn a regular file or socket into an interrupt line: we only write 8-byte counters to
/// eventfds.
fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parsing() {
        let q = br#"{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"pgsize":4096},"write_multiple":true}}"#;
        let mut v = q.to_vec();
        v.push(0);
        let n = parse_caps(&v).unwrap();
        assert_eq!((n.client_max_xfer, n.client_max_fds, n.write_multiple), (1 << 20, 16, true));
        assert_eq!(parse_caps(q).unwrap_err(), Errno::EINVAL, "no NUL");
        assert_eq!(parse_caps(b"[1]\0").unwrap_err(), Errno::EINVAL);
        assert_eq!(parse_caps(b"{\"capabilities\":{\"max_msg_fds\":-1}}\0").unwrap_err(), Errno::EINVAL);
        assert_eq!(parse_caps(b"{\"capabilities\":{\"pgsizes\":8192}}\0").unwrap_err(), Errno::EINVAL);
        assert_eq!(
            parse_caps(b"{\"capabilities\":{\"max_data_xfer_size\":1099511627776}}\0").unwrap().client_max_xfer,
            64 << 20
        );
        assert_eq!(parse_caps(b"").unwrap().client_max_fds, 1);
    }

    /// A device whose region 0 offers two mmap areas backed by a memfd.
    struct MmapDev(OwnedFd);

    impl VfioDevice for MmapDev {
        fn num_regions(&self) -> u32 {
            1
        }
        fn num_irqs(&self) -> u32 {
            0
        }
        fn region_info(&self, index: u32) -> Option<device::RegionInfo> {
            (index == 0).then(|| device::RegionInfo {
                size: 0x10000,
                read: true,
                write: true,
                mmap_areas: vec![(0, 0x1000), (0x3000, 0x2000)],
            })
        }
        fn region_mmap(&self, _: u32) -> Option<device::RegionMmap> {
            Some(device::RegionMmap { fd: self.0.try_clone().unwrap(), offset: 0x40000 })
        }
        fn irq_info(&self, index: u32) -> Option<device::IrqInfo> {
            // A remap IRQ that may name regions 0 and 3 (docs/remap-irq.md).
            (index == 5).then_some(device::IrqInfo {
                count: 1,
                eventfd: true,
                maskable: true,
                automasked: true,
                cap_type: Some((1, 0)),
                remap_regions: Some(0b1001),
                ..Default::default()
            })
        }
        fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> device::DevResult<()> {
            Ok(())
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> device::DevResult<()> {
            Ok(())
        }
        fn set_irqs(&mut self, _: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> device::DevResult<()> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn client_gone(&mut self) {}
    }

    #[test]
    fn irq_info_capability_chain_and_argsz_retry() {
        let fd = rustix::fs::memfd_create("region", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut dev = MmapDev(fd);
        let mem = GuestMem::new();
        let mut neg = Some(Negotiated { client_max_xfer: 1 << 20, client_max_fds: 16, write_multiple: false });
        let limits = Limits::default();
        let mut mig = Migration::new(false);
        let mut ctx = Ctx { device: &mut dev, mem: &mem, negotiated: &mut neg, limits: &limits, mig: &mut mig };
        let req = |argsz: u32| Writer::default().u32(argsz).u32(0).u32(5).u32(0).0;
        let flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED;

        // The legacy 16 bytes, argsz saying what the chain needs, no CAPS flag.
        let r = ctx.irq_info(&req(16)).unwrap();
        let mut rd = Reader::new(&r.payload);
        assert_eq!((rd.u32(), rd.u32(), rd.u32(), rd.u32()), (Some(56), Some(flags), Some(5), Some(1)));
        assert_eq!(r.payload.len(), 16);

        let r = ctx.irq_info(&req(56)).unwrap();
        assert_eq!(r.payload.len(), 56);
        let mut rd = Reader::new(&r.payload);
        let head = (rd.u32(), rd.u32(), rd.u32(), rd.u32(), rd.u32(), rd.u32());
        assert_eq!(head, (Some(56), Some(flags | VFU_IRQ_INFO_FLAG_CAPS), Some(5), Some(1), Some(24), Some(0)));
        // TYPE {1, 0} at 24, next 40; REMAP_REGIONS {0b1001} at 40, last.
        assert_eq!((rd.u16(), rd.u16(), rd.u32(), rd.u32(), rd.u32()), (Some(1), Some(1), Some(40), Some(1), Some(0)));
        assert_eq!((rd.u16(), rd.u16(), rd.u32(), rd.u64()), (Some(2), Some(1), Some(0), Some(0b1001)));
    }

    #[test]
    fn sparse_mmap_capability_and_argsz_retry() {
        let fd = rustix::fs::memfd_create("region", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut dev = MmapDev(fd);
        let mem = GuestMem::new();
        let mut neg = Some(Negotiated { client_max_xfer: 1 << 20, client_max_fds: 16, write_multiple: false });
        let limits = Limits::default();
        let mut mig = Migration::new(false);
        let mut ctx = Ctx { device: &mut dev, mem: &mem, negotiated: &mut neg, limits: &limits, mig: &mut mig };
        let req = |argsz: u32| Writer::default().u32(argsz).u32(0).u32(0).u32(0).u64(0).u64(0).0;
        let need = 32 + 8 + 8 + 2 * 16;

        // Too small: the fixed part only, argsz says what is needed, no capability (so no CAPS flag) and no fd yet.
        let r = ctx.region_info(&req(32)).unwrap();
        let mut rd = Reader::new(&r.payload);
        let (argsz, flags, index, cap_off, size, off) = (
            rd.u32().unwrap(),
            rd.u32().unwrap(),
            rd.u32().unwrap(),
            rd.u32().unwrap(),
            rd.u64().unwrap(),
            rd.u64().unwrap(),
        );
        assert_eq!((argsz, index, cap_off, size, off), (need, 0, 0, 0x10000, 0x40000));
        let all = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;
        assert_eq!(flags, all);
        assert_eq!(r.payload.len(), 32);
        assert!(r.fds.is_empty());

        // Retry with the size asked for: the capability chain and exactly one fd.
        let r = ctx.region_info(&req(need)).unwrap();
        assert_eq!(r.payload.len(), need as usize);
        assert_eq!(r.fds.len(), 1);
        let mut rd = Reader::new(&r.payload[4..]);
        assert_eq!(rd.u32(), Some(all | VFIO_REGION_INFO_FLAG_CAPS), "CAPS with the chain");
        let mut rd = Reader::new(&r.payload[12..]);
        assert_eq!(rd.u32(), Some(32), "cap_offset");
        let mut cap = Reader::new(&r.payload[32..]);
        assert_eq!((cap.u16(), cap.u16(), cap.u32()), (Some(1), Some(1), Some(0)), "sparse mmap id 1 v1, last");
        assert_eq!((cap.u32(), cap.u32()), (Some(2), Some(0)));
        assert_eq!((cap.u64(), cap.u64(), cap.u64(), cap.u64()), (Some(0), Some(0x1000), Some(0x3000), Some(0x2000)));
    }
}
