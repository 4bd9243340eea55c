//! A classic pcap capture (LINKTYPE_ETHERNET, microsecond timestamps, snaplen 65535) of the frames a backend moves
//! in both directions.
//!
//! [`PcapWriter::record`] only timestamps, copies and queues the record (bounded: [`QUEUE_RECORDS`]; beyond that
//! records are dropped and counted), so the datapath never waits for the disk. A writer thread appends whatever is
//! queued with one `write` per batch of whole records and no user-space buffering in between, so the file on disk
//! is a readable capture up to the last batch even if the process is killed.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::{suppressed, RateLimited};

/// The pcap magic number for microsecond timestamps (written little-endian, so it reads back as this value).
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Longer frames are truncated in the capture (their original length is kept in the record header).
pub const SNAPLEN: u32 = 65535;
/// Records queued for the writer thread before new ones are dropped.
pub const QUEUE_RECORDS: usize = 1024;
/// The global header's length.
pub const GLOBAL_HEADER_LEN: usize = 24;
/// A record header's length.
pub const RECORD_HEADER_LEN: usize = 16;

const BATCH_BYTES: usize = 1 << 20;

enum Msg {
    Record(Vec<u8>),
    Close,
}

/// Writes a pcap file from any thread without blocking it.
pub struct PcapWriter {
    path: PathBuf,
    tx: Sender<Msg>,
    closed: AtomicBool,
    dropped: AtomicU64,
    dropped_log: RateLimited,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Display for PcapWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

/// The 24-byte global header.
pub fn global_header() -> [u8; GLOBAL_HEADER_LEN] {
    let mut h = [0u8; GLOBAL_HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes()); // version 2.4
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs: 0
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// One record (header and captured bytes) for `frame` seen at `ts` since the epoch.
pub fn encode_record(ts: Duration, frame: &[u8]) -> Vec<u8> {
    let caplen = frame.len().min(SNAPLEN as usize);
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + caplen);
    r.extend_from_slice(&(ts.as_secs() as u32).to_le_bytes());
    r.extend_from_slice(&ts.subsec_micros().to_le_bytes());
    r.extend_from_slice(&(caplen as u32).to_le_bytes());
    r.extend_from_slice(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes());
    r.extend_from_slice(&frame[..caplen]);
    r
}

impl PcapWriter {
    /// Creates (or truncates) `path`, writes the global header and starts the writer thread.
    pub fn create(path: &Path) -> io::Result<PcapWriter> {
        let mut file = File::create(path)?;
        file.write_all(&global_header())?;
        let (tx, rx) = bounded(QUEUE_RECORDS);
        let name = path.display().to_string();
        let thread = super::spawn_named("net-pcap", move || writer(file, rx, name))?;
        Ok(PcapWriter {
            path: path.to_owned(),
            tx,
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            dropped_log: RateLimited::new(Duration::from_secs(5)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `frame` for the capture, timestamped now. Never waits: drops the record if the writer is behind.
    pub fn record(&self, frame: &[u8]) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        match self.tx.try_send(Msg::Record(encode_record(ts, frame))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(n) = self.dropped_log.hit() {
                    log::warn!(
                        "pcap {self}: writer behind, a frame was not captured ({total} so far){}",
                        suppressed(n)
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued, stops the writer thread and closes the file. Later records are ignored. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            // Blocks only while the queue is full, i.e. until the writer has made room.
            let _ = self.tx.send(Msg::Close);
            if h.join().is_err() {
                log::error!("pcap {self}: writer thread panicked");
            }
        }
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer(mut file: File, rx: Receiver<Msg>, name: String) {
    let errors = RateLimited::new(Duration::from_secs(5));
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut done = false;
        let mut take = |m: Msg, batch: &mut Vec<u8>| match m {
            Msg::Record(r) => batch.extend_from_slice(&r),
            Msg::Close => done = true,
        };
        take(first, &mut batch);
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            if let Err(e) = file.write_all(&batch) {
                if let Some(n) = errors.hit() {
                    log::error!("pcap {name}: {e}; records lost{}", suppressed(n));
                }
            }
            batch.clear();
        }
        if done {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_record_layout() {
        let h = global_header();
        assert_eq!(&h[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), 65535);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 1);
        let r = encode_record(Duration::new(5, 123_456_789), &[7u8; 20]);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 123_456);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), 20);
        assert_eq!(u32::from_le_bytes(r[12..16].try_into().unwrap()), 20);
        assert_eq!(&r[16..], &[7u8; 20]);
        let big = encode_record(Duration::ZERO, &vec![1u8; 70_000]);
        assert_eq!(u32::from_le_bytes(big[8..12].try_into().unwrap()), 65535);
        assert_eq!(u32::from_le_bytes(big[12..16].try_into().unwrap()), 70_000);
        assert_eq!(big.len(), 16 + 65535);
    }
}
