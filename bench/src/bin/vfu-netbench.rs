//! `vfu-netbench`: datapath throughput of the emulated VF, each figure next to a baseline measured in the same run.
//!
//! 1. `frames_64B` / `frames_1500B` (in-process): the device's iavf driver model drives an `I40eVf` whose sink is
//!    the server's `loopback` backend, so every transmitted frame comes back on RX. The driver keeps the TX ring
//!    fed (batches of descriptors closed by one QTX_TAIL write, as `xmit_more` does), reaps TX completions and RX
//!    writebacks and re-posts RX buffers, for a fixed time. Guest memory is a memfd the device maps (`mem=memfd`,
//!    what DMA_MAP with an fd gives it) or, as the baselines for QEMU's plain `-m` RAM, memory without an fd that
//!    the device reaches through its DMA transport: an in-process call (`mem=dma`) or a request/reply over an
//!    AF_UNIX socket to another thread per access (`mem=dma_socket`, the shape of vfio-user DMA_READ/DMA_WRITE);
//!    `dma_ops_per_frame` counts the accesses.
//!    Frames are IPv4/UDP with valid checksums and the driver configures RSS as iavf does, so the device does
//!    its per-frame work (checksum check, Toeplitz hash). 64 B and 1500 B are on-the-wire sizes: the device sees
//!    60 and 1514 bytes (no FCS); `mbit_per_s` counts those bytes.
//! 2. `tcp_host_to_guest` / `tcp_guest_to_host`: a Linux guest (QEMU TCG) with our VF on a tap backend moved into
//!    a network namespace, and the same guest with QEMU's own virtio-net-pci (userspace backend, `vhost=off`), the
//!    same with the guest's receive offloads off (`virtio-net-nogso`: frame-at-a-time receive, as a VF without LRO
//!    does) and QEMU's e1000e, each on a tap in a namespace, in the same run: busybox nc moves `--tcp-mib` MiB each way
//!    (the guest script is `qemu-configs/guest/bench-tcp.sh`), timed from the guest's /proc/uptime; the host checks
//!    the bytes it gets back (SHA-256). The target (issue 13): our VF >= 1.0x virtio-net-pci in both directions.
//!
//! Output: `bench`, `ratio`, `run`, `skip` and `info` lines of key=value fields; human lines start with `#`. The exit
//! status is non-zero on a functional failure (lost, reordered or corrupted frames or bytes, a guest that did not
//! finish), never on a slow figure.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use device::mem::{DmaTransport, GuestMem};
use device::nic::offload::{RXD_QW1_ERROR_IPE, RXD_QW1_ERROR_L4E, RXD_QW1_STATUS_L3L4P};
use device::nic::regs::{QRX_TAIL1, QTX_TAIL1};
use device::nic::virtchnl::*;
use device::{I40eVf, VfConfig, VfioDevice};
use rustix::process::{kill_process, Pid, Signal};
use rustix::thread::{move_into_link_name_space, sched_getaffinity, sched_setaffinity, CpuSet, LinkNameSpaceType};
use server::backend::{Backend, BackendSpec};
use sha2::{Digest, Sha256};
use testkit::{self as dm, Bus, DriverModel};

type Res<T> = Result<T, String>;

/// Above this much CPU use by other processes (% of one CPU) during a measurement, a WARNING line says so.
const BUSY_WARN_PCT: f64 = 25.0;

/// Set by SIGINT or SIGTERM: every loop then gives up with an error, so the guards on the way out stop the guests
/// and the server and delete the namespaces, taps and temporary directories.
static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

fn interrupted() -> Res<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Frames,
    Tcp,
}

#[derive(Parser, Debug)]
#[command(
    name = "vfu-netbench",
    about = "Datapath throughput of vfu-i40evf: frames/s through the loopback backend (memfd vs fd-less memory) and \
             guest TCP throughput under QEMU TCG against QEMU's virtio-net-pci and e1000e",
    after_help = "Build and run (the TCP part needs root and qemu-configs/provision.sh):\n  \
                  cargo build --release -p server -p bench && ./target/release/vfu-netbench\n\
                  Exit status: 0 unless something was lost, corrupted or did not finish."
)]
struct Cli {
    /// Short run: 0.3 s per frames measurement, one round, and no guest boots (prints `skip name=tcp`).
    #[arg(long)]
    quick: bool,

    /// Seconds per frames measurement [default: 2, --quick 0.3].
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,

    /// Frames part: measure a fixed number of frames instead of a time (after a warm-up of N/8 frames), so an
    /// instruction count (valgrind --tool=callgrind) is for a known number of frames. Replaces --seconds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(8..))]
    frames: Option<u64>,

    /// Rounds of frames measurements (every size and memory kind per round, order rotated) [default: 3, --quick 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,

    /// Pin the driver thread to the first allowed CPU and the device's datapath worker to the second (a guest vCPU
    /// and the server's worker on separate CPUs). Off by default: on a shared machine a pinned thread cannot get
    /// away from another process's load, which makes the figures depend on it far more.
    #[arg(long)]
    pin: bool,

    /// TX descriptors per QTX_TAIL write.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    batch: u32,

    /// MiB per TCP direction.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    tcp_mib: u32,

    /// Guest boots per NIC for the TCP part, the order rotated each round (A-B-C, B-C-A, C-A-B, ...).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    tcp_rounds: u32,

    /// Guest kernel for the TCP part (qemu-configs/build-guest.sh).
    #[arg(long, value_name = "K", default_value = "6.12")]
    kernel: String,

    /// The server binary [default: vfu-i40evf next to this executable].
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,

    /// The qemu-configs directory [default: the workspace's].
    #[arg(long, value_name = "DIR")]
    qemu_configs: Option<PathBuf>,

    /// Frames part: only these frame sizes, in bytes on the wire (for profiling one).
    #[arg(long, value_name = "BYTES", value_delimiter = ',', value_parser = ["64", "1500"])]
    sizes: Vec<String>,

    /// Frames part: only these kinds of guest memory (for profiling one).
    #[arg(long, value_name = "KIND", value_delimiter = ',', value_enum)]
    mem: Vec<MemKind>,

    /// Copy each guest's console (and the server's log) into DIR, which must exist.
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,

    /// Run only these parts.
    #[arg(long, value_name = "PART", value_delimiter = ',', value_enum)]
    only: Vec<Part>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, INTERRUPTED.clone()) {
            eprintln!("vfu-netbench: cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let want = |p: Part| cli.only.is_empty() || cli.only.contains(&p);
    let mut failed = false;
    if want(Part::Frames) {
        if let Err(e) = frames_part(&cli) {
            eprintln!("vfu-netbench: FUNCTIONAL FAILURE (frames): {e}");
            failed = true;
        }
    }
    if want(Part::Tcp) {
        if cli.quick {
            println!("skip name=tcp reason=quick");
        } else if let Err(e) = tcp_part(&cli) {
            eprintln!("vfu-netbench: FUNCTIONAL FAILURE (tcp): {e}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Part 1: frames/s through the loopback backend.

/// Guest memory layout of the frames rig.
const RAM_SIZE: u64 = 8 << 20;
const AQ_BASE: u64 = 0x10_0000;
const TX_RING: u64 = 0x20_0000;
/// A 512-entry TX ring is 8 KiB; the RX ring (16 KiB) follows it.
const RX_RING: u64 = 0x20_4000;
const TX_BUFS: u64 = 0x30_0000;
const RX_BUFS: u64 = 0x40_0000;
/// iavf's default ring size.
const RING: u32 = 512;
const BUF: u64 = 2048;
const MAX_FRAME: u32 = 1522;
const TX_DESC: u64 = 16;
const RX_DESC: u64 = 32;
const TX_CMD_EOP_RS: u64 = 0x30;
const DTYPE_DONE: u64 = 0xf;
const RX_DD: u64 = 1;
const RX_EOF: u64 = 2;
/// The RSS hash is in the writeback.
const RX_FLTSTAT_RSS: u64 = 3 << 12;
/// Frames the driver lets be in flight (transmitted, not yet received): RX ring plus the device's RX backlog
/// could hold 1023, so nothing is ever dropped for lack of buffers; drops would show as `rx_discards`.
const CREDIT: u64 = RING as u64;
/// RX buffers the driver re-posts per QRX_TAIL write (iavf: IAVF_RX_BUFFER_WRITE).
const RX_REFILL_BATCH: u32 = 16;
/// Every this many received frames, the whole frame is compared with what was sent (every frame's length is).
const CHECK_EVERY: u64 = 16;

const MEM_KINDS: [MemKind; 3] = [MemKind::Memfd, MemKind::Dma, MemKind::DmaSocket];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MemKind {
    /// A memfd the device maps, as DMA_MAP with an fd gives it.
    Memfd,
    /// No fd: every device access goes through its DMA transport, here an in-process call.
    Dma,
    /// No fd, and every transport call is a request/reply over an AF_UNIX socket to another thread, like the
    /// DMA_READ/DMA_WRITE messages QEMU answers for plain RAM.
    #[value(name = "dma_socket")]
    DmaSocket,
}

impl MemKind {
    fn name(self) -> &'static str {
        match self {
            MemKind::Memfd => "memfd",
            MemKind::Dma => "dma",
            MemKind::DmaSocket => "dma_socket",
        }
    }
}

/// The device's DMA transport for fd-less memory. The memory itself is a mapping of the memfd the driver uses
/// (the guest writes its RAM without taking any lock of ours, so neither does the driver here); every call is
/// counted, and with `sock` it is a round trip to [`dma_peer`].
struct Transport {
    mem: GuestMem,
    sock: Option<Mutex<UnixStream>>,
    ops: AtomicU64,
}

/// Request: op (0 read, 1 write), 7 bytes of padding, address, length, then the data of a write: 24 bytes plus
/// data, about a vfio-user DMA message (16-byte header, 16-byte DMA header). Reply: 8-byte status, then the data
/// of a read.
const DMA_REQ: usize = 24;

fn dma_call(s: &mut UnixStream, op: u8, addr: u64, len: usize, data: Option<&[u8]>, out: &mut [u8]) -> io::Result<()> {
    let mut req = Vec::with_capacity(DMA_REQ + data.map_or(0, |d| d.len()));
    req.extend_from_slice(&[op, 0, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&addr.to_le_bytes());
    req.extend_from_slice(&(len as u64).to_le_bytes());
    if let Some(d) = data {
        req.extend_from_slice(d);
    }
    s.write_all(&req)?;
    let mut status = [0u8; 8];
    s.read_exact(&mut status)?;
    if u64::from_le_bytes(status) != 0 {
        return Err(io::Error::other("the DMA peer refused the access"));
    }
    s.read_exact(out)
}

impl DmaTransport for Transport {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        match &self.sock {
            Some(s) => dma_call(&mut s.lock().unwrap(), 0, addr, buf.len(), None, buf),
            None => self.mem.read(addr, buf).map_err(io::Error::other),
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        match &self.sock {
            Some(s) => dma_call(&mut s.lock().unwrap(), 1, addr, data.len(), Some(data), &mut []),
            None => self.mem.write(addr, data).map_err(io::Error::other),
        }
    }
}

/// The other end of [`MemKind::DmaSocket`]: answers DMA requests from `mem` until the socket closes.
fn dma_peer(mut s: UnixStream, mem: GuestMem) {
    let mut hdr = [0u8; DMA_REQ];
    let mut buf = vec![0u8; 1 << 16];
    while s.read_exact(&mut hdr).is_ok() {
        let addr = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(hdr[16..24].try_into().unwrap()) as usize;
        if len > buf.len() {
            return;
        }
        let data = &mut buf[..len];
        let reply = if hdr[0] == 0 {
            let ok = mem.read(addr, data).is_ok();
            [u64::from(!ok).to_le_bytes().as_slice(), data].concat()
        } else {
            if s.read_exact(data).is_err() {
                return;
            }
            u64::from(mem.write(addr, data).is_err()).to_le_bytes().to_vec()
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// The driver's side: registers through the device, guest memory through its own mapping of the memfd (the guest
/// touches its RAM directly whatever the device does).
struct BenchBus {
    vf: I40eVf,
    mem: GuestMem,
}

impl Bus for BenchBus {
    fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.vf.region_read(0, off, &mut b).expect("BAR0 read");
        u32::from_le_bytes(b)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.vf.region_write(0, off, &v.to_le_bytes()).expect("BAR0 write");
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.vf.region_write(device::CONFIG_REGION, off, &v.to_le_bytes()).expect("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.mem.read(addr, buf).expect("driver memory read");
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.mem.write(addr, data).expect("driver memory write");
    }
}

/// A VF up with one queue pair, its sink the server's loopback backend. Field order is drop order: the device
/// (and its workers) first, then the backend.
struct Rig {
    d: DriverModel<BenchBus>,
    _backend: Backend,
    dma: Option<Arc<Transport>>,
    mac: [u8; 6],
    /// The device's `vf-datapath` thread, for its CPU time.
    worker_tid: String,
}

fn memfd(size: u64) -> Res<File> {
    let fd = rustix::fs::memfd_create("vfu-netbench-ram", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let f = File::from(fd);
    f.set_len(size).map_err(|e| format!("sizing the memfd: {e}"))?;
    Ok(f)
}

fn tid_pid(tid: &str) -> Res<Pid> {
    tid.parse().ok().and_then(Pid::from_raw).ok_or_else(|| format!("bad thread id {tid}"))
}

/// Pins this thread to one CPU until dropped, then restores its affinity.
struct Pinned(CpuSet);

impl Pinned {
    fn to(cpu: usize) -> Res<Pinned> {
        let saved = sched_getaffinity(None).map_err(|e| format!("sched_getaffinity: {e}"))?;
        let mut set = CpuSet::new();
        set.set(cpu);
        sched_setaffinity(None, &set).map_err(|e| format!("pinning the driver to CPU {cpu}: {e}"))?;
        Ok(Pinned(saved))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = sched_setaffinity(None, &self.0);
    }
}

fn datapath_threads() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/proc/self/task") else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "vf-datapath"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Nanoseconds a thread of this process has run (`/proc/self/task/TID/schedstat`, first field).
fn thread_cpu_ns(tid: &str) -> u64 {
    fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// Times a thread of this process went to sleep (`voluntary_ctxt_switches`).
fn thread_sleeps(tid: &str) -> u64 {
    fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds all CPUs of the machine spent busy (/proc/stat: everything but idle and iowait).
fn machine_busy_s() -> f64 {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let busy: u64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy as f64 / USER_HZ
}

/// CPU time of other processes, in % of one CPU, between two (machine busy, ours) samples `dt` apart.
fn others_pct(before: (f64, f64), after: (f64, f64), dt: f64) -> f64 {
    (((after.0 - before.0) - (after.1 - before.1)) / dt * 100.0).max(0.0)
}

fn self_cpu_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

impl Rig {
    fn new(kind: MemKind, worker_cpu: Option<usize>) -> Res<Rig> {
        let before = datapath_threads();
        let f = memfd(RAM_SIZE)?;
        let mapping = |f: &File| -> Res<GuestMem> {
            let m = GuestMem::new();
            let dup = f.try_clone().map_err(|e| format!("dup of the memfd: {e}"))?;
            m.map(0, RAM_SIZE, true, true, Some((dup, 0))).map_err(|e| format!("mapping the memfd: {e}"))?;
            Ok(m)
        };
        let mem = mapping(&f)?;
        let (dev_mem, dma) = match kind {
            MemKind::Memfd => (mapping(&f)?, None),
            MemKind::Dma | MemKind::DmaSocket => {
                let sock = if kind == MemKind::DmaSocket {
                    let (a, b) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
                    let peer_mem = mapping(&f)?;
                    std::thread::Builder::new()
                        .name("dma-peer".into())
                        .spawn(move || dma_peer(b, peer_mem))
                        .map_err(|e| format!("spawning the DMA peer: {e}"))?;
                    Some(Mutex::new(a))
                } else {
                    None
                };
                let t = Arc::new(Transport { mem: mapping(&f)?, sock, ops: AtomicU64::new(0) });
                let dev = GuestMem::new();
                dev.map(0, RAM_SIZE, true, true, None).map_err(|e| format!("device map: {e}"))?;
                dev.set_transport(Some(t.clone()));
                (dev, Some(t))
            }
        };
        let vf = I40eVf::new(VfConfig::default(), dev_mem);
        let mut backend = Backend::open(&BackendSpec::Loopback, None).map_err(|e| format!("loopback backend: {e}"))?;
        vf.set_sink(backend.sink());
        backend.start(vf.rx_port()).map_err(|e| format!("loopback backend: {e}"))?;
        // A new thread names itself once it runs: look for a while.
        let t = Instant::now();
        let worker_tid = loop {
            if let Some(tid) = datapath_threads().into_iter().find(|t| !before.contains(t)) {
                break tid;
            }
            if t.elapsed() > Duration::from_secs(2) {
                return Err("no vf-datapath thread of the new device in /proc/self/task".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some(cpu) = worker_cpu {
            let pid = tid_pid(&worker_tid)?;
            let mut set = CpuSet::new();
            set.set(cpu);
            sched_setaffinity(Some(pid), &set).map_err(|e| format!("pinning vf-datapath to CPU {cpu}: {e}"))?;
        }
        let mut d = DriverModel::new(BenchBus { vf, mem }, AQ_BASE);
        if !d.wait_active(Duration::from_secs(2)) {
            return Err("VFGEN_RSTAT never read VFACTIVE".into());
        }
        let mac = bring_up(&mut d)?;
        Ok(Rig { d, _backend: backend, dma, mac, worker_tid })
    }

    fn stats(&mut self) -> Res<Vec<u64>> {
        let r = self.d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
        if r.status != 0 || r.payload.len() != 96 {
            return Err(format!("GET_STATS: status {} with {} bytes", r.status, r.payload.len()));
        }
        Ok(r.payload.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

/// iavf's probe for one queue pair with 512-entry rings and RSS on (key, LUT, every hash type the PF offers).
fn bring_up(d: &mut DriverModel<BenchBus>) -> Res<[u8; 6]> {
    d.init_aq();
    d.request_ok("VERSION", OP_VERSION, &dm::msg_version(1, 1))?;
    let caps = CAP_L2 | CAP_RSS_PF | CAP_ADV_LINK_SPEED;
    let res = d.request_ok("GET_VF_RESOURCES", OP_GET_VF_RESOURCES, &caps.to_le_bytes())?;
    d.request_ok("CONFIG_IRQ_MAP", OP_CONFIG_IRQ_MAP, &dm::msg_irq_map(&[(1, 1, 1), (0, 0, 0)]))?;
    let mac: [u8; 6] = res.payload.get(30..36).and_then(|m| m.try_into().ok()).ok_or("short GET_VF_RESOURCES")?;
    d.request_ok("ADD_ETH_ADDR", OP_ADD_ETH_ADDR, &dm::msg_eth_addrs(&[mac]))?;
    let mut q = dm::msg_config_queues(1, TX_RING, RING as u16, BUF as u32, MAX_FRAME);
    // msg_config_queues puts the RX ring 4 KiB after the TX ring, too close for 512 entries: move it. The RX
    // ring address is the 8 bytes at 24 in the RX part, which follows the 8-byte header and the 24-byte TX part.
    const RX_RING_AT: usize = 8 + 24 + 24;
    if q.get(RX_RING_AT..RX_RING_AT + 8) != Some(&(TX_RING + 0x1000).to_le_bytes()[..]) {
        return Err("msg_config_queues layout changed: RX ring address not where expected".into());
    }
    q[RX_RING_AT..RX_RING_AT + 8].copy_from_slice(&RX_RING.to_le_bytes());
    d.request_ok("CONFIG_VSI_QUEUES", OP_CONFIG_VSI_QUEUES, &q)?;
    // RSS as iavf sets it up; iavf sizes these messages one byte longer than the key and the LUT.
    d.request_ok("CONFIG_RSS_KEY", OP_CONFIG_RSS_KEY, &dm::msg_rss_key())?;
    let mut lut = [VSI_ID.to_le_bytes(), (RSS_LUT_SIZE as u16).to_le_bytes()].concat();
    lut.extend(std::iter::repeat_n(0u8, RSS_LUT_SIZE + 1));
    d.request_ok("CONFIG_RSS_LUT", OP_CONFIG_RSS_LUT, &lut)?;
    let hena = d.request_ok("GET_RSS_HENA_CAPS", OP_GET_RSS_HENA_CAPS, &[])?;
    d.request_ok("SET_RSS_HENA", OP_SET_RSS_HENA, &hena.payload)?;
    d.request_ok("ENABLE_QUEUES", OP_ENABLE_QUEUES, &dm::msg_queue_select(1, 1))?;
    Ok(mac)
}

fn csum_add(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn csum_fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IPv4/UDP frame of `len` bytes (no FCS) to `dst`, valid IP and UDP checksums, `seq` in the payload.
fn udp_frame(dst: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let (src_ip, dst_ip) = ([10, 216, 0, 1], [10, 216, 0, 2]);
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0xbe, 0x01, 0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&src_ip);
    ip.extend_from_slice(&dst_ip);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let udp_len = ip_len - 20;
    let mut udp = [0x9c, 0x40, 0x23, 0x28, 0, 0, 0, 0].to_vec();
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&seq.to_be_bytes());
    let mut x = u64::from(seq) | 1;
    while udp.len() < usize::from(udp_len) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        udp.push(x as u8);
    }
    let mut pseudo = [src_ip, dst_ip].concat();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let c = match csum_fold(csum_add(csum_add(0, &pseudo), &udp)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

struct FramesRun {
    frames_per_s: f64,
    worker_ns_per_frame: f64,
    driver_ns_per_frame: f64,
    worker_cpu_pct: f64,
    dma_ops_per_frame: Option<f64>,
    doorbells_per_frame: f64,
    worker_sleeps_per_frame: f64,
    /// Other processes' CPU use during the measurement, in % of one CPU.
    others_cpu_pct: f64,
    /// Frames sent (and received) in all, warm-up and drain included.
    posted: u64,
}

/// Ring indices and counters of the driver loop.
struct Rings {
    tx_ntu: u32,
    tx_ntc: u32,
    rx_ntc: u32,
    rx_ntu: u32,
    /// The last QRX_TAIL value written.
    rx_tail: u32,
    posted: u64,
    completed: u64,
    received: u64,
    doorbells: u64,
}

fn rd_u64(d: &mut DriverModel<BenchBus>, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    d.bus.mem_read(addr, &mut b);
    u64::from_le_bytes(b)
}

/// One driver-loop pass: reap TX completions, reap RX frames (re-posting their buffers, with a QRX_TAIL write per
/// [`RX_REFILL_BATCH`]), and post a batch of TX descriptors (one QTX_TAIL write) when the ring and the credit
/// allow. True if it did anything.
fn pass(
    d: &mut DriverModel<BenchBus>,
    r: &mut Rings,
    frames: &[Vec<u8>],
    batch: u32,
    post: bool,
    scratch: &mut Vec<u8>,
) -> Res<bool> {
    let mut progress = false;
    while r.tx_ntc != r.tx_ntu {
        let qw1 = rd_u64(d, TX_RING + u64::from(r.tx_ntc) * TX_DESC + 8);
        if qw1 & 0xf != DTYPE_DONE {
            break;
        }
        r.tx_ntc = (r.tx_ntc + 1) % RING;
        r.completed += 1;
        progress = true;
    }
    let mut reaped = 0;
    loop {
        let at = RX_RING + u64::from(r.rx_ntc) * RX_DESC;
        let qw1 = rd_u64(d, at + 8);
        if qw1 & RX_DD == 0 {
            break;
        }
        let want = &frames[(r.received % u64::from(RING)) as usize];
        let len = ((qw1 >> 38) & 0x3fff) as usize;
        // One buffer per frame, the checksums checked and good, an RSS hash: the device did its whole job.
        let must = RX_EOF | RXD_QW1_STATUS_L3L4P | RX_FLTSTAT_RSS;
        if qw1 & must != must || qw1 & (RXD_QW1_ERROR_IPE | RXD_QW1_ERROR_L4E) != 0 || len != want.len() {
            return Err(format!(
                "RX frame {}: writeback {qw1:#x} (length {len}); expected EOF, L3L4P, RSS, no checksum error, {} bytes",
                r.received,
                want.len()
            ));
        }
        if r.received.is_multiple_of(CHECK_EVERY) {
            scratch.resize(len, 0);
            d.bus.mem_read(RX_BUFS + u64::from(r.rx_ntc) * BUF, scratch);
            if scratch != want {
                return Err(format!("RX frame {}: content differs from what was sent (lost or reordered)", r.received));
            }
        }
        let slot = r.rx_ntu;
        let desc = [(RX_BUFS + u64::from(slot) * BUF).to_le_bytes(), [0; 8]].concat();
        d.bus.mem_write(RX_RING + u64::from(slot) * RX_DESC, &desc);
        r.rx_ntu = (slot + 1) % RING;
        r.rx_ntc = (r.rx_ntc + 1) % RING;
        r.received += 1;
        reaped += 1;
        if reaped == 64 {
            break;
        }
    }
    if reaped > 0 {
        progress = true;
    }
    // iavf returns RX buffers to the device in groups (IAVF_RX_BUFFER_WRITE); when draining, all of them.
    let unposted = (r.rx_ntu + RING - r.rx_tail) % RING;
    if unposted >= RX_REFILL_BATCH || (!post && unposted > 0) {
        d.bus.write32(QRX_TAIL1, r.rx_ntu);
        r.rx_tail = r.rx_ntu;
        r.doorbells += 1;
    }
    let used = (r.tx_ntu + RING - r.tx_ntc) % RING;
    if post && RING - 1 - used >= batch && r.posted - r.received + u64::from(batch) <= CREDIT {
        // Descriptors go in with as few memory writes as the ring's wrap allows, then one tail write.
        let mut i = 0;
        while i < batch {
            let start = r.tx_ntu;
            let n = (batch - i).min(RING - start);
            let mut descs = Vec::with_capacity(n as usize * TX_DESC as usize);
            for k in 0..n {
                let slot = start + k;
                let len = frames[slot as usize].len() as u64;
                descs.extend_from_slice(&(TX_BUFS + u64::from(slot) * BUF).to_le_bytes());
                descs.extend_from_slice(&(TX_CMD_EOP_RS | (len << 34)).to_le_bytes());
            }
            d.bus.mem_write(TX_RING + u64::from(start) * TX_DESC, &descs);
            r.tx_ntu = (start + n) % RING;
            i += n;
        }
        r.posted += u64::from(batch);
        d.bus.write32(QTX_TAIL1, r.tx_ntu);
        r.doorbells += 1;
        progress = true;
    }
    Ok(progress)
}

/// How long one frames measurement lasts.
#[derive(Clone, Copy)]
enum Span {
    Seconds(f64),
    /// A fixed number of frames (received), after a fixed warm-up, for instruction counts.
    Frames(u64),
}

fn run_frames(kind: MemKind, wire_len: usize, span: Span, batch: u32, worker_cpu: Option<usize>) -> Res<FramesRun> {
    let mut rig = Rig::new(kind, worker_cpu)?;
    let len = wire_len - 4; // no FCS
    let frames: Vec<Vec<u8>> = (0..RING).map(|s| udp_frame(rig.mac, len, s)).collect();
    let d = &mut rig.d;
    for (s, f) in frames.iter().enumerate() {
        d.bus.mem_write(TX_BUFS + s as u64 * BUF, f);
    }
    for s in 0..RING - 1 {
        let desc = [(RX_BUFS + u64::from(s) * BUF).to_le_bytes(), [0; 8]].concat();
        d.bus.mem_write(RX_RING + u64::from(s) * RX_DESC, &desc);
    }
    d.bus.write32(QRX_TAIL1, RING - 1);
    let mut r = Rings {
        tx_ntu: 0,
        tx_ntc: 0,
        rx_ntc: 0,
        rx_ntu: RING - 1,
        rx_tail: RING - 1,
        posted: 0,
        completed: 0,
        received: 0,
        doorbells: 0,
    };
    let mut scratch = Vec::new();
    // With a frame count, exactly `limit` frames are posted in all (warm-up and measurement, whole batches), so
    // an instruction count covers a known number of frames whatever the threads' timing.
    let b = u64::from(batch);
    let (warm, warm_frames, limit) = match span {
        Span::Seconds(secs) => (Duration::from_secs_f64((secs / 5.0).min(0.3)), u64::MAX, u64::MAX),
        Span::Frames(n) => (Duration::MAX, (n / 8).div_ceil(b) * b, (n / 8).div_ceil(b) * b + n.div_ceil(b) * b),
    };
    let t0 = Instant::now();
    while t0.elapsed() < warm && r.received < warm_frames {
        interrupted()?;
        let post = r.posted + b <= limit;
        if !pass(d, &mut r, &frames, batch, post, &mut scratch)? {
            std::thread::yield_now();
        }
    }
    let dma0 = rig.dma.as_ref().map(|c| c.ops.load(Ordering::Relaxed));
    let (rx0, tails0, w0, me0) = (r.received, r.doorbells, thread_cpu_ns(&rig.worker_tid), self_cpu_ns());
    let sleeps0 = thread_sleeps(&rig.worker_tid);
    let load0 = (machine_busy_s(), proc_cpu_s(std::process::id(), &[""]).unwrap_or(0.0));
    let start = Instant::now();
    let window = match span {
        Span::Seconds(secs) => Duration::from_secs_f64(secs),
        Span::Frames(_) => Duration::MAX,
    };
    let d = &mut rig.d;
    while start.elapsed() < window && r.received < limit {
        let post = r.posted + b <= limit;
        interrupted()?;
        if !pass(d, &mut r, &frames, batch, post, &mut scratch)? {
            std::thread::yield_now();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (rx1, tails1, w1, me1) = (r.received, r.doorbells, thread_cpu_ns(&rig.worker_tid), self_cpu_ns());
    let sleeps1 = thread_sleeps(&rig.worker_tid);
    let load1 = (machine_busy_s(), proc_cpu_s(std::process::id(), &[""]).unwrap_or(0.0));
    let dma1 = rig.dma.as_ref().map(|c| c.ops.load(Ordering::Relaxed));
    // Drain: everything posted must complete and come back, in order, with nothing dropped.
    let t = Instant::now();
    while r.received < r.posted || r.completed < r.posted {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "after the run, {} of {} frames completed and {} received within 10 s",
                r.completed, r.posted, r.received
            ));
        }
        if !pass(&mut rig.d, &mut r, &frames, batch, false, &mut scratch)? {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let s = rig.stats()?;
    let (rx_unicast, rx_discards, tx_unicast, tx_errors) = (s[1], s[4], s[7], s[11]);
    if rx_discards != 0 || tx_errors != 0 || tx_unicast != r.posted || rx_unicast != r.posted {
        return Err(format!(
            "device stats: tx_unicast {tx_unicast} rx_unicast {rx_unicast} for {} frames, rx_discards {rx_discards}, \
             tx_errors {tx_errors}",
            r.posted
        ));
    }
    let n = (rx1 - rx0) as f64;
    if n == 0.0 {
        return Err("no frame came back during the measurement".into());
    }
    Ok(FramesRun {
        frames_per_s: n / elapsed,
        worker_ns_per_frame: (w1 - w0) as f64 / n,
        driver_ns_per_frame: (me1 - me0) as f64 / n,
        worker_cpu_pct: (w1 - w0) as f64 / (elapsed * 1e7),
        dma_ops_per_frame: dma0.zip(dma1).map(|(a, b)| (b - a) as f64 / n),
        doorbells_per_frame: (tails1 - tails0) as f64 / n,
        worker_sleeps_per_frame: (sleeps1 - sleeps0) as f64 / n,
        others_cpu_pct: others_pct(load0, load1, elapsed),
        posted: r.posted,
    })
}

fn frames_part(cli: &Cli) -> Res<()> {
    let secs = cli.seconds.unwrap_or(if cli.quick { 0.3 } else { 2.0 });
    if !(0.01..=600.0).contains(&secs) {
        return Err(format!("--seconds {secs}: out of range"));
    }
    let span = cli.frames.map_or(Span::Seconds(secs), Span::Frames);
    let rounds = cli.rounds.unwrap_or(if cli.quick { 1 } else { 3 });
    let cases: Vec<(usize, MemKind)> = [64, 1518]
        .iter()
        .flat_map(|&w| MEM_KINDS.map(|k| (w, k)))
        .filter(|c| cli.mem.is_empty() || cli.mem.contains(&c.1))
        .filter(|c| cli.sizes.is_empty() || cli.sizes.iter().any(|s| (s == "64") == (c.0 == 64)))
        .collect();
    let mut runs: Vec<Vec<FramesRun>> = cases.iter().map(|_| Vec::new()).collect();
    let allowed = sched_getaffinity(None).map_err(|e| format!("sched_getaffinity: {e}"))?;
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| allowed.is_set(c)).collect();
    let (_pin, worker_cpu) = match (cli.pin, cpus.as_slice()) {
        (true, [a, b, ..]) => (Some(Pinned::to(*a)?), Some(*b)),
        _ => (None, None),
    };
    match worker_cpu {
        Some(w) => println!("info name=placement driver_cpu={} worker_cpu={w} pinned=yes", cpus[0]),
        None => println!("info name=placement pinned=no cpus={}", cpus.len()),
    }
    println!(
        "# frames: driver model -> I40eVf -> loopback backend -> RX, {RING}-entry rings, {} descriptors per tail \
         write, {secs} s x {rounds} round(s)",
        cli.batch
    );
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (k + round as usize) % cases.len();
            let (wire, kind) = cases[i];
            let run = run_frames(kind, wire, span, cli.batch, worker_cpu)
                .map_err(|e| format!("{}-byte frames, mem={}: {e}", wire, kind.name()))?;
            runs[i].push(run);
        }
    }
    let mut fps = Vec::new();
    for (i, &(wire, kind)) in cases.iter().enumerate() {
        let rs = &runs[i];
        let f: Vec<f64> = rs.iter().map(|r| r.frames_per_s).collect();
        let m = median(&f);
        let pick = |g: fn(&FramesRun) -> f64| median(&rs.iter().map(g).collect::<Vec<_>>());
        let name = if wire == 64 { "frames_64B" } else { "frames_1500B" };
        let dma = match rs[0].dma_ops_per_frame {
            Some(_) => format!(" dma_ops_per_frame={:.2}", pick(|r| r.dma_ops_per_frame.unwrap_or(0.0))),
            None => String::new(),
        };
        println!(
            "bench name={name} mem={} frame_bytes={} frames_per_s={m:.0} mbit_per_s={:.1} min={:.0} max={:.0} \
             rounds={rounds} seconds={secs} worker_ns_per_frame={:.0} worker_cpu_pct={:.0} driver_ns_per_frame={:.0} \
             doorbells_per_frame={:.4} worker_sleeps_per_frame={:.4} others_cpu_pct={:.0} frames_total={}{dma}",
            kind.name(),
            wire - 4,
            m * (wire - 4) as f64 * 8.0 / 1e6,
            f.iter().copied().fold(f64::INFINITY, f64::min),
            f.iter().copied().fold(0.0, f64::max),
            pick(|r| r.worker_ns_per_frame),
            pick(|r| r.worker_cpu_pct),
            pick(|r| r.driver_ns_per_frame),
            pick(|r| r.doorbells_per_frame),
            pick(|r| r.worker_sleeps_per_frame),
            pick(|r| r.others_cpu_pct),
            rs[0].posted,
        );
        let busiest = rs.iter().map(|r| r.others_cpu_pct).fold(0.0, f64::max);
        if busiest > BUSY_WARN_PCT {
            println!(
                "# WARNING: other processes used up to {busiest:.0}% of a CPU during {name} mem={}: this figure \
                 measured the machine's load too",
                kind.name()
            );
        }
        fps.push((name, kind, m));
    }
    for name in ["frames_64B", "frames_1500B"] {
        let get = |k| fps.iter().find(|f| f.0 == name && f.1 == k).map(|f| f.2).unwrap_or(f64::NAN);
        for vs in [MemKind::Dma, MemKind::DmaSocket] {
            let v = get(MemKind::Memfd) / get(vs);
            if v.is_finite() {
                println!("ratio name={name} mem=memfd vs={} value={v:.2}", vs.name());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Part 2: guest TCP throughput under TCG, our VF against QEMU's virtio-net-pci (userspace backend) and e1000e.

const HOST: &str = "10.215.0.1";
const GUEST: &str = "10.215.0.2";
const PORT_TO_GUEST: u16 = 5002;
const PORT_FROM_GUEST: u16 = 5001;
/// Linux USER_HZ: the unit of utime/stime in /proc/PID/stat.
const USER_HZ: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nic {
    Vf,
    VirtioNet,
    /// virtio-net-pci with the guest's receive offloads off (no TSO/ECN/UFO packets into the guest): the same
    /// frame-at-a-time receive iavf does, since a VF has no LRO. Separates the offload from the rest.
    VirtioNetNoGso,
    E1000e,
}

impl Nic {
    const ALL: [Nic; 4] = [Nic::Vf, Nic::VirtioNet, Nic::VirtioNetNoGso, Nic::E1000e];

    fn name(self) -> &'static str {
        match self {
            Nic::Vf => "vfu",
            Nic::VirtioNet => "virtio-net",
            Nic::VirtioNetNoGso => "virtio-net-nogso",
            Nic::E1000e => "e1000e",
        }
    }
    fn driver(self) -> &'static str {
        match self {
            Nic::Vf => "iavf",
            Nic::VirtioNet | Nic::VirtioNetNoGso => "virtio_net",
            Nic::E1000e => "e1000e",
        }
    }
    /// QEMU's `-device` for a NIC QEMU emulates itself, on the tap netdev `n0`.
    fn qemu_device(self) -> Option<&'static str> {
        match self {
            Nic::Vf => None,
            Nic::VirtioNet => Some("virtio-net-pci"),
            Nic::VirtioNetNoGso => Some("virtio-net-pci,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"),
            Nic::E1000e => Some("e1000e"),
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call, short enough for an interface name (15 bytes).
fn unique(tag: &str) -> String {
    format!("vfunb{tag}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Res<TempDir> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        // /tmp, not $TMPDIR: the vfio-user socket path must fit in 108 bytes.
        let p = PathBuf::from(format!("/tmp/vfu-netbench-{}-{nanos:x}", std::process::id()));
        fs::create_dir(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace of our own, deleted on drop (with the links in it).
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Res<NetNs> {
        let name = unique("ns");
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Res<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a thread inside this namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> Res<T> + Send + 'static) -> JoinHandle<Res<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| format!("setns {path}: {e}"))?;
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output();
    }
}

/// A child process stopped on drop by its PID: SIGTERM, then SIGKILL after 5 s.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let t = Instant::now();
        while self.running() {
            if t.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// CPU seconds of a process (all threads, living and dead), if its command name starts with one of `comms`.
fn proc_cpu_s(pid: u32, comms: &[&str]) -> Option<f64> {
    stat_cpu_s(&format!("/proc/{pid}/stat"), comms)
}

/// QEMU's vCPU thread ("CPU 0/TCG").
fn vcpu_thread(pid: u32) -> Option<String> {
    fs::read_dir(format!("/proc/{pid}/task")).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        comm.starts_with("CPU ").then(|| e.path().join("stat").to_string_lossy().into_owned())
    })
}

/// utime + stime in seconds from a /proc stat file, if the command name starts with one of `comms`.
fn stat_cpu_s(path: &str, comms: &[&str]) -> Option<f64> {
    let s = fs::read_to_string(path).ok()?;
    let (name, rest) = s.split_once(" (")?.1.rsplit_once(") ")?;
    if !comms.iter().any(|c| name.starts_with(c)) {
        return None;
    }
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    let (u, s): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((u + s) / USER_HZ)
}

/// Deterministic bytes (xorshift64), so the host can check what comes back.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Accepts one connection, giving up when `stop` is set.
fn accept(l: &TcpListener, stop: &AtomicBool) -> Res<TcpStream> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return Err("the guest never connected".into());
                }
                interrupted()?;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

fn stalled(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// Host -> guest: sends `data` to the guest that connects, then closes. Returns the host-side send time
/// (accept to last write, before the guest has read everything).
fn send_to_guest(l: TcpListener, data: Arc<Vec<u8>>, stop: Arc<AtomicBool>) -> Res<(Instant, Instant)> {
    let mut s = accept(&l, &stop)?;
    let t0 = Instant::now();
    s.set_write_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    let mut at = 0;
    while at < data.len() {
        match s.write(&data[at..(at + (1 << 16)).min(data.len())]) {
            Ok(0) => return Err("guest closed early".into()),
            Ok(n) => at += n,
            Err(e) if stalled(&e) && !stop.load(Ordering::SeqCst) => {}
            Err(e) => return Err(format!("sending to the guest after {at} bytes: {e}")),
        }
    }
    let t1 = Instant::now();
    let _ = s.shutdown(Shutdown::Write);
    Ok((t0, t1))
}

/// Guest -> host: receives until EOF; (bytes, SHA-256, accept time, time of the last byte).
fn recv_from_guest(l: TcpListener, stop: Arc<AtomicBool>) -> Res<(usize, String, Instant, Instant)> {
    let mut s = accept(&l, &stop)?;
    let t0 = Instant::now();
    let mut last = t0;
    s.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n;
                last = Instant::now();
            }
            Err(e) if stalled(&e) && !stop.load(Ordering::SeqCst) => {}
            Err(e) => return Err(format!("receiving from the guest after {total} bytes: {e}")),
        }
    }
    Ok((total, hex(&h.finalize()), t0, last))
}

struct TcpRun {
    /// MiB/s from the guest's /proc/uptime stamps.
    to_guest: f64,
    from_guest: f64,
    /// The same transfers timed on the host (host -> guest: until the host's last write).
    from_guest_host: f64,
    to_guest_host: f64,
    /// CPU use during guest -> host: QEMU (all threads) and the server, in % of one CPU.
    qemu_pct: f64,
    /// Of which QEMU's vCPU thread.
    vcpu_pct: f64,
    server_pct: Option<f64>,
    /// Other processes' CPU use during guest -> host, in % of one CPU.
    others_pct: f64,
    boot_s: f64,
}

struct Paths {
    server: PathBuf,
    run_vm: PathBuf,
    script: PathBuf,
}

fn field<'a>(l: &'a str, key: &str) -> Res<&'a str> {
    l.split_whitespace().find_map(|w| w.strip_prefix(key)).ok_or_else(|| format!("no {key} in '{l}'"))
}

fn console_line<'a>(out: &'a str, prefix: &str) -> Res<&'a str> {
    out.lines().find(|l| l.starts_with(prefix)).ok_or_else(|| format!("no '{prefix}' line"))
}

fn uptime_span(l: &str) -> Res<f64> {
    let p = |k| field(l, k).and_then(|v| v.parse::<f64>().map_err(|e| format!("{k}{v}: {e}")));
    Ok(p("end=")? - p("start=")?)
}

/// CPU % of one CPU between two instants, from (time, cpu seconds) samples.
fn cpu_pct(samples: &[(Instant, f64)], from: Instant, to: Instant) -> Option<f64> {
    let a = samples.iter().rev().find(|s| s.0 <= from)?;
    let b = samples.iter().find(|s| s.0 >= to)?;
    let dt = b.0.duration_since(a.0).as_secs_f64();
    (dt > 0.0).then(|| (b.1 - a.1) / dt * 100.0)
}

fn tcp_trial(nic: Nic, cli: &Cli, paths: &Paths, data: &Arc<Vec<u8>>, want_hash: &str) -> Res<TcpRun> {
    let dir = TempDir::new()?;
    let ns = NetNs::new()?;
    let tap = unique("t");
    let host_cidr = format!("{HOST}/24");
    let mut server = None;
    match nic {
        Nic::Vf => {
            let socket = dir.0.join("vf.sock");
            let log = File::create(dir.0.join("server.log")).map_err(|e| e.to_string())?;
            let log2 = log.try_clone().map_err(|e| e.to_string())?;
            let child = Command::new(&paths.server)
                .arg("--socket")
                .arg(&socket)
                .args(["--backend", &format!("tap:{tap}")])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(|e| format!("spawning {}: {e}", paths.server.display()))?;
            let mut p = Proc { child };
            let t = Instant::now();
            while UnixStream::connect(&socket).is_err() {
                if !p.running() || t.elapsed() > Duration::from_secs(10) {
                    let log = fs::read_to_string(dir.0.join("server.log")).unwrap_or_default();
                    return Err(format!("server did not come up:\n{log}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // The server created the tap in our namespace; move it into the private one.
            run(Command::new("ip").args(["link", "set", &tap, "netns", &ns.name]))?;
            server = Some(p);
        }
        Nic::VirtioNet | Nic::VirtioNetNoGso | Nic::E1000e => {
            ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        }
    }
    ns.ip(&["addr", "add", &host_cidr, "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;

    // Host ends, listening before the guest boots.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (d, s, r) = (data.clone(), stop.clone(), ready_tx.clone());
    let sender = ns.spawn(move || {
        let l = TcpListener::bind((HOST, PORT_TO_GUEST)).map_err(|e| format!("bind {PORT_TO_GUEST}: {e}"));
        let _ = r.send(());
        send_to_guest(l?, d, s)
    });
    let (s, r) = (stop.clone(), ready_tx);
    let receiver = ns.spawn(move || {
        let l = TcpListener::bind((HOST, PORT_FROM_GUEST)).map_err(|e| format!("bind {PORT_FROM_GUEST}: {e}"));
        let _ = r.send(());
        recv_from_guest(l?, s)
    });
    for _ in 0..2 {
        ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "host listeners did not start")?;
    }

    let timeout = 900;
    let append = format!("bench.driver={} bench.ip={GUEST}/24 bench.peer={HOST}", nic.driver());
    let mut cmd = match nic {
        Nic::Vf => {
            let mut c = Command::new(&paths.run_vm);
            c.arg("--socket").arg(dir.0.join("vf.sock"));
            c
        }
        Nic::VirtioNet | Nic::VirtioNetNoGso | Nic::E1000e => {
            // QEMU attaches to the tap by name, so it runs in the namespace (`ip netns exec` execs: same PID).
            // vhost=off: virtio-net's datapath stays in QEMU (its main loop), the userspace backend.
            let device = nic.qemu_device().unwrap_or_default();
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(&paths.run_vm).arg("--no-device").args([
                "--extra",
                &format!(
                    "-netdev tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off -device {device},netdev=n0,bus=rp1"
                ),
            ]);
            c
        }
    };
    cmd.args(["--kernel", &cli.kernel, "--mem", "512", "--timeout", &timeout.to_string()])
        .arg("--script")
        .arg(&paths.script)
        .args(["--append", &append]);
    let console = dir.0.join("console.log");
    let out = File::create(&console).map_err(|e| e.to_string())?;
    let err = File::create(dir.0.join("qemu.err")).map_err(|e| e.to_string())?;
    let booted = Instant::now();
    let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(|e| format!("run-vm.sh: {e}"))?;
    let mut qemu = Proc { child };
    let qemu_pid = qemu.pid();
    let server_pid = server.as_ref().map(|p: &Proc| p.pid());
    let mut qemu_cpu = Vec::new();
    let (mut vcpu, mut vcpu_cpu) = (None, Vec::new());
    let mut server_cpu = Vec::new();
    let mut others_cpu = Vec::new();
    let deadline = Duration::from_secs(timeout + 30);
    while qemu.running() {
        let now = Instant::now();
        // $BUILD/qemu/bin/qemu-system-x86_64 may exec QEMU through its own ld.so.
        if let Some(c) = proc_cpu_s(qemu_pid, &["qemu", "ld-linux"]) {
            qemu_cpu.push((now, c));
            if vcpu.is_none() {
                vcpu = vcpu_thread(qemu_pid);
            }
            if let Some(c) = vcpu.as_deref().and_then(|p| stat_cpu_s(p, &["CPU "])) {
                vcpu_cpu.push((now, c));
            }
        }
        let srv = server_pid.and_then(|p| proc_cpu_s(p, &["vfu-i40evf"]));
        if let Some(c) = srv {
            server_cpu.push((now, c));
        }
        // Everything else the machine ran: busy time minus QEMU, the server and this process.
        if let (Some(q), Some(me)) = (qemu_cpu.last(), proc_cpu_s(std::process::id(), &[""])) {
            others_cpu.push((now, machine_busy_s() - q.1 - srv.unwrap_or(0.0) - me));
        }
        if booted.elapsed() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ran = booted.elapsed().as_secs_f64();
    drop(qemu);
    if nic != Nic::Vf {
        // Persistent, so ours to delete (deleting the namespace would too).
        let _ = ns.ip(&["link", "del", &tap]);
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().map_err(|_| "host sender panicked")?;
    let got = receiver.join().map_err(|_| "host receiver panicked")?;
    interrupted()?;
    if let Some(logs) = &cli.logs {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let _ = fs::copy(&console, logs.join(format!("{n:02}-{}-console.log", nic.name())));
        let _ = fs::copy(dir.0.join("server.log"), logs.join(format!("{n:02}-{}-server.log", nic.name())));
    }
    let text = fs::read_to_string(&console).unwrap_or_default();
    let qerr = fs::read_to_string(dir.0.join("qemu.err")).unwrap_or_default();
    let ctx = |e: String| format!("{} guest: {e}\n--- console ---\n{text}\n--- stderr ---\n{qerr}", nic.name());
    if !text.contains("BENCH: done") {
        return Err(ctx(format!("did not finish ({ran:.0} s)")));
    }
    console_line(&text, "BENCH: setup ok").map_err(ctx)?;
    if let Ok(l) = console_line(&text, "BENCH: driver-error") {
        return Err(ctx(format!("driver logged an error: {l}")));
    }
    let (t_send0, t_send1) = sent.map_err(ctx)?;
    let (bytes, hash, t_recv0, t_recv1) = got.map_err(ctx)?;
    let mib = data.len() as f64 / f64::from(1 << 20);
    let tin = console_line(&text, "BENCH: tcp-in").map_err(ctx)?;
    if field(tin, "bytes=").map_err(ctx)? != data.len().to_string() {
        return Err(ctx(format!("the guest received the wrong amount: {tin}")));
    }
    if bytes != data.len() || hash != want_hash {
        return Err(ctx(format!(
            "guest -> host: {bytes} bytes, sha256 {hash}; sent {} bytes, {want_hash}",
            data.len()
        )));
    }
    let tout = console_line(&text, "BENCH: tcp-out").map_err(ctx)?;
    let (in_s, out_s) = (uptime_span(tin).map_err(ctx)?, uptime_span(tout).map_err(ctx)?);
    if let Some(p) = server.as_mut() {
        if !p.running() {
            return Err(ctx("the server died".into()));
        }
    }
    // From spawning QEMU to the guest's first connection: boot, driver probe, link up.
    let boot_s = t_send0.duration_since(booted).as_secs_f64();
    Ok(TcpRun {
        to_guest: mib / in_s,
        from_guest: mib / out_s,
        from_guest_host: mib / t_recv1.duration_since(t_recv0).as_secs_f64(),
        to_guest_host: mib / t_send1.duration_since(t_send0).as_secs_f64(),
        qemu_pct: cpu_pct(&qemu_cpu, t_recv0, t_recv1).unwrap_or(f64::NAN),
        vcpu_pct: cpu_pct(&vcpu_cpu, t_recv0, t_recv1).unwrap_or(f64::NAN),
        server_pct: server.as_ref().and_then(|_| cpu_pct(&server_cpu, t_recv0, t_recv1)),
        others_pct: cpu_pct(&others_cpu, t_recv0, t_recv1).unwrap_or(f64::NAN).max(0.0),
        boot_s,
    })
}

fn tcp_part(cli: &Cli) -> Res<()> {
    if !rustix::process::geteuid().is_root() {
        return Err("the TCP part needs root (network namespaces, tap devices); --quick skips it".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let server = cli.server.clone().unwrap_or_else(|| exe.with_file_name("vfu-i40evf"));
    let qc = cli
        .qemu_configs
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("qemu-configs"));
    let paths = Paths { server, run_vm: qc.join("run-vm.sh"), script: qc.join("guest").join("bench-tcp.sh") };
    for p in [&paths.server, &paths.run_vm, &paths.script] {
        if !p.exists() {
            return Err(format!("{} is missing (build the server; run qemu-configs/provision.sh)", p.display()));
        }
    }
    // A private copy of the server, so a rebuild during the run cannot change it between boots.
    let bin_dir = TempDir::new()?;
    let copy = bin_dir.0.join("vfu-i40evf");
    fs::copy(&paths.server, &copy).map_err(|e| format!("copying {}: {e}", paths.server.display()))?;
    let paths = Paths { server: copy, ..paths };
    // Fails early, with run-vm.sh's message, when QEMU or the guest is not provisioned.
    run(Command::new(&paths.run_vm).args(["--no-device", "--dry-run", "--kernel", &cli.kernel]))?;
    let data = Arc::new(pattern(cli.tcp_mib as usize * (1 << 20), 0x5eed_07c9));
    let want = hex(&Sha256::digest(data.as_slice()));
    println!(
        "# tcp: guest {} under TCG (1 vCPU, 512 MiB), busybox nc, {} MiB each way, {} boot(s) per NIC",
        cli.kernel, cli.tcp_mib, cli.tcp_rounds
    );
    let mut order = Vec::new();
    for i in 0..cli.tcp_rounds as usize {
        let mut round = Nic::ALL;
        round.rotate_left(i % Nic::ALL.len());
        order.extend(round);
    }
    let mut results: Vec<(Nic, TcpRun)> = Vec::new();
    for nic in order {
        let r = tcp_trial(nic, cli, &paths, &data, &want)?;
        println!(
            "run name=tcp nic={} to_guest_mib_s={:.2} from_guest_mib_s={:.2} to_guest_host_mib_s={:.2} \
             from_guest_host_mib_s={:.2} qemu_cpu_pct={:.0} vcpu_cpu_pct={:.0} server_cpu_pct={} others_cpu_pct={:.0} boot_s={:.1}",
            nic.name(),
            r.to_guest,
            r.from_guest,
            r.to_guest_host,
            r.from_guest_host,
            r.qemu_pct,
            r.vcpu_pct,
            r.server_pct.map(|p| format!("{p:.0}")).unwrap_or_else(|| "-".into()),
            r.others_pct,
            r.boot_s
        );
        if r.others_pct > BUSY_WARN_PCT {
            println!(
                "# WARNING: other processes used {:.0}% of a CPU during this boot's transfer: its figures measured \
                 the machine's load too",
                r.others_pct
            );
        }
        results.push((nic, r));
    }
    let of =
        |nic: Nic, g: fn(&TcpRun) -> f64| results.iter().filter(|r| r.0 == nic).map(|r| g(&r.1)).collect::<Vec<_>>();
    let med = |nic: Nic, g: fn(&TcpRun) -> f64| median(&of(nic, g));
    for (name, dir, g) in [
        ("tcp_host_to_guest", "host_to_guest", (|r: &TcpRun| r.to_guest) as fn(&TcpRun) -> f64),
        ("tcp_guest_to_host", "guest_to_host", |r: &TcpRun| r.from_guest),
    ] {
        for nic in Nic::ALL {
            let v = of(nic, g);
            println!(
                "bench name={name} nic={} mib_per_s={:.2} min={:.2} max={:.2} mib={} boots={} kernel={} accel=tcg \
                 others_cpu_pct_max={:.0}",
                nic.name(),
                median(&v),
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                cli.tcp_mib,
                cli.tcp_rounds,
                cli.kernel,
                results.iter().filter(|r| r.0 == nic).map(|r| r.1.others_pct).fold(0.0, f64::max)
            );
        }
        let vs_virtio = med(Nic::Vf, g) / med(Nic::VirtioNet, g);
        println!("ratio name={name} vs=virtio-net value={vs_virtio:.2}");
        println!("ratio name={name} vs=virtio-net-nogso value={:.2}", med(Nic::Vf, g) / med(Nic::VirtioNetNoGso, g));
        println!("ratio name={name} vs=e1000e value={:.2}", med(Nic::Vf, g) / med(Nic::E1000e, g));
        println!(
            "target name=tcp_vf_vs_virtio dir={dir} value={vs_virtio:.3} min=1.0 {}",
            if vs_virtio >= 1.0 { "met" } else { "missed" }
        );
    }
    Ok(())
}
