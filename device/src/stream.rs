//! The device-state stream (docs/migration-stream.md): records of typed, length-prefixed sections with a magic, a
//! version, a total length with a hard bound, and a CRC32C. A `compat` record (identity only) goes first, during
//! PRE_COPY, so a destination can refuse an incompatible source before the guest stops; a `state` record carries
//! everything at STOP_COPY. The decoder treats its input as hostile: every length is bounded, every section is
//! checked for presence and repetition, and the result still goes through [`DeviceState::validate`] when loaded.

use std::collections::VecDeque;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::nic::adminq::ArqMsg;
use crate::nic::offload::crc32c;
use crate::nic::regs::RegFile;
use crate::nic::stats::EthStats;
use crate::nic::virtchnl::{LinkSpeed, Pf, RxQueue, TxQueue};
use crate::pci::MsixState;
use crate::state::{Counters, DeviceState, Identity, NicState, QueueState, ResetPhase, VectorState};

pub const MAGIC: [u8; 8] = *b"VFU-I40E";
pub const VERSION: u16 = 1;
/// The largest record a decoder accepts (a busy device's state is a few KiB; this leaves room for an audit).
pub const MAX_RECORD: usize = 4 << 20;
const HEADER: usize = 16;
const SECTION_HEADER: usize = 8;
const CHECKSUM: usize = 4;

/// Section flag: a decoder that does not know the type skips it instead of failing.
pub const OPTIONAL: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PRE_COPY: identity only.
    Compat = 1,
    /// STOP_COPY: the whole state.
    State = 2,
}

/// Section types.
pub mod section {
    pub const IDENTITY: u16 = 1;
    pub const CONFIG: u16 = 2;
    pub const MSIX: u16 = 3;
    pub const REGS: u16 = 4;
    pub const ADMINQ: u16 = 5;
    pub const VIRTCHNL: u16 = 6;
    pub const QUEUE: u16 = 7;
    pub const FILTERS: u16 = 8;
    pub const RSS: u16 = 9;
    pub const STATS: u16 = 10;
    pub const LINK: u16 = 11;
    pub const VECTORS: u16 = 12;
    /// Server-level: `--migration-audit` page digests.
    pub const AUDIT: u16 = 100;
}

#[derive(Serialize, Deserialize)]
struct Adminq {
    arq: VecDeque<ArqMsg>,
    reset: ResetPhase,
    held_writes: Vec<(u32, u32)>,
    held_flr: bool,
}

#[derive(Serialize, Deserialize)]
struct Virtchnl {
    version: Option<(u32, u32)>,
    caps: u32,
    irq_map: Vec<(u16, u16)>,
    rx_enabled: u32,
    tx_enabled: u32,
}

#[derive(Serialize, Deserialize)]
struct Queue {
    index: u16,
    tx: Option<TxQueue>,
    rx: Option<RxQueue>,
    state: QueueState,
}

#[derive(Serialize, Deserialize)]
struct Filters {
    macs: Vec<[u8; 6]>,
    promisc: u16,
}

#[derive(Serialize, Deserialize)]
struct Rss {
    key: Vec<u8>,
    lut: Vec<u8>,
    hena: u64,
}

#[derive(Serialize, Deserialize)]
struct Stats {
    eth: EthStats,
    counters: Counters,
}

#[derive(Serialize, Deserialize)]
struct Link {
    up: bool,
    speed: LinkSpeed,
}

/// A section a caller adds beside the device's own (the server's audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    pub kind: u16,
    pub optional: bool,
    pub body: Vec<u8>,
}

/// Why a stream is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    Truncated(String),
    Corrupt(String),
    TooLong(usize),
    Version(u16),
    UnknownSection(u16),
    Missing(&'static str),
    Repeated(u16),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Truncated(w) => write!(f, "stream truncated: {w}"),
            StreamError::Corrupt(w) => write!(f, "stream corrupt: {w}"),
            StreamError::TooLong(n) => write!(f, "stream record of {n} bytes is over the {MAX_RECORD}-byte limit"),
            StreamError::Version(v) => write!(f, "stream version {v} is newer than this device's ({VERSION})"),
            StreamError::UnknownSection(t) => {
                write!(f, "stream section type {t} is unknown and not optional (a newer version's?)")
            }
            StreamError::Missing(s) => write!(f, "stream has no {s} section"),
            StreamError::Repeated(t) => write!(f, "stream section type {t} appears twice"),
        }
    }
}

impl std::error::Error for StreamError {}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: Kind) -> Self {
        let mut b = Vec::with_capacity(1024);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(kind as u16).to_le_bytes());
        b.extend_from_slice(&[0; 4]); // length, filled in by finish
        Writer(b)
    }

    fn raw(&mut self, kind: u16, flags: u16, body: &[u8]) {
        self.0.extend_from_slice(&kind.to_le_bytes());
        self.0.extend_from_slice(&flags.to_le_bytes());
        self.0.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.0.extend_from_slice(body);
    }

    fn section<T: Serialize>(&mut self, kind: u16, v: &T) {
        let body = postcard::to_stdvec(v).expect("state serializes");
        self.raw(kind, 0, &body);
    }

    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() + CHECKSUM) as u32;
        self.0[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c(&self.0);
        self.0.extend_from_slice(&crc.to_le_bytes());
        self.0
    }
}

/// The PRE_COPY record: the identity a destination must match.
pub fn encode_compat(id: &Identity) -> Vec<u8> {
    let mut w = Writer::new(Kind::Compat);
    w.section(section::IDENTITY, id);
    w.finish()
}

/// The STOP_COPY record: the whole state, one section per component, one per queue pair, plus `extras`.
pub fn encode_state(s: &DeviceState, extras: &[Extra]) -> Vec<u8> {
    let mut w = Writer::new(Kind::State);
    let (n, pf) = (&s.nic, &s.nic.pf);
    w.section(section::IDENTITY, &s.identity);
    w.section(section::CONFIG, &s.config);
    w.section(section::MSIX, &s.msix);
    w.section(section::REGS, &n.regs);
    w.section(
        section::ADMINQ,
        &Adminq { arq: n.arq.clone(), reset: n.reset, held_writes: n.held_writes.clone(), held_flr: n.held_flr },
    );
    w.section(
        section::VIRTCHNL,
        &Virtchnl {
            version: pf.version,
            caps: pf.caps,
            irq_map: pf.irq_map.clone(),
            rx_enabled: pf.rx_enabled,
            tx_enabled: pf.tx_enabled,
        },
    );
    for (i, q) in n.queues.iter().enumerate() {
        let (tx, rx) = (pf.tx.get(i).copied().flatten(), pf.rx.get(i).copied().flatten());
        w.section(section::QUEUE, &Queue { index: i as u16, tx, rx, state: *q });
    }
    w.section(section::FILTERS, &Filters { macs: pf.macs.clone(), promisc: pf.promisc });
    w.section(section::RSS, &Rss { key: pf.rss_key.clone(), lut: pf.rss_lut.clone(), hena: pf.hena });
    w.section(section::STATS, &Stats { eth: pf.stats, counters: n.counters });
    w.section(section::LINK, &Link { up: pf.link_up, speed: pf.link_speed });
    w.section(section::VECTORS, &n.vectors);
    for e in extras {
        w.raw(e.kind, if e.optional { OPTIONAL } else { 0 }, &e.body);
    }
    w.finish()
}

/// A record taken apart: its kind and its sections (type, flags, body) in order.
pub struct Record<'a> {
    pub kind: Kind,
    pub sections: Vec<(u16, u16, &'a [u8])>,
}

/// The length of the record starting at `b`, once its header is complete; errors for a header no decoder
/// accepts. `Ok(None)`: fewer than 16 bytes so far.
pub fn record_len(b: &[u8]) -> Result<Option<usize>, StreamError> {
    if b.len() < HEADER {
        return Ok(None);
    }
    if b[..8] != MAGIC {
        return Err(StreamError::Corrupt(format!("bad magic {:02x?}", &b[..8])));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version > VERSION || version == 0 {
        return Err(StreamError::Version(version));
    }
    let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    if len > MAX_RECORD {
        return Err(StreamError::TooLong(len));
    }
    if len < HEADER + CHECKSUM {
        return Err(StreamError::Corrupt(format!("record length {len}")));
    }
    Ok(Some(len))
}

/// Splits one complete record (exactly its bytes) into sections, checking magic, version, length and checksum.
pub fn parse_record(b: &[u8]) -> Result<Record<'_>, StreamError> {
    let len = record_len(b)?.ok_or_else(|| StreamError::Truncated(format!("{} bytes, no record header", b.len())))?;
    if b.len() < len {
        return Err(StreamError::Truncated(format!("record of {len} bytes, {} present", b.len())));
    }
    if b.len() > len {
        return Err(StreamError::Corrupt(format!("{} bytes after a record of {len}", b.len() - len)));
    }
    let body_end = len - CHECKSUM;
    let want = u32::from_le_bytes(b[body_end..].try_into().unwrap());
    if crc32c(&b[..body_end]) != want {
        return Err(StreamError::Corrupt("checksum mismatch".into()));
    }
    let kind = match u16::from_le_bytes([b[10], b[11]]) {
        1 => Kind::Compat,
        2 => Kind::State,
        k => return Err(StreamError::Corrupt(format!("record kind {k}"))),
    };
    let mut sections = Vec::new();
    let mut at = HEADER;
    while at < body_end {
        if body_end - at < SECTION_HEADER {
            return Err(StreamError::Corrupt("a section header crosses the record's end".into()));
        }
        let t = u16::from_le_bytes([b[at], b[at + 1]]);
        let flags = u16::from_le_bytes([b[at + 2], b[at + 3]]);
        let n = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        at += SECTION_HEADER;
        if n > body_end - at {
            return Err(StreamError::Corrupt(format!("section {t} of {n} bytes crosses the record's end")));
        }
        sections.push((t, flags, &b[at..at + n]));
        at += n;
    }
    Ok(Record { kind, sections })
}

fn need<T>(v: Option<T>, what: &'static str) -> Result<T, StreamError> {
    v.ok_or(StreamError::Missing(what))
}

fn body<T: DeserializeOwned>(t: u16, b: &[u8]) -> Result<T, StreamError> {
    match postcard::take_from_bytes::<T>(b) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(StreamError::Corrupt(format!("section {t}: {} bytes left over", rest.len()))),
        Err(e) => Err(StreamError::Corrupt(format!("section {t}: {e}"))),
    }
}

/// The identity in a record (compat or state).
pub fn decode_identity(r: &Record<'_>) -> Result<Identity, StreamError> {
    let (_, _, b) = r.sections.iter().find(|s| s.0 == section::IDENTITY).ok_or(StreamError::Missing("identity"))?;
    body(section::IDENTITY, b)
}

/// A state record back into a [`DeviceState`] and the extra sections it carried (known to the caller by type;
/// unknown optional sections are skipped, unknown required ones refused). The state still needs
/// [`DeviceState::validate`] against the device it goes into.
pub fn decode_state(r: &Record<'_>, extra_kinds: &[u16]) -> Result<(DeviceState, Vec<Extra>), StreamError> {
    if r.kind != Kind::State {
        return Err(StreamError::Corrupt("a compat record where the state was expected".into()));
    }
    let identity = decode_identity(r)?;
    let (mut config, mut msix, mut regs, mut adminq, mut vc, mut filters, mut rss, mut stats, mut link, mut vectors) =
        (None, None, None, None, None, None, None, None, None, None);
    let mut queues: Vec<Option<Queue>> = Vec::new();
    let mut extras = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for &(t, flags, b) in &r.sections {
        if t != section::QUEUE && !extra_kinds.contains(&t) && !seen.insert(t) {
            return Err(StreamError::Repeated(t));
        }
        match t {
            section::IDENTITY => {}
            section::CONFIG => config = Some(body::<Vec<u8>>(t, b)?),
            section::MSIX => msix = Some(body::<MsixState>(t, b)?),
            section::REGS => regs = Some(body::<RegFile>(t, b)?),
            section::ADMINQ => adminq = Some(body::<Adminq>(t, b)?),
            section::VIRTCHNL => vc = Some(body::<Virtchnl>(t, b)?),
            section::FILTERS => filters = Some(body::<Filters>(t, b)?),
            section::RSS => rss = Some(body::<Rss>(t, b)?),
            section::STATS => stats = Some(body::<Stats>(t, b)?),
            section::LINK => link = Some(body::<Link>(t, b)?),
            section::VECTORS => vectors = Some(body::<Vec<VectorState>>(t, b)?),
            section::QUEUE => {
                let q: Queue = body(t, b)?;
                let i = usize::from(q.index);
                if i >= usize::from(identity.queue_pairs) {
                    return Err(StreamError::Corrupt(format!("queue section {i} past {} pairs", identity.queue_pairs)));
                }
                queues.resize_with(usize::from(identity.queue_pairs), || None);
                if queues[i].is_some() {
                    return Err(StreamError::Repeated(t));
                }
                queues[i] = Some(q);
            }
            t if extra_kinds.contains(&t) => {
                extras.push(Extra { kind: t, optional: flags & OPTIONAL != 0, body: b.to_vec() })
            }
            t if flags & OPTIONAL != 0 => log::info!("stream: optional section type {t} skipped"),
            t => return Err(StreamError::UnknownSection(t)),
        }
    }
    let config = need(config, "config space")?;
    let (msix, regs, adminq) = (need(msix, "MSI-X")?, need(regs, "register")?, need(adminq, "admin queue")?);
    let (vc, filters, rss) = (need(vc, "virtchnl")?, need(filters, "filter")?, need(rss, "RSS")?);
    let (stats, link, vectors) = (need(stats, "statistics")?, need(link, "link")?, need(vectors, "vector")?);
    queues.resize_with(usize::from(identity.queue_pairs), || None);
    let queues: Vec<Queue> = queues.into_iter().collect::<Option<_>>().ok_or(StreamError::Missing("queue"))?;
    let pf = Pf {
        mac: identity.mac,
        queue_pairs: identity.queue_pairs,
        max_vectors: identity.msix_vectors,
        link_speed: link.speed,
        version: vc.version,
        caps: vc.caps,
        tx: queues.iter().map(|q| q.tx).collect(),
        rx: queues.iter().map(|q| q.rx).collect(),
        irq_map: vc.irq_map,
        rx_enabled: vc.rx_enabled,
        tx_enabled: vc.tx_enabled,
        macs: filters.macs,
        promisc: filters.promisc,
        rss_key: rss.key,
        rss_lut: rss.lut,
        hena: rss.hena,
        stats: stats.eth,
        link_up: link.up,
    };
    let nic = NicState {
        regs,
        pf,
        vectors,
        arq: adminq.arq,
        queues: queues.iter().map(|q| q.state).collect(),
        counters: stats.counters,
        reset: adminq.reset,
        held_writes: adminq.held_writes,
        held_flr: adminq.held_flr,
    };
    Ok((DeviceState { identity, config, msix, nic }, extras))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::GuestMem;
    use crate::{I40eVf, VfConfig};

    fn saved() -> DeviceState {
        let vf = I40eVf::new(VfConfig::default(), GuestMem::new());
        vf.pause();
        vf.save().unwrap()
    }

    #[test]
    fn state_round_trip_and_size() {
        let s = saved();
        let audit = Extra { kind: section::AUDIT, optional: true, body: vec![1, 2, 3] };
        let rec = encode_state(&s, std::slice::from_ref(&audit));
        assert!(rec.len() < 16 * 1024, "idle state record is {} bytes", rec.len());
        println!("idle state record: {} bytes", rec.len());
        assert_eq!(record_len(&rec).unwrap(), Some(rec.len()));
        let (back, extras) = decode_state(&parse_record(&rec).unwrap(), &[section::AUDIT]).unwrap();
        assert_eq!(back, s);
        assert_eq!(extras, vec![audit]);
        // A decoder that does not know the audit skips it (optional).
        let (back, extras) = decode_state(&parse_record(&rec).unwrap(), &[]).unwrap();
        assert_eq!((back, extras.len()), (s, 0));
    }

    #[test]
    fn hostile_records_are_refused_with_a_reason() {
        let s = saved();
        let rec = encode_state(&s, &[]);
        let mut bad = rec.clone();
        bad[40] ^= 1;
        assert!(matches!(parse_record(&bad), Err(StreamError::Corrupt(w)) if w.contains("checksum")));
        assert!(matches!(parse_record(&rec[..rec.len() - 1]), Err(StreamError::Truncated(_))));
        let mut v2 = rec.clone();
        v2[8] = 2;
        assert_eq!(record_len(&v2).err(), Some(StreamError::Version(2)));
        let mut long = rec.clone();
        long[12..16].copy_from_slice(&(MAX_RECORD as u32 + 1).to_le_bytes());
        assert_eq!(record_len(&long).err(), Some(StreamError::TooLong(MAX_RECORD + 1)));
        // A required section of an unknown type, from a newer version.
        let newer = encode_state(&s, &[Extra { kind: 999, optional: false, body: vec![] }]);
        assert_eq!(decode_state(&parse_record(&newer).unwrap(), &[]).err(), Some(StreamError::UnknownSection(999)));
        let compat = encode_compat(&s.identity);
        assert_eq!(decode_identity(&parse_record(&compat).unwrap()).unwrap(), s.identity);
        assert!(decode_state(&parse_record(&compat).unwrap(), &[]).is_err());
    }
}
