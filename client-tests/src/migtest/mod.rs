//! `vfu-migtest`: live-migrates a VM that uses the VF with an unmodified QEMU 11.1.3 and checks the result. QEMU
//! cannot migrate a vfio-user device's state, so the VF leaves the VM for the migration and a fresh one comes back:
//!
//! - [`Flow::Failover`]: virtio-net failover. The VF is the primary of a virtio-net standby (`failover=on`,
//!   `failover_pair_id`); QEMU unplugs it when migration starts, the guest's net_failover keeps traffic on the
//!   standby, and the destination QEMU plugs its own VF (another server) after the switchover.
//! - [`Flow::Unplug`]: the VF leaves before `migrate` and is added on the destination with `device_add`; the
//!   guest keeps its address on an active-backup bond whose backup is a plain virtio-net, and enslaves the new VF.
//! - [`Flow::Cancel`]: a failover migration cancelled after the unplug: the VF must come back on the source.
//!
//! One call, [`run`], does everything: checks prerequisites, makes a network namespace (bridge, taps), starts two
//! servers and two QEMUs in it, boots the guest (which pings the host every 50 ms), runs the flow, measures, stops
//! everything it started (by PID) and deletes the namespace, and returns a [`Report`] (JSON, JUnit). The binary
//! `vfu-migtest` is a CLI over it; the tests in `tests/qemu_migration.rs` call it in-process.

pub mod analysis;
pub mod guest;
pub mod procs;
pub mod qmp;
pub mod report;
mod run;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use report::{Outcome, Report};

/// The migration flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// virtio-net failover: QEMU unplugs the primary VF at migration start and the destination re-plugs its own.
    Failover,
    /// Unplug the VF, migrate, device_add it on the destination; the guest keeps its network on a bond.
    Unplug,
    /// A failover migration cancelled after the unplug: the VF comes back on the source.
    Cancel,
}

/// How the unplug flow takes the VF away on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnplugMethod {
    /// The guest releases the VF itself (`echo 1 > /sys/bus/pci/devices/BDF/remove`, asked over the console, as a
    /// guest agent would); QEMU keeps the device, the destination starts without it. Works with QEMU 11.1.3.
    Guest,
    /// QMP `device_del` and wait for DEVICE_DELETED. QEMU 11.1.3 aborts when the guest completes the unplug (a
    /// known QEMU bug the harness recognises); use it with a QEMU that has the upstream fix.
    Qmp,
}

/// What to run and where everything is. [`Config::default`] is the failover flow on the 7.x guest with the
/// workspace's `build/` and debug server.
#[derive(Debug, Clone)]
pub struct Config {
    pub flow: Flow,
    /// Guest label: picks `<build>/guest-<kernel>` unless `guest_dir` is given. 6.1, 6.12, 7.x.
    pub kernel: String,
    /// Where `qemu-configs/provision.sh` put QEMU and the guests (default: `$VFU_BUILD`, `$BUILD`, else the
    /// workspace's `build/`).
    pub build_dir: Option<PathBuf>,
    /// The QEMU binary (default: `$QEMU`, else `<build>/qemu/bin/qemu-system-x86_64`).
    pub qemu: Option<PathBuf>,
    /// A directory with `vmlinux` (or `vmlinuz`) and `initramfs.cpio.gz` (default `<build>/guest-<kernel>`).
    pub guest_dir: Option<PathBuf>,
    /// The server binary (default: `$VFU_BIN`, else the workspace's `target/debug/vfu-i40evf`).
    pub server: Option<PathBuf>,
    /// Extra arguments for both servers (e.g. `--fault ...`).
    pub server_args: Vec<String>,
    /// Each server records every frame to `<work dir>/server-<src|dst>.pcap` (`--pcap`), each QEMU its virtio-net's
    /// to `standby-<source|destination>.pcap` (filter-dump); the logs are kept.
    pub pcap: bool,
    /// Replace the built-in guest script (`qemu-configs/guest/failover.sh` or `bond.sh`).
    pub guest_script: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// How long the guest pings over the VF before the migration starts.
    pub before: Duration,
    /// How long the guest pings after the VF is back.
    pub after: Duration,
    /// From QEMU start to the guest's network being up with the VF carrying traffic.
    pub boot_timeout: Duration,
    /// From the switchover (or the cancel) to the VF being back.
    pub replug_timeout: Duration,
    /// The migration itself (from `migrate` to a final status).
    pub migration_timeout: Duration,
    /// The guest reports a VF that is on the bus but not up after this many seconds as stuck and dumps the
    /// blocked tasks' stacks.
    pub stuck_secs: u32,
    pub unplug: UnplugMethod,
    /// The source's max-bandwidth in the cancel flow (bytes/s), so the migration is still running when it is
    /// cancelled.
    pub cancel_bandwidth: u64,
    /// The VF's MAC on the source server (and the failover standby's: failover pairs them by MAC).
    pub mac: String,
    /// The VF's MAC on the destination server (default: the same).
    pub dest_mac: Option<String>,
    /// The bond flow's virtio-net MAC (the bond uses fail_over_mac=active, so it may differ from the VF's).
    pub standby_mac: String,
    pub ping_interval_ms: u32,
    /// Where to keep logs (default: a fresh directory under /tmp, removed when the run passes unless `keep`).
    pub work_dir: Option<PathBuf>,
    pub keep: bool,
    /// KVM instead of TCG (nested KVM often fails for Linux guests; TCG is the default).
    pub kvm: bool,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Set (e.g. by a signal handler) to make the run give up, clean up and report an error.
    pub stop: Arc<AtomicBool>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            flow: Flow::Failover,
            kernel: "7.x".into(),
            build_dir: None,
            qemu: None,
            guest_dir: None,
            server: None,
            server_args: Vec::new(),
            pcap: false,
            guest_script: None,
            mem_mib: 256,
            before: Duration::from_secs(3),
            after: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(120),
            replug_timeout: Duration::from_secs(60),
            migration_timeout: Duration::from_secs(120),
            stuck_secs: 15,
            unplug: UnplugMethod::Guest,
            cancel_bandwidth: 8 << 20,
            mac: "02:00:00:15:4c:01".into(),
            dest_mac: None,
            standby_mac: "02:00:00:15:4c:02".into(),
            ping_interval_ms: 50,
            work_dir: None,
            keep: false,
            kvm: false,
            progress: true,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Config {
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The built-in guest scripts (the files in `qemu-configs/guest/`, compiled in so the binary is self-contained).
pub const FAILOVER_SH: &str = include_str!("../../../qemu-configs/guest/failover.sh");
pub const BOND_SH: &str = include_str!("../../../qemu-configs/guest/bond.sh");

/// The workspace this crate was built in (fallback for `build/` and the server binary).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cfg.flow` and returns the report. Never panics on a failed check; everything started is stopped before it
/// returns.
pub fn run(cfg: &Config) -> Report {
    run::run(cfg)
}
