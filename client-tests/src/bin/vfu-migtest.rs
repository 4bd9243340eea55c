//! `vfu-migtest`: migrate a VM that uses the VF with an unmodified QEMU and check the result (`run`), or drive a
//! QEMU's migration by hand over QMP (`qmp`). See docs/migration.md ("Migration with unmodified QEMU").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use client_tests::migtest::qmp::{self, Qmp, StatusChange};
use client_tests::migtest::{self, procs, Config, Flow, UnplugMethod};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "vfu-migtest",
    version,
    about = "Live-migration tests of a VM using the vfu-i40evf VF with unmodified QEMU (virtio-net failover, \
             unplug / re-plug), and a QMP migration driver"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one migration flow end to end and report (JSON, JUnit XML, exit status).
    #[command(
        after_help = "Needs root (it creates a network namespace), QEMU >= 10.1 with vfio-user-pci and a guest \
                            built by qemu-configs/provision.sh.\n\
                            Exit status: 0 pass, 1 a check failed, 2 the harness could not run, 3 a known guest or QEMU \
                            bug was recognised (the report names it).\n\
                            SIGINT/SIGTERM: everything started is stopped (by PID) and the namespace deleted."
    )]
    Run(Box<RunArgs>),
    /// Drive a QEMU over its QMP socket: migrate (with timings), cancel, device_del / device_add, any command.
    Qmp(QmpArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The flow: failover (QEMU unplugs the primary VF, the destination re-plugs its own), unplug (VF out, migrate,
    /// device_add on the destination, guest bond), cancel (failover migration cancelled after the unplug).
    #[arg(long, value_enum, default_value = "failover")]
    flow: Flow,
    /// Guest: 6.1, 6.12 or 7.x (BUILD/guest-KERNEL).
    #[arg(long, default_value = "7.x")]
    kernel: String,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the report as JUnit XML here (one testsuite, one testcase per check).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Where provision.sh put QEMU and the guests (default $VFU_BUILD, $BUILD, else the workspace's build/).
    #[arg(long, value_name = "DIR")]
    build: Option<PathBuf>,
    /// QEMU binary (default $QEMU, else BUILD/qemu/bin/qemu-system-x86_64).
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Guest directory with vmlinux (or vmlinuz) and initramfs.cpio.gz (default BUILD/guest-KERNEL).
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// vfu-i40evf binary (default $VFU_BIN, else the workspace's target/debug/vfu-i40evf).
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// Extra argument for both servers; repeat it (e.g. --server-arg=--queues --server-arg=2).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// A fault for both servers (docs/faults.md), e.g. --fault rx-drop=5; repeat it. Same as
    /// --server-arg=--fault --server-arg=SPEC.
    #[arg(long = "fault", value_name = "NAME[=ARG]")]
    faults: Vec<String>,
    /// --seed for both servers' fault decisions.
    #[arg(long)]
    seed: Option<u64>,
    /// Record frames: the servers' to WORK_DIR/server-{src,dst}.pcap, the virtio-nets' (QEMU filter-dump) to
    /// WORK_DIR/standby-{source,destination}.pcap; the logs are kept.
    #[arg(long)]
    pcap: bool,
    /// Guest script instead of the built-in qemu-configs/guest/failover.sh or bond.sh.
    #[arg(long, value_name = "FILE")]
    guest_script: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Seconds of pings over the VF before the migration.
    #[arg(long, default_value_t = 3)]
    before: u64,
    /// Seconds of pings after the VF is back.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// Seconds for the guest to boot with its network up.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Seconds from the switchover to the VF being back.
    #[arg(long, default_value_t = 60)]
    replug_timeout: u64,
    /// Seconds for the migration itself.
    #[arg(long, default_value_t = 120)]
    migration_timeout: u64,
    /// The guest reports a VF on the bus that is not up after this many seconds as stuck (and dumps task stacks).
    #[arg(long, default_value_t = 15)]
    stuck: u32,
    /// Unplug flow: how the VF leaves the source. guest: the guest removes it (QEMU 11.1.3 aborts on device_del of
    /// a vfio-user-pci device); qmp: device_del and DEVICE_DELETED (a QEMU with the upstream fix).
    #[arg(long, value_enum, default_value = "guest")]
    unplug: UnplugMethod,
    /// Cancel flow: the source's max-bandwidth (bytes/s) so the migration is still running when cancelled.
    #[arg(long, default_value_t = 8 << 20)]
    cancel_bandwidth: u64,
    /// The VF's MAC (source server; the failover standby gets it too).
    #[arg(long, default_value = "02:00:00:15:4c:01")]
    mac: String,
    /// The destination server's VF MAC (default: --mac).
    #[arg(long)]
    dest_mac: Option<String>,
    /// The unplug flow's virtio-net MAC.
    #[arg(long, default_value = "02:00:00:15:4c:02")]
    standby_mac: String,
    /// Guest ping interval in ms.
    #[arg(long, default_value_t = 50)]
    ping_interval_ms: u32,
    /// Keep logs here (default: a directory under /tmp, removed when the run passes unless --keep).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the logs even when the run passes.
    #[arg(long)]
    keep: bool,
    /// -accel kvm -cpu host instead of TCG.
    #[arg(long)]
    kvm: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct QmpArgs {
    /// The QEMU's QMP socket (-chardev socket,...,server=on + -object monitor-qmp, or -qmp unix:PATH,server=on).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: QmpCmd,
}

#[derive(Subcommand, Debug)]
enum QmpCmd {
    /// Run state and migration status.
    Status,
    /// Migrate to URI and wait: prints each status change and event with its time, then QEMU's figures.
    /// Exit status 0 when the migration completed (or, with --cancel-after-unplug, was cancelled).
    Migrate {
        /// e.g. unix:/tmp/mig.sock or tcp:10.0.0.2:4444
        #[arg(long)]
        uri: String,
        /// The destination's QMP socket: migrate-incoming URI is sent there first (QEMU started with -incoming defer).
        #[arg(long, value_name = "PATH")]
        dest: Option<PathBuf>,
        /// Set max-bandwidth (bytes/s) first.
        #[arg(long)]
        max_bandwidth: Option<u64>,
        /// Cancel (migrate_cancel) as soon as the status is active, i.e. once the failover primary is unplugged.
        #[arg(long)]
        cancel_after_unplug: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// migrate_cancel.
    Cancel,
    /// device_del ID and wait for DEVICE_DELETED.
    DeviceDel {
        id: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// device_add with a JSON object, e.g.
    /// '{"driver":"vfio-user-pci","id":"primary0","bus":"rp1","socket":{"path":"/tmp/d.sock","type":"unix"}}'
    DeviceAdd { json: String },
    /// Any QMP command, arguments as a JSON object; prints the return value.
    Exec { command: String, arguments: Option<String> },
    /// Print events as they arrive for SECONDS.
    Events {
        #[arg(default_value_t = 10)]
        seconds: u64,
    },
    /// quit.
    Quit,
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Qmp(a) => match qmp_cmd(a) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vfu-migtest qmp: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(a: RunArgs) -> ExitCode {
    let cfg = Config {
        flow: a.flow,
        kernel: a.kernel,
        build_dir: a.build,
        qemu: a.qemu,
        guest_dir: a.guest_dir,
        server: a.server,
        server_args: {
            let mut v = a.server_args.clone();
            for f in &a.faults {
                v.extend(["--fault".to_string(), f.clone()]);
            }
            if let Some(s) = a.seed {
                v.extend(["--seed".to_string(), s.to_string()]);
            }
            v
        },
        pcap: a.pcap,
        guest_script: a.guest_script,
        mem_mib: a.mem,
        before: Duration::from_secs(a.before),
        after: Duration::from_secs(a.after),
        boot_timeout: Duration::from_secs(a.boot_timeout),
        replug_timeout: Duration::from_secs(a.replug_timeout),
        migration_timeout: Duration::from_secs(a.migration_timeout),
        stuck_secs: a.stuck,
        unplug: a.unplug,
        cancel_bandwidth: a.cancel_bandwidth,
        mac: a.mac,
        dest_mac: a.dest_mac,
        standby_mac: a.standby_mac,
        ping_interval_ms: a.ping_interval_ms,
        work_dir: a.work_dir,
        keep: a.keep,
        kvm: a.kvm,
        progress: !a.quiet,
        ..Config::default()
    };
    // SIGINT/SIGTERM: the run gives up at its next wait and cleans up; if it has not finished 20 s later (or on a
    // second signal), every registered process is killed and the namespace deleted here.
    let stop = cfg.stop.clone();
    match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for sig in signals.forever() {
                    if stop.swap(true, Ordering::SeqCst) {
                        procs::force_cleanup();
                        std::process::exit(130);
                    }
                    eprintln!("vfu-migtest: signal {sig}: stopping and cleaning up");
                    std::thread::spawn(|| {
                        std::thread::sleep(Duration::from_secs(20));
                        eprintln!("vfu-migtest: cleanup took too long: killing what is left");
                        procs::force_cleanup();
                        std::process::exit(130);
                    });
                }
            });
        }
        Err(e) => eprintln!("vfu-migtest: cannot handle signals ({e}); continuing"),
    }
    let rep = migtest::run(&cfg);
    eprint!("{}", rep.summary());
    let mut code = rep.outcome.exit_code();
    for (path, text) in [(&a.json, rep.to_json()), (&a.junit, rep.to_junit())] {
        if let Some(p) = path {
            if let Err(e) = std::fs::write(p, text) {
                eprintln!("vfu-migtest: writing {}: {e}", p.display());
                code = code.max(2);
            }
        }
    }
    if cfg.stop.load(Ordering::SeqCst) {
        return ExitCode::from(130);
    }
    ExitCode::from(code)
}

fn qmp_cmd(a: QmpArgs) -> Result<ExitCode, String> {
    let mut q = Qmp::connect(&a.socket, Duration::from_secs(5))?;
    match a.cmd {
        QmpCmd::Status => {
            let st = q.run_state()?;
            let m = q.query_migrate()?;
            println!("run state: {st}");
            println!("migration: {}", serde_json::to_string_pretty(&m).unwrap_or_default());
        }
        QmpCmd::Migrate { uri, dest, max_bandwidth, cancel_after_unplug, timeout } => {
            return migrate(&mut q, &uri, dest, max_bandwidth, cancel_after_unplug, timeout);
        }
        QmpCmd::Cancel => {
            q.execute("migrate_cancel", Value::Null)?;
            println!("migrate_cancel sent");
        }
        QmpCmd::DeviceDel { id, timeout } => {
            let t = Instant::now();
            q.execute("device_del", json!({ "id": id }))?;
            match q.wait_event("DEVICE_DELETED", Some(&id), t, Duration::from_secs(timeout), &|| false) {
                Some(e) => println!("{id} deleted after {} ms", (e.at - t).as_millis()),
                None => {
                    println!("no DEVICE_DELETED for {id} within {timeout} s (the guest did not release it?)");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        QmpCmd::DeviceAdd { json } => {
            let v: Value = serde_json::from_str(&json).map_err(|e| format!("device-add JSON: {e}"))?;
            q.execute("device_add", v)?;
            println!("device_add done");
        }
        QmpCmd::Exec { command, arguments } => {
            let args = match arguments {
                Some(s) => serde_json::from_str(&s).map_err(|e| format!("arguments JSON: {e}"))?,
                None => Value::Null,
            };
            let r = q.execute(&command, args)?;
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        }
        QmpCmd::Events { seconds } => {
            let t = Instant::now();
            let mut seen = 0;
            while t.elapsed() < Duration::from_secs(seconds) {
                let ev = q.events();
                for e in &ev[seen..] {
                    println!("{:8} ms {} {}", (e.at - t).as_millis(), e.name, e.data);
                }
                seen = ev.len();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        QmpCmd::Quit => {
            let _ = q.execute_timeout("quit", Value::Null, Duration::from_secs(3));
            println!("quit sent");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn migrate(
    src: &mut Qmp,
    uri: &str,
    dest: Option<PathBuf>,
    max_bandwidth: Option<u64>,
    cancel_after_unplug: bool,
    timeout: u64,
) -> Result<ExitCode, String> {
    let mut dst = match dest {
        Some(p) => {
            let mut d = Qmp::connect(&p, Duration::from_secs(5))?;
            d.execute("migrate-incoming", json!({ "uri": uri }))?;
            println!("destination: migrate-incoming {uri}");
            Some(d)
        }
        None => None,
    };
    if let Some(bw) = max_bandwidth {
        src.execute("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
    }
    src.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}))?;
    let t0 = Instant::now();
    src.execute("migrate", json!({ "uri": uri }))?;
    println!("{:8} ms migrate {uri}", 0);
    let mut changes: Vec<StatusChange> = Vec::new();
    let deadline = t0 + Duration::from_secs(timeout);
    let mut cancelled = false;
    let mut printed_events = 0;
    let r = qmp::poll_migration(
        src,
        Duration::from_millis(50),
        &mut changes,
        &mut |q, status| {
            let ev = q.events();
            for e in ev[printed_events..].iter().filter(|e| e.name != "MIGRATION" && e.name != "MIGRATION_PASS") {
                println!("{:8} ms event {} {}", ms(t0, e.at), e.name, e.data);
            }
            printed_events = ev.len();
            println!("{:8} ms status {status}", t0.elapsed().as_millis());
            if cancel_after_unplug && status == "active" && !cancelled {
                cancelled = true;
                q.execute("migrate_cancel", Value::Null)?;
                println!("{:8} ms migrate_cancel", t0.elapsed().as_millis());
            }
            Ok(())
        },
        &|| (Instant::now() > deadline).then(|| format!("no final status after {timeout} s")),
    )?;
    let status = r["status"].as_str().unwrap_or("?");
    if let Some(d) = dst.as_mut() {
        if status == "completed" {
            if let Some(e) = d.wait_event("RESUME", None, t0, Duration::from_secs(10), &|| false) {
                println!("{:8} ms destination RESUME", ms(t0, e.at));
            }
        }
    }
    let num = |k: &str| r[k].as_u64().map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    println!(
        "status {status}: total {}, downtime {}, setup {}, RAM transferred {} bytes",
        num("total-time"),
        num("downtime"),
        num("setup-time"),
        r["ram"]["transferred"].as_u64().unwrap_or(0)
    );
    if let Some(e) = r["error-desc"].as_str() {
        println!("error: {e}");
    }
    let ok = status == "completed" || (cancel_after_unplug && status == "cancelled");
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn ms(t0: Instant, t: Instant) -> u128 {
    t.saturating_duration_since(t0).as_millis()
}
