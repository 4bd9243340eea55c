//! The vfio-user commands a migrating VMM sends, over the raw [`Client`], each returning an error that names the
//! command instead of panicking: VERSION, DMA_MAP with an fd, MSI-X eventfds, and migration v2 (the MIGRATION and
//! MIG_DEVICE_STATE features, MIG_DATA_READ/WRITE, DMA_LOGGING_START/STOP/REPORT). Layouts: `docs/migration.md`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::client::parse_version_reply;
use crate::wire::*;
use crate::{Client, Reply};

pub type Result<T> = std::result::Result<T, String>;

/// DEVICE_FEATURE flags and indexes (vfio uapi).
pub const FEATURE_GET: u32 = 1 << 16;
pub const FEATURE_SET: u32 = 1 << 17;
pub const FEATURE_MIGRATION: u32 = 1;
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY.
pub const MIGRATION_STOP_COPY: u64 = 1;
pub const MIGRATION_PRE_COPY: u64 = 4;

/// `enum vfio_device_mig_state`.
pub mod state {
    pub const STOP: u32 = 1;
    pub const RUNNING: u32 = 2;
    pub const STOP_COPY: u32 = 3;
    pub const RESUMING: u32 = 4;
    pub const PRE_COPY: u32 = 6;

    pub fn name(s: u32) -> &'static str {
        match s {
            0 => "ERROR",
            STOP => "STOP",
            RUNNING => "RUNNING",
            STOP_COPY => "STOP_COPY",
            RESUMING => "RESUMING",
            PRE_COPY => "PRE_COPY",
            _ => "?",
        }
    }
}

/// Bytes asked for per MIG_DATA_READ, and written per MIG_DATA_WRITE.
const DATA_CHUNK: u32 = 64 * 1024;

/// Largest DMA_LOGGING_REPORT bitmap asked for at once (well under any max_data_xfer_size).
const REPORT_BITMAP_BYTES: u64 = 64 * 1024;

/// Sends a command and turns a transport error or an error reply into a message naming `what`.
pub fn call(c: &mut Client, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>], what: &str) -> Result<Reply> {
    let r = c.request(cmd, payload, fds).map_err(|e| format!("{what}: no reply: {e}"))?;
    match r.errno {
        Some(e) => Err(format!("{what}: the server answered errno {e} ({})", io::Error::from_raw_os_error(e))),
        None => Ok(r),
    }
}

/// VERSION with QEMU's capabilities; returns the server's max_data_xfer_size.
pub fn negotiate(c: &mut Client) -> Result<u64> {
    let mut caps = QEMU_LIKE_CAPS.as_bytes().to_vec();
    caps.push(0);
    let r = call(c, cmd::VERSION, &Payload::new().u16(0).u16(0).bytes(&caps).build(), &[], "VERSION")?;
    let (_, caps) = parse_version_reply(&r);
    Ok(caps.get("max_data_xfer_size").and_then(|v| v.as_u64()).unwrap_or(1 << 20))
}

/// DMA_MAP of `size` bytes of `fd` (from offset 0) at `iova`, readable and writable.
pub fn dma_map_fd(c: &mut Client, iova: u64, size: u64, fd: BorrowedFd<'_>) -> Result<()> {
    let p = Payload::new().u32(32).u32(DMA_RW).u64(0).u64(iova).u64(size).build();
    call(c, cmd::DMA_MAP, &p, &[fd], "DMA_MAP")?;
    Ok(())
}

/// The number of MSI-X vectors (DEVICE_GET_IRQ_INFO).
pub fn msix_count(c: &mut Client) -> Result<u32> {
    let r = call(
        c,
        cmd::DEVICE_GET_IRQ_INFO,
        &Payload::new().u32(16).u32(0).u32(IRQ_MSIX).u32(0).build(),
        &[],
        "IRQ_INFO",
    )?;
    Ok(r.u32_at(12))
}

/// SET_IRQS: one eventfd per MSI-X vector, from vector 0.
pub fn set_msix_eventfds(c: &mut Client, efds: &[OwnedFd]) -> Result<()> {
    let fds: Vec<BorrowedFd<'_>> = efds.iter().map(|f| f.as_fd()).collect();
    let p =
        crate::client::set_irqs_payload(20, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IRQ_MSIX, 0, efds.len() as u32, &[]);
    call(c, cmd::DEVICE_SET_IRQS, &p, &fds, "SET_IRQS (MSI-X eventfds)")?;
    Ok(())
}

/// DEVICE_FEATURE GET MIGRATION: the migration flags.
pub fn migration_flags(c: &mut Client) -> Result<u64> {
    let p = Payload::new().u32(16).u32(FEATURE_GET | FEATURE_MIGRATION).build();
    Ok(call(c, cmd::DEVICE_FEATURE, &p, &[], "GET MIGRATION")?.u64_at(8))
}

/// MIG_DEVICE_STATE SET; returns the state the reply reports.
pub fn set_state(c: &mut Client, s: u32) -> Result<u32> {
    let p = Payload::new().u32(16).u32(FEATURE_SET | FEATURE_MIG_DEVICE_STATE).u32(s).u32(u32::MAX).build();
    let r = call(c, cmd::DEVICE_FEATURE, &p, &[], &format!("MIG_DEVICE_STATE SET {}", state::name(s)))?;
    let got = r.u32_at(8);
    if got != s {
        return Err(format!("MIG_DEVICE_STATE SET {}: the reply says {}", state::name(s), state::name(got)));
    }
    Ok(got)
}

/// MIG_DEVICE_STATE GET.
pub fn get_state(c: &mut Client) -> Result<u32> {
    let p = Payload::new().u32(16).u32(FEATURE_GET | FEATURE_MIG_DEVICE_STATE).build();
    Ok(call(c, cmd::DEVICE_FEATURE, &p, &[], "MIG_DEVICE_STATE GET")?.u32_at(8))
}

/// MIG_DATA_READ until a reply carries less than asked for: the data of the current transfer.
pub fn data_read_all(c: &mut Client) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let p = Payload::new().u32(8 + DATA_CHUNK).u32(DATA_CHUNK).build();
        let r = call(c, cmd::MIG_DATA_READ, &p, &[], "MIG_DATA_READ")?;
        let n = r.u32_at(4) as usize;
        if r.payload.len() != 8 + n || n > DATA_CHUNK as usize {
            return Err(format!("MIG_DATA_READ: reply of {} bytes says {n} bytes of data", r.payload.len()));
        }
        out.extend_from_slice(&r.payload[8..]);
        if n < DATA_CHUNK as usize {
            return Ok(out);
        }
    }
}

/// MIG_DATA_WRITE of `data`, in chunks.
pub fn data_write_all(c: &mut Client, data: &[u8]) -> Result<()> {
    for chunk in data.chunks(DATA_CHUNK as usize) {
        let p = Payload::new().u32(8 + chunk.len() as u32).u32(chunk.len() as u32).bytes(chunk).build();
        call(c, cmd::MIG_DATA_WRITE, &p, &[], "MIG_DATA_WRITE")?;
    }
    Ok(())
}

/// DMA_LOGGING_START over `ranges` (iova, length) at `page_size`; returns the page size the server chose.
pub fn logging_start(c: &mut Client, page_size: u64, ranges: &[(u64, u64)]) -> Result<u64> {
    let mut p = Payload::new()
        .u32(8 + 16 + 16 * ranges.len() as u32)
        .u32(FEATURE_SET | FEATURE_DMA_LOGGING_START)
        .u64(page_size)
        .u32(ranges.len() as u32)
        .u32(0);
    for &(iova, len) in ranges {
        p = p.u64(iova).u64(len);
    }
    Ok(call(c, cmd::DEVICE_FEATURE, &p.build(), &[], "DMA_LOGGING_START")?.u64_at(8))
}

pub fn logging_stop(c: &mut Client) -> Result<()> {
    let p = Payload::new().u32(8).u32(FEATURE_SET | FEATURE_DMA_LOGGING_STOP).build();
    call(c, cmd::DEVICE_FEATURE, &p, &[], "DMA_LOGGING_STOP")?;
    Ok(())
}

/// DMA_LOGGING_REPORT of `[iova, iova + len)` at `page_size`, split so each bitmap stays small: the page
/// numbers (absolute, in `page_size` units) the device wrote since the last report.
pub fn logging_report(c: &mut Client, iova: u64, len: u64, page_size: u64) -> Result<Vec<u64>> {
    let span = REPORT_BITMAP_BYTES * 8 * page_size;
    let mut pages = Vec::new();
    let mut at = iova;
    while at < iova + len {
        let n = (iova + len - at).min(span);
        let words = (n / page_size).div_ceil(64);
        let p = Payload::new()
            .u32(32 + 8 * words as u32)
            .u32(FEATURE_GET | FEATURE_DMA_LOGGING_REPORT)
            .u64(at)
            .u64(n)
            .u64(page_size)
            .build();
        let r = call(c, cmd::DEVICE_FEATURE, &p, &[], "DMA_LOGGING_REPORT")?;
        if r.payload.len() != 32 + 8 * words as usize {
            return Err(format!("DMA_LOGGING_REPORT: reply of {} bytes for {words} bitmap words", r.payload.len()));
        }
        for w in 0..words as usize {
            crate::refvmm::mem::push_bits(r.u64_at(32 + 8 * w), at / page_size + 64 * w as u64, &mut pages);
        }
        at += n;
    }
    Ok(pages)
}
