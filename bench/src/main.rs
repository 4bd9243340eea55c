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
//! 4. the server's idle RSS.
//!
//! The benchmarks run interleaved in rounds so that noise from other work on the (shared, unpinned) cores hits all
//! of them alike. Machine-readable lines start with `bench`, `cpu`, `rss`, `ratio` or `target` (key=value fields);
//! the human summary lines with `#`.
//! The exit status is non-zero only on a functional failure (a wrong reply, a dead server), never on a missed target.

mod procs;
mod stats;
mod wire;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use rustix::net::RecvFlags;

use procs::{last_cpu, Proc, Sched, TempDir};
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

const RATIO_TARGET: f64 = 1.15;
const RSS_TARGET_KIB: u64 = 16 * 1024;
/// Ratios whose two sides shared a CPU in proportions further apart than this are flagged.
const PLACEMENT_TOLERANCE_PCT: f64 = 25.0;
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

    /// Short run for CI: a few thousand iterations per benchmark, well under 5 s.
    #[arg(long)]
    quick: bool,

    /// Measured round trips per benchmark (default 200000, --quick 5000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(100..=100_000_000))]
    iters: Option<u64>,

    /// Posted REGION_WRITEs per batch (each batch ends with one REGION_READ).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    posted_batch: u32,

    /// Run only these benchmarks (for profiling one request type; ratios need pingpong too).
    #[arg(long, value_name = "NAME", value_delimiter = ',', value_enum)]
    only: Vec<Kind>,

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

/// How much to run.
struct Plan {
    rounds: usize,
    per_round: usize,
    warmup: usize,
    batches_per_round: usize,
    batch: u32,
    /// Check where the client and its peer ran every this many iterations.
    cpu_sample_every: usize,
}

impl Plan {
    fn new(cli: &Cli) -> Plan {
        let (rounds, total, warmup, batches) = if cli.quick { (5, 5_000, 500, 20) } else { (20, 200_000, 20_000, 200) };
        let total = cli.iters.map_or(total, |n| n as usize);
        let per_round = total.div_ceil(rounds);
        Plan {
            rounds,
            per_round,
            warmup: warmup.min(total),
            batches_per_round: batches,
            batch: cli.posted_batch,
            cpu_sample_every: (per_round / 50).max(4),
        }
    }
}

/// The two connections under test and the request state.
struct Bench {
    echo: UnixStream,
    server: UnixStream,
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
}

const KINDS: [Kind; 4] = [Kind::Pingpong, Kind::RegionReadConfig, Kind::RegionReadBar0, Kind::PostedWrite];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pingpong => "pingpong",
            Kind::RegionReadConfig => "region_read_config",
            Kind::RegionReadBar0 => "region_read_bar0",
            Kind::PostedWrite => "posted_write",
        }
    }
}

fn step(b: &mut Bench, kind: Kind, batch: u32) -> Result<u64, String> {
    match kind {
        Kind::Pingpong => b.pingpong(),
        Kind::RegionReadConfig => b.read_config(),
        Kind::RegionReadBar0 => b.read_rstat(),
        Kind::PostedWrite => b.posted_batch(batch),
    }
}

fn default_server() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join("vfu-i40evf"))
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
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "# vfu-bench mode={} rounds={} iters_per_round={} warmup={} posted_batch={} cpus={cpus} pinned=no",
        if cli.quick { "quick" } else { "full" },
        plan.rounds,
        plan.per_round,
        plan.warmup,
        plan.batch
    );
    println!("# server {}", server_bin.display());

    // Declared first, dropped last: the processes are gone before their directory is removed.
    let dir = TempDir::new().map_err(|e| format!("creating a temporary directory: {e}"))?;

    // The ping-pong peer: this binary again, as a separate process, like the server.
    let echo_path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&echo_path).map_err(|e| format!("binding {}: {e}", echo_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--echo-socket").arg(&echo_path);
    let mut echo_proc = Proc::spawn("ping-pong peer", cmd, None)?;
    let echo = echo_proc.accept(&listener)?;
    drop(listener);

    // The server on its own socket, logging at info level to a file (a trace level from the environment would
    // measure the logger).
    let sock = dir.path().join("vfu.sock");
    let log = dir.path().join("server.log");
    let mut cmd = Command::new(&server_bin);
    cmd.arg("--socket").arg(&sock).env("RUST_LOG", "info");
    let mut server_proc = Proc::spawn("server", cmd, Some(log))?;
    let mut server = server_proc.connect(&sock)?;

    let result = (|| -> Result<(), String> {
        Sched::of("self")?; // fail early if /proc lacks schedstat
        for s in [&echo, &server] {
            s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| e.to_string())?;
        }
        let caps = negotiate(&mut server, 0)?;
        println!("# negotiated {caps}");
        let mut b = Bench { echo, server, id: 0, atqbal: 0 };
        // Functional checks before anything is timed.
        b.read_config()?;
        b.read_rstat()?;
        b.posted_batch(4)?;
        b.pingpong()?;

        std::thread::sleep(Duration::from_millis(300));
        let (idle_rss, idle_hwm) = server_proc.rss_kib()?;

        let kinds: Vec<Kind> = KINDS.into_iter().filter(|k| cli.only.is_empty() || cli.only.contains(k)).collect();
        for &kind in &kinds {
            let n = if kind == Kind::PostedWrite { plan.warmup / plan.batch as usize + 1 } else { plan.warmup };
            for _ in 0..n {
                step(&mut b, kind, plan.batch)?;
            }
        }
        let mut results: Vec<Measured> = kinds.iter().map(|&kind| Measured::new(kind)).collect();
        for round in 0..plan.rounds {
            for k in 0..results.len() {
                let r = &mut results[(round + k) % kinds.len()]; // rotate which benchmark goes first
                let n = if r.kind == Kind::PostedWrite { plan.batches_per_round } else { plan.per_round };
                // CPU time and context switches of the answering process (peer or server) and of this one.
                let answering = if r.kind == Kind::Pingpong { &echo_proc } else { &server_proc };
                let before = [answering.sched()?, Sched::of("self")?];
                let pid = answering.pid().to_string();
                for i in 0..n {
                    r.samples.push(step(&mut b, r.kind, plan.batch)?);
                    // Now and then (untimed): did this round trip run on one CPU or across both?
                    if i % plan.cpu_sample_every == plan.cpu_sample_every - 1 {
                        r.placement[usize::from(last_cpu("self")? == last_cpu(&pid)?)] += 1;
                    }
                }
                let after = [answering.sched()?, Sched::of("self")?];
                for j in 0..2 {
                    r.cpu[j].add(&after[j].since(&before[j]));
                }
            }
            if let Some(why) = server_proc.exited() {
                return Err(why);
            }
        }
        let (end_rss, end_hwm) = server_proc.rss_kib()?;
        report(&plan, &results, (idle_rss, idle_hwm), (end_rss, end_hwm));
        Ok(())
    })();
    let result = result.map_err(|e| format!("{e}\n{}\n{}", server_proc.diagnose(), echo_proc.diagnose()));
    drop(server_proc);
    drop(echo_proc);
    drop(dir);
    result
}

/// One benchmark's per-iteration times and the CPU accounting of [answering process, this process].
struct Measured {
    kind: Kind,
    samples: Vec<u64>,
    cpu: [Sched; 2],
    /// Samples of [client and peer last ran on different CPUs, on the same CPU].
    placement: [u64; 2],
}

impl Measured {
    fn new(kind: Kind) -> Measured {
        Measured { kind, samples: Vec::new(), cpu: [Sched::default(); 2], placement: [0; 2] }
    }
}

fn bench_line(name: &str, s: &Summary, extra: &str) {
    println!(
        "bench name={name} median_ns={} p99_ns={} min_ns={} mean_ns={} iters={}{extra}",
        s.median, s.p99, s.min, s.mean, s.iters
    );
}

/// CPU time and context switches (voluntary: blocked waiting; involuntary: preempted) per operation, of the
/// answering process (`peer`: the echo process or the server) and of this client.
fn cpu_line(name: &str, peer: &str, m: &Measured, ops: usize) {
    let per = |v: u64| v as f64 / ops as f64;
    let [p, c] = &m.cpu;
    println!(
        "cpu name={name} peer={peer} peer_cpu_ns_per_op={:.0} peer_vcsw_per_op={:.2} peer_ivcsw_per_op={:.2} \
         client_cpu_ns_per_op={:.0} client_vcsw_per_op={:.2} client_ivcsw_per_op={:.2} same_cpu_pct={:.0} ops={ops}",
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
    100.0 * m.placement[1] as f64 / (m.placement[0] + m.placement[1]).max(1) as f64
}

fn target_line(name: &str, value: String, limit: String, met: bool) {
    println!("target name={name} value={value} max={limit} {}", if met { "met" } else { "missed" });
}

fn us(ns: u64) -> String {
    format!("{:.2} us", ns as f64 / 1000.0)
}

fn report(plan: &Plan, results: &[Measured], idle: (u64, u64), end: (u64, u64)) {
    let get = |k: Kind| results.iter().find(|r| r.kind == k).map(|r| (r, summarize(&r.samples)));
    let [pp, cfg, bar0, batch] = KINDS.map(get);
    let word = |m: bool| if m { "met" } else { "MISSED" };
    let mut summary = Vec::new();
    let mut warnings: Vec<String> = Vec::new();

    if let Some((r, s)) = &pp {
        bench_line("pingpong", s, " bytes_out=32 bytes_in=36 peer=process");
        cpu_line("pingpong", "echo", r, s.iters);
        summary.push(format!("AF_UNIX ping-pong, 32 B -> 36 B, peer process: {} [{}]", us(s.median), us(s.p99)));
    }
    for (m, what, extra) in [
        (&cfg, "REGION_READ config 4 B:          ", " region=7 offset=0x0 count=4"),
        (&bar0, "REGION_READ BAR0 VFGEN_RSTAT 4 B:", " region=0 offset=0x8800 count=4"),
    ] {
        let Some((r, s)) = m else { continue };
        let name = r.kind.name();
        bench_line(name, s, extra);
        cpu_line(name, "server", r, s.iters);
        let mut line = format!("{what}             {} [{}]", us(s.median), us(s.p99));
        if let Some((base_m, base)) = &pp {
            let ratio = s.median as f64 / base.median as f64;
            let delta = s.median as i64 - base.median as i64;
            // Both round trips are only comparable when the scheduler placed the partners alike: on one CPU they
            // hand over by context switch, across CPUs every message costs a cross-CPU wake-up.
            let (p_same, s_same) = (same_cpu_pct(base_m), same_cpu_pct(r));
            let matched = (p_same - s_same).abs() <= PLACEMENT_TOLERANCE_PCT;
            println!(
                "ratio name={name} vs=pingpong value={ratio:.3} delta_ns={delta} same_cpu_pct={s_same:.0} \
                 baseline_same_cpu_pct={p_same:.0} placement_matched={}",
                if matched { "yes" } else { "no" }
            );
            let met = ratio <= RATIO_TARGET;
            target_line(&format!("{name}_vs_pingpong"), format!("{ratio:.3}"), RATIO_TARGET.to_string(), met);
            line.push_str(&format!(
                "  = {ratio:.2}x ping-pong, +{} (target <= {RATIO_TARGET}: {})",
                us(delta.max(0) as u64),
                word(met)
            ));
            if !matched {
                warnings.push(format!(
                    "{name}: client and server shared a CPU {s_same:.0}% of the time, the ping-pong pair {p_same:.0}%: \
                     the ratio compares different scheduler placements (see docs/performance.md)"
                ));
            }
        }
        summary.push(line);
    }
    if let Some((r, s)) = &batch {
        bench_line("posted_write_batch", s, &format!(" writes={} region=0 offset=0x7c00", plan.batch));
        // Per posted write: the batch minus one REGION_READ (the median BAR0 read, else the batch's own
        // minimum as a stand-in), divided by the batch size.
        let read = bar0.as_ref().map_or(0, |(_, b)| b.median);
        let per_write: Vec<u64> = r.samples.iter().map(|&t| t.saturating_sub(read) / u64::from(plan.batch)).collect();
        let pw = summarize(&per_write);
        bench_line("posted_write", &pw, " derived=(batch-median_region_read_bar0)/writes replies_to_posted=0");
        cpu_line("posted_write", "server", r, s.iters * plan.batch as usize);
        let mut line = format!("posted REGION_WRITE (batches of {} + 1 read):  {} each", plan.batch, us(pw.median));
        if let Some((_, b)) = &bar0 {
            let ratio = pw.median as f64 / b.median as f64;
            println!("ratio name=posted_write vs=region_read_bar0 value={ratio:.3}");
            line.push_str(&format!(" = {ratio:.2}x a REGION_READ"));
        }
        line.push_str("; no reply to any posted write");
        summary.push(line);
    }
    println!("rss name=server_idle vmrss_kib={} vmhwm_kib={}", idle.0, idle.1);
    println!("rss name=server_after_bench vmrss_kib={} vmhwm_kib={}", end.0, end.1);
    let rss_met = idle.0 <= RSS_TARGET_KIB;
    target_line("server_idle_rss_kib", idle.0.to_string(), RSS_TARGET_KIB.to_string(), rss_met);
    summary.push(format!(
        "server RSS idle after VERSION: {} KiB (target <= {RSS_TARGET_KIB} KiB: {}); after the run {} KiB, peak {} KiB",
        idle.0,
        word(rss_met),
        end.0,
        end.1
    ));

    println!("#");
    println!("# Summary (medians; p99 in brackets). Nothing is pinned: the bench, the peer/server and anything else");
    println!("# on this machine share its cores, so compare the ratios, measured interleaved in the same run.");
    for line in summary {
        println!("#   {line}");
    }
    for w in warnings {
        println!("# WARNING: {w}");
    }
}
