//! vfu-icount: the instruction-count regression gate (issue 13). Wall-clock figures on these shared machines move by
//! tens of percent from run to run; the number of instructions an operation executes does not, so this is the
//! figure CI compares against committed baselines (`bench/icount-baseline.json`) and fails on when it grows by
//! more than 5%.
//!
//! Workloads, each deterministic and on one thread (no device worker runs: the request path's device has its two
//! workers started but idle, the datapath and dirty workloads use a device core without workers):
//!
//! - `request-read`: a 4-byte REGION_READ of config space, framed by the server's `Framer`, handled by `Ctx::handle`
//!   (the code the socket path runs), reply built (`server::bench`);
//! - `request-write`: a posted 4-byte REGION_WRITE to ATQBAL in BAR0, the same way;
//! - `frame-tx` / `frame-rx`: one 64-byte frame (60 bytes without the FCS) through queue pair 0's TX or RX engine,
//!   memfd guest memory, RSS and checksums on, descriptors re-armed 32 at a time (`device::bench::Datapath`);
//! - `dirty-report`: 64 logged device writes to distinct pages and a DMA_LOGGING_REPORT of a 1 GiB mapping at 4 KiB
//!   pages (`device::bench::DirtyReport`).
//!
//! Parent mode (the default) runs this binary in child mode (`--workload NAME --n N`) under
//! `valgrind --tool=callgrind` at two values of N and takes per-op = (Ir(N2) - Ir(N1)) / (N2 - N1), so process
//! start, setup and checks cancel. One line per workload: `icount name=... per_op=... baseline=... ratio=...`.
//! `--update` rewrites the baseline file; `--inject-regression PCT` adds a calibrated spin loop to every operation
//! (PCT percent of its baseline count) to show that the gate fails.
//!
//! Why not iai-callgrind: it needs its runner binary (`iai-callgrind-runner`) installed separately, at exactly the
//! version of the library crate, on every machine that runs the gate, and its benchmarks are harness-less bench
//! targets built in the bench profile. Ours is one binary built with the rest of the workspace, needs only valgrind,
//! and measures the same workloads with setup subtracted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "vfu-icount",
    about = "Instruction counts (callgrind) of the request, per-frame and dirty-report paths against committed baselines",
    after_help = "Build and run: cargo build --release -p server -p bench && ./target/release/vfu-icount [--quick]"
)]
struct Cli {
    /// Child mode: run this workload N times (under callgrind, started by the parent).
    #[arg(long, value_name = "NAME")]
    workload: Option<String>,

    /// Child mode: operations to run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    n: u64,

    /// Child mode: spin-loop iterations added to every operation (what --inject-regression asks for).
    #[arg(long, value_name = "K", default_value_t = 0, hide = true)]
    spin: u64,

    /// Small N for CI (the per-op counts agree with a full run's).
    #[arg(long)]
    quick: bool,

    /// Record the measured counts (median of 3 runs each) as the new baselines (with --only, the other entries stay).
    #[arg(long)]
    update: bool,

    /// Comma-separated workloads to run [default: all].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,

    /// The baseline file.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/icount-baseline.json"))]
    baseline: PathBuf,

    /// Fail when a per-op count exceeds its baseline by more than this many percent.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    tolerance: f64,

    /// Test only: add PCT percent of each workload's baseline count to every operation (a calibrated spin loop).
    #[arg(long, value_name = "PCT")]
    inject_regression: Option<f64>,

    /// The valgrind executable.
    #[arg(long, value_name = "PATH", default_value = "valgrind")]
    valgrind: PathBuf,
}

struct Workload {
    name: &'static str,
    what: &'static str,
    /// (N1, N2) for a full run and for --quick.
    full: (u64, u64),
    quick: (u64, u64),
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "request-read",
        what: "REGION_READ of config space: framed, handled, reply built",
        full: (2_000, 12_000),
        quick: (500, 2_500),
    },
    Workload {
        name: "request-write",
        what: "posted REGION_WRITE to BAR0 ATQBAL: framed, handled",
        full: (2_000, 12_000),
        quick: (500, 2_500),
    },
    Workload {
        name: "frame-tx",
        what: "one 64 B frame through the TX engine (32 per tail write)",
        full: (1_024, 8_192),
        quick: (256, 1_280),
    },
    Workload {
        name: "frame-rx",
        what: "one 64 B frame through RX (filter, RSS, checksum, writeback; 32 buffers per re-post)",
        full: (1_024, 8_192),
        quick: (256, 1_280),
    },
    Workload {
        name: "dirty-report",
        what: "64 logged writes + REPORT of a 1 GiB mapping at 4 KiB pages",
        full: (20, 120),
        quick: (5, 25),
    },
];

/// The calibration workload for --inject-regression: one operation is a call of the spin loop with `--spin K`
/// iterations; run with K = 0 and K = `SPIN_K` it gives the cost of a call and of an iteration.
const SPIN: &str = "spin";
const SPIN_K: u64 = 1_000;
const SPIN_N: (u64, u64) = (100, 500);

/// Dirty-report geometry.
const DIRTY_SIZE: u64 = 1 << 30;
const DIRTY_MARKS: u64 = 64;

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Work that cannot be optimised away, a fixed number of instructions per iteration.
#[inline(never)]
fn spin(k: u64) {
    let mut x = 0u64;
    for i in 0..k {
        x = std::hint::black_box(x.wrapping_add(i));
    }
    std::hint::black_box(x);
}

// ---- child mode -------------------------------------------------------------------------------------------------

/// Runs `name` `n` times with `extra` spin iterations after each operation, then checks the result.
fn child(name: &str, n: u64, extra: u64) -> Result<(), String> {
    let op = |f: &mut dyn FnMut()| {
        for _ in 0..n {
            f();
            if extra > 0 {
                spin(extra);
            }
        }
    };
    match name {
        "request-read" => {
            let mut r = server::bench::RequestPath::new();
            let mut bad = 0u64;
            op(&mut || bad += u64::from(r.region_read_config() != server::bench::CONFIG_ID));
            if bad > 0 {
                return Err(format!("{bad} REGION_READs of config space returned the wrong ID"));
            }
            if r.reply_bytes != n * 36 {
                return Err(format!("{} reply bytes for {n} REGION_READs", r.reply_bytes));
            }
            // Stopping the workers (thread joins, their exit) costs a slightly different count each run: skip it.
            std::mem::forget(r);
        }
        "request-write" => {
            let mut r = server::bench::RequestPath::new();
            op(&mut || r.posted_write_bar0());
            if n > 0 && r.atqbal() != 0x1234_5000 {
                return Err("the posted writes did not reach ATQBAL".into());
            }
            std::mem::forget(r);
        }
        "frame-tx" => {
            let mut d = device::bench::Datapath::new(60);
            // Whole batches: one operation is one frame, with its share of the batch's tail write.
            let batch = u64::from(device::bench::BATCH);
            if !n.is_multiple_of(batch) {
                return Err(format!("frame-tx: N must be a multiple of {batch}"));
            }
            for _ in 0..n / batch {
                d.tx(batch);
                if extra > 0 {
                    (0..batch).for_each(|_| spin(extra));
                }
            }
            d.check();
        }
        "frame-rx" => {
            let mut d = device::bench::Datapath::new(60);
            let batch = u64::from(device::bench::BATCH);
            if !n.is_multiple_of(batch) {
                return Err(format!("frame-rx: N must be a multiple of {batch}"));
            }
            op(&mut || d.rx(1));
            d.check();
        }
        "dirty-report" => {
            let d = device::bench::DirtyReport::new(DIRTY_SIZE, DIRTY_MARKS);
            op(&mut || d.round(false));
            d.round(true); // once per run: cancels out of per_op
        }
        SPIN => (0..n).for_each(|_| spin(std::hint::black_box(extra))),
        _ => return Err(format!("unknown workload {name:?}")),
    }
    println!("done workload={name} n={n} spin={extra}");
    Ok(())
}

// ---- parent mode ------------------------------------------------------------------------------------------------

/// One child run under callgrind.
struct Job {
    name: String,
    n: u64,
    spin: u64,
    out: PathBuf,
}

/// Total Ir of a callgrind output file: its `totals:` line (or `summary:`).
fn total_ir(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("totals:"))
        .or_else(|| text.lines().find(|l| l.starts_with("summary:")))
        .ok_or_else(|| format!("{}: no totals line", path.display()))?;
    let v = line.split_whitespace().nth(1).ok_or_else(|| format!("{}: empty totals line", path.display()))?;
    v.parse().map_err(|e| format!("{}: totals {v:?}: {e}", path.display()))
}

/// Runs the jobs under callgrind, as many at a time as there are CPUs (counts do not depend on it); their Ir.
fn run_jobs(cli: &Cli, jobs: &[Job]) -> Result<Vec<u64>, String> {
    let me = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let par = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    let mut results = vec![None; jobs.len()];
    let mut next = 0;
    let mut running: Vec<(usize, std::process::Child)> = Vec::new();
    while next < jobs.len() || !running.is_empty() {
        while next < jobs.len() && running.len() < par {
            let j = &jobs[next];
            let child = Command::new(&cli.valgrind)
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", j.out.display()))
                .arg("--")
                .arg(&me)
                .args(["--workload", &j.name, "--n", &j.n.to_string(), "--spin", &j.spin.to_string()])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting {}: {e}", cli.valgrind.display()))?;
            running.push((next, child));
            next += 1;
        }
        // Wait for the oldest: the jobs are of similar length, and the pipes are drained by wait_with_output.
        let (i, child) = running.remove(0);
        let out = child.wait_with_output().map_err(|e| format!("waiting for valgrind: {e}"))?;
        let j = &jobs[i];
        if !out.status.success() {
            return Err(format!(
                "workload {} n={} failed under callgrind ({}):\n{}{}",
                j.name,
                j.n,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        results[i] = Some(total_ir(&j.out)?);
    }
    Ok(results.into_iter().map(|r| r.expect("every job ran")).collect())
}

/// Per-op Ir of each named workload, each from two runs at (N1, N2) with `spin` extra iterations per op; with
/// `reps` > 1 each pair is run that many times and the median per-op count kept (with its Ir figures).
fn measure(
    cli: &Cli,
    dir: &Path,
    set: &[(String, (u64, u64), u64)],
    reps: usize,
) -> Result<Vec<(f64, u64, u64)>, String> {
    let mut jobs = Vec::new();
    for rep in 0..reps {
        for (name, (n1, n2), spin) in set {
            for n in [n1, n2] {
                let out = dir.join(format!("{name}-{n}-{spin}-{rep}.callgrind"));
                jobs.push(Job { name: name.clone(), n: *n, spin: *spin, out });
            }
        }
    }
    let ir = run_jobs(cli, &jobs)?;
    Ok(set
        .iter()
        .enumerate()
        .map(|(i, (_, (n1, n2), _))| {
            let mut runs: Vec<(f64, u64, u64)> = (0..reps)
                .map(|rep| {
                    let at = 2 * (rep * set.len() + i);
                    let (a, b) = (ir[at], ir[at + 1]);
                    ((b as f64 - a as f64) / (n2 - n1) as f64, a, b)
                })
                .collect();
            runs.sort_by(|x, y| x.0.total_cmp(&y.0));
            runs[reps / 2]
        })
        .collect())
}

fn read_baseline(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn parent(cli: &Cli) -> Result<bool, String> {
    for name in &cli.only {
        if !WORKLOADS.iter().any(|w| w.name == name) {
            return Err(format!("unknown workload {name:?} (known: {})", names().join(", ")));
        }
    }
    let version = match Command::new(&cli.valgrind).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            let msg = format!(
                "vfu-icount: SKIPPED: {} not found or not working: the instruction-count gate did NOT run \
                 (install valgrind)",
                cli.valgrind.display()
            );
            let bar = "#".repeat(100);
            println!("{bar}\n# {msg}\n{bar}");
            eprintln!("{bar}\n# {msg}\n{bar}");
            println!("skip name=icount reason=no_valgrind");
            return Ok(true);
        }
    };
    let baseline = read_baseline(&cli.baseline)?;
    let base_of =
        |name: &str| -> Option<f64> { baseline.as_ref()?.get("workloads")?.get(name)?.get("per_op")?.as_f64() };
    if let Some(b) = &baseline {
        let p = b.get("profile").and_then(Value::as_str).unwrap_or("release");
        if p != profile() && !cli.update {
            return Err(format!(
                "{} was recorded with a {p} build and this is a {} build: counts are not comparable \
                 (build with --release, or pass --baseline)",
                cli.baseline.display(),
                profile()
            ));
        }
    }
    let selected: Vec<&Workload> =
        WORKLOADS.iter().filter(|w| cli.only.is_empty() || cli.only.iter().any(|o| o == w.name)).collect();
    let dir = std::env::temp_dir().join(format!("vfu-icount-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let result = gate(cli, &dir, &selected, &version, &baseline, &base_of);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn names() -> Vec<&'static str> {
    WORKLOADS.iter().map(|w| w.name).collect()
}

fn gate(
    cli: &Cli,
    dir: &Path,
    selected: &[&Workload],
    version: &str,
    baseline: &Option<Value>,
    base_of: &dyn Fn(&str) -> Option<f64>,
) -> Result<bool, String> {
    let t0 = Instant::now();
    println!(
        "# vfu-icount: {version}, {} build, {} mode; per_op = (Ir(n2) - Ir(n1)) / (n2 - n1); baselines {}",
        profile(),
        if cli.quick { "quick" } else { "full" },
        cli.baseline.display()
    );
    // --inject-regression: extra spin iterations per op worth PCT% of each baseline, from a calibration run.
    let mut spins = vec![0u64; selected.len()];
    if let Some(pct) = cli.inject_regression {
        let cal = measure(cli, dir, &[(SPIN.to_string(), SPIN_N, 0), (SPIN.to_string(), SPIN_N, SPIN_K)], 1)?;
        let (call, per_iter) = (cal[0].0, (cal[1].0 - cal[0].0) / SPIN_K as f64);
        println!("# injecting a {pct}% regression: a spin call costs {call:.1} Ir and an iteration {per_iter:.3}");
        for (s, w) in spins.iter_mut().zip(selected) {
            let b = base_of(w.name).ok_or_else(|| format!("--inject-regression: no baseline for {}", w.name))?;
            *s = ((b * pct / 100.0 - call) / per_iter).round().max(1.0) as u64;
        }
    }
    let set: Vec<(String, (u64, u64), u64)> = selected
        .iter()
        .zip(&spins)
        .map(|(w, &s)| (w.name.to_string(), if cli.quick { w.quick } else { w.full }, s))
        .collect();
    // Counts agree to a fraction of an instruction per op from run to run (thread start-up in the request
    // workloads varies by ~1,000 Ir a run); --update takes the median of 3 so that re-recording an unchanged tree
    // writes the same file.
    let measured = measure(cli, dir, &set, if cli.update { 3 } else { 1 })?;
    let mut failed = Vec::new();
    let mut improved = Vec::new();
    for ((w, (n1, n2)), (per_op, ir1, ir2)) in selected.iter().zip(set.iter().map(|s| s.1)).zip(&measured) {
        let base = base_of(w.name);
        let ratio = base.map(|b| per_op / b);
        let status = match ratio {
            None => "no_baseline",
            Some(r) if r > 1.0 + cli.tolerance / 100.0 => {
                failed.push(format!(
                    "{}: {per_op:.1} instructions per op, baseline {:.1}: {:+.1}% (limit +{}%)",
                    w.name,
                    base.unwrap_or(0.0),
                    (r - 1.0) * 100.0,
                    cli.tolerance
                ));
                "REGRESSION"
            }
            Some(r) if r < 1.0 - cli.tolerance / 100.0 => {
                improved.push(w.name);
                "improved"
            }
            Some(_) => "ok",
        };
        println!(
            "icount name={} per_op={per_op:.1} baseline={} ratio={} status={status} n1={n1} n2={n2} ir_n1={ir1} \
             ir_n2={ir2}",
            w.name,
            base.map_or("none".into(), |b| format!("{b:.1}")),
            ratio.map_or("none".into(), |r| format!("{r:.4}")),
        );
    }
    for w in selected {
        println!("# {:<14} {}", w.name, w.what);
    }
    println!("# {:.1} s", t0.elapsed().as_secs_f64());
    if cli.update {
        let mut workloads: BTreeMap<String, Value> = baseline
            .as_ref()
            .and_then(|b| b.get("workloads"))
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (w, (per_op, _, _)) in selected.iter().zip(&measured) {
            workloads.insert(w.name.to_string(), json!({ "per_op": round1(*per_op), "what": w.what }));
        }
        let file = json!({
            "about": "Instructions per operation (callgrind Ir) of vfu-icount's workloads; .ci/run fails when one \
                      grows by more than 5%. Re-record with: cargo build --release -p server -p bench && \
                      ./target/release/vfu-icount --update --quick",
            "profile": profile(),
            "workloads": workloads,
        });
        let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())? + "\n";
        std::fs::write(&cli.baseline, text).map_err(|e| format!("writing {}: {e}", cli.baseline.display()))?;
        println!("# baselines written to {}", cli.baseline.display());
        return Ok(true);
    }
    if !improved.is_empty() {
        println!(
            "# {} improved by more than {}%: record the new counts with --update",
            improved.join(", "),
            cli.tolerance
        );
    }
    if failed.is_empty() {
        println!("# instruction counts within {}% of the baselines", cli.tolerance);
        Ok(true)
    } else {
        for f in &failed {
            println!("# REGRESSION {f}");
            eprintln!("vfu-icount: REGRESSION {f}");
        }
        Ok(false)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(name) = &cli.workload {
        return match child(name, cli.n, cli.spin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vfu-icount: {e}");
                ExitCode::from(2)
            }
        };
    }
    match parent(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vfu-icount: {e}");
            ExitCode::from(2)
        }
    }
}
