//! vfu-migbench: what migration costs the device, each figure beside a floor measured in the same run.
//!
//! - DMA_LOGGING_REPORT over 64 GiB of fd-backed memory at 4 KiB pages (16 Mi pages, a 2 MiB bitmap), sparse and
//!   dense, against the floor of reading and zeroing that much bitmap memory.
//! - One mark on the write path: a 64-byte device write with dirty logging on against the same write with it off,
//!   and a bare `PageBitmap::mark` against a bare atomic OR.
//! - Save + restore of the device state: pause, save, encode; decode, load into a paused device, resume; against
//!   a plain clone of the state.
//! - State size, idle and after a driver brought two queue pairs up and ran traffic.
//!
//! One machine-readable line per figure (`bench name=...`, `ratio name=... vs=... value=...`,
//! `target name=... value=... max=... met|missed`). `--quick` for CI.

use std::fs::File;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use device::stream::{decode_state, encode_state, parse_record};
use device::{GuestMem, I40eVf, VfConfig};

#[derive(Parser)]
#[command(
    name = "vfu-migbench",
    about = "Migration costs of vfu-i40evf's device model: dirty REPORT, mark, save/restore, state size"
)]
struct Cli {
    /// Fewer rounds (CI).
    #[arg(long)]
    quick: bool,
}

fn memfd(size: u64) -> File {
    let fd = rustix::fs::memfd_create("vfu-migbench", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// The median of `rounds` timings of `f`, in nanoseconds.
fn median_ns(rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<u128> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos()
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2] as f64
}

fn target(name: &str, value: f64, max: f64, unit: &str) {
    println!(
        "target name={name} value={value:.3}{unit} max={max}{unit} {}",
        if value <= max { "met" } else { "missed" }
    );
}

const GIB: u64 = 1 << 30;

fn report_bench(rounds: usize) {
    let size = 64 * GIB;
    let mem = GuestMem::new();
    // Sixteen 4 GiB mappings, as a VMM maps RAM in slots; sparse memfds: nothing is allocated.
    for i in 0..16 {
        mem.map(i * 4 * GIB, 4 * GIB, true, true, Some((memfd(4 * GIB), 0))).expect("map");
    }
    mem.start_logging(4096, &[], false).expect("start");
    let words = (size / 4096 / 64) as usize;
    // Floor: what any report must do at least: zero a 2 MiB bitmap and read 2 MiB of bitmap words.
    let src: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let floor = median_ns(rounds, || {
        let out = vec![0u64; words];
        let s: u64 = src.iter().map(|w| w.load(Ordering::Relaxed)).fold(0, |a, b| a | b);
        black_box((out, s));
    });
    let sparse = median_ns(rounds, || {
        // 1000 pages written between reports (an idle guest's RX rings and buffers).
        for i in 0..1000u64 {
            mem.write(i * 64 * 1024 * 1024 + 4096, &[1]).unwrap();
        }
        black_box(mem.report(0, size, 4096).unwrap());
    });
    // Dense: every page of the first 4 GiB written (1 Mi pages reported); the writes are not timed.
    let mut dense_runs: Vec<f64> = (0..rounds.min(5))
        .map(|_| {
            for m in 0..(4 * GIB / 4096) {
                mem.write(m * 4096, &[1]).unwrap();
            }
            let t = Instant::now();
            black_box(mem.report(0, size, 4096).unwrap());
            t.elapsed().as_nanos() as f64
        })
        .collect();
    dense_runs.sort_by(f64::total_cmp);
    let dense_report = dense_runs[dense_runs.len() / 2];
    println!("bench name=report_64gib pages=16777216 dirty=1000 ns={sparse:.0} floor_ns={floor:.0}");
    println!("bench name=report_64gib pages=16777216 dirty=1048576 ns={dense_report:.0}");
    println!("ratio name=report_64gib_sparse vs=bitmap_floor value={:.2}", sparse / floor);
    target("report_64gib_sparse_ms", sparse / 1e6, 2.0, "");
    target("report_64gib_dense_ms", dense_report / 1e6, 2.0, "");
}

fn mark_bench(iters: u64) {
    let mem = GuestMem::new();
    mem.map(0, GIB, true, true, Some((memfd(GIB), 0))).expect("map");
    let data = [7u8; 64];
    let write_all = |mem: &GuestMem| {
        let t = Instant::now();
        for i in 0..iters {
            mem.write((i * 4096 * 7) % (GIB - 4096), &data).unwrap();
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    };
    let _ = write_all(&mem); // fault the pages in
    let off = write_all(&mem);
    mem.start_logging(4096, &[], false).unwrap();
    let on = write_all(&mem);
    mem.stop_logging();
    mem.start_logging(4096, &[], true).unwrap();
    let audit = write_all(&mem);
    println!("bench name=device_write_64b logging=off ns={off:.2}");
    println!("bench name=device_write_64b logging=on ns={on:.2}");
    println!("bench name=device_write_64b logging=on_with_audit ns={audit:.2}");
    println!("ratio name=device_write_64b logging=on vs=logging_off value={:.3}", on / off);
    println!("ratio name=device_write_64b logging=on_with_audit vs=logging_off value={:.3}", audit / off);
    // The mark alone, against a bare atomic OR on one word.
    let bm = dirty::PageBitmap::new(0, GIB, 4096);
    let word = AtomicU64::new(0);
    let t = Instant::now();
    for i in 0..iters {
        word.fetch_or(1 << (i % 64), Ordering::Relaxed);
    }
    let floor = t.elapsed().as_nanos() as f64 / iters as f64;
    let mark_all = |bm: &dirty::PageBitmap| {
        let t = Instant::now();
        for i in 0..iters {
            bm.mark(black_box((i * 4096 * 7) % (GIB - 4096)), 64);
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    };
    // First marks since a report (a locked OR each), then the same pages again (a load each: RX buffers and rings
    // are rewritten between reports).
    let first = mark_all(&bm);
    let again = mark_all(&bm);
    black_box((&word, &bm));
    println!("bench name=mark first_ns={first:.2} again_ns={again:.2} floor_atomic_or_ns={floor:.2}");
    println!("ratio name=mark_first vs=atomic_or value={:.2}", first / floor);
    println!("ratio name=mark_again vs=atomic_or value={:.2}", again / floor);
    target("mark_again_ns", again, 5.0, "");
    target("mark_first_ns", first, 5.0, "");
}

/// A device a driver brought up with two queue pairs, RSS and filters, with admin-queue traffic behind it.
fn busy_device() -> testkit::DriverModel<testkit::VfBus> {
    let mut d = testkit::testbed(VfConfig { queue_pairs: 2, ..Default::default() });
    d.bring_up(2, testkit::RINGS);
    for _ in 0..8 {
        d.request(device::nic::virtchnl::OP_GET_STATS, &testkit::msg_queue_select(0, 0));
    }
    d
}

fn state_bench(rounds: usize) {
    let idle = I40eVf::new(VfConfig::default(), GuestMem::new());
    idle.pause();
    let idle_rec = encode_state(&idle.save().unwrap(), &[]);
    let compat = device::stream::encode_compat(&idle.identity());
    let d = busy_device();
    let cfg = d.bus.vf.config().clone();
    d.bus.vf.pause();
    let busy = d.bus.vf.save().unwrap();
    let busy_rec = encode_state(&busy, &[]);
    println!(
        "bench name=state_size idle_bytes={} busy_bytes={} compat_bytes={}",
        idle_rec.len(),
        busy_rec.len(),
        compat.len()
    );
    target("state_idle_kib", idle_rec.len() as f64 / 1024.0, 16.0, "");
    d.bus.vf.resume();
    let dst = I40eVf::new(cfg, GuestMem::new());
    let save = median_ns(rounds, || {
        d.bus.vf.pause();
        let s = d.bus.vf.save().unwrap();
        black_box(encode_state(&s, &[]));
        d.bus.vf.resume();
    });
    let restore = median_ns(rounds, || {
        dst.pause();
        let (s, _) = decode_state(&parse_record(&busy_rec).unwrap(), &[]).unwrap();
        dst.load(&s).unwrap();
        dst.resume();
    });
    let floor = median_ns(rounds, || {
        black_box(busy.clone());
    });
    println!("bench name=save ns={save:.0}");
    println!("bench name=restore ns={restore:.0}");
    println!("ratio name=save_restore vs=state_clone value={:.1}", (save + restore) / floor);
    target("save_restore_ms", (save + restore) / 1e6, 5.0, "");
}

fn main() {
    let cli = Cli::parse();
    let (rounds, iters) = if cli.quick { (5, 200_000) } else { (21, 5_000_000) };
    let started = Instant::now();
    println!("# vfu-migbench ({}): medians of {rounds} rounds", if cli.quick { "quick" } else { "full" });
    report_bench(rounds);
    mark_bench(iters);
    state_bench(rounds);
    println!("# done in {:.1?}", started.elapsed().max(Duration::ZERO));
}
