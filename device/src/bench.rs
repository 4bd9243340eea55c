//! Workloads for the instruction-count benchmark (`bench/src/bin/vfu-icount.rs`): the per-frame TX and RX paths
//! and the dirty-report path, each run synchronously on the caller's thread (a [`Core`] without workers, as the
//! fuzz targets use) so that callgrind's counts do not depend on thread scheduling. Not part of the device's API.
//!
//! The driver's side (re-arming descriptors) is a `pwrite` into the memfd per batch of 32 frames, so it costs a
//! few instructions per frame next to the device's work, as in `vfu-netbench` (32 descriptors per tail write, like
//! `xmit_more`; RX buffers re-posted 32 at a time).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cfg::VfConfig;
use crate::core::Core;
use crate::engine::{rx, tx};
use crate::mem::GuestMem;
use crate::net::FrameSink;
use crate::nic::regs::{QRX_TAIL1, QTX_TAIL1};
use crate::nic::virtchnl::{self, RSS_KEY_SIZE};
use crate::pci::config::{CMD, CMD_BUS_MASTER};

/// Guest memory: one memfd mapped at [`MEM`]; rings and buffers inside it.
const MEM: u64 = 0x10_0000;
const MEM_SIZE: u64 = 0x40_0000;
const TX_RING: u64 = MEM;
const RX_RING: u64 = MEM + 0x1_0000;
const TX_BUFS: u64 = MEM + 0x10_0000;
const RX_BUFS: u64 = MEM + 0x20_0000;
/// Ring entries (both rings) and buffer size.
pub const RING: u32 = 512;
const BUF: u64 = 2048;
/// Descriptors per tail write.
pub const BATCH: u32 = 32;
const TX_DESC: usize = 16;
const RX_DESC: usize = 32;

fn memfd(name: &str, size: u64) -> File {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// Counts transmitted frames and bytes.
#[derive(Default)]
struct Count {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl FrameSink for Count {
    fn transmit(&self, frame: &[u8]) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
}

/// An Ethernet/IPv4/UDP frame of `len` bytes (at least 42) to `dst` with valid IP and UDP checksums.
pub fn udp_frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    assert!(len >= 42, "a {len}-byte frame cannot hold Ethernet, IPv4 and UDP headers");
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = !fold(sum16(0, ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&5001u16.to_be_bytes());
    f[36..38].copy_from_slice(&5002u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // Pseudo-header (addresses, protocol, UDP length), then the UDP header and payload.
    let mut s = sum16(0, &f[26..34]);
    s += 17 + u32::from(udp_len);
    s = sum16(s, &f[34..]);
    let c = match !fold(s) {
        0 => 0xffff,
        c => c,
    };
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

// The test frames' checksums are computed here, apart from nic/offload.rs, on purpose: the frames are the oracle
// the device's checksum check is measured (and checked) against.
fn sum16(mut s: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// CONFIG_VSI_QUEUES for queue pair 0 (`struct virtchnl_vsi_queue_config_info` with one pair).
pub(crate) fn queue_config(tx_ring: u64, rx_ring: u64, len: u16, buf: u32, max_frame: u32) -> Vec<u8> {
    let vsi = virtchnl::VSI_ID.to_le_bytes();
    let mut m = [vsi, 1u16.to_le_bytes()].concat();
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&vsi);
    m.extend_from_slice(&0u16.to_le_bytes());
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&0u16.to_le_bytes());
    m.extend_from_slice(&tx_ring.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&vsi);
    m.extend_from_slice(&0u16.to_le_bytes());
    m.extend_from_slice(&u32::from(len).to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&buf.to_le_bytes());
    m.extend_from_slice(&max_frame.to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&rx_ring.to_le_bytes());
    m.extend_from_slice(&[0; 8]);
    m
}

/// Queue pair 0 of a one-pair VF, up (bus mastering on, rings in memfd memory, RSS granted with a key, the MAC
/// filter set), with a driver that keeps both rings fed.
pub struct Datapath {
    core: Core,
    file: File,
    sink: Arc<Count>,
    frame: Vec<u8>,
    tx_image: Vec<u8>,
    rx_image: Vec<u8>,
    tx_tail: u32,
    rx_tail: u32,
    tx_frames: u64,
    rx_frames: u64,
}

impl Datapath {
    /// `frame_len`: the bytes the device sees per frame (60 for a 64-byte frame on the wire).
    pub fn new(frame_len: usize) -> Self {
        let mem = GuestMem::new();
        let file = memfd("vfu-icount", MEM_SIZE);
        mem.map(MEM, MEM_SIZE, true, true, Some((file.try_clone().expect("dup"), 0))).expect("mapping guest memory");
        let cfg = VfConfig { queue_pairs: 1, ..Default::default() };
        let frame = udp_frame(cfg.mac, frame_len);
        let core = Core::new(cfg, mem);
        let sink = Arc::new(Count::default());
        {
            let mut st = core.lock();
            st.sink = sink.clone();
            st.config.write(CMD, &CMD_BUS_MASTER.to_le_bytes());
            assert!(st.bus_master(), "bus mastering did not turn on");
            let pf = &mut st.nic.pf;
            pf.handle(virtchnl::OP_VERSION, &[1, 0, 0, 0, 1, 0, 0, 0]);
            let m = queue_config(TX_RING, RX_RING, RING as u16, BUF as u32, 1522);
            let r = pf.handle(virtchnl::OP_CONFIG_VSI_QUEUES, &m).reply;
            assert!(r.is_some_and(|(s, _)| s == 0), "CONFIG_VSI_QUEUES refused");
            let mut sel = [0u8; 12];
            sel[..2].copy_from_slice(&virtchnl::VSI_ID.to_le_bytes());
            sel[4] = 1;
            sel[8] = 1;
            pf.handle(virtchnl::OP_ENABLE_QUEUES, &sel);
            assert!(pf.tx_enabled & pf.rx_enabled & 1 == 1, "queue pair 0 not enabled");
            pf.irq_map[1] = (1, 1);
            pf.caps |= virtchnl::CAP_RSS_PF;
            pf.rss_key = (0..RSS_KEY_SIZE).map(|i| (i as u8).wrapping_mul(37).wrapping_add(0x6d)).collect();
            let mac = core.cfg.mac;
            pf.macs.push(mac);
        }
        let mut tx_image = Vec::with_capacity(RING as usize * TX_DESC);
        let mut rx_image = Vec::with_capacity(RING as usize * RX_DESC);
        for i in 0..u64::from(RING) {
            file.write_all_at(&frame, TX_BUFS + i * BUF - MEM).expect("filling a TX buffer");
            let qw1 = ((1u64 | 2) << 4) | ((frame.len() as u64) << 34); // EOP | RS, buffer size
            tx_image.extend_from_slice(&(TX_BUFS + i * BUF).to_le_bytes());
            tx_image.extend_from_slice(&qw1.to_le_bytes());
            rx_image.extend_from_slice(&(RX_BUFS + i * BUF).to_le_bytes());
            rx_image.extend_from_slice(&[0; 24]);
        }
        let mut d = Datapath {
            core,
            file,
            sink,
            frame,
            tx_image,
            rx_image,
            tx_tail: 0,
            rx_tail: 0,
            tx_frames: 0,
            rx_frames: 0,
        };
        d.file.write_all_at(&d.rx_image, RX_RING - MEM).expect("posting RX buffers");
        d.rx_tail = RING - BATCH;
        d.core.lock().set_reg(QRX_TAIL1, d.rx_tail);
        d
    }

    /// Rewrites descriptors `[from, from + n)` (mod the ring) of one ring from its image.
    fn arm(file: &File, image: &[u8], ring: u64, desc: usize, from: u32, n: u32) {
        let (from, n) = (from as usize, n as usize);
        let first = n.min(RING as usize - from);
        file.write_all_at(&image[from * desc..(from + first) * desc], ring - MEM + (from * desc) as u64)
            .expect("writing descriptors");
        if first < n {
            file.write_all_at(&image[..(n - first) * desc], ring - MEM).expect("writing descriptors");
        }
    }

    /// Transmits `n` frames: per batch of up to 32 the driver writes the descriptors and the tail, and the TX
    /// engine walks them (descriptor read, buffer read, writeback, offloads, the sink, the interrupt).
    pub fn tx(&mut self, n: u64) {
        let mut left = n;
        while left > 0 {
            let b = left.min(u64::from(BATCH)) as u32;
            Self::arm(&self.file, &self.tx_image, TX_RING, TX_DESC, self.tx_tail, b);
            self.tx_tail = (self.tx_tail + b) % RING;
            self.core.lock().set_reg(QTX_TAIL1, self.tx_tail);
            tx::process_tx(&self.core, 0);
            left -= u64::from(b);
        }
        self.tx_frames += n;
    }

    /// Receives `n` frames from the wire: each is a fresh copy (as the loopback backend makes), filtered, hashed,
    /// checksummed and written into a posted buffer; the driver re-posts 32 buffers at a time.
    pub fn rx(&mut self, n: u64) {
        for _ in 0..n {
            rx::receive(&self.core, &self.frame);
            self.rx_frames += 1;
            if self.rx_frames.is_multiple_of(u64::from(BATCH)) {
                Self::arm(&self.file, &self.rx_image, RX_RING, RX_DESC, self.rx_tail, BATCH);
                self.rx_tail = (self.rx_tail + BATCH) % RING;
                self.core.lock().set_reg(QRX_TAIL1, self.rx_tail);
            }
        }
    }

    /// Checks that every frame went where it should: counters, the sink, and the last RX writeback and data.
    pub fn check(&self) {
        let st = self.core.lock();
        let q = &st.nic.queues[0];
        assert_eq!(q.stats.tx_frames, self.tx_frames, "TX frames counted");
        assert_eq!(q.stats.rx_frames, self.rx_frames, "RX frames counted");
        assert_eq!(self.sink.frames.load(Ordering::Relaxed), self.tx_frames, "frames at the sink");
        assert_eq!(self.sink.bytes.load(Ordering::Relaxed), self.tx_frames * self.frame.len() as u64);
        assert_eq!(st.nic.pf.stats.rx_discards, 0, "RX discards");
        if self.rx_frames > 0 {
            let last = (q.rx_head + RING - 1) % RING;
            let mut wb = [0u8; 16];
            self.file.read_exact_at(&mut wb, RX_RING - MEM + u64::from(last) * RX_DESC as u64).expect("reading");
            let qw0 = u64::from_le_bytes(wb[..8].try_into().unwrap());
            let qw1 = u64::from_le_bytes(wb[8..].try_into().unwrap());
            let csum = crate::nic::offload::rx_checksum_ok(&self.frame);
            assert!(csum.l3l4p && !csum.ipe && !csum.l4e, "the frame's checksums do not verify");
            let want = 1 | 2 | (3 << 12) | csum.qword1_bits() | ((self.frame.len() as u64) << 38);
            assert_eq!(qw1, want, "RX writeback qword 1 (DD, EOF, RSS, checksum status, length)");
            assert_ne!(qw0 >> 32, 0, "no RSS hash in the writeback");
            let mut data = vec![0u8; self.frame.len()];
            self.file.read_exact_at(&mut data, RX_BUFS + u64::from(last) * BUF - MEM).expect("reading");
            assert!(data == self.frame, "received bytes differ from the frame");
        }
    }
}

/// Dirty logging over one fd-backed mapping: each operation is `marks` 8-byte device writes to distinct pages
/// (logged) and a DMA_LOGGING_REPORT of the whole mapping at 4 KiB pages, which must return exactly those pages.
pub struct DirtyReport {
    mem: GuestMem,
    iova: u64,
    size: u64,
    marks: u64,
}

impl DirtyReport {
    pub fn new(size: u64, marks: u64) -> Self {
        let iova = 1 << 32;
        let mem = GuestMem::new();
        let file = memfd("vfu-icount-dirty", size);
        mem.map(iova, size, true, true, Some((file, 0))).expect("mapping guest memory");
        mem.start_logging(4096, &[], false).expect("starting dirty logging");
        assert!(marks > 0 && marks <= size / 4096);
        DirtyReport { mem, iova, size, marks }
    }

    /// One round of writes and a report. Each marked page must be reported; with `full`, also that no other page
    /// is (a popcount over the whole report, kept out of most rounds so it does not weigh on the count).
    pub fn round(&self, full: bool) {
        let stride = (self.size / self.marks) & !4095;
        for i in 0..self.marks {
            self.mem.write(self.iova + i * stride + 8, &i.to_le_bytes()).expect("device write");
        }
        let bits = self.mem.report(self.iova, self.size, 4096).expect("report");
        assert_eq!(bits.len() as u64, self.size / 4096 / 64, "report length");
        for i in 0..self.marks {
            let page = i * stride / 4096;
            assert!(bits[(page / 64) as usize] & (1 << (page % 64)) != 0, "a written page not reported");
        }
        if full {
            let n: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
            assert_eq!(n, self.marks, "pages reported dirty");
        }
    }
}
