//! `vfu-bench`: what one MMIO trap costs through `vfu-i40evf`, next to the cheapest possible socket round trip.
//!
//! In one run it measures
//! 1. `pingpong`: a raw AF_UNIX SOCK_STREAM round trip between this process and a peer process (this binary
//!    re-executed with `--echo-socket`) doing blocking read/write of REGION_READ-sized messages (32 B out, 36 B
//!    back): the floor for any socket-based MMIO trap;
//! 2. `region_read_config` / `region_read_bar0`: a 4-byte REGION_READ of config space (region 7, offset 0) and of
//!    VFGEN_RSTAT (BAR0 offset 0x8800) against a real `vfu-i40evf` process;
//! 3. `posted_write`: batches of no_reply REGION_WRITEs to ATQBAL (BAR0 0x7C00) closed by one REGION_READ of it,
//!    checking that the only reply is the read's and that it returns the last value written;
//! 4. the server's idle RSS;
//! 5. `region_read_poll`: the config REGION_READ against a second server started with `--poll-us` (adaptive busy
//!    polling), interleaved with the others, with that server's CPU use while polling and once its client is idle;
//! 6. after the interleaved rounds, per placement: posted REGION_WRITE and REGION_WRITE_MULTI throughput (writes/s,
//!    with the server thread's CPU time per write) beside the ping-pong rate, and DMA_MAP + DMA_UNMAP of 10,000
//!    4 KiB regions of a memfd, each timed beside an interleaved REGION_READ;
//! 7. scale: 64 servers with `--poll-us`, each with a client that sent a few requests and went idle: their CPU
//!    time over 2 s and their RSS; one server with `--queues 16` after a driver model brought 16 queue pairs up.
//!
//! Placement is explicit: this (single-threaded) client is pinned to the first CPU, and the main thread of the
//! ping-pong peer and of the server (the thread that serves the socket) to the same CPU (`same`) or to the second
//! one (`cross`); every benchmark is measured under both, and ratios only compare like with like. The benchmarks
//! and the placements run interleaved in rounds so that noise from other work on the machine hits all of them alike.
//! Machine-readable lines start with `bench`, `cpu`, `rss`, `ratio` or `target` (key=value fields, with
//! `placement=same|cross`); the human summary lines with `#`.
//! The exit status is non-zero only on a functional failure (a wrong reply, a dead server), never on a missed target.

mod pin;
mod procs;
mod stats;
mod wire;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use rustix::net::RecvFlags;

use pin::{pin, Cpus, Placement};
use procs::{last_cpu, machine_ticks, process_ticks, Proc, Sched, TempDir};
use stats::{summarize, Summary};
use wire::*;

const CONFIG_REGION: u32 = 7;
const BAR0_REGION: u32 = 0;
const VFGEN_RSTAT: u64 = 0x8800;
const VF_ATQBAL1: u64 = 0x7c00;
/// Config dword 0: device 154c, vendor 8086.
const CONFIG_ID: u32 = 0x154c_8086;
/// VFGEN_RSTAT bits 0-1 after power-on: VFACTIVE.
const RSTAT_VFACTIVE: u32 = 2;
/// The value the ping-pong peer answers with (any value would do).
const ECHO_VALUE: u32 = 0xec40_ec40;

/// REGION_READ / ping-pong by default (issue 13; issue 3 asked for 1.15).
const RATIO_TARGET: f64 = 1.0;
/// `region_read_poll` / ping-pong, `cross` placement.
const POLL_RATIO_TARGET: f64 = 0.6;
/// Posted REGION_WRITEs per second, server on its own CPU.
const POSTED_RATE_TARGET: f64 = 2.0e6;
/// DMA_MAP or DMA_UNMAP / REGION_READ.
const DMA_RATIO_TARGET: f64 = 1.2;
const DMA_REGIONS: u64 = 10_000;
/// An idle server (no client input within its polling window) may use this much of one CPU, in percent.
const IDLE_CPU_TARGET_PCT: f64 = 1.0;
const SCALE_SERVERS: usize = 64;
/// Idle RSS per server at scale ("about 3.5 MiB", today's figure): 4 MiB.
const SCALE_RSS_TARGET_KIB: u64 = 4096;
const QUEUES16_RSS_TARGET_KIB: u64 = 16 * 1024;
const ATQBAL_STEP: u32 = 0x40;
/// Clock ticks per second of /proc/<pid>/stat's utime and stime: USER_HZ, 100 on Linux.
const USER_HZ: u64 = 100;
const RSS_TARGET_KIB: u64 = 16 * 1024;
/// Above this much other work during the measured rounds (in % of one CPU), say so.
const OTHERS_CPU_WARN_PCT: f64 = 10.0;
/// How far `same_cpu_pct` may stray from 100 (`same`) or 0 (`cross`) before the pinning is reported as not holding.
const PLACEMENT_TOLERANCE_PCT: f64 = 5.0;
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "vfu-bench",
    about = "Round-trip cost of vfio-user MMIO traps against vfu-i40evf, as ratios to a raw AF_UNIX ping-pong",
    after_help = "Build and run: cargo build --release -p server -p bench && ./target/release/vfu-bench\n\
                  Exit status: 0 unless the server misbehaved (wrong reply, died); missed targets are only reported."
)]
struct Cli {
    /// The server binary [default: vfu-i40evf next to this executable].
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,

    /// Short run for CI: a few thousand iterations per benchmark and placement, well under 5 s.
    #[arg(long)]
    quick: bool,

    /// Measured round trips per benchmark and placement (default 200000, --quick 5000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(100..=100_000_000))]
    iters: Option<u64>,

    /// Posted REGION_WRITEs per batch (each batch ends with one REGION_READ).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    posted_batch: u32,

    /// Run only these benchmarks (for profiling one request type; ratios need pingpong too).
    #[arg(long, value_name = "NAME", value_delimiter = ',', value_enum)]
    only: Vec<Kind>,

    /// Run only these placements [default: same and cross; only same on a single CPU].
    #[arg(long, value_name = "P", value_delimiter = ',', value_enum)]
    placement: Vec<Placement>,

    /// `--poll-us` of the polling server (`region_read_poll`) and of the servers of the scale test.
    #[arg(long, value_name = "US", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    poll_us: u32,

    /// Servers started for the scale test (0: skip it).
    #[arg(long, value_name = "N", default_value_t = SCALE_SERVERS)]
    scale_servers: usize,

    /// Internal: run as the ping-pong peer connected to this socket.
    #[arg(long, value_name = "PATH", hide = true)]
    echo_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.echo_socket {
        return match echo_peer(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vfu-bench echo peer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.placement.contains(&Placement::Cross) && Cpus::allowed().is_ok_and(|c| c.other.is_none()) {
        Cli::command()
            .error(ErrorKind::InvalidValue, "--placement cross needs a second CPU, and this process may only use one")
            .exit();
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfu-bench: FUNCTIONAL FAILURE: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The ping-pong peer: blocking read of one 32-byte request, blocking write of its 36-byte reply, until EOF.
fn echo_peer(path: &Path) -> Result<(), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    let mut req = [0u8; READ_REQ_LEN];
    loop {
        match s.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = Header::parse(&req);
        let offset = u64::from_le_bytes(req[16..24].try_into().unwrap());
        let region = u32::from_le_bytes(req[24..28].try_into().unwrap());
        s.write_all(&read_reply(h.id, region, offset, ECHO_VALUE)).map_err(|e| format!("write: {e}"))?;
    }
}

/// How much to run: `rounds` placement blocks per placement (alternating), each of `slices` passes over the
/// benchmarks, each pass `per_slice` timed round trips (`batches_per_slice` posted batches) of every benchmark.
struct Plan {
    rounds: usize,
    slices: usize,
    per_slice: usize,
    warmup: usize,
    /// Untimed round trips per benchmark after each change of placement.
    settle: usize,
    batches_per_slice: usize,
    batch: u32,
}

impl Plan {
    fn new(cli: &Cli) -> Plan {
        let (rounds, slices, total, warmup, batches) =
            if cli.quick { (5, 5, 5_000, 500, 4) } else { (20, 10, 200_000, 20_000, 20) };
        let total = cli.iters.map_or(total, |n| n as usize);
        let per_slice = total.div_ceil(rounds * slices);
        Plan {
            rounds,
            slices,
            per_slice,
            warmup: warmup.min(total),
            settle: 100,
            batches_per_slice: batches,
            batch: cli.posted_batch,
        }
    }
}

/// The two connections under test and the request state.
struct Bench {
    echo: UnixStream,
    server: UnixStream,
    /// The connection to the server started with `--poll-us`.
    poll: UnixStream,
    id: u16,
    atqbal: u32,
}

impl Bench {
    fn next_id(&mut self) -> u16 {
        self.id = self.id.wrapping_add(1);
        self.id
    }

    /// One REGION_READ-shaped round trip on `stream`; returns the elapsed time and the value read.
    fn round_trip(stream: &mut UnixStream, id: u16, region: u32, offset: u64) -> Result<(u64, u32), String> {
        let req = read_request(id, region, offset);
        let mut buf = [0u8; READ_REPLY_LEN];
        let t0 = Instant::now();
        stream.write_all(&req).map_err(|e| format!("write: {e}"))?;
        let len = read_message(stream, &mut buf)?;
        let ns = t0.elapsed().as_nanos() as u64;
        let v = parse_read_reply(&buf, len, id, region, offset)?;
        Ok((ns, v))
    }

    fn pingpong(&mut self) -> Result<u64, String> {
        let id = self.next_id();
        let (ns, v) = Self::round_trip(&mut self.echo, id, CONFIG_REGION, 0).map_err(|e| format!("ping-pong: {e}"))?;
        if v != ECHO_VALUE {
            return Err(format!("ping-pong peer answered {v:#x}"));
        }
        Ok(ns)
    }

    fn read_config(&mut self) -> Result<u64, String> {
        let id = self.next_id();
        let (ns, v) = Self::round_trip(&mut self.server, id, CONFIG_REGION, 0)
            .map_err(|e| format!("REGION_READ config offset 0: {e}"))?;
        if v != CONFIG_ID {
            return Err(format!("REGION_READ config offset 0 returned {v:#010x}, expected {CONFIG_ID:#010x}"));
        }
        Ok(ns)
    }

    fn read_poll(&mut self) -> Result<u64, String> {
        let id = self.next_id();
        let (ns, v) = Self::round_trip(&mut self.poll, id, CONFIG_REGION, 0)
            .map_err(|e| format!("REGION_READ config offset 0 (--poll-us server): {e}"))?;
        if v != CONFIG_ID {
            return Err(format!(
                "REGION_READ config (--poll-us server) returned {v:#010x}, expected {CONFIG_ID:#010x}"
            ));
        }
        Ok(ns)
    }

    fn read_rstat(&mut self) -> Result<u64, String> {
        let id = self.next_id();
        let (ns, v) = Self::round_trip(&mut self.server, id, BAR0_REGION, VFGEN_RSTAT)
            .map_err(|e| format!("REGION_READ BAR0 VFGEN_RSTAT: {e}"))?;
        if v & 3 != RSTAT_VFACTIVE {
            return Err(format!("VFGEN_RSTAT reads {v:#x}, expected VFACTIVE ({RSTAT_VFACTIVE}) in bits 0-1"));
        }
        Ok(ns)
    }

    /// `n` posted writes to ATQBAL, then a REGION_READ of it: the reply must be the read's (no reply to any posted
    /// write precedes it, nothing follows it) and carry the last value written.
    fn posted_batch(&mut self, n: u32) -> Result<u64, String> {
        let t0 = Instant::now();
        for _ in 0..n {
            self.atqbal = self.atqbal.wrapping_add(0x40);
            let id = self.next_id();
            self.server
                .write_all(&posted_write(id, BAR0_REGION, VF_ATQBAL1, self.atqbal))
                .map_err(|e| format!("posted REGION_WRITE: {e}"))?;
        }
        let id = self.next_id();
        let (_, v) = Self::round_trip(&mut self.server, id, BAR0_REGION, VF_ATQBAL1)
            .map_err(|e| format!("REGION_READ after {n} posted writes (a reply to a posted write?): {e}"))?;
        let ns = t0.elapsed().as_nanos() as u64;
        if v != self.atqbal {
            return Err(format!("ATQBAL reads {v:#x} after posted writes, last written {:#x}", self.atqbal));
        }
        let mut probe = [0u8; 1];
        match rustix::net::recv(&self.server, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Err(rustix::io::Errno::AGAIN) => {}
            Ok((0, _)) => return Err("the server closed the connection".into()),
            Ok(_) => return Err("unexpected data after the REGION_READ reply (a reply to a posted write?)".into()),
            Err(e) => return Err(format!("recv: {e}")),
        }
        Ok(ns)
    }
}

/// The benchmarks, in report order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Kind {
    #[value(name = "pingpong")]
    Pingpong,
    #[value(name = "region_read_config")]
    RegionReadConfig,
    #[value(name = "region_read_bar0")]
    RegionReadBar0,
    #[value(name = "posted_write")]
    PostedWrite,
    #[value(name = "region_read_poll")]
    RegionReadPoll,
}

const KINDS: [Kind; 5] =
    [Kind::Pingpong, Kind::RegionReadConfig, Kind::RegionReadBar0, Kind::PostedWrite, Kind::RegionReadPoll];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pingpong => "pingpong",
            Kind::RegionReadConfig => "region_read_config",
            Kind::RegionReadBar0 => "region_read_bar0",
            Kind::PostedWrite => "posted_write",
            Kind::RegionReadPoll => "region_read_poll",
        }
    }
}

fn step(b: &mut Bench, kind: Kind, batch: u32) -> Result<u64, String> {
    match kind {
        Kind::Pingpong => b.pingpong(),
        Kind::RegionReadConfig => b.read_config(),
        Kind::RegionReadBar0 => b.read_rstat(),
        Kind::PostedWrite => b.posted_batch(batch),
        Kind::RegionReadPoll => b.read_poll(),
    }
}

fn default_server() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join("vfu-i40evf"))
}

/// Untimed iterations of `kind` (`n` round trips; for posted writes, as many batches as make about `n` requests).
fn untimed(b: &mut Bench, kind: Kind, n: usize, batch: u32) -> Result<(), String> {
    let n = if kind == Kind::PostedWrite { n / batch as usize + 1 } else { n };
    for _ in 0..n {
        step(b, kind, batch)?;
    }
    Ok(())
}

/// Pins the main threads of the ping-pong peer and of the server for a placement. A failure is reported, not fatal
/// (the `same_cpu_pct` check in the report shows what it did to the figures).
struct Pins {
    cpus: Cpus,
    echo: rustix::process::Pid,
    server: rustix::process::Pid,
    poll: rustix::process::Pid,
    failures: Vec<String>,
}

impl Pins {
    fn apply(&mut self, p: Placement) {
        let Some(cpu) = self.cpus.peer(p) else { return };
        for (who, tid) in [("ping-pong peer", self.echo), ("server", self.server), ("--poll-us server", self.poll)] {
            if let Err(e) = pin(Some(tid), cpu) {
                let e = format!("placement {}: {who}: {e}", p.name());
                if !self.failures.contains(&e) {
                    self.failures.push(e);
                }
            }
        }
    }
}

/// Pins a child's main thread for placement `p`, right after spawning it: threads the child starts later inherit that.
fn pin_child(proc: &Proc, cpus: Cpus, p: Placement, failures: &mut Vec<String>) {
    if let Some(cpu) = cpus.peer(p) {
        if let Err(e) = pin(Some(proc.main_thread()), cpu) {
            failures.push(format!("{}: {e}", proc.name));
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let plan = Plan::new(cli);
    let server_bin = match &cli.server {
        Some(p) => p.clone(),
        None => default_server()?,
    };
    if !server_bin.is_file() {
        return Err(format!(
            "server binary {} not found (build it: cargo build --release -p server, or pass --server PATH)",
            server_bin.display()
        ));
    }
    let cpus = Cpus::allowed()?;
    // Those asked for (main() has checked that the machine has them), else all the machine has.
    let placements: Vec<Placement> = [Placement::Same, Placement::Cross]
        .into_iter()
        .filter(|&p| cpus.peer(p).is_some() && (cli.placement.is_empty() || cli.placement.contains(&p)))
        .collect();
    let ncpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let names: Vec<&str> = placements.iter().map(|p| p.name()).collect();
    println!(
        "# vfu-bench mode={} rounds={} slices={} iters_per_slice={} warmup={} posted_batch={} cpus={ncpus} \
         placements={} client_cpu={}",
        if cli.quick { "quick" } else { "full" },
        plan.rounds,
        plan.slices,
        plan.per_slice,
        plan.warmup,
        plan.batch,
        names.join(","),
        cpus.client
    );
    for &p in &placements {
        println!(
            "# placement {}: client on CPU {}, ping-pong peer and server main thread on CPU {}",
            p.name(),
            cpus.client,
            cpus.peer(p).unwrap_or(cpus.client)
        );
    }
    println!("# server {}", server_bin.display());

    // This client is single-threaded: pinning this thread pins all of it. Done before spawning, so the children
    // start with the same affinity in all their threads; their main threads are then pinned explicitly.
    let mut failures = Vec::new();
    if let Err(e) = pin(None, cpus.client) {
        failures.push(format!("client: {e}"));
    }

    // Declared first, dropped last: the processes are gone before their directory is removed.
    let dir = TempDir::new().map_err(|e| format!("creating a temporary directory: {e}"))?;

    // The ping-pong peer: this binary again, as a separate process, like the server.
    let echo_path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&echo_path).map_err(|e| format!("binding {}: {e}", echo_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--echo-socket").arg(&echo_path);
    let mut echo_proc = Proc::spawn("ping-pong peer", cmd, None)?;
    pin_child(&echo_proc, cpus, placements[0], &mut failures);
    let echo = echo_proc.accept(&listener)?;
    drop(listener);

    // The server on its own socket, logging at info level to a file (a trace level from the environment would
    // measure the logger).
    let sock = dir.path().join("vfu.sock");
    let log = dir.path().join("server.log");
    let mut cmd = Command::new(&server_bin);
    cmd.arg("--socket").arg(&sock).env("RUST_LOG", "info");
    let mut server_proc = Proc::spawn("server", cmd, Some(log))?;
    pin_child(&server_proc, cpus, placements[0], &mut failures);
    let mut server = server_proc.connect(&sock)?;
    // The same with adaptive busy polling.
    let poll_sock = dir.path().join("vfu-poll.sock");
    let mut cmd = Command::new(&server_bin);
    cmd.arg("--socket").arg(&poll_sock).arg("--poll-us").arg(cli.poll_us.to_string()).env("RUST_LOG", "info");
    let mut poll_proc = Proc::spawn("--poll-us server", cmd, Some(dir.path().join("server-poll.log")))?;
    pin_child(&poll_proc, cpus, placements[0], &mut failures);
    let mut poll = poll_proc.connect(&poll_sock)?;
    let mut pins = Pins {
        cpus,
        echo: echo_proc.main_thread(),
        server: server_proc.main_thread(),
        poll: poll_proc.main_thread(),
        failures,
    };

    let result = (|| -> Result<(), String> {
        Sched::of("self")?; // fail early if /proc lacks schedstat
        for s in [&echo, &server, &poll] {
            s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| e.to_string())?;
        }
        let caps = negotiate(&mut server, 0)?;
        println!("# negotiated {caps}");
        negotiate(&mut poll, 0)?;
        let mut b = Bench { echo, server, poll, id: 0, atqbal: 0 };
        // Functional checks before anything is timed.
        b.read_config()?;
        b.read_poll()?;
        b.read_rstat()?;
        b.posted_batch(4)?;
        b.pingpong()?;

        std::thread::sleep(Duration::from_millis(300));
        let (idle_rss, idle_hwm) = server_proc.rss_kib()?;
        // The server's threads once it is up. Only the main thread (the protocol loop) reads and answers the
        // socket, so only it is pinned per placement; the others, started at startup, keep the affinity they
        // inherited (the client's CPU, or the first placement's if the pin came before they were created).
        let threads = pin::threads(server_proc.pid())?;
        let list: Vec<String> = threads.iter().map(|t| format!("{}:{}:cpus={}", t.tid, t.comm, t.cpus)).collect();
        println!("# server threads (main first; only the main thread serves the socket): {}", list.join(" "));
        let workers_ns = |t: &[pin::ThreadInfo]| t.iter().skip(1).map(|t| t.cpu_ns).sum::<u64>();
        let workers_before = workers_ns(&threads);

        let kinds: Vec<Kind> = KINDS.into_iter().filter(|k| cli.only.is_empty() || cli.only.contains(k)).collect();
        for &p in &placements {
            pins.apply(p);
            for &kind in &kinds {
                untimed(&mut b, kind, plan.warmup, plan.batch)?;
            }
        }
        // CPU time of the whole machine and of the three processes taking part: the rest is other work.
        let (echo_pid, server_pid) = (echo_proc.pid().to_string(), server_proc.pid().to_string());
        let ours = || -> Result<u64, String> {
            Ok(process_ticks("self")? + process_ticks(&echo_pid)? + process_ticks(&server_pid)?)
        };
        let (busy0, total0, _) = machine_ticks()?;
        let ours0 = ours()?;
        let mut results: Vec<Measured> =
            placements.iter().flat_map(|&p| kinds.iter().map(move |&kind| Measured::new(p, kind))).collect();
        for round in 0..plan.rounds {
            // Alternate which placement goes first; within a placement, interleave the benchmarks in short slices
            // (rotating which one goes first) so that a disturbance hits the baseline and the server alike.
            for pi in 0..placements.len() {
                let placement = placements[(round + pi) % placements.len()];
                pins.apply(placement);
                for &kind in &kinds {
                    untimed(&mut b, kind, plan.settle, plan.batch)?;
                }
                for slice in 0..plan.slices {
                    for k in 0..kinds.len() {
                        let kind = kinds[(round + slice + k) % kinds.len()];
                        let r = results.iter_mut().find(|r| r.placement == placement && r.kind == kind).unwrap();
                        let n = if kind == Kind::PostedWrite { plan.batches_per_slice } else { plan.per_slice };
                        // CPU time and context switches of the answering process (peer or server) and of this one.
                        let answering = match kind {
                            Kind::Pingpong => &echo_proc,
                            Kind::RegionReadPoll => &poll_proc,
                            _ => &server_proc,
                        };
                        let before = [answering.sched()?, Sched::of("self")?];
                        let pid = answering.pid().to_string();
                        let sample_every = (n / 10).max(1);
                        let t0 = Instant::now();
                        for i in 0..n {
                            r.samples.push(step(&mut b, kind, plan.batch)?);
                            // Now and then (untimed): did this round trip run on one CPU or across two? A check
                            // that the pinning held: 100% for `same`, 0% for `cross`.
                            if i % sample_every == sample_every - 1 {
                                r.placement_seen[usize::from(last_cpu("self")? == last_cpu(&pid)?)] += 1;
                            }
                        }
                        r.wall_ns += t0.elapsed().as_nanos() as u64;
                        let after = [answering.sched()?, Sched::of("self")?];
                        for j in 0..2 {
                            r.cpu[j].add(&after[j].since(&before[j]));
                        }
                    }
                }
            }
            for p in [&mut server_proc, &mut poll_proc] {
                if let Some(why) = p.exited() {
                    return Err(why);
                }
            }
        }
        let (busy1, total1, ncpus) = machine_ticks()?;
        let others = (busy1 - busy0).saturating_sub(ours()? - ours0);
        let others_cpu_pct = 100.0 * (others * ncpus) as f64 / (total1 - total0).max(1) as f64;
        let workers_after = workers_ns(&pin::threads(server_proc.pid())?);
        let (end_rss, end_hwm) = server_proc.rss_kib()?;
        let poll_run_ticks = process_ticks(&poll_proc.pid().to_string())?;
        let run = Run {
            plan: &plan,
            cpus,
            placements: &placements,
            results: &results,
            idle: (idle_rss, idle_hwm),
            end: (end_rss, end_hwm),
            workers_ns: workers_after.saturating_sub(workers_before),
            others_cpu_pct,
            pin_failures: &pins.failures,
        };
        report(&run);

        // After the interleaved rounds: what they cannot measure.
        let mut x = Extras::default();
        let pingpong_median = |p: Placement| {
            results.iter().find(|r| r.placement == p && r.kind == Kind::Pingpong).map(|r| summarize(&r.samples).median)
        };
        // The polling server's CPU time over the whole run (it polled only during its own slices).
        poll_cpu_over_run(&poll_proc, poll_run_ticks, run_wall(&results))?;
        // The polling server once its client is idle.
        idle_cpu(&poll_proc, cli, &mut x)?;
        for &p in &placements {
            pins.apply(p);
            throughput(&mut b, p, &server_proc, cli, pingpong_median(p), &mut x)?;
            dma_map_unmap(&mut b, p, &mut x)?;
        }
        if let Some(why) = server_proc.exited() {
            return Err(why);
        }
        scale(&server_bin, dir.path(), cli, &mut x)?;
        queues16(&server_bin, dir.path(), &mut x)?;
        x.print();
        Ok(())
    })();
    let result = result
        .map_err(|e| format!("{e}\n{}\n{}\n{}", server_proc.diagnose(), poll_proc.diagnose(), echo_proc.diagnose()));
    drop(poll_proc);
    drop(server_proc);
    drop(echo_proc);
    drop(dir);
    result
}

/// One benchmark's per-iteration times under one placement, and the CPU accounting of [answering process, this
/// process].
struct Measured {
    placement: Placement,
    kind: Kind,
    samples: Vec<u64>,
    cpu: [Sched; 2],
    /// Samples of [client and peer last ran on different CPUs, on the same CPU].
    placement_seen: [u64; 2],
    /// Wall time of the timed slices.
    wall_ns: u64,
}

impl Measured {
    fn new(placement: Placement, kind: Kind) -> Measured {
        Measured {
            placement,
            kind,
            samples: Vec::new(),
            cpu: [Sched::default(); 2],
            placement_seen: [0; 2],
            wall_ns: 0,
        }
    }
}

/// Everything the report needs.
struct Run<'a> {
    plan: &'a Plan,
    cpus: Cpus,
    placements: &'a [Placement],
    results: &'a [Measured],
    idle: (u64, u64),
    end: (u64, u64),
    /// CPU time of the server's threads other than the main one during the warm-up and the measured rounds.
    workers_ns: u64,
    /// CPU time that went to anything but the client, the peer and the server during the measured rounds, in % of
    /// one CPU (/proc/stat, clock-tick resolution).
    others_cpu_pct: f64,
    pin_failures: &'a [String],
}

fn bench_line(name: &str, p: Placement, s: &Summary, extra: &str) {
    println!(
        "bench name={name} placement={} median_ns={} p99_ns={} min_ns={} mean_ns={} iters={}{extra}",
        p.name(),
        s.median,
        s.p99,
        s.min,
        s.mean,
        s.iters
    );
}

/// CPU time and context switches (voluntary: blocked waiting; involuntary: preempted) per operation, of the
/// answering process (`peer`: the echo process or the server) and of this client.
fn cpu_line(name: &str, peer: &str, m: &Measured, ops: usize) {
    let per = |v: u64| v as f64 / ops as f64;
    let [p, c] = &m.cpu;
    println!(
        "cpu name={name} placement={} peer={peer} peer_cpu_ns_per_op={:.0} peer_vcsw_per_op={:.2} \
         peer_ivcsw_per_op={:.2} client_cpu_ns_per_op={:.0} client_vcsw_per_op={:.2} client_ivcsw_per_op={:.2} \
         same_cpu_pct={:.0} ops={ops}",
        m.placement.name(),
        per(p.cpu_ns),
        per(p.vcsw),
        per(p.ivcsw),
        per(c.cpu_ns),
        per(c.vcsw),
        per(c.ivcsw),
        same_cpu_pct(m)
    );
}

/// How often the client and its peer were last seen on the same CPU, in percent.
fn same_cpu_pct(m: &Measured) -> f64 {
    100.0 * m.placement_seen[1] as f64 / (m.placement_seen[0] + m.placement_seen[1]).max(1) as f64
}

/// Whether `same_cpu_pct` is what the placement pins it to; else a warning.
fn check_pinning(m: &Measured, warnings: &mut Vec<String>) {
    let expected = if m.placement == Placement::Same { 100.0 } else { 0.0 };
    let seen = same_cpu_pct(m);
    if (seen - expected).abs() > PLACEMENT_TOLERANCE_PCT {
        warnings.push(format!(
            "placement {}: {}: client and peer were on the same CPU {seen:.0}% of the time, expected {expected:.0}%: \
             the pinning did not hold, these figures mix placements",
            m.placement.name(),
            m.kind.name()
        ));
    }
}

fn target_line(name: &str, p: Option<Placement>, value: String, limit: String, met: bool) {
    let placement = p.map_or(String::new(), |p| format!(" placement={}", p.name()));
    println!("target name={name}{placement} value={value} max={limit} {}", if met { "met" } else { "missed" });
}

fn us(ns: u64) -> String {
    format!("{:.2} us", ns as f64 / 1000.0)
}

fn report(run: &Run) {
    let plan = run.plan;
    let word = |m: bool| if m { "met" } else { "MISSED" };
    let mut summary = Vec::new();
    let mut warnings: Vec<String> = run.pin_failures.iter().map(|e| format!("pinning failed: {e}")).collect();
    let mut pingpong_median = Vec::new();

    for &p in run.placements {
        let get =
            |k: Kind| run.results.iter().find(|r| r.placement == p && r.kind == k).map(|r| (r, summarize(&r.samples)));
        let [pp, cfg, bar0, batch, poll] = KINDS.map(get);
        summary.push(format!(
            "{}: client on CPU {}, peer/server main thread on CPU {}",
            p.name(),
            run.cpus.client,
            run.cpus.peer(p).unwrap_or(run.cpus.client)
        ));
        for r in run.results.iter().filter(|r| r.placement == p) {
            check_pinning(r, &mut warnings);
        }

        if let Some((r, s)) = &pp {
            bench_line("pingpong", p, s, " bytes_out=32 bytes_in=36 peer=process");
            cpu_line("pingpong", "echo", r, s.iters);
            summary.push(format!("  AF_UNIX ping-pong, 32 B -> 36 B, peer process: {} [{}]", us(s.median), us(s.p99)));
            pingpong_median.push((p, s.median));
        }
        for (m, what, extra) in [
            (&cfg, "REGION_READ config 4 B:          ", " region=7 offset=0x0 count=4"),
            (&bar0, "REGION_READ BAR0 VFGEN_RSTAT 4 B:", " region=0 offset=0x8800 count=4"),
        ] {
            let Some((r, s)) = m else { continue };
            let name = r.kind.name();
            bench_line(name, p, s, extra);
            cpu_line(name, "server", r, s.iters);
            let mut line = format!("  {what}             {} [{}]", us(s.median), us(s.p99));
            if let Some((base_m, base)) = &pp {
                let ratio = s.median as f64 / base.median as f64;
                let delta = s.median as i64 - base.median as i64;
                println!(
                    "ratio name={name} placement={} vs=pingpong value={ratio:.3} delta_ns={delta} same_cpu_pct={:.0} \
                     baseline_same_cpu_pct={:.0}",
                    p.name(),
                    same_cpu_pct(r),
                    same_cpu_pct(base_m)
                );
                let met = ratio <= RATIO_TARGET;
                target_line(
                    &format!("{name}_vs_pingpong"),
                    Some(p),
                    format!("{ratio:.3}"),
                    RATIO_TARGET.to_string(),
                    met,
                );
                let sign = if delta < 0 { "-" } else { "+" };
                line.push_str(&format!(
                    "  = {ratio:.2}x ping-pong, {sign}{} (target <= {RATIO_TARGET}: {})",
                    us(delta.unsigned_abs()),
                    word(met)
                ));
            }
            summary.push(line);
        }
        if let Some((r, s)) = &poll {
            bench_line("region_read_poll", p, s, " region=7 offset=0x0 count=4 server=--poll-us");
            cpu_line("region_read_poll", "server", r, s.iters);
            // The polling server's main thread: on-CPU time over the wall time of its slices.
            let busy = 100.0 * r.cpu[0].cpu_ns as f64 / r.wall_ns.max(1) as f64;
            println!(
                "cpu name=region_read_poll_server placement={} server_busy_pct={busy:.0} server_cpu_ns={} wall_ns={}",
                p.name(),
                r.cpu[0].cpu_ns,
                r.wall_ns
            );
            let mut line = format!("  REGION_READ config, --poll-us server:       {} [{}]", us(s.median), us(s.p99));
            if let Some((_, base)) = &pp {
                let ratio = s.median as f64 / base.median as f64;
                println!(
                    "ratio name=region_read_poll placement={} vs=pingpong value={ratio:.3} delta_ns={} \
                     same_cpu_pct={:.0}",
                    p.name(),
                    s.median as i64 - base.median as i64,
                    same_cpu_pct(r)
                );
                line.push_str(&format!("  = {ratio:.2}x ping-pong"));
                if p == Placement::Cross {
                    let met = ratio <= POLL_RATIO_TARGET;
                    target_line(
                        "region_read_poll_vs_pingpong",
                        Some(p),
                        format!("{ratio:.3}"),
                        POLL_RATIO_TARGET.to_string(),
                        met,
                    );
                    line.push_str(&format!(" (target <= {POLL_RATIO_TARGET}: {})", word(met)));
                }
            }
            line.push_str(&format!("; server thread busy {busy:.0}% of the time"));
            summary.push(line);
        }
        if let Some((r, s)) = &batch {
            bench_line("posted_write_batch", p, s, &format!(" writes={} region=0 offset=0x7c00", plan.batch));
            // Per posted write: the batch minus one REGION_READ (the median BAR0 read under the same placement,
            // else nothing), divided by the batch size.
            let read = bar0.as_ref().map_or(0, |(_, b)| b.median);
            let per_write: Vec<u64> =
                r.samples.iter().map(|&t| t.saturating_sub(read) / u64::from(plan.batch)).collect();
            let pw = summarize(&per_write);
            bench_line("posted_write", p, &pw, " derived=(batch-median_region_read_bar0)/writes replies_to_posted=0");
            cpu_line("posted_write", "server", r, s.iters * plan.batch as usize);
            let mut line =
                format!("  posted REGION_WRITE (batches of {} + 1 read):  {} each", plan.batch, us(pw.median));
            if let Some((_, b)) = &bar0 {
                let ratio = pw.median as f64 / b.median as f64;
                println!("ratio name=posted_write placement={} vs=region_read_bar0 value={ratio:.3}", p.name());
                line.push_str(&format!(" = {ratio:.2}x a REGION_READ"));
            }
            line.push_str("; no reply to any posted write");
            summary.push(line);
        }
    }
    if let [(Placement::Same, same), (Placement::Cross, cross)] | [(Placement::Cross, cross), (Placement::Same, same)] =
        pingpong_median[..]
    {
        let ratio = cross as f64 / same as f64;
        println!("ratio name=pingpong placement=cross vs=pingpong_same value={ratio:.3}");
        summary.push(format!("ping-pong cross / same: {ratio:.2}x (what a cross-CPU wake-up costs here)"));
    }
    let (idle, end) = (run.idle, run.end);
    println!("rss name=server_idle vmrss_kib={} vmhwm_kib={}", idle.0, idle.1);
    println!("rss name=server_after_bench vmrss_kib={} vmhwm_kib={}", end.0, end.1);
    let rss_met = idle.0 <= RSS_TARGET_KIB;
    target_line("server_idle_rss_kib", None, idle.0.to_string(), RSS_TARGET_KIB.to_string(), rss_met);
    summary.push(format!(
        "server RSS idle after VERSION: {} KiB (target <= {RSS_TARGET_KIB} KiB: {}); after the run {} KiB, peak {} KiB",
        idle.0,
        word(rss_met),
        end.0,
        end.1
    ));
    println!("cpu name=server_other_threads cpu_ns={}", run.workers_ns);
    println!("cpu name=other_processes others_cpu_pct={:.0}", run.others_cpu_pct);
    if run.others_cpu_pct > OTHERS_CPU_WARN_PCT {
        warnings.push(format!(
            "other processes used {:.0}% of a CPU during the measured rounds: `cross` figures depend on the second \
             CPU being idle and are disturbed (see docs/performance.md)",
            run.others_cpu_pct
        ));
    }
    summary.push(format!(
        "server threads other than the main one: {} of CPU in all (not pinned per placement, not on the request path)",
        us(run.workers_ns)
    ));

    println!("#");
    println!("# Summary (medians; p99 in brackets). Pinned: this client to one CPU, the ping-pong peer's and the");
    println!("# server's main thread to that CPU (same) or another (cross); ratios compare the same placement,");
    println!("# measured interleaved in the same run.");
    for line in summary {
        println!("#   {line}");
    }
    for w in warnings {
        println!("# WARNING: {w}");
    }
}

/// What runs after the interleaved rounds: its summary lines.
#[derive(Default)]
struct Extras {
    summary: Vec<String>,
}

impl Extras {
    fn print(&self) {
        println!("#");
        println!("# Polling, throughput, DMA mappings, scale:");
        for l in &self.summary {
            println!("#   {l}");
        }
    }
}

fn met_word(m: bool) -> &'static str {
    if m {
        "met"
    } else {
        "MISSED"
    }
}

/// Wall time of all the timed slices of the interleaved rounds.
fn run_wall(results: &[Measured]) -> u64 {
    results.iter().map(|r| r.wall_ns).sum()
}

/// The `--poll-us` server's user + system time (all threads, /proc/<pid>/stat) over the warm-up and the measured
/// rounds, against the wall time of the timed slices (it polls only during and right after its own).
fn poll_cpu_over_run(p: &Proc, ticks_at_end: u64, wall_ns: u64) -> Result<(), String> {
    let tick_ns = 1e9 / USER_HZ as f64;
    let cpu_ns = (ticks_at_end as f64 * tick_ns) as u64;
    println!(
        "cpu name=poll_server_whole_run utime_stime_ms={} timed_wall_ms={} pid={}",
        cpu_ns / 1_000_000,
        wall_ns / 1_000_000,
        p.pid()
    );
    Ok(())
}

/// Sum of the on-CPU time (schedstat, ns) of every thread of these processes.
fn cpu_ns_all_threads(pids: &[u32]) -> Result<u64, String> {
    let mut sum = 0;
    for &pid in pids {
        sum += pin::threads(pid)?.iter().map(|t| t.cpu_ns).sum::<u64>();
    }
    Ok(sum)
}

/// User + system time of these processes (all threads), clock ticks.
fn ticks_of(pids: &[u32]) -> Result<u64, String> {
    pids.iter().map(|p| process_ticks(&p.to_string())).sum()
}

/// CPU used by `pids` over `over`: (schedstat ns of all threads, utime+stime ticks).
fn cpu_over(pids: &[u32], over: Duration) -> Result<(u64, u64), String> {
    let (ns0, t0) = (cpu_ns_all_threads(pids)?, ticks_of(pids)?);
    std::thread::sleep(over);
    Ok((cpu_ns_all_threads(pids)?.saturating_sub(ns0), ticks_of(pids)?.saturating_sub(t0)))
}

/// The `--poll-us` server with its client connected and idle: it must sleep, not spin.
fn idle_cpu(p: &Proc, cli: &Cli, x: &mut Extras) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(50)); // well past the polling window
    let over = Duration::from_secs(1);
    let (ns, ticks) = cpu_over(&[p.pid()], over)?;
    let pct = 100.0 * ns as f64 / over.as_nanos() as f64;
    println!(
        "cpu name=poll_server_idle poll_us={} client=connected_idle over_ms={} cpu_ns={ns} utime_stime_ticks={ticks} \
         cpu_pct={pct:.3}",
        cli.poll_us,
        over.as_millis()
    );
    let met = pct <= IDLE_CPU_TARGET_PCT;
    target_line("poll_server_idle_cpu_pct", None, format!("{pct:.3}"), IDLE_CPU_TARGET_PCT.to_string(), met);
    x.summary.push(format!(
        "--poll-us {} server, client connected and idle, over {} ms: {} us of CPU = {pct:.3}% of a CPU \
         (target <= {IDLE_CPU_TARGET_PCT}%: {})",
        cli.poll_us,
        over.as_millis(),
        ns / 1000,
        met_word(met)
    ));
    Ok(())
}

/// No byte may be waiting on `s` (a reply to a posted write would be).
fn nothing_pending(s: &UnixStream) -> Result<(), String> {
    let mut probe = [0u8; 1];
    match rustix::net::recv(s, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Err(rustix::io::Errno::AGAIN) => Ok(()),
        Ok((0, _)) => Err("the server closed the connection".into()),
        Ok(_) => Err("unexpected data after the REGION_READ reply (a reply to a posted write?)".into()),
        Err(e) => Err(format!("recv: {e}")),
    }
}

/// Posted REGION_WRITE and REGION_WRITE_MULTI throughput: `n` writes to ATQBAL streamed as fast as the socket
/// takes them, then one REGION_READ that must return the last value. Rate = n / (time until that read's reply);
/// the server thread's CPU time per write from its schedstat.
fn throughput(
    b: &mut Bench,
    p: Placement,
    server: &Proc,
    cli: &Cli,
    pingpong_ns: Option<u64>,
    x: &mut Extras,
) -> Result<(), String> {
    let n: usize = if cli.quick { 100_000 } else { 1_000_000 };
    const CHUNK: usize = 1000; // writes per write(2): 36 KB of REGION_WRITE, 5 REGION_WRITE_MULTI of 200
    const MULTI: usize = 200; // QEMU's VFIO_USER_MULTI_MAX, the server's limit
    let single: Vec<u8> = (0..CHUNK)
        .flat_map(|i| posted_write(i as u16, BAR0_REGION, VF_ATQBAL1, (i as u32 + 1) * ATQBAL_STEP))
        .collect();
    let multi: Vec<u8> = (0..CHUNK / MULTI)
        .flat_map(|m| {
            let w: Vec<(u32, u64, u32)> =
                (0..MULTI).map(|i| (BAR0_REGION, VF_ATQBAL1, ((m * MULTI + i) as u32 + 1) * ATQBAL_STEP)).collect();
            posted_write_multi(m as u16, &w)
        })
        .collect();
    let last = CHUNK as u32 * ATQBAL_STEP;
    let mut rates = Vec::new();
    for (name, buf) in [("posted_write_rate", &single), ("posted_write_multi_rate", &multi)] {
        // A short untimed run first.
        for round in [n / 20, n] {
            let before = server.sched()?;
            let t0 = Instant::now();
            for _ in 0..round.div_ceil(CHUNK) {
                b.server.write_all(buf).map_err(|e| format!("{name}: write: {e}"))?;
            }
            let id = b.next_id();
            let (_, v) = Bench::round_trip(&mut b.server, id, BAR0_REGION, VF_ATQBAL1)
                .map_err(|e| format!("{name}: REGION_READ after the posted writes: {e}"))?;
            let ns = t0.elapsed().as_nanos() as u64;
            let cpu = server.sched()?.since(&before);
            if v != last {
                return Err(format!("{name}: ATQBAL reads {v:#x} after posted writes, last written {last:#x}"));
            }
            nothing_pending(&b.server)?;
            if round != n {
                continue;
            }
            let writes = round.div_ceil(CHUNK) * CHUNK;
            let rate = writes as f64 * 1e9 / ns as f64;
            let cpu_per = cpu.cpu_ns as f64 / writes as f64;
            let per_cpu_s = writes as f64 * 1e9 / cpu.cpu_ns.max(1) as f64;
            let vs = pingpong_ns.map(|pp| rate / (1e9 / pp as f64));
            println!(
                "bench name={name} placement={} writes={writes} wall_ns={ns} writes_per_s={rate:.0} \
                 server_cpu_ns_per_write={cpu_per:.0} writes_per_server_cpu_s={per_cpu_s:.0} server_vcsw={}{}",
                p.name(),
                cpu.vcsw,
                if name == "posted_write_multi_rate" { format!(" per_message={MULTI}") } else { String::new() }
            );
            if let Some(v) = vs {
                println!("ratio name={name} placement={} vs=pingpong_round_trips_per_s value={v:.1}", p.name());
            }
            rates.push((name, rate, per_cpu_s, vs));
        }
    }
    let [(_, single_rate, single_cpu, single_vs), (_, multi_rate, multi_cpu, _)] = rates[..] else { unreachable!() };
    // "On one server core": writes per second of the server thread's CPU time, which other work on a shared
    // machine does not dilute (the wall-clock rate beside it does: it is what the scheduler let the thread run).
    // In `cross` the server's thread has a CPU of its own.
    let met = single_cpu >= POSTED_RATE_TARGET;
    if p == Placement::Cross {
        println!(
            "target name=posted_write_rate_per_server_core placement={} value={single_cpu:.0} \
             min={POSTED_RATE_TARGET:.0} {}",
            p.name(),
            if met { "met" } else { "missed" }
        );
    }
    x.summary.push(format!(
        "{}: posted REGION_WRITE {:.2} M/s wall clock, {:.2} M per server CPU-second ({:.0}x the ping-pong rate){}; \
         REGION_WRITE_MULTI of {MULTI}: {:.2} M writes/s ({:.2} M per server CPU-second)",
        p.name(),
        single_rate / 1e6,
        single_cpu / 1e6,
        single_vs.unwrap_or(0.0),
        if p == Placement::Cross {
            format!(" (target >= {:.0} M per server core-second: {})", POSTED_RATE_TARGET / 1e6, met_word(met))
        } else {
            String::new()
        },
        multi_rate / 1e6,
        multi_cpu / 1e6
    ));
    Ok(())
}

/// One request on the default server and its reply (header and `reply_len` bytes): the round-trip time.
fn timed_request(
    b: &mut Bench,
    req: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    reply_len: usize,
) -> Result<u64, String> {
    let h = Header::parse(req);
    let mut buf = [0u8; 64];
    let t0 = Instant::now();
    match fd {
        Some(fd) => send_with_fd(&b.server, req, fd)?,
        None => b.server.write_all(req).map_err(|e| format!("write: {e}"))?,
    }
    let len = read_message(&mut b.server, &mut buf[..reply_len])?;
    let ns = t0.elapsed().as_nanos() as u64;
    check_reply(&Header::parse(&buf), h.id, h.cmd)?;
    if len != reply_len {
        return Err(format!("reply to command {} of {len} bytes, expected {reply_len}", h.cmd));
    }
    if h.cmd == CMD_DMA_UNMAP && buf[HEADER_SIZE..len] != req[HEADER_SIZE..] {
        return Err("DMA_UNMAP reply does not echo the request".into());
    }
    Ok(ns)
}

/// DMA_MAP of 10,000 4 KiB pieces of one memfd (each with the fd, as QEMU maps RAM), then DMA_UNMAP of each, every
/// request timed beside a REGION_READ of config space timed just before it.
fn dma_map_unmap(b: &mut Bench, p: Placement, x: &mut Extras) -> Result<(), String> {
    let n = DMA_REGIONS;
    let memfd = rustix::fs::memfd_create(
        "vfu-bench-dma",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create: {e}"))?;
    rustix::fs::ftruncate(&memfd, n * 4096).map_err(|e| format!("ftruncate: {e}"))?;
    // Sealed against resizing, as QEMU's memfd backend does.
    rustix::fs::fcntl_add_seals(&memfd, rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW)
        .map_err(|e| format!("sealing the memfd: {e}"))?;
    const IOVA: u64 = 0x1_0000_0000;
    let iova = |i: u64| IOVA + i * 0x2000; // a hole after each, so no two regions touch
    let (mut reads, mut maps, mut unmaps) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        reads.push(b.read_config()?);
        let id = b.next_id();
        let req = dma_map_request(id, DMA_RW, i * 4096, iova(i), 4096);
        maps.push(timed_request(b, &req, Some(memfd.as_fd()), HEADER_SIZE).map_err(|e| format!("DMA_MAP {i}: {e}"))?);
    }
    for i in 0..n {
        reads.push(b.read_config()?);
        let id = b.next_id();
        let req = dma_unmap_request(id, iova(i), 4096);
        unmaps.push(timed_request(b, &req, None, req.len()).map_err(|e| format!("DMA_UNMAP {i}: {e}"))?);
    }
    let read = summarize(&reads);
    bench_line("dma_region_read", p, &read, " region=7 offset=0x0 count=4 interleaved_with=dma_map,dma_unmap");
    // The device side of the same requests in this process, no socket: fstat, the table and closing the fd (the
    // file's first DMA_MAP also checks its seals and maps it whole). REGION_READ plus this is a DMA_MAP's floor
    // before the socket's own cost of carrying an fd.
    let mem = device::GuestMem::new();
    let (mut map_in, mut unmap_in) = (Vec::new(), Vec::new());
    for i in 0..n {
        let f = std::fs::File::from(memfd.try_clone().map_err(|e| format!("dup: {e}"))?);
        let t0 = Instant::now();
        mem.map(iova(i), 4096, true, true, Some((f, i * 4096))).map_err(|e| format!("in-process map {i}: {e:?}"))?;
        map_in.push(t0.elapsed().as_nanos() as u64);
    }
    for i in 0..n {
        let t0 = Instant::now();
        mem.unmap(iova(i), 4096).map_err(|e| format!("in-process unmap {i}: {e:?}"))?;
        unmap_in.push(t0.elapsed().as_nanos() as u64);
    }
    let (map_in, unmap_in) = (summarize(&map_in), summarize(&unmap_in));
    bench_line("dma_map_inprocess", p, &map_in, " size=4096 what=fstat,table,close");
    bench_line("dma_unmap_inprocess", p, &unmap_in, " size=4096 what=table");
    let floor = (read.median + map_in.median) as f64 / read.median as f64;
    println!("ratio name=dma_map_floor placement={} vs=region_read value={floor:.3}", p.name());
    let mut line =
        format!("{}: {n} x 4 KiB with an fd, per op (REGION_READ beside them {}):", p.name(), us(read.median));
    for (name, v) in [("dma_map", &maps), ("dma_unmap", &unmaps)] {
        let s = summarize(v);
        // The first and the last 1,000: does a request cost more as the table fills?
        let (first, last) = (summarize(&v[..1000.min(v.len())]), summarize(&v[v.len().saturating_sub(1000)..]));
        bench_line(
            name,
            p,
            &s,
            &format!(
                " size=4096 fd=memfd regions={n} first1000_median_ns={} last1000_median_ns={}",
                first.median, last.median
            ),
        );
        let ratio = s.median as f64 / read.median as f64;
        println!("ratio name={name} placement={} vs=region_read value={ratio:.3}", p.name());
        let met = ratio <= DMA_RATIO_TARGET;
        target_line(
            &format!("{name}_vs_region_read"),
            Some(p),
            format!("{ratio:.3}"),
            DMA_RATIO_TARGET.to_string(),
            met,
        );
        line.push_str(&format!(" {name} {} = {ratio:.2}x ({});", us(s.median), met_word(met)));
    }
    line.push_str(&format!(
        " the same in process without the socket: map {}, unmap {}, so a DMA_MAP cannot go below {floor:.2}x \
         (before the socket's cost of carrying an fd);",
        us(map_in.median),
        us(unmap_in.median)
    ));
    x.summary.push(line);
    Ok(())
}

use std::os::fd::AsFd;

/// 64 servers with `--poll-us`, each with a client that negotiated, sent 100 requests and went idle: CPU over 2 s
/// (1 s with --quick) and RSS.
fn scale(server_bin: &Path, dir: &Path, cli: &Cli, x: &mut Extras) -> Result<(), String> {
    let count = cli.scale_servers;
    if count == 0 {
        return Ok(());
    }
    let mut procs = Vec::new();
    let mut conns = Vec::new();
    let result = (|| -> Result<(), String> {
        for i in 0..count {
            let sock = dir.join(format!("scale-{i}.sock"));
            let mut cmd = Command::new(server_bin);
            cmd.arg("--socket").arg(&sock).arg("--poll-us").arg(cli.poll_us.to_string()).env("RUST_LOG", "warn");
            procs.push(Proc::spawn("scale server", cmd, Some(dir.join(format!("scale-{i}.log"))))?);
        }
        for (i, p) in procs.iter_mut().enumerate() {
            let mut c = p.connect(&dir.join(format!("scale-{i}.sock")))?;
            c.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| e.to_string())?;
            negotiate(&mut c, 0)?;
            for id in 1..=100u16 {
                Bench::round_trip(&mut c, id, CONFIG_REGION, 0)?;
            }
            conns.push(c);
        }
        std::thread::sleep(Duration::from_millis(100));
        let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
        let over = Duration::from_secs(if cli.quick { 1 } else { 2 });
        let (ns, ticks) = cpu_over(&pids, over)?;
        let pct = 100.0 * ns as f64 / over.as_nanos() as f64;
        let (mut rss, mut pss, mut anon) = (Vec::new(), 0, 0);
        for p in &procs {
            rss.push(p.rss_kib()?.0);
            let (ps, an) = procs::pss_anon_kib(p.pid())?;
            (pss, anon) = (pss + ps, anon + an);
        }
        let avg = rss.iter().sum::<u64>() / rss.len() as u64;
        let max = *rss.iter().max().unwrap_or(&0);
        for p in procs.iter_mut() {
            if let Some(why) = p.exited() {
                return Err(why);
            }
        }
        println!(
            "cpu name=scale_idle servers={count} poll_us={} client=connected_idle over_ms={} cpu_ns={ns} \
             utime_stime_ticks={ticks} cpu_pct={pct:.3}",
            cli.poll_us,
            over.as_millis()
        );
        println!(
            "rss name=scale_idle servers={count} avg_vmrss_kib={avg} max_vmrss_kib={max} total_pss_kib={pss} \
             avg_pss_kib={} avg_rss_anon_kib={}",
            pss / count as u64,
            anon / count as u64
        );
        let cpu_met = pct <= IDLE_CPU_TARGET_PCT;
        let rss_met = avg <= SCALE_RSS_TARGET_KIB;
        target_line("scale_idle_cpu_pct", None, format!("{pct:.3}"), IDLE_CPU_TARGET_PCT.to_string(), cpu_met);
        target_line("scale_idle_rss_kib", None, avg.to_string(), SCALE_RSS_TARGET_KIB.to_string(), rss_met);
        x.summary.push(format!(
            "{count} idle servers with --poll-us {} (clients connected, idle): {} us of CPU in {} ms = {pct:.3}% of \
             a CPU (target <= {IDLE_CPU_TARGET_PCT}%: {}); RSS {avg} KiB each on average, {max} max (target <= \
             {SCALE_RSS_TARGET_KIB}: {}); all {count} together {} MiB proportional (PSS), {} KiB private heap and \
             stacks (RssAnon) each",
            cli.poll_us,
            ns / 1000,
            over.as_millis(),
            met_word(cpu_met),
            met_word(rss_met),
            pss / 1024,
            anon / count as u64
        ));
        Ok(())
    })();
    drop(conns);
    drop(procs);
    result
}

/// The driver model's view for [`queues16`]: BAR0 and config space through the socket, guest memory straight from
/// the memfd the server maps.
struct MemBus {
    c: client_tests::Client,
    mem: std::fs::File,
    base: u64,
}

impl testkit::Bus for MemBus {
    fn read32(&mut self, off: u64) -> u32 {
        self.c.read32(BAR0_REGION, off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.c.write32(BAR0_REGION, off, v)
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.c.region_write(CONFIG_REGION, off, &v.to_le_bytes()).ok("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        self.mem.read_exact_at(buf, addr - self.base).expect("guest memory read");
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        self.mem.write_all_at(data, addr - self.base).expect("guest memory write");
    }
}

/// One server with `--queues 16` and the loopback backend: its RSS idle, after the driver model brought all 16
/// queue pairs up (64-descriptor rings in 4 MiB of memfd memory mapped with DMA_MAP), and after traffic on all of
/// them: every RX ring filled with buffers, then 32 UDP frames of different flows sent on each TX queue, which
/// the loopback turns into received frames that RSS spreads over the 16 RX queues.
fn queues16(server_bin: &Path, dir: &Path, x: &mut Extras) -> Result<(), String> {
    use device::nic::regs::{QRX_TAIL1, QTX_TAIL1};
    use device::nic::virtchnl::{OP_CONFIG_RSS_KEY, OP_GET_RSS_HENA_CAPS, OP_SET_RSS_HENA};
    use testkit::Bus;
    const BASE: u64 = 0x40_0000;
    const SIZE: u64 = 4 << 20;
    const PAIRS: u64 = 16;
    const LEN: u64 = 64;
    const FRAMES: u64 = 32;
    let tx_ring = |q: u64| BASE + 0x10_0000 + q * 0x1000;
    let rx_ring = |q: u64| BASE + 0x18_0000 + q * 0x1000;
    let rx_buf = |q: u64, i: u64| BASE + 0x20_0000 + (q * LEN + i) * 2048;
    let tx_buf = |q: u64, i: u64| BASE + 0x8_0000 + (q * FRAMES + i) * 128;
    let sock = dir.join("q16.sock");
    let mut cmd = Command::new(server_bin);
    cmd.arg("--socket").arg(&sock).args(["--queues", "16", "--backend", "loopback"]).env("RUST_LOG", "warn");
    let mut p = Proc::spawn("--queues 16 server", cmd, Some(dir.join("q16.log")))?;
    drop(p.connect(&sock)?); // up; that first client leaves at once
    std::thread::sleep(Duration::from_millis(50));
    let (idle, _) = p.rss_kib()?;
    let memfd = rustix::fs::memfd_create("vfu-bench-q16", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    rustix::fs::ftruncate(&memfd, SIZE).map_err(|e| format!("ftruncate: {e}"))?;
    let mut c = client_tests::Client::connect(&sock).map_err(|e| format!("connecting to {}: {e}", sock.display()))?;
    c.negotiate();
    c.dma_map(BASE, SIZE, DMA_RW, Some((memfd.as_fd(), 0))).ok("DMA_MAP the memfd");
    c.enable_bus_master();
    let mem = std::fs::File::from(memfd);
    let mut d = testkit::DriverModel::new(MemBus { c, mem, base: BASE }, BASE);
    if !d.wait_active(Duration::from_secs(2)) {
        return Err("--queues 16 server: VFGEN_RSTAT never read VFACTIVE".into());
    }
    let rings: Vec<(u64, u64)> = (0..PAIRS).map(|q| (tx_ring(q), rx_ring(q))).collect();
    let res = d.bring_up_with(&rings, LEN as u16, &[(1, 0xffff, 0xffff), (0, 0, 0)]);
    let pairs = u16::from_le_bytes([res[2], res[3]]);
    if pairs != 16 {
        return Err(format!("--queues 16 server offered {pairs} queue pairs"));
    }
    std::thread::sleep(Duration::from_millis(50));
    let (up, _) = p.rss_kib()?;
    // RSS as iavf sets it: a key and the hash types; the device's default table spreads over the 16 queues.
    d.request_ok("CONFIG_RSS_KEY", OP_CONFIG_RSS_KEY, &testkit::msg_rss_key())?;
    let hena = d.request_ok("GET_RSS_HENA_CAPS", OP_GET_RSS_HENA_CAPS, &[])?;
    d.request_ok("SET_RSS_HENA", OP_SET_RSS_HENA, &hena.payload)?;
    let mac: [u8; 6] = res.get(30..36).and_then(|m| m.try_into().ok()).ok_or("short GET_VF_RESOURCES")?;
    for q in 0..PAIRS {
        for i in 0..LEN - 1 {
            d.bus.mem_write(rx_ring(q) + 32 * i, &[rx_buf(q, i).to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat());
        }
        d.bus.write32(QRX_TAIL1 + 4 * q, (LEN - 1) as u32);
    }
    for q in 0..PAIRS {
        for i in 0..FRAMES {
            let mut f = device::bench::udp_frame(mac, 64);
            f[34..36].copy_from_slice(&(1000 + (q * FRAMES + i) as u16).to_be_bytes());
            f[40..42].copy_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it): the port changed
            d.bus.mem_write(tx_buf(q, i), &f);
            let qw1 = 0x30 | ((f.len() as u64) << 34); // EOP | RS, DTYPE data
            d.bus.mem_write(tx_ring(q) + 16 * i, &[tx_buf(q, i).to_le_bytes(), qw1.to_le_bytes()].concat());
        }
        d.bus.write32(QTX_TAIL1 + 4 * q, FRAMES as u32);
    }
    let t = Instant::now();
    let done = |d: &mut testkit::DriverModel<MemBus>, q: u64| {
        let mut b = [0u8; 8];
        d.bus.mem_read(tx_ring(q) + 16 * (FRAMES - 1) + 8, &mut b);
        u64::from_le_bytes(b) & 0xf == 0xf
    };
    while !(0..PAIRS).all(|q| done(&mut d, q)) {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("--queues 16 server: TX not done on every queue within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Frames received per RX queue: descriptors with DD set.
    let mut per_q = Vec::new();
    for q in 0..PAIRS {
        let mut n = 0;
        for i in 0..LEN - 1 {
            let mut b = [0u8; 8];
            d.bus.mem_read(rx_ring(q) + 32 * i + 8, &mut b);
            n += u64::from_le_bytes(b) & 1;
        }
        per_q.push(n);
    }
    let (received, hit) = (per_q.iter().sum::<u64>(), per_q.iter().filter(|&&n| n > 0).count());
    std::thread::sleep(Duration::from_millis(50));
    let (busy, hwm) = p.rss_kib()?;
    if let Some(why) = p.exited() {
        return Err(why);
    }
    println!(
        "rss name=queues16 queue_pairs=16 idle_vmrss_kib={idle} up_vmrss_kib={up} traffic_vmrss_kib={busy} \
         vmhwm_kib={hwm} frames_sent={} frames_received={received} rx_queues_hit={hit}",
        PAIRS * FRAMES
    );
    if received == 0 || hit < 2 {
        return Err(format!("--queues 16 server: {received} frames came back, on {hit} RX queues: {per_q:?}"));
    }
    let met = hwm <= QUEUES16_RSS_TARGET_KIB;
    target_line("queues16_rss_kib", None, hwm.to_string(), QUEUES16_RSS_TARGET_KIB.to_string(), met);
    x.summary.push(format!(
        "--queues 16: RSS {idle} KiB idle, {up} KiB with 16 queue pairs up, {busy} KiB after traffic on all of them \
         ({} frames sent, {received} received on {hit} RX queues; peak {hwm} KiB; target <= \
         {QUEUES16_RSS_TARGET_KIB}: {})",
        PAIRS * FRAMES,
        met_word(met)
    ));
    drop(d);
    Ok(())
}
