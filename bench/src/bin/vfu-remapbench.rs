//! vfu-remapbench: what the remap IRQ's fast path (docs/remap-irq.md) saves, against the server binary over its
//! socket, each figure beside the trapped baseline of the same run.
//!
//! - Per doorbell write: a store into the mapped doorbell page (the reference VMM's `Mappings::store32`), a
//!   posted REGION_WRITE (send cost, and cost until applied: batches of 64 closed by a REGION_READ, less one
//!   REGION_READ round trip), a REGION_WRITE with a reply (the round trip the refvmm's vCPU waits for).
//! - Guest-visible throughput: the reference VMM's vCPU and wire peer (`refvmm::traffic`) running TX and RX through
//!   the VF as fast as they go, with the fast path and with `--remap off`, alternating, for a doorbell per frame and
//!   per 32 frames.
//!
//! One machine-readable line per figure (`bench ...`, `ratio ...`), `#` lines for people. `--quick` for CI.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use client_tests::refvmm::proto;
use client_tests::refvmm::remap::{self, Mappings};
use client_tests::refvmm::traffic::{self, TrafficConfig, TrafficReport};
use client_tests::util::{eventfd, eventfd_wait};
use client_tests::{Client, BAR0};
use device::nic::regs::QTX_TAIL1;

#[derive(Parser)]
#[command(
    name = "vfu-remapbench",
    about = "The remap IRQ's fast path against trapped doorbells: per write, and the reference VMM's frames/s",
    after_help = "Build and run: cargo build --release -p server -p bench && ./target/release/vfu-remapbench"
)]
struct Cli {
    /// The server binary [default: vfu-i40evf next to this executable].
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,

    /// Short run for CI (a few seconds).
    #[arg(long)]
    quick: bool,
}

type Res<T> = Result<T, String>;

/// A server process of ours in a private directory: SIGTERM (then SIGKILL) by PID on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Server {
    fn start(bin: &Path, backend: &str) -> Res<Server> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("vfu-remapbench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let socket = dir.join("vf.sock");
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--backend", backend])
            .env("RUST_LOG", "info") // a debug log would be measured too
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let s = Server { child, dir, socket };
        let t = Instant::now();
        while UnixStream::connect(&s.socket).is_err() {
            if t.elapsed() > Duration::from_secs(5) {
                return Err(format!("{} does not accept connections", s.socket.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t.elapsed() > Duration::from_secs(2) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One traffic measurement.
#[derive(Clone, Copy)]
struct Measure {
    dir: &'static str,
    batch: u32,
    fast: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---- per write ---------------------------------------------------------------------------------------------

/// A REGION_WRITE of `v` to BAR0 `off`, with the no_reply flag or not.
fn write_msg(id: u16, off: u64, v: u32, posted: bool) -> [u8; 36] {
    let mut m = [0u8; 36];
    m[0..2].copy_from_slice(&id.to_le_bytes());
    m[2..4].copy_from_slice(&client_tests::cmd::REGION_WRITE.to_le_bytes());
    m[4..8].copy_from_slice(&36u32.to_le_bytes());
    m[8..12].copy_from_slice(&(if posted { client_tests::FLAG_NO_REPLY } else { 0 }).to_le_bytes());
    m[16..24].copy_from_slice(&off.to_le_bytes());
    m[24..28].copy_from_slice(&BAR0.to_le_bytes());
    m[28..32].copy_from_slice(&4u32.to_le_bytes());
    m[32..36].copy_from_slice(&v.to_le_bytes());
    m
}

fn read_msg(id: u16, off: u64) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0..2].copy_from_slice(&id.to_le_bytes());
    m[2..4].copy_from_slice(&client_tests::cmd::REGION_READ.to_le_bytes());
    m[4..8].copy_from_slice(&32u32.to_le_bytes());
    m[16..24].copy_from_slice(&off.to_le_bytes());
    m[24..28].copy_from_slice(&BAR0.to_le_bytes());
    m[28..32].copy_from_slice(&4u32.to_le_bytes());
    m
}

/// Reads exactly one reply of `len` bytes for `id` (no error flag); returns its payload's last 4 bytes.
fn reply(s: &mut UnixStream, id: u16, len: usize) -> Res<u32> {
    let mut b = [0u8; 36];
    s.read_exact(&mut b[..len]).map_err(|e| format!("reply to {id}: {e}"))?;
    let (rid, size, flags) = (
        u16::from_le_bytes([b[0], b[1]]),
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
    );
    if rid != id || size as usize != len || flags != client_tests::TYPE_REPLY {
        return Err(format!("expected a {len}-byte reply to {id}, got id {rid} size {size} flags {flags:#x}"));
    }
    Ok(u32::from_le_bytes(b[len - 4..len].try_into().unwrap()))
}

/// Per-write costs, in ns: (store, posted send, posted applied, with a reply, REGION_READ round trip).
fn per_write(srv: &Server, rounds: usize, n: u32) -> Res<[f64; 5]> {
    let mut c = Client::connect(&srv.socket).map_err(|e| e.to_string())?;
    proto::negotiate(&mut c)?;
    let info = remap::discover(&mut c)?.ok_or("the server has no remap IRQ (--doorbells trap?)")?;
    let efd = eventfd();
    remap::enable(&mut c, info.index, efd.as_fd())?;
    if eventfd_wait(&efd, Duration::from_secs(2)) != 1 {
        return Err("no offer signalled".into());
    }
    let maps = Mappings::default();
    let ch = maps.apply(BAR0, &remap::region_info(&mut c, BAR0)?);
    remap::unmask(&mut c, info.index)?;
    if ch.areas.is_empty() {
        return Err(format!("BAR0 offers no areas: {ch:?}"));
    }
    // The measured loops speak the protocol directly on (a dup of) the socket, with nothing outstanding.
    let mut s = UnixStream::from(c.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?);
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let tail = QTX_TAIL1 + 4 * 3; // a queue the driver never enabled: the write is kept, nothing runs
    let mut id = 0x4000u16;
    let mut next = || {
        id = id.wrapping_add(1);
        id
    };
    let (mut store, mut send, mut applied, mut replied, mut rtt) = (vec![], vec![], vec![], vec![], vec![]);
    const BATCH: u32 = 64;
    for r in 0..rounds {
        let t = Instant::now();
        for i in 0..n * 10 {
            maps.store32(BAR0, tail, i);
        }
        store.push(t.elapsed().as_nanos() as f64 / f64::from(n * 10));
        let i = next();
        s.write_all(&read_msg(i, tail)).map_err(|e| e.to_string())?;
        if reply(&mut s, i, 36)? != n * 10 - 1 {
            return Err("a REGION_READ does not see the last store".into());
        }

        let t = Instant::now();
        for _ in 0..n / 4 {
            let i = next();
            s.write_all(&read_msg(i, tail)).map_err(|e| e.to_string())?;
            reply(&mut s, i, 36)?;
        }
        rtt.push(t.elapsed().as_nanos() as f64 / f64::from(n / 4));

        let (mut sending, t) = (Duration::ZERO, Instant::now());
        for b in 0..n / BATCH {
            let ts = Instant::now();
            for k in 0..BATCH {
                let m = write_msg(next(), tail, ((r as u32) << 20) | (b * BATCH + k), true);
                s.write_all(&m).map_err(|e| e.to_string())?;
            }
            sending += ts.elapsed();
            let i = next();
            s.write_all(&read_msg(i, tail)).map_err(|e| e.to_string())?;
            if reply(&mut s, i, 36)? != ((r as u32) << 20) | (b * BATCH + BATCH - 1) {
                return Err("a REGION_READ after posted writes does not see the last one".into());
            }
        }
        let batches = f64::from(n / BATCH);
        let per_batch = t.elapsed().as_nanos() as f64 / batches;
        send.push(sending.as_nanos() as f64 / (batches * f64::from(BATCH)));
        applied.push((per_batch - rtt[r]) / f64::from(BATCH));

        let t = Instant::now();
        for k in 0..n / 4 {
            let i = next();
            s.write_all(&write_msg(i, tail, k, false)).map_err(|e| e.to_string())?;
            reply(&mut s, i, 32)?;
        }
        replied.push(t.elapsed().as_nanos() as f64 / f64::from(n / 4));
    }
    Ok([median(&mut store), median(&mut send), median(&mut applied), median(&mut replied), median(&mut rtt)])
}

// ---- throughput --------------------------------------------------------------------------------------------

/// One direction (TX with a doorbell per `batch` frames, or RX) as fast as it goes, mapped or trapped.
fn traffic_run(srv: &Server, wire: &UdpSocket, backend: SocketAddr, m: Measure, secs: f64) -> Res<TrafficReport> {
    let (fast, tx, batch) = (m.fast, m.dir == "tx", m.batch);
    let mut cfg = TrafficConfig::new(srv.socket.clone(), backend);
    cfg.duration = Duration::from_secs_f64(secs);
    cfg.tx = tx;
    cfg.rx = !tx;
    cfg.tx_rate = 0;
    cfg.rx_rate = 0;
    cfg.rx_window = 128;
    cfg.tx_batch = batch;
    cfg.poll_sleep = Duration::ZERO;
    cfg.remap = fast;
    let r = traffic::run(&cfg, wire.try_clone().map_err(|e| e.to_string())?)?;
    if fast && !r.remap.enabled {
        return Err(format!("the fast path was not used: {}", r.remap.note));
    }
    // Frames the wire peer's socket could not take at this rate are the host's loss, not the VF's.
    if r.tx_completed_total != r.tx_posted_total || r.tx_arrived_total > r.tx_posted_total || r.rx_foreign != 0 {
        return Err(format!("traffic went wrong: {r:?}"));
    }
    if r.tx_completed + r.rx_harvested == 0 {
        return Err(format!("no traffic: {r:?}"));
    }
    Ok(r)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfu-remapbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Res<()> {
    let bin = match &cli.server {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("vfu-i40evf"),
    };
    let (rounds, n, secs, traffic_rounds) = if cli.quick { (5, 2048, 0.2, 2) } else { (21, 16384, 2.0, 3) };
    let started = Instant::now();
    let wire = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let backend = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?;
    let spec = format!("dgram:{backend},{}", wire.local_addr().map_err(|e| e.to_string())?);
    let srv = Server::start(&bin, &spec)?;
    println!("# vfu-remapbench ({}): {} against {}", if cli.quick { "quick" } else { "full" }, bin.display(), spec);

    let [store, send, applied, replied, rtt] = per_write(&srv, rounds, n)?;
    println!("bench name=doorbell path=mapped_store ns={store:.1} rounds={rounds}");
    println!("bench name=doorbell path=posted_write send_ns={send:.0} applied_ns={applied:.0}");
    println!("bench name=doorbell path=write_with_reply ns={replied:.0} region_read_rtt_ns={rtt:.0}");
    println!("ratio name=doorbell_posted_applied vs=mapped_store value={:.0}", applied / store);
    println!("ratio name=doorbell_with_reply vs=mapped_store value={:.0}", replied / store);

    // Every measurement in each round, modes alternating first, so drift hits both alike.
    let kinds = [("tx", 1), ("tx", 32), ("rx", 0)];
    let mut fps: Vec<(Measure, Vec<f64>, Option<TrafficReport>)> = Vec::new();
    for &(dir, batch) in &kinds {
        for fast in [true, false] {
            fps.push((Measure { dir, batch, fast }, Vec::new(), None));
        }
    }
    // Warm-up (untimed): the first traffic after the server started ran several times slower here.
    for fast in [true, false] {
        traffic_run(&srv, &wire, backend, Measure { dir: "tx", batch: 32, fast }, 0.1)?;
    }
    for round in 0..traffic_rounds {
        for k in (0..fps.len()).map(|i| i ^ (round & 1)) {
            let m = fps[k].0;
            let r = traffic_run(&srv, &wire, backend, m, secs)?;
            fps[k].1.push(if m.dir == "tx" { r.tx_fps } else { r.rx_fps });
            fps[k].2 = Some(r);
        }
    }
    let mut medians = Vec::new();
    for (m, v, r) in &mut fps {
        let f = median(v);
        let r = r.as_ref().expect("measured");
        println!(
            "bench name=traffic dir={} doorbells={} tx_batch={} fps={f:.0} doorbells_mapped={} doorbells_trapped={} \
             seconds={:.2} rounds={traffic_rounds}",
            m.dir,
            if m.fast { "mapped" } else { "trapped" },
            m.batch,
            r.doorbells_mapped,
            r.doorbells_trapped,
            r.seconds
        );
        medians.push((*m, f));
    }
    for &(dir, batch) in &kinds {
        let get = |fast| medians.iter().find(|(m, _)| (m.dir, m.batch, m.fast) == (dir, batch, fast)).unwrap().1;
        let (fast, trapped) = (get(true), get(false));
        println!("ratio name=traffic_{dir} tx_batch={batch} vs=trapped value={:.2}", fast / trapped);
        let what = if dir == "tx" { format!("TX, a doorbell per {batch} frame(s)") } else { "RX".to_string() };
        println!("# {what}: {fast:.0} frames/s mapped, {trapped:.0} trapped: {:.2}x", fast / trapped);
    }
    println!(
        "# per doorbell: mapped store {store:.1} ns; posted REGION_WRITE {send:.0} ns to send, {applied:.0} ns applied \
         ({:.0}x); REGION_WRITE with a reply {replied:.0} ns ({:.0}x)",
        applied / store,
        replied / store
    );
    println!("# done in {:.1?}", started.elapsed());
    Ok(())
}
