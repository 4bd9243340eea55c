//! `vfu-refvmm`: the reference VMM. Live-migrates the VF from one `vfu-i40evf` server to another under traffic
//! with vfio-user migration v2, prints the timeline and checks that nothing was lost (docs/refvmm.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use client_tests::refvmm::remap::AckPolicy;
use client_tests::refvmm::{self, Config};

#[derive(Parser, Debug)]
#[command(
    name = "vfu-refvmm",
    about = "Reference VMM: migrates an i40e VF between two vfu-i40evf servers under traffic and verifies the result",
    after_help = "Both servers need a dgram backend whose REMOTE is --wire:\n  \
                  vfu-i40evf --socket SRC.sock --backend dgram:SRC_BACKEND,WIRE\n  \
                  vfu-i40evf --socket DST.sock --backend dgram:DST_BACKEND,WIRE\n\
                  Add --migration-audit to both to have the destination audit the copy (its log).\n\
                  Exit status: 0 when every check passed, 1 when a check failed, 2 when the migration could not run."
)]
struct Cli {
    /// The source server's socket.
    #[arg(long, value_name = "PATH")]
    source: PathBuf,

    /// The destination server's socket.
    #[arg(long, value_name = "PATH")]
    destination: PathBuf,

    /// The wire peer's UDP address: the REMOTE of both servers' dgram backends.
    #[arg(long, value_name = "ADDR")]
    wire: SocketAddr,

    /// The source's dgram backend address (its LOCAL).
    #[arg(long, value_name = "ADDR")]
    source_backend: SocketAddr,

    /// The destination's dgram backend address (its LOCAL).
    #[arg(long, value_name = "ADDR")]
    destination_backend: SocketAddr,

    /// Guest memory (memfd), e.g. 64M, 1G or bytes; at least 16M.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    memory: u64,

    /// Frames in each direction, at least (a quarter before the migration, a quarter after it). 0: no traffic.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    frames: u64,

    /// Frames per second in each direction.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    rate: u64,

    /// Pre-copy iterations, at most (the first copies all memory).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    iterations: u32,

    /// Shortest pre-copy iteration, in milliseconds: traffic runs meanwhile.
    #[arg(long, value_name = "MS", default_value_t = 25)]
    iteration_ms: u64,

    /// Stop iterating once an iteration's dirty set is at most this many pages (0: run every iteration).
    #[arg(long, value_name = "PAGES", default_value_t = 0)]
    converge_pages: u64,

    /// Pages per second the guest workload writes besides the driver.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    guest_dirty_rate: u64,

    /// Negative control: do not copy the pages DMA_LOGGING_REPORT returns (guest-dirty pages are still copied).
    /// The memory check then finds the lost pages and the run fails.
    #[arg(long)]
    skip_dirty: bool,

    /// The remap IRQ (docs/remap-irq.md): on = enable it where a server offers it and store doorbells into the
    /// pages it maps; off = every BAR0 access is a message.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    remap: String,

    /// When a revocation is acknowledged (tests): prompt; delay:MS (keep storing into the old mapping for MS
    /// first); never (keep the stale mapping and store into it for good, never acknowledge).
    #[arg(long, value_name = "POLICY", default_value = "prompt", value_parser = |s: &str| s.parse::<AckPolicy>())]
    remap_ack: AckPolicy,

    /// Write the timeline and the verification as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 64M)"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("'{s}' is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = Config::new(cli.source, cli.destination, cli.wire, cli.source_backend, cli.destination_backend);
    cfg.memory = cli.memory;
    cfg.frames = cli.frames;
    cfg.rate = cli.rate;
    cfg.iterations = cli.iterations;
    cfg.iteration_ms = cli.iteration_ms;
    cfg.converge_pages = cli.converge_pages;
    cfg.guest_dirty_rate = cli.guest_dirty_rate;
    cfg.skip_dirty = cli.skip_dirty;
    cfg.remap = cli.remap == "on";
    cfg.remap_ack = cli.remap_ack;
    let report = match refvmm::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vfu-refvmm: the migration failed: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.timeline());
    if let Some(path) = &cli.json {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            eprintln!("vfu-refvmm: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("timeline written to {}", path.display());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
