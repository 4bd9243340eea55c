//! vfio-user migration v2: the device state machine (`MIG_DEVICE_STATE`), the data transfer sessions
//! (`MIG_DATA_READ` / `MIG_DATA_WRITE`) and `--migration-audit`. Dirty logging itself lives in the memory accessor
//! (`device::mem`); the handlers call it directly.
//!
//! The state machine follows `enum vfio_device_mig_state` in Linux's uapi and the vfio-user spec: the required
//! arcs in [`arc`], any other request along the shortest path that has no saving state inside it ([`next`]).
//! Arcs that stop the device wait for the device's pause to complete before the reply (STOP means frozen), without
//! blocking the protocol thread: the transition is left pending and finished from the event loop.

use std::fmt;
use std::sync::Arc;

use device::event::{Event, Events};
use device::fault::Faults;
use device::mem::GuestMem;
use device::stream::{self, section, Extra};
use device::{Errno, Migratable};
use serde::{Deserialize, Serialize};

/// `enum vfio_device_mig_state` (P2P states are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    PreCopy = 6,
}

impl MigState {
    pub fn from_u32(v: u32) -> Option<MigState> {
        Some(match v {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            6 => MigState::PreCopy,
            _ => return None,
        })
    }

    fn saving(self) -> bool {
        matches!(self, MigState::StopCopy | MigState::PreCopy)
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::PreCopy => "PRE_COPY",
        })
    }
}

/// The next state on the way from `cur` to `target`: the shortest path with no saving state in its interior.
/// None: no path (`STOP_COPY -> PRE_COPY`, or from ERROR).
pub fn next(cur: MigState, target: MigState) -> Option<MigState> {
    use MigState::*;
    if cur == target {
        return Some(cur);
    }
    Some(match (cur, target) {
        (Error, _) | (_, Error) => return None,
        (Stop, Running | StopCopy | Resuming) => target,
        (Stop, PreCopy) => Running,
        (Running, Stop | PreCopy) => target,
        (Running, StopCopy | Resuming) => Stop,
        (StopCopy, PreCopy) => return None,
        (StopCopy, _) => Stop,
        (Resuming, _) => Stop,
        (PreCopy, Running | StopCopy) => target,
        (PreCopy, Stop | Resuming) => Running,
        _ => return None,
    })
}

/// Bytes a destination accepts in one resuming session: a compat record and a state record at most.
pub const MAX_RESUME_BYTES: usize = 2 * stream::MAX_RECORD;

/// `--migration-audit`: the source's digests of the pages the device wrote while logging was on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub page_size: u64,
    /// (absolute page number, FNV-1a of its contents at STOP_COPY).
    pub pages: Vec<(u64, u64)>,
}

/// What the destination's audit found at STOP -> RUNNING.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditResult {
    pub checked: u64,
    pub mismatches: u64,
    /// Pages the destination could not read itself (not in fd-backed memory).
    pub skipped: u64,
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Reads one page of guest memory without a DMA message (fd-backed memory only): the audit runs on the protocol
/// thread, which must not wait for the client.
fn read_page(mem: &GuestMem, addr: u64, size: u64) -> Option<Vec<u8>> {
    let direct = mem.mappings().iter().any(|m| m.has_fd && m.iova <= addr && addr + size <= m.iova + m.size);
    if !direct {
        return None;
    }
    let mut b = vec![0u8; size as usize];
    mem.read(addr, &mut b).ok()?;
    Some(b)
}

/// A transition in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Done,
    /// Waiting for the device's pause; [`Migration::poll`] finishes it.
    Waiting,
}

/// What the control socket's query-migration reports: the current client's transfers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigStats {
    /// MIG_DATA_READ bytes returned (source).
    pub bytes_read: u64,
    /// MIG_DATA_WRITE bytes accepted (destination).
    pub bytes_written: u64,
    /// DMA_LOGGING_REPORTs answered and the dirty pages (set bits) they carried.
    pub reports: u64,
    pub dirty_pages_reported: u64,
    /// State records corrupted by mig-corrupt.
    pub corrupted_reads: u64,
}

pub struct Migration {
    state: MigState,
    /// Set while a transition waits for the device's pause.
    target: Option<MigState>,
    /// Saving: the data of the current transfer and how much the client has read.
    out: Vec<u8>,
    out_pos: usize,
    /// Resuming: what the client has written, how much of it (whole records) is checked, and what was wrong
    /// with it.
    inbuf: Vec<u8>,
    checked: usize,
    resume_error: Option<String>,
    /// `--migration-audit`.
    audit: bool,
    pending_audit: Option<Audit>,
    pub last_audit: Option<AuditResult>,
    /// The addresses of the pages the last audit found differing (at most [`MAX_AUDIT_ADDRS`]).
    pub last_audit_pages: Vec<u64>,
    /// Where the state record is inside `out` (mig-corrupt flips bytes there only).
    state_rec: Option<(usize, usize)>,
    pub stats: MigStats,
    faults: Arc<Faults>,
    events: Arc<Events>,
}

/// Differing page addresses the audit keeps for the control socket.
pub const MAX_AUDIT_ADDRS: usize = 4096;

impl Migration {
    pub fn new(audit: bool) -> Self {
        Migration {
            state: MigState::Running,
            target: None,
            out: Vec::new(),
            out_pos: 0,
            inbuf: Vec::new(),
            checked: 0,
            resume_error: None,
            audit,
            pending_audit: None,
            last_audit: None,
            last_audit_pages: Vec::new(),
            state_rec: None,
            stats: MigStats::default(),
            faults: Arc::default(),
            events: Arc::default(),
        }
    }

    /// The faults (mig-fail, mig-corrupt) to apply and where state changes are reported.
    pub fn set_hooks(&mut self, faults: Arc<Faults>, events: Arc<Events>) {
        self.faults = faults;
        self.events = events;
    }

    fn changed(&self, from: MigState, to: MigState) {
        if from != to {
            self.events.emit(Event::MigrationState { from: from.to_string(), to: to.to_string() });
        }
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    pub fn audit_enabled(&self) -> bool {
        self.audit
    }

    /// A transition is waiting for the device.
    pub fn waiting(&self) -> bool {
        self.target.is_some()
    }

    /// MIG_DEVICE_STATE SET: moves toward `target` arc by arc. Err leaves ERROR when an arc failed part-way
    /// (a stream that cannot be loaded); a request with no path is refused with the state unchanged.
    pub fn set_state(&mut self, target: MigState, dev: &dyn Migratable, mem: &GuestMem) -> Result<Progress, Errno> {
        if self.target.is_some() {
            log::warn!("migration: a transition to {target} while one is still under way");
            return Err(Errno::EBUSY);
        }
        if self.state == MigState::Error {
            log::warn!("migration: {target} requested in ERROR: only DEVICE_RESET leaves it");
            return Err(Errno::EINVAL);
        }
        if next(self.state, target).is_none() {
            log::warn!("migration: {} -> {target} is not allowed", self.state);
            return Err(Errno::EINVAL);
        }
        self.target = Some(target);
        self.run(dev, mem)
    }

    /// Continues a waiting transition once the device may have paused. None: nothing was waiting, or it still is.
    pub fn poll(&mut self, dev: &dyn Migratable, mem: &GuestMem) -> Option<Result<(), Errno>> {
        self.target?;
        if !dev.is_paused() {
            return None;
        }
        match self.run(dev, mem) {
            Ok(Progress::Waiting) => None,
            Ok(Progress::Done) => Some(Ok(())),
            Err(e) => Some(Err(e)),
        }
    }

    fn run(&mut self, dev: &dyn Migratable, mem: &GuestMem) -> Result<Progress, Errno> {
        while let Some(target) = self.target {
            if self.state == target {
                self.target = None;
                log::info!("migration: device state {target}");
                return Ok(Progress::Done);
            }
            let to = next(self.state, target).ok_or(Errno::EINVAL)?;
            let result = if self.faults.mig_fail(to as u32) {
                Err(format!("fault mig-fail={}", to.to_string().to_ascii_lowercase()))
            } else {
                self.arc(to, dev, mem)
            };
            match result {
                Ok(true) => {
                    let from = self.state;
                    self.state = to;
                    self.changed(from, to);
                    // The fast path (docs/remap-irq.md) is taken back while saving or resuming.
                    match to {
                        MigState::Running => dev.fast_path(true),
                        MigState::PreCopy | MigState::StopCopy | MigState::Resuming => dev.fast_path(false),
                        _ => {}
                    }
                }
                Ok(false) => return Ok(Progress::Waiting),
                Err(why) => {
                    log::error!(
                        "migration: {} -> {to} failed: {why}; device state ERROR (DEVICE_RESET recovers)",
                        self.state
                    );
                    let from = self.state;
                    self.state = MigState::Error;
                    self.target = None;
                    self.changed(from, MigState::Error);
                    return Err(Errno::EINVAL);
                }
            }
        }
        Ok(Progress::Done)
    }

    /// Carries out one arc; false when it waits for the device's pause.
    fn arc(&mut self, to: MigState, dev: &dyn Migratable, mem: &GuestMem) -> Result<bool, String> {
        use MigState::*;
        match (self.state, to) {
            (Running, Stop) | (PreCopy, StopCopy) => {
                dev.request_pause();
                if !dev.is_paused() {
                    return Ok(false);
                }
                if to == StopCopy {
                    // The same saving session goes on: what PRE_COPY produced and the client has not read yet
                    // stays ahead of the state record.
                    let record = dev.state_record(&self.audit_extras(mem))?;
                    self.out.drain(..self.out_pos);
                    self.out_pos = 0;
                    self.state_rec = Some((self.out.len(), self.out.len() + record.len()));
                    self.out.extend_from_slice(&record);
                }
                if self.state == PreCopy {
                    log::info!("migration: device stopped; {} bytes of state to read", self.out.len());
                }
            }
            (Stop, Running) => {
                self.run_audit(mem);
                dev.resume();
            }
            (Running, PreCopy) => self.begin_saving(dev.compat_record()),
            (PreCopy, Running) | (StopCopy, Stop) => self.end_saving(),
            (Stop, StopCopy) => {
                self.begin_saving(dev.state_record(&self.audit_extras(mem))?);
                self.state_rec = Some((0, self.out.len()));
            }
            (Stop, Resuming) => {
                self.inbuf.clear();
                self.checked = 0;
                self.resume_error = None;
                self.pending_audit = None;
            }
            (Resuming, Stop) => self.finish_resuming(dev)?,
            (from, to) => return Err(format!("no arc {from} -> {to}")),
        }
        Ok(true)
    }

    fn begin_saving(&mut self, data: Vec<u8>) {
        self.out = data;
        self.out_pos = 0;
        self.state_rec = None;
    }

    fn end_saving(&mut self) {
        self.out = Vec::new();
        self.out_pos = 0;
        self.state_rec = None;
    }

    /// MIG_DATA_READ: up to `size` bytes of the current transfer; fewer means the stream (for now) ends.
    pub fn read(&mut self, size: usize) -> Result<&[u8], Errno> {
        if !self.state.saving() || self.target.is_some() {
            log::warn!("MIG_DATA_READ in {}: only in PRE_COPY or STOP_COPY", self.state);
            return Err(Errno::EINVAL);
        }
        let n = size.min(self.out.len() - self.out_pos);
        let at = self.out_pos;
        self.out_pos += n;
        // mig-corrupt: one byte of the state record's sections or checksum (past its 16-byte header, so the
        // destination finds a checksum mismatch rather than a misleading length) flipped in every read that
        // returns some of them.
        if let Some((start, end)) = self.state_rec {
            let (lo, hi) = (at.max(start + 16), (at + n).min(end));
            if lo < hi && self.faults.mig_corrupt() {
                let i = lo + (hi - lo) / 2;
                self.out[i] ^= 0xff;
                self.faults.mig_corrupt_fired();
                self.stats.corrupted_reads += 1;
                log::warn!("fault mig-corrupt: flipped byte {} of the state record in this MIG_DATA_READ", i - start);
            }
        }
        self.stats.bytes_read += n as u64;
        Ok(&self.out[at..at + n])
    }

    /// MIG_DATA_WRITE: appends to the resuming stream; a compat record is checked as soon as it is complete, so an
    /// incompatible source is refused before its guest stops.
    pub fn write(&mut self, data: &[u8], dev: &dyn Migratable) -> Result<(), Errno> {
        if self.state != MigState::Resuming || self.target.is_some() {
            log::warn!("MIG_DATA_WRITE in {}: only in RESUMING", self.state);
            return Err(Errno::EINVAL);
        }
        if let Some(e) = &self.resume_error {
            log::warn!("MIG_DATA_WRITE: the stream was already refused ({e})");
            return Err(Errno::EINVAL);
        }
        if self.inbuf.len() + data.len() > MAX_RESUME_BYTES {
            return self.refuse(format!("over-long: more than {MAX_RESUME_BYTES} bytes"), Errno(libc::E2BIG));
        }
        self.inbuf.extend_from_slice(data);
        self.stats.bytes_written += data.len() as u64;
        // Check every compat record completed by this write (each record once: re-parsing the whole stream on every
        // write would cost quadratic time); the state record is loaded at RESUMING -> STOP.
        let mut at = self.checked;
        loop {
            match stream::record_len(&self.inbuf[at..]) {
                Ok(Some(len)) if self.inbuf.len() - at >= len => {
                    let rec = &self.inbuf[at..at + len];
                    let kind = stream::parse_record(rec).map(|r| r.kind);
                    match kind {
                        Ok(stream::Kind::Compat) => {
                            if let Err(e) = dev.check_compat(rec) {
                                return self.refuse(format!("incompatible source: {e}"), Errno::EINVAL);
                            }
                            log::info!("migration: the source's identity matches this device");
                        }
                        Ok(stream::Kind::State) => {}
                        Err(e) => return self.refuse(e.to_string(), Errno::EINVAL),
                    }
                    at += len;
                    self.checked = at;
                }
                Ok(_) => return Ok(()),
                Err(e) => return self.refuse(e.to_string(), Errno::EINVAL),
            }
        }
    }

    fn refuse(&mut self, why: String, e: Errno) -> Result<(), Errno> {
        log::error!("migration: incoming stream refused: {why}");
        self.resume_error = Some(why);
        Err(e)
    }

    /// RESUMING -> STOP: the stream must be complete records, the last a state record, and load.
    fn finish_resuming(&mut self, dev: &dyn Migratable) -> Result<(), String> {
        if let Some(e) = self.resume_error.take() {
            return Err(e);
        }
        let buf = std::mem::take(&mut self.inbuf);
        self.checked = 0;
        let mut at = 0;
        let mut state = None;
        while at < buf.len() {
            let len = stream::record_len(&buf[at..])
                .map_err(|e| e.to_string())?
                .filter(|&l| buf.len() - at >= l)
                .ok_or_else(|| format!("stream truncated: {} bytes of an incomplete record", buf.len() - at))?;
            let r = stream::parse_record(&buf[at..at + len]).map_err(|e| e.to_string())?;
            if r.kind == stream::Kind::State {
                state = Some(at..at + len);
            }
            at += len;
        }
        let range = state.ok_or("stream truncated: no state record")?;
        let extras = dev.load_record(&buf[range], &[section::AUDIT])?;
        self.pending_audit = None;
        if let Some(a) = extras.into_iter().find(|e| e.kind == section::AUDIT) {
            match postcard::from_bytes::<Audit>(&a.body) {
                Ok(audit) if self.audit => self.pending_audit = Some(audit),
                Ok(_) => log::info!("migration: the source sent an audit; run with --migration-audit to check it"),
                Err(e) => log::warn!("migration: unreadable audit section ignored: {e}"),
            }
        }
        log::info!("migration: device state loaded ({} bytes)", buf.len());
        Ok(())
    }

    /// The source's audit section: a digest of every page the device wrote while logging was on.
    fn audit_extras(&self, mem: &GuestMem) -> Vec<Extra> {
        if !self.audit {
            return Vec::new();
        }
        let Some(page_size) = mem.logging() else {
            log::warn!("migration audit: dirty logging is off, so there are no device writes to vouch for");
            return Vec::new();
        };
        let mut pages = Vec::new();
        let mut unreadable = 0;
        for p in mem.written_pages() {
            match read_page(mem, p * page_size, page_size) {
                Some(b) => pages.push((p, fnv1a(&b))),
                None => unreadable += 1,
            }
            if pages.len() * 16 > stream::MAX_RECORD / 2 {
                log::warn!("migration audit: too many pages; the rest are not audited");
                break;
            }
        }
        log::info!(
            "migration audit: {} pages written by the device while logging ({unreadable} not readable here)",
            pages.len()
        );
        let body = postcard::to_stdvec(&Audit { page_size, pages }).expect("audit serializes");
        vec![Extra { kind: section::AUDIT, optional: true, body }]
    }

    /// Destination, STOP -> RUNNING: compares every audited page with this side's copy.
    fn run_audit(&mut self, mem: &GuestMem) {
        let Some(a) = self.pending_audit.take() else { return };
        let mut r = AuditResult::default();
        let mut bad = Vec::new();
        for &(p, h) in &a.pages {
            let addr = p * a.page_size;
            match read_page(mem, addr, a.page_size) {
                Some(b) if fnv1a(&b) == h => r.checked += 1,
                Some(_) => {
                    r.checked += 1;
                    r.mismatches += 1;
                    bad.push(addr);
                }
                None => r.skipped += 1,
            }
        }
        if r.mismatches > 0 {
            let list: Vec<String> = bad.iter().take(64).map(|a| format!("{a:#x}")).collect();
            log::error!(
                "migration audit: {} of {} pages the device wrote on the source differ here (the VMM lost device \
                 writes): {}{}",
                r.mismatches,
                r.checked,
                list.join(" "),
                if bad.len() > 64 { " ..." } else { "" }
            );
        } else {
            log::info!(
                "migration audit: all {} pages the device wrote on the source match ({} skipped)",
                r.checked,
                r.skipped
            );
        }
        self.last_audit = Some(r);
        bad.truncate(MAX_AUDIT_ADDRS);
        self.last_audit_pages = bad;
    }

    /// DEVICE_RESET: any migration ends and the device runs.
    pub fn reset(&mut self, dev: &dyn Migratable) {
        if self.state != MigState::Running || self.target.is_some() {
            log::info!("migration: DEVICE_RESET in {}: back to RUNNING", self.state);
        }
        self.abandon();
        let from = self.state;
        self.state = MigState::Running;
        self.changed(from, MigState::Running);
        dev.resume();
        dev.fast_path(true);
    }

    /// The client left: sessions end; a device the migration had stopped stays stopped (STOP: no DMA into memory
    /// of a client that is gone) until a client sets RUNNING or resets it; a running one keeps running.
    pub fn client_gone(&mut self, dev: &dyn Migratable) {
        let was = self.state;
        let stopped = matches!(was, MigState::Stop | MigState::StopCopy | MigState::Resuming | MigState::Error)
            || (self.target.is_some() && dev.is_paused())
            || self.target.is_some();
        self.abandon();
        self.state = if stopped { MigState::Stop } else { MigState::Running };
        if stopped {
            dev.request_pause();
        }
        if was != self.state {
            log::info!("migration: client gone in {was}: device state {}", self.state);
            self.changed(was, self.state);
        }
    }

    fn abandon(&mut self) {
        self.target = None;
        self.end_saving();
        self.inbuf = Vec::new();
        self.checked = 0;
        self.resume_error = None;
        self.pending_audit = None;
    }
}

#[cfg(test)]
mod tests {
    use super::MigState::*;
    use super::*;

    const ALL: [MigState; 6] = [Error, Stop, Running, StopCopy, Resuming, PreCopy];

    /// Every (from, to) pair reaches `to` through required arcs only, never through a saving state in between,
    /// and in the fewest steps.
    #[test]
    fn paths_are_shortest_and_avoid_saving_states_inside() {
        let arcs = [
            (Running, Stop),
            (StopCopy, Stop),
            (Resuming, Stop),
            (PreCopy, Running),
            (Stop, Running),
            (Running, PreCopy),
            (Stop, StopCopy),
            (PreCopy, StopCopy),
            (Stop, Resuming),
        ];
        for from in ALL {
            for to in ALL {
                let Some(_) = next(from, to) else {
                    assert!(from == Error || to == Error || (from, to) == (StopCopy, PreCopy), "{from} -> {to}");
                    continue;
                };
                if from == to {
                    continue; // no arc: a SET to the current state succeeds doing nothing
                }
                let mut path = vec![from];
                let mut cur = from;
                while cur != to {
                    let n = next(cur, to).unwrap();
                    assert!(arcs.contains(&(cur, n)), "{from} -> {to}: {cur} -> {n} is not a required arc");
                    path.push(n);
                    cur = n;
                    assert!(path.len() <= 4, "{from} -> {to}: {path:?}");
                }
                for s in &path[1..path.len() - 1] {
                    assert!(!s.saving(), "{from} -> {to} passes through {s}: {path:?}");
                }
                // Shortest: a breadth-first search over the arcs (without saving states inside) agrees.
                let mut frontier = vec![(from, 0usize)];
                let mut best = None;
                while let Some((s, d)) = frontier.pop() {
                    if s == to {
                        best = Some(best.map_or(d, |b: usize| b.min(d)));
                        continue;
                    }
                    if d > 4 || (s != from && s.saving()) {
                        continue;
                    }
                    frontier.extend(arcs.iter().filter(|a| a.0 == s).map(|a| (a.1, d + 1)));
                }
                assert_eq!(Some(path.len() - 1), best, "{from} -> {to}: {path:?}");
            }
        }
    }
}
