//! The remap IRQ, client side (docs/remap-irq.md): discovery by type among the device-specific IRQ indexes, enabling
//! it with one eventfd, and a handler thread per connection that, on each signal, re-queries REGION_INFO for every
//! region named in the value, munmaps the areas no longer listed, mmaps the newly listed ones and acknowledges.
//! [`Mappings`] holds what is mapped; the vCPU's bus stores into it while an area covers the offset
//! (`vcpu::VmmBus`). The handler runs beside the migration thread: nothing waits for it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use super::proto::{call, Result};
use super::{Shared, PHASES};
use crate::client::set_irqs_payload;
use crate::util::eventfd_take;
use crate::wire::*;
use crate::Client;

/// `struct vfu_irq_info` flag: cap_offset and the chain are present.
pub const VFU_IRQ_INFO_FLAG_CAPS: u32 = 1 << 4;
/// IRQ info capability ids.
pub const VFU_IRQ_INFO_CAP_TYPE: u16 = 1;
pub const VFU_IRQ_INFO_CAP_REMAP_REGIONS: u16 = 2;
/// The remap IRQ's type and subtype.
pub const VFU_IRQ_TYPE_REMAP: u32 = 1;
pub const VFU_IRQ_SUBTYPE_REMAP_SPARSE_MMAP: u32 = 0;
/// VFIO_REGION_INFO_CAP_SPARSE_MMAP.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// vfio_irq_info flags.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;

/// VFIO_PCI_NUM_IRQS: device-specific IRQ indexes start here.
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

/// Largest info reply asked for after an argsz retry (a server asking for more is broken).
const MAX_INFO_BYTES: u32 = 64 * 1024;
/// Capabilities followed in one chain, at most (a loop in `next` must not hang the client).
const MAX_CAPS: usize = 64;

/// When the client acknowledges a signal that withdraws an area it has mapped (a revocation). Signals that only
/// add areas (offers) are handled and acknowledged at once under every policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// Re-query, munmap, acknowledge as soon as the signal is read.
    #[default]
    Prompt,
    /// Keep the old mappings (and keep storing into them) for this many milliseconds, then munmap and acknowledge.
    Delay(u64),
    /// Read the signal, keep the stale mappings, keep storing into them, never acknowledge.
    Never,
}

impl FromStr for AckPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "prompt" => Ok(AckPolicy::Prompt),
            "never" => Ok(AckPolicy::Never),
            _ => s
                .strip_prefix("delay:")
                .and_then(|ms| ms.parse().ok())
                .map(AckPolicy::Delay)
                .ok_or_else(|| format!("'{s}' is not prompt, delay:MS or never")),
        }
    }
}

impl fmt::Display for AckPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckPolicy::Prompt => write!(f, "prompt"),
            AckPolicy::Delay(ms) => write!(f, "delay:{ms}"),
            AckPolicy::Never => write!(f, "never"),
        }
    }
}

impl Serialize for AckPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

// ---- discovery ---------------------------------------------------------------------------------------------

/// DEVICE_GET_INFO: (num_regions, num_irqs).
pub fn device_info(c: &mut Client) -> Result<(u32, u32)> {
    let r =
        call(c, cmd::DEVICE_GET_INFO, &Payload::new().u32(16).u32(0).u32(0).u32(0).build(), &[], "DEVICE_GET_INFO")?;
    if r.payload.len() < 16 {
        return Err(format!("DEVICE_GET_INFO: reply of {} bytes", r.payload.len()));
    }
    Ok((r.u32_at(8), r.u32_at(12)))
}

/// DEVICE_GET_IRQ_INFO with argsz 16, asked again with the argsz the reply says it needs: the whole reply.
pub fn irq_info(c: &mut Client, index: u32) -> Result<Vec<u8>> {
    let mut argsz = 16;
    loop {
        let p = Payload::new().u32(argsz).u32(0).u32(index).u32(0).build();
        let r = call(c, cmd::DEVICE_GET_IRQ_INFO, &p, &[], &format!("IRQ_INFO {index}"))?;
        if r.payload.len() < 16 {
            return Err(format!("IRQ_INFO {index}: reply of {} bytes", r.payload.len()));
        }
        let need = r.u32_at(0);
        if need <= argsz || r.payload.len() >= need as usize {
            return Ok(r.payload);
        }
        if need > MAX_INFO_BYTES || argsz != 16 {
            return Err(format!("IRQ_INFO {index}: asked with argsz {argsz}, the server wants {need}"));
        }
        argsz = need;
    }
}

/// What an IRQ info capability chain says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqCaps {
    pub cap_type: Option<(u32, u32)>,
    pub regions: Option<u64>,
}

/// Walks an IRQ info reply's capability chain (none without VFU_IRQ_INFO_FLAG_CAPS); unknown ids are skipped.
pub fn parse_irq_caps(p: &[u8]) -> Result<IrqCaps> {
    let mut caps = IrqCaps::default();
    if p.len() < 16 || le_u32(p, 4) & VFU_IRQ_INFO_FLAG_CAPS == 0 {
        return Ok(caps);
    }
    if p.len() < 24 {
        return Err(format!("IRQ info: CAPS set in a {}-byte reply", p.len()));
    }
    let mut at = le_u32(p, 16) as usize;
    let mut hops = 0;
    while at != 0 {
        hops += 1;
        if at < 24 || at + 8 > p.len() || hops > MAX_CAPS {
            return Err(format!("IRQ info: capability at {at} outside the {}-byte reply (or a loop)", p.len()));
        }
        let (id, next) = (le_u16(p, at), le_u32(p, at + 4) as usize);
        let body = |len: usize| {
            (at + 8 + len <= p.len()).then_some(at + 8).ok_or_else(|| format!("IRQ info: capability {id} truncated"))
        };
        match id {
            VFU_IRQ_INFO_CAP_TYPE => {
                let b = body(8)?;
                caps.cap_type = Some((le_u32(p, b), le_u32(p, b + 4)));
            }
            VFU_IRQ_INFO_CAP_REMAP_REGIONS => caps.regions = Some(le_u64(p, body(8)?)),
            _ => {}
        }
        at = next;
    }
    Ok(caps)
}

/// The remap IRQ as discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RemapIrqInfo {
    pub index: u32,
    pub flags: u32,
    pub count: u32,
    /// The REMAP_REGIONS bitmap: the regions a signal may name.
    pub regions: u64,
}

/// Scans the indexes from 5 (VFIO_PCI_NUM_IRQS) to num_irqs for the remap IRQ's type.
pub fn discover(c: &mut Client) -> Result<Option<RemapIrqInfo>> {
    let (_, num_irqs) = device_info(c)?;
    for index in VFIO_PCI_NUM_IRQS..num_irqs {
        let p = irq_info(c, index)?;
        let caps = parse_irq_caps(&p)?;
        if caps.cap_type != Some((VFU_IRQ_TYPE_REMAP, VFU_IRQ_SUBTYPE_REMAP_SPARSE_MMAP)) {
            continue;
        }
        let Some(regions) = caps.regions else {
            return Err(format!("IRQ {index} is a remap IRQ without a REMAP_REGIONS capability"));
        };
        return Ok(Some(RemapIrqInfo { index, flags: le_u32(&p, 4), count: le_u32(&p, 12), regions }));
    }
    Ok(None)
}

/// SET_IRQS DATA_EVENTFD | ACTION_TRIGGER with one eventfd.
pub fn enable(c: &mut Client, index: u32, efd: BorrowedFd<'_>) -> Result<()> {
    let p = set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, index, 0, 1, &[]);
    call(c, cmd::DEVICE_SET_IRQS, &p, &[efd], "SET_IRQS (remap IRQ enable)")?;
    Ok(())
}

/// SET_IRQS DATA_NONE | ACTION_UNMASK: the acknowledgement.
pub fn unmask(c: &mut Client, index: u32) -> Result<()> {
    let p = set_irqs_payload(20, IRQ_DATA_NONE | IRQ_ACTION_UNMASK, index, 0, 1, &[]);
    call(c, cmd::DEVICE_SET_IRQS, &p, &[], "SET_IRQS (remap IRQ unmask)")?;
    Ok(())
}

// ---- region layouts ----------------------------------------------------------------------------------------

/// What REGION_INFO says about a region's fast path.
#[derive(Debug)]
pub struct RegionLayout {
    pub flags: u32,
    pub size: u64,
    /// The file offset of region offset 0 in `fd`.
    pub offset: u64,
    /// The sparse mmap areas (offset, size); empty without MMAP.
    pub areas: Vec<(u64, u64)>,
    pub fd: Option<OwnedFd>,
}

/// DEVICE_GET_REGION_INFO with argsz 32, asked again with the argsz the reply needs: the layout and its fd.
pub fn region_info(c: &mut Client, index: u32) -> Result<RegionLayout> {
    let mut argsz = 32;
    loop {
        let p = Payload::new().u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0).build();
        let r = call(c, cmd::DEVICE_GET_REGION_INFO, &p, &[], &format!("REGION_INFO {index}"))?;
        if r.payload.len() < 32 {
            return Err(format!("REGION_INFO {index}: reply of {} bytes", r.payload.len()));
        }
        let need = r.u32_at(0);
        if need <= argsz || r.payload.len() >= need as usize {
            return parse_region_info(&r.payload, r.fds);
        }
        if need > MAX_INFO_BYTES || argsz != 32 {
            return Err(format!("REGION_INFO {index}: asked with argsz {argsz}, the server wants {need}"));
        }
        argsz = need;
    }
}

/// A REGION_INFO reply: MMAP without a sparse capability means the whole region.
pub fn parse_region_info(p: &[u8], mut fds: Vec<OwnedFd>) -> Result<RegionLayout> {
    let (flags, size, offset) = (le_u32(p, 4), le_u64(p, 16), le_u64(p, 24));
    let mut areas = None;
    if flags & REGION_FLAG_CAPS != 0 {
        let mut at = le_u32(p, 12) as usize;
        let mut hops = 0;
        while at != 0 {
            hops += 1;
            if at < 32 || at + 8 > p.len() || hops > MAX_CAPS {
                return Err(format!("REGION_INFO: capability at {at} outside the {}-byte reply", p.len()));
            }
            if le_u16(p, at) == REGION_CAP_SPARSE_MMAP {
                let n = if at + 16 <= p.len() { le_u32(p, at + 8) as usize } else { usize::MAX };
                if n > p.len() || at + 16 + 16 * n > p.len() {
                    return Err("REGION_INFO: sparse mmap capability truncated".into());
                }
                areas = Some((0..n).map(|i| (le_u64(p, at + 16 + 16 * i), le_u64(p, at + 24 + 16 * i))).collect());
            }
            at = le_u32(p, at + 4) as usize;
        }
    }
    if flags & REGION_FLAG_MMAP == 0 {
        return Ok(RegionLayout { flags, size, offset, areas: Vec::new(), fd: None });
    }
    if fds.len() != 1 {
        return Err(format!("REGION_INFO: MMAP with {} fds", fds.len()));
    }
    let areas: Vec<(u64, u64)> = areas.unwrap_or_else(|| vec![(0, size)]);
    if let Some(a) = areas.iter().find(|(o, s)| *s == 0 || o.checked_add(*s).is_none_or(|e| e > size)) {
        return Err(format!("REGION_INFO: area {a:?} outside the {size:#x}-byte region"));
    }
    Ok(RegionLayout { flags, size, offset, areas, fd: fds.pop() })
}

// ---- mappings ----------------------------------------------------------------------------------------------

/// One mapped area of a region.
struct Area {
    offset: u64,
    size: u64,
    map: MmapRegion<()>,
}

/// The client's mappings, by region. Stores hold the read lock, munmap takes the write lock: when
/// [`Mappings::apply`] returns, no store into a withdrawn area is in flight or can start.
#[derive(Default)]
pub struct Mappings {
    regions: RwLock<BTreeMap<u32, Vec<Area>>>,
}

/// What one re-evaluation of a region changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionChange {
    pub region: u32,
    pub unmapped: usize,
    pub mapped: usize,
    /// The areas mapped afterwards.
    pub areas: Vec<(u64, u64)>,
    /// Areas listed but not mapped, and why.
    pub error: Option<String>,
}

impl Mappings {
    /// A 32-bit store into a mapped area covering `off`; false (nothing stored) if none does.
    pub fn store32(&self, region: u32, off: u64, v: u32) -> bool {
        let g = self.regions.read().unwrap();
        match g.get(&region).and_then(|a| a.iter().find(|a| off >= a.offset && off + 4 <= a.offset + a.size)) {
            Some(a) => a.map.as_volatile_slice().store(v.to_le(), (off - a.offset) as usize, Ordering::Release).is_ok(),
            None => false,
        }
    }

    /// A 32-bit load from a mapped area covering `off`.
    pub fn load32(&self, region: u32, off: u64) -> Option<u32> {
        let g = self.regions.read().unwrap();
        let a = g.get(&region)?.iter().find(|a| off >= a.offset && off + 4 <= a.offset + a.size)?;
        a.map.as_volatile_slice().load::<u32>((off - a.offset) as usize, Ordering::Acquire).ok().map(u32::from_le)
    }

    /// The areas of `region` mapped now.
    pub fn areas(&self, region: u32) -> Vec<(u64, u64)> {
        let g = self.regions.read().unwrap();
        g.get(&region).map(|a| a.iter().map(|a| (a.offset, a.size)).collect()).unwrap_or_default()
    }

    /// Mapped areas of `region` that `layout` no longer lists.
    pub fn withdrawn(&self, region: u32, layout: &RegionLayout) -> usize {
        self.areas(region).iter().filter(|a| !layout.areas.contains(a)).count()
    }

    /// Brings `region` in line with `layout`: munmaps every area it no longer lists (first), then mmaps the newly
    /// listed ones from the layout's fd. An area that cannot be mapped is left out (and named in `error`).
    pub fn apply(&self, region: u32, layout: &RegionLayout) -> RegionChange {
        let mut ch = RegionChange { region, ..Default::default() };
        let mut g = self.regions.write().unwrap();
        let areas = g.entry(region).or_default();
        let before = areas.len();
        areas.retain(|a| layout.areas.contains(&(a.offset, a.size)));
        ch.unmapped = before - areas.len();
        for &(offset, size) in &layout.areas {
            if areas.iter().any(|a| (a.offset, a.size) == (offset, size)) {
                continue;
            }
            match map_area(layout, offset, size) {
                Ok(map) => {
                    areas.push(Area { offset, size, map });
                    ch.mapped += 1;
                }
                Err(e) => ch.error = Some(e),
            }
        }
        areas.sort_by_key(|a| a.offset);
        ch.areas = areas.iter().map(|a| (a.offset, a.size)).collect();
        ch
    }

    /// Drops every mapping (the connection is gone).
    pub fn clear(&self) {
        self.regions.write().unwrap().clear();
    }
}

/// mmap of one area, shared, read/write; refused when the file is too short (a store past its end would SIGBUS).
fn map_area(layout: &RegionLayout, offset: u64, size: u64) -> Result<MmapRegion<()>> {
    let fd = layout.fd.as_ref().ok_or("no fd")?;
    let file = File::from(fd.try_clone().map_err(|e| format!("dup of the region fd: {e}"))?);
    let at = layout.offset.checked_add(offset).ok_or("file offset overflows")?;
    let len = file.metadata().map_err(|e| format!("fstat of the region fd: {e}"))?.len();
    if at.checked_add(size).is_none_or(|end| end > len) {
        return Err(format!("area {offset:#x}+{size:#x} at file offset {at:#x} past the fd's {len:#x} bytes"));
    }
    MmapRegion::build(
        Some(FileOffset::new(file, at)),
        size as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| format!("mmap of area {offset:#x}+{size:#x}: {e}"))
}

// ---- the handler -------------------------------------------------------------------------------------------

/// Where the handler gets layouts from and sends its acknowledgements to: the server, or a fake in unit tests.
pub trait RemapDevice {
    fn region_info(&mut self, index: u32) -> Result<RegionLayout>;
    fn unmask(&mut self) -> Result<()>;
}

/// The server over a connection shared with the vCPU and the orchestrator (one request at a time).
pub struct SharedConn {
    pub conn: Arc<Mutex<Client>>,
    pub index: u32,
}

impl RemapDevice for SharedConn {
    fn region_info(&mut self, index: u32) -> Result<RegionLayout> {
        region_info(&mut self.conn.lock().unwrap(), index)
    }
    fn unmask(&mut self) -> Result<()> {
        unmask(&mut self.conn.lock().unwrap(), self.index)
    }
}

/// The server over a connection the caller owns (tests).
pub struct ClientConn<'a> {
    pub conn: &'a mut Client,
    pub index: u32,
}

impl RemapDevice for ClientConn<'_> {
    fn region_info(&mut self, index: u32) -> Result<RegionLayout> {
        region_info(self.conn, index)
    }
    fn unmask(&mut self) -> Result<()> {
        unmask(self.conn, self.index)
    }
}

/// What handling one signal did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// "offer" (areas added only), "revoke" (a mapped area withdrawn), "none" (nothing changed).
    pub kind: &'static str,
    pub regions: Vec<RegionChange>,
    pub acked: bool,
}

/// Region indexes whose bit is set in `value`, ascending.
pub fn bits(value: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |n| value & (1 << n) != 0)
}

/// The client's whole procedure for one signal value, any number of bits: re-query REGION_INFO for each region
/// named, munmap what is no longer listed, mmap what is newly listed, acknowledge. `policy` decides when (and
/// whether) a revocation is carried out; `stop` cuts a delay short (then nothing is acknowledged).
pub fn handle_signal(
    value: u64,
    dev: &mut dyn RemapDevice,
    maps: &Mappings,
    policy: AckPolicy,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let mut layouts = Vec::new();
    for n in bits(value) {
        layouts.push((n, dev.region_info(n)?));
    }
    let revoke = layouts.iter().any(|(n, l)| maps.withdrawn(*n, l) > 0);
    let grows = layouts.iter().any(|(n, l)| l.areas.iter().any(|a| !maps.areas(*n).contains(a)));
    let mut out = Outcome {
        kind: if revoke {
            "revoke"
        } else if grows {
            "offer"
        } else {
            "none"
        },
        ..Default::default()
    };
    if revoke {
        match policy {
            AckPolicy::Prompt => {}
            AckPolicy::Delay(ms) => {
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(out);
                    }
                    std::thread::sleep(Duration::from_millis(1).min(until.saturating_duration_since(Instant::now())));
                }
            }
            AckPolicy::Never => return Ok(out),
        }
    }
    out.regions = layouts.iter().map(|(n, l)| maps.apply(*n, l)).collect();
    dev.unmask()?;
    out.acked = true;
    Ok(out)
}

/// One signal as the handler saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Signal {
    pub side: &'static str,
    /// The eventfd's value: a bitmap of region indexes.
    pub value: u64,
    /// When the eventfd was read, and the phase then.
    pub at_ms: f64,
    pub phase: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When the acknowledgement's reply came (None: not acknowledged).
    pub acked_ms: Option<f64>,
    pub error: Option<String>,
}

/// The handler thread of one connection: reads the eventfd, handles each signal, records it.
pub struct Handler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    signals: Arc<Mutex<Vec<Signal>>>,
    handled: Arc<AtomicU64>,
}

impl Handler {
    pub fn spawn(
        side: &'static str,
        efd: OwnedFd,
        mut dev: Box<dyn RemapDevice + Send>,
        maps: Arc<Mappings>,
        policy: AckPolicy,
        shared: Arc<Shared>,
        t0: Instant,
    ) -> Result<Handler> {
        let stop = Arc::new(AtomicBool::new(false));
        let signals: Arc<Mutex<Vec<Signal>>> = Arc::default();
        let handled = Arc::new(AtomicU64::new(0));
        let (st, sg, hd) = (stop.clone(), signals.clone(), handled.clone());
        let ms = move || (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let body = move || {
            // After a revocation the `never` policy left unacknowledged, the client only reads (nothing can come).
            let mut ignoring = false;
            while !st.load(Ordering::SeqCst) {
                let mut pfd = [rustix::event::PollFd::new(&efd, rustix::event::PollFlags::IN)];
                let tick = rustix::event::Timespec { tv_sec: 0, tv_nsec: 10_000_000 };
                if rustix::event::poll(&mut pfd, Some(&tick)).unwrap_or(0) == 0 {
                    continue;
                }
                let value = eventfd_take(&efd);
                if value == 0 {
                    continue;
                }
                let mut s = Signal {
                    side,
                    value,
                    at_ms: ms(),
                    phase: PHASES[shared.phase.load(Ordering::SeqCst)],
                    outcome: Outcome { kind: "ignored", ..Default::default() },
                    acked_ms: None,
                    error: None,
                };
                if !ignoring {
                    match handle_signal(value, dev.as_mut(), &maps, policy, &st) {
                        Ok(o) => {
                            ignoring = !o.acked && policy == AckPolicy::Never;
                            s.acked_ms = o.acked.then(ms);
                            s.outcome = o;
                        }
                        Err(e) => s.error = Some(e),
                    }
                }
                sg.lock().unwrap().push(s);
                hd.fetch_add(1, Ordering::SeqCst);
            }
        };
        let thread = std::thread::Builder::new()
            .name(format!("refvmm-remap-{side}"))
            .spawn(body)
            .map_err(|e| format!("spawning the remap IRQ handler: {e}"))?;
        Ok(Handler { stop, thread: Some(thread), signals, handled })
    }

    /// The signals handled so far.
    pub fn signals(&self) -> Vec<Signal> {
        self.signals.lock().unwrap().clone()
    }

    /// Waits (<= `within`) until `n` signals have been handled.
    pub fn wait_handled(&self, n: u64, within: Duration) -> bool {
        let t = Instant::now();
        while self.handled.load(Ordering::SeqCst) < n {
            if t.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connection's remap IRQ, enabled: its mappings and its handler.
pub struct RemapConn {
    pub info: RemapIrqInfo,
    pub maps: Arc<Mappings>,
    pub handler: Handler,
}

/// Discovers the remap IRQ and, if this client can re-evaluate every region it names (every index below
/// num_regions: [`Mappings`] handles any region), enables it, maps the current layout and starts the handler.
/// Ok(Err(why)) when it is not used.
pub fn attach(
    side: &'static str,
    conn: &Arc<Mutex<Client>>,
    policy: AckPolicy,
    shared: Arc<Shared>,
    t0: Instant,
) -> Result<std::result::Result<RemapConn, String>> {
    let mut c = conn.lock().unwrap();
    let Some(info) = discover(&mut c)? else {
        return Ok(Err("the server has no remap IRQ".into()));
    };
    let (num_regions, _) = device_info(&mut c)?;
    let unknown = info.regions & !((1u64 << num_regions.min(63)) - 1);
    if unknown != 0 || info.count != 1 {
        return Ok(Err(format!(
            "not enabled: regions {:#x} (count {}) include ones this client cannot map",
            info.regions, info.count
        )));
    }
    let efd = crate::util::eventfd();
    enable(&mut c, info.index, efd.as_fd())?;
    // The current layout (a device that offered areas before the IRQ was enabled does not signal them).
    let maps = Arc::new(Mappings::default());
    for n in bits(info.regions) {
        maps.apply(n, &region_info(&mut c, n)?);
    }
    drop(c);
    let dev = Box::new(SharedConn { conn: conn.clone(), index: info.index });
    let handler = Handler::spawn(side, efd, dev, maps.clone(), policy, shared, t0)?;
    Ok(Ok(RemapConn { info, maps, handler }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A device with a layout per region, each backed by its own memfd; counts acknowledgements.
    #[derive(Default)]
    struct Fake {
        layouts: BTreeMap<u32, Vec<(u64, u64)>>,
        files: BTreeMap<u32, File>,
        queried: Vec<u32>,
        acks: u32,
    }

    impl Fake {
        fn set(&mut self, region: u32, areas: &[(u64, u64)]) {
            self.files.entry(region).or_insert_with(|| crate::util::memfd(0x4000));
            self.layouts.insert(region, areas.to_vec());
        }
    }

    impl RemapDevice for Fake {
        fn region_info(&mut self, index: u32) -> Result<RegionLayout> {
            self.queried.push(index);
            let areas = self.layouts.get(&index).cloned().unwrap_or_default();
            let fd = (!areas.is_empty()).then(|| OwnedFd::from(self.files[&index].try_clone().unwrap()));
            let flags = REGION_FLAG_READ | REGION_FLAG_WRITE | if fd.is_some() { REGION_FLAG_MMAP } else { 0 };
            Ok(RegionLayout { flags, size: 0x4000, offset: 0, areas, fd })
        }
        fn unmask(&mut self) -> Result<()> {
            self.acks += 1;
            Ok(())
        }
    }

    #[test]
    fn a_signal_naming_several_regions_re_evaluates_each_and_acknowledges_once() {
        let (mut dev, maps, stop) = (Fake::default(), Mappings::default(), AtomicBool::new(false));
        dev.set(0, &[(0, 0x1000), (0x2000, 0x1000)]);
        dev.set(3, &[(0x1000, 0x1000)]);
        dev.set(5, &[(0, 0x1000)]);
        let o = handle_signal(0b1001, &mut dev, &maps, AckPolicy::Prompt, &stop).unwrap();
        assert_eq!((o.kind, o.acked, dev.acks), ("offer", true, 1));
        assert_eq!(dev.queried, vec![0, 3], "exactly the regions named");
        assert_eq!(maps.areas(0), vec![(0, 0x1000), (0x2000, 0x1000)]);
        assert_eq!(maps.areas(3), vec![(0x1000, 0x1000)]);
        assert!(maps.areas(5).is_empty(), "region 5 was not named");
        // Stores land in the region's file at the area's offset; offsets outside every area are not stored.
        assert!(maps.store32(3, 0x1004, 0xabcd) && !maps.store32(3, 0x0ffc, 1) && !maps.store32(3, 0x1ffe, 1));
        let mut b = [0u8; 4];
        dev.files[&3].read_exact_at(&mut b, 0x1004).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd);
        assert_eq!(maps.load32(3, 0x1004), Some(0xabcd));

        // Both withdrawn in one signal (region 0 partly): both unmapped, one acknowledgement.
        dev.set(0, &[(0x2000, 0x1000)]);
        dev.set(3, &[]);
        let o = handle_signal(0b1001, &mut dev, &maps, AckPolicy::Prompt, &stop).unwrap();
        assert_eq!((o.kind, o.acked, dev.acks), ("revoke", true, 2));
        assert_eq!((o.regions[0].unmapped, o.regions[1].unmapped), (1, 1));
        assert_eq!(maps.areas(0), vec![(0x2000, 0x1000)]);
        assert!(maps.areas(3).is_empty() && !maps.store32(3, 0x1004, 1));

        // `never`: a revocation is read, the stale mapping stays and stays usable, nothing is acknowledged.
        dev.set(0, &[]);
        let o = handle_signal(0b1, &mut dev, &maps, AckPolicy::Never, &stop).unwrap();
        assert_eq!((o.kind, o.acked, dev.acks), ("revoke", false, 2));
        assert!(maps.store32(0, 0x2000, 7));
        // `delay`: the same, then carried out.
        let t = Instant::now();
        let o = handle_signal(0b1, &mut dev, &maps, AckPolicy::Delay(30), &stop).unwrap();
        assert!(o.acked && t.elapsed() >= Duration::from_millis(30) && maps.areas(0).is_empty());
    }

    #[test]
    fn capability_chains_are_walked_and_bad_ones_refused() {
        let chain = Payload::new()
            .u32(72)
            .u32(7 | VFU_IRQ_INFO_FLAG_CAPS)
            .u32(5)
            .u32(1)
            .u32(24)
            .u32(0)
            .u16(99) // unknown id: skipped
            .u16(1)
            .u32(40)
            .u64(0)
            .u16(VFU_IRQ_INFO_CAP_REMAP_REGIONS)
            .u16(1)
            .u32(56)
            .u64(0x9)
            .u16(VFU_IRQ_INFO_CAP_TYPE)
            .u16(1)
            .u32(0)
            .u32(1)
            .u32(0)
            .build();
        assert_eq!(parse_irq_caps(&chain).unwrap(), IrqCaps { cap_type: Some((1, 0)), regions: Some(9) });
        let mut no_caps = chain.clone();
        no_caps[4] &= !(VFU_IRQ_INFO_FLAG_CAPS as u8);
        assert_eq!(parse_irq_caps(&no_caps).unwrap(), IrqCaps::default());
        let mut looped = chain.clone();
        looped[28..32].copy_from_slice(&24u32.to_le_bytes());
        assert!(parse_irq_caps(&looped).is_err());
        assert!(parse_irq_caps(&chain[..60]).is_err(), "truncated");
        assert_eq!("delay:25".parse(), Ok(AckPolicy::Delay(25)));
        assert!("delay:x".parse::<AckPolicy>().is_err() && "later".parse::<AckPolicy>().is_err());
    }
}
