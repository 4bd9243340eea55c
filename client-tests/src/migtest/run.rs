//! The run itself: prerequisites, namespace, servers, QEMUs, the flows, teardown and the report.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::analysis::{self, rel, Bounds, TapSample};
use super::guest::{self, Console, KnownBug, Side};
use super::procs::{Namespace, Proc};
use super::qmp::{self, Qmp, StatusChange};
use super::report::{Migration, Outcome, Report};
use super::{Config, Flow, UnplugMethod, BOND_SH, FAILOVER_SH};
use crate::netns::{read_counters, NetNs};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const PREFIX: u8 = 24;
/// The share of the guest's frames a tap must receive for its VF to count as "carrying the traffic" (host side;
/// the guest's own counters lag, so there the VF needs the larger part).
const SHARE: f64 = 0.8;

type Res<T> = Result<T, String>;

/// Paths and versions, checked before anything starts.
struct Env {
    qemu: PathBuf,
    qemu_version: String,
    kernel_image: PathBuf,
    initrd: PathBuf,
    kver: Option<String>,
    server: PathBuf,
}

fn build_dir(cfg: &Config) -> PathBuf {
    cfg.build_dir
        .clone()
        .or_else(|| std::env::var_os("VFU_BUILD").map(PathBuf::from))
        .or_else(|| std::env::var_os("BUILD").map(PathBuf::from))
        .unwrap_or_else(|| super::workspace_dir().join("build"))
}

fn resolve_env(cfg: &Config) -> Res<Env> {
    if !rustix::process::geteuid().is_root() {
        return Err("vfu-migtest needs root: it creates a network namespace with a bridge and taps".into());
    }
    Command::new("ip").arg("-V").output().map_err(|e| format!("the `ip` command (iproute2) is needed: {e}"))?;
    let build = build_dir(cfg);
    let hint = "run qemu-configs/provision.sh (or give the path with a flag)";
    let qemu = cfg
        .qemu
        .clone()
        .or_else(|| std::env::var_os("QEMU").map(PathBuf::from))
        .unwrap_or_else(|| build.join("qemu/bin/qemu-system-x86_64"));
    if !qemu.exists() {
        return Err(format!("no QEMU at {} ({hint}; --qemu PATH)", qemu.display()));
    }
    let out = Command::new(&qemu).arg("-version").output().map_err(|e| format!("{}: {e}", qemu.display()))?;
    let qemu_version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("QEMU emulator version ")
        .to_string();
    let probe = Command::new(&qemu).args(["-device", "vfio-user-pci,help"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        return Err(format!("{} has no vfio-user-pci device (QEMU >= 10.1 needed; {hint})", qemu.display()));
    }
    let gdir = cfg.guest_dir.clone().unwrap_or_else(|| build.join(format!("guest-{}", cfg.kernel)));
    let kernel_image = ["vmlinux", "vmlinuz"].iter().map(|n| gdir.join(n)).find(|p| p.exists()).ok_or_else(|| {
        format!("no guest kernel (vmlinux or vmlinuz) in {} ({hint}; --guest-dir DIR)", gdir.display())
    })?;
    let initrd = gdir.join("initramfs.cpio.gz");
    if !initrd.exists() {
        return Err(format!("no {} ({hint})", initrd.display()));
    }
    if let Ok(mods) = fs::read_to_string(gdir.join("modules.txt")) {
        let need: &[&str] = match cfg.flow {
            Flow::Failover | Flow::Cancel => &["iavf", "virtio_net", "net_failover"],
            Flow::Unplug => &["iavf", "virtio_net", "bonding"],
        };
        let missing: Vec<&str> = need.iter().copied().filter(|m| !mods.lines().any(|l| l.trim() == *m)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "the guest in {} lacks the modules {missing:?} (rebuild it: qemu-configs/provision.sh)",
                gdir.display()
            ));
        }
    }
    let kver = fs::read_to_string(gdir.join("KVER")).ok().map(|s| s.trim().to_string());
    let server = cfg
        .server
        .clone()
        .or_else(|| std::env::var_os("VFU_BIN").map(PathBuf::from))
        .unwrap_or_else(crate::server::server_binary);
    if !server.exists() {
        return Err(format!("no server binary at {} (cargo build -p server; --server PATH)", server.display()));
    }
    Ok(Env { qemu, qemu_version, kernel_image, initrd, kver, server })
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// The run's directory: sockets (so its path must be short), logs, the guest script.
struct WorkDir {
    path: PathBuf,
    /// Removed on drop unless kept.
    remove: bool,
}

impl WorkDir {
    fn new(cfg: &Config) -> Res<WorkDir> {
        let (path, remove) = match &cfg.work_dir {
            Some(p) => (p.clone(), false),
            None => (
                PathBuf::from(format!(
                    "/tmp/vfu-migtest-{}-{}",
                    std::process::id(),
                    DIRS.fetch_add(1, Ordering::Relaxed)
                )),
                !cfg.keep,
            ),
        };
        if path.as_os_str().len() > 80 {
            return Err(format!("work directory path too long for UNIX sockets: {}", path.display()));
        }
        fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(WorkDir { path, remove })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// One QEMU: its process (the PID is QEMU's: `ip netns exec` execs it), its console's stdin, its QMP connection.
struct Qemu {
    side: Side,
    proc: Proc,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    qmp: Option<Qmp>,
}

impl Qemu {
    /// Types a line on the guest's console.
    fn send(&mut self, line: &str) -> Res<()> {
        let s = self.stdin.as_mut().ok_or("no console stdin")?;
        s.write_all(format!("{line}\n").as_bytes()).and_then(|_| s.flush()).map_err(|e| format!("console: {e}"))
    }

    fn qmp(&mut self) -> Res<&mut Qmp> {
        self.qmp.as_mut().ok_or_else(|| format!("no QMP connection to the {:?} QEMU", self.side))
    }

    fn stderr(&self) -> String {
        self.proc.log_text()
    }
}

/// The host-side sampler: a thread in the namespace reading the taps' counters every 100 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<TapSample>>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(ns: &NetNs) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (st, sa) = (stop.clone(), samples.clone());
        let handle = ns.spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Ok(taps) = read_counters() {
                    sa.lock().unwrap_or_else(|p| p.into_inner()).push(TapSample { at: Instant::now(), taps });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler { stop, samples, handle: Some(handle) }
    }

    fn snapshot(&self) -> Vec<TapSample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What the run knows; fields drop in order: QEMUs, servers, sampler, namespace, directory.
struct Ctx<'a> {
    cfg: &'a Config,
    src: Option<Qemu>,
    dst: Option<Qemu>,
    srv_src: Option<Proc>,
    srv_dst: Option<Proc>,
    sampler: Option<Sampler>,
    ns: Option<Namespace>,
    dir: Option<WorkDir>,
    console: Console,
    begin: Instant,
    /// The migration (or, for the unplug flow, the unplug) started.
    t0: Option<Instant>,
    /// The guest's VF left (first vf-gone after t0).
    vf_gone: Option<Instant>,
    /// The switchover: destination RESUME, or the cancelled status.
    switchover: Option<Instant>,
    /// The VF back (vf-active after vf_gone).
    vf_back: Option<Instant>,
    /// "stop" sent to the guest.
    stopped_at: Option<Instant>,
    /// The guest's network was up with the VF carrying traffic (before the migration).
    ready: Option<Instant>,
    /// Which QEMU runs the guest now.
    guest_on: Side,
    /// The side whose VF should carry the traffic at the end (destination, or source after a cancel).
    vf_side: Side,
}

fn vf_tap(side: Side) -> &'static str {
    match side {
        Side::Source => "vfS",
        Side::Destination => "vfD",
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Source => "source",
        Side::Destination => "destination",
    }
}

/// QemuOpts value escaping (commas are doubled).
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn shell_quote(a: &str) -> String {
    if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./,:@+%".contains(c)) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

pub(super) fn run(cfg: &Config) -> Report {
    let mut rep = Report::new(cfg.flow, &cfg.kernel);
    rep.server_args = cfg.server_args.clone();
    if cfg.flow == Flow::Unplug {
        rep.unplug_method = Some(cfg.unplug);
    }
    let mut ctx = Ctx {
        cfg,
        src: None,
        dst: None,
        srv_src: None,
        srv_dst: None,
        sampler: None,
        ns: None,
        dir: None,
        console: Console::default(),
        begin: Instant::now(),
        t0: None,
        vf_gone: None,
        switchover: None,
        vf_back: None,
        stopped_at: None,
        ready: None,
        guest_on: Side::Source,
        vf_side: if cfg.flow == Flow::Cancel { Side::Source } else { Side::Destination },
    };
    let result = ctx.go(&mut rep);
    if let Err(e) = &result {
        ctx.say(&format!("stopping: {e}"));
    }
    ctx.finish(&mut rep, result);
    rep
}

impl Ctx<'_> {
    fn say(&self, msg: &str) {
        if self.cfg.progress {
            eprintln!("vfu-migtest: [{:6.1}s] {msg}", self.begin.elapsed().as_secs_f64());
        }
    }

    fn dir(&self) -> &Path {
        &self.dir.as_ref().expect("work directory").path
    }

    fn interrupted(&self) -> Res<()> {
        if self.cfg.stopped() {
            Err("interrupted (signal): cleaned up".into())
        } else {
            Ok(())
        }
    }

    fn qemu(&mut self, side: Side) -> Res<&mut Qemu> {
        match side {
            Side::Source => self.src.as_mut(),
            Side::Destination => self.dst.as_mut(),
        }
        .ok_or_else(|| format!("no {} QEMU", side_name(side)))
    }

    /// Fails if the QEMU on `side` has exited, with the end of its stderr.
    fn alive(&mut self, side: Side) -> Res<()> {
        let q = self.qemu(side)?;
        if let Some(st) = q.proc.try_wait() {
            let err = q.stderr();
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("the {} QEMU exited ({st}): {}", side_name(side), tail.join(" | ")));
        }
        Ok(())
    }

    /// Sleeps `d` while the guest's QEMU stays alive.
    fn pause(&mut self, d: Duration) -> Res<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.interrupted()?;
            self.alive(self.guest_on)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn go(&mut self, rep: &mut Report) -> Res<()> {
        let cfg = self.cfg;
        let env = resolve_env(cfg)?;
        rep.qemu = env.qemu.display().to_string();
        rep.qemu_version = env.qemu_version.clone();
        rep.server = env.server.display().to_string();
        rep.guest_kernel = env.kver.clone().unwrap_or_default();
        self.dir = Some(WorkDir::new(cfg)?);
        let dir = self.dir().to_path_buf();
        rep.logs = Some(dir.display().to_string());
        let script = dir.join("guest.sh");
        match &cfg.guest_script {
            Some(p) => fs::copy(p, &script).map(|_| ()).map_err(|e| format!("guest script {}: {e}", p.display()))?,
            None => fs::write(&script, if cfg.flow == Flow::Unplug { BOND_SH } else { FAILOVER_SH })
                .map_err(|e| format!("{}: {e}", script.display()))?,
        }

        // The network: a namespace with a bridge (the host end, HOST_IP) and four taps.
        let ns = Namespace::create("mig")?;
        self.say(&format!("namespace {} (bridge br0 {HOST_IP}/{PREFIX}; taps vfS vfD nvS nvD)", ns.0.name));
        let _ =
            ns.0.spawn(|| {
                for f in ["all", "default"] {
                    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
                }
            })
            .join();
        ns.0.add_bridge("br0", &format!("{HOST_IP}/{PREFIX}"))?;
        for t in ["vfS", "vfD", "nvS", "nvD"] {
            ns.0.add_tap(t, "br0")?;
        }
        self.sampler = Some(Sampler::start(&ns.0));
        self.ns = Some(ns);

        // Servers: one per "host", each with its tap backend.
        let dst_mac = cfg.dest_mac.clone().unwrap_or_else(|| cfg.mac.clone());
        let (ssock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
        self.srv_src = Some(self.start_server(&env, "server-src", &ssock, &cfg.mac, "vfS")?);
        self.srv_dst = Some(self.start_server(&env, "server-dst", &dsock, &dst_mac, "vfD")?);

        // QEMUs: the source boots the guest, the destination waits for the migration.
        let failover = cfg.flow != Flow::Unplug;
        let src = self.start_qemu(&env, Side::Source, Some(&ssock), failover, &script)?;
        let dst_primary = if failover { Some(dsock.as_path()) } else { None };
        let dst = self.start_qemu(&env, Side::Destination, dst_primary, failover, &script)?;
        rep.qemu_commands = vec![src.1, dst.1];
        self.src = Some(src.0);
        self.dst = Some(dst.0);
        for side in [Side::Source, Side::Destination] {
            let path = dir.join(format!("qmp-{}.sock", side_name(side)));
            let mut q = Qmp::connect(&path, Duration::from_secs(15))?;
            q.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}))?;
            self.qemu(side)?.qmp = Some(q);
        }

        self.wait_ready(rep)?;
        self.pause(cfg.before)?;
        self.wait_vf_counters(self.ready.unwrap_or(self.begin))?;
        self.check_before(rep);

        match cfg.flow {
            Flow::Failover => self.failover(rep, false)?,
            Flow::Cancel => self.failover(rep, true)?,
            Flow::Unplug => self.unplug(rep, &dsock)?,
        }
        self.replugged(rep)?;
        self.say(&format!("VF back; {} s of pings over it", cfg.after.as_secs()));
        self.pause(cfg.after)?;
        self.wait_vf_counters(self.vf_back.unwrap_or(self.begin))?;
        Ok(())
    }

    /// Waits (at most 10 s more) until the guest's counters show the VF sending after `from`: iavf's counters lag up
    /// to 2 s and the guest's sampling lags under load.
    fn wait_vf_counters(&mut self, from: Instant) -> Res<()> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !analysis::vf_tx_grew(&self.console.state().counters, from) {
            self.interrupted()?;
            self.alive(self.guest_on)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn start_server(&self, env: &Env, name: &str, sock: &Path, mac: &str, tap: &str) -> Res<Proc> {
        let ns = &self.ns.as_ref().expect("namespace").0;
        let mut cmd = ns.command(&env.server);
        cmd.arg("--socket").arg(sock).args(["--mac", mac, "--backend", &format!("tap:{tap}")]);
        if self.cfg.pcap {
            cmd.arg("--pcap").arg(self.dir().join(format!("{name}.pcap")));
        }
        cmd.args(&self.cfg.server_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut p = Proc::spawn(name, cmd, &self.dir().join(format!("{name}.log")), false, false)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = p.try_wait() {
                return Err(format!("{name} exited at start ({st}): {}", p.log_text().trim()));
            }
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(format!("{name}: socket {} not accepting after 10 s", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a QEMU in the namespace. `primary`: the VF's server socket, if this QEMU has the VF from the start.
    fn start_qemu(
        &self,
        env: &Env,
        side: Side,
        primary: Option<&Path>,
        failover: bool,
        script: &Path,
    ) -> Res<(Qemu, String)> {
        let cfg = self.cfg;
        let dir = self.dir();
        let name = side_name(side);
        let tap = if side == Side::Source { "nvS" } else { "nvD" };
        let mem = cfg.mem_mib;
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("vfu-migtest-{name}"),
            "-display".into(),
            "none".into(),
            "-vga".into(),
            "none".into(),
            "-no-reboot".into(),
            "-nic".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-monitor".into(),
            "none".into(),
            "-parallel".into(),
            "none".into(),
        ];
        let accel = if cfg.kvm { ["-accel", "kvm", "-cpu", "host"] } else { ["-accel", "tcg", "-cpu", "max"] };
        a.extend(accel.iter().map(|s| s.to_string()));
        a.extend([
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-device".into(),
            "pcie-root-port,id=rp1,chassis=1,slot=1".into(),
            "-device".into(),
            "pcie-root-port,id=rp2,chassis=2,slot=2".into(),
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ]);
        let (standby_mac, mut standby) =
            if failover { (&cfg.mac, json!({"failover": true})) } else { (&cfg.standby_mac, json!({})) };
        standby["driver"] = json!("virtio-net-pci");
        standby["netdev"] = json!("n0");
        standby["id"] = json!("standby0");
        standby["mac"] = json!(standby_mac);
        standby["bus"] = json!("rp2");
        standby["romfile"] = json!("");
        a.extend(["-device".into(), standby.to_string()]);
        if cfg.pcap {
            // QEMU records the virtio-net's frames too (both directions), to compare with the servers' pcaps.
            let f = dir.join(format!("standby-{name}.pcap"));
            a.extend(["-object".into(), format!("filter-dump,id=dump0,netdev=n0,file={}", opt(&f))]);
        }
        if let Some(sock) = primary {
            a.extend(["-device".into(), primary_json(sock, failover).to_string()]);
        }
        let qmp = dir.join(format!("qmp-{name}.sock"));
        a.extend([
            "-chardev".into(),
            format!("socket,id=qmp,path={},server=on,wait=off", opt(&qmp)),
            "-object".into(),
            "monitor-qmp,id=qmp-mon,chardev=qmp".into(),
            "-fw_cfg".into(),
            format!("name=opt/vfu/script,file={}", opt(script)),
            "-kernel".into(),
            env.kernel_image.display().to_string(),
            "-initrd".into(),
            env.initrd.display().to_string(),
            "-append".into(),
            format!(
                "console=ttyS0 quiet panic=-1 mig.ip={GUEST_IP}/{PREFIX} mig.peer={HOST_IP} mig.interval={} mig.stuck={}",
                f64::from(cfg.ping_interval_ms) / 1000.0,
                cfg.stuck_secs
            ),
        ]);
        if side == Side::Destination {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        let ns = &self.ns.as_ref().expect("namespace").0;
        let mut cmd = ns.command(&env.qemu);
        cmd.args(&a);
        let line =
            std::iter::once(env.qemu.display().to_string()).chain(a).map(|s| shell_quote(&s)).collect::<Vec<_>>();
        let mut proc = Proc::spawn(&format!("qemu-{name}"), cmd, &dir.join(format!("qemu-{name}.stderr")), true, true)?;
        let stdin = proc.take_stdin();
        let out = proc.take_stdout().ok_or("no QEMU stdout")?;
        let reader = self.console.attach(side, out, &dir.join(format!("console-{name}.log")))?;
        Ok((Qemu { side, proc, stdin, reader: Some(reader), qmp: None }, line.join(" ")))
    }

    /// Waits for the guest's network (address on the failover master or bond, the VF up in it) and for replies
    /// to its pings.
    fn wait_ready(&mut self, rep: &mut Report) -> Res<()> {
        self.say(&format!("booting the {} guest", self.cfg.kernel));
        let deadline = self.begin + self.cfg.boot_timeout;
        loop {
            self.interrupted()?;
            if let Err(e) = self.alive(Side::Source) {
                rep.check("guest booted and configured its network", false, e.clone());
                return Err(e);
            }
            {
                let g = self.console.state();
                if let Some(up) = &g.up {
                    if let Some(act) = g.event_after("vf-active", self.begin) {
                        if g.replies_since(act.at.max(up.at)) > 0 {
                            let msg = format!(
                                "master {} (standby {}, VF {}) after {:.1} s",
                                up.master,
                                up.standby,
                                up.vf,
                                (up.at - self.begin).as_secs_f64()
                            );
                            drop(g);
                            self.ready = Some(Instant::now());
                            rep.check("guest booted and configured its network", true, msg.clone());
                            self.say(&format!("guest ready: {msg}"));
                            return Ok(());
                        }
                    }
                }
                if let Some(e) = g.events.iter().find(|e| e.kind == "setup-failed") {
                    let why = format!("the guest script could not set up: {}", e.args.join(" "));
                    drop(g);
                    rep.check("guest booted and configured its network", false, why.clone());
                    return Err(why);
                }
            }
            if Instant::now() > deadline {
                let g = self.console.state();
                let why = format!(
                    "no network with the VF after {} s (up: {}, replies: {}); console tail: {}",
                    self.cfg.boot_timeout.as_secs(),
                    g.up.is_some(),
                    g.replies.len(),
                    tail(&g)
                );
                drop(g);
                rep.check("guest booted and configured its network", false, why.clone());
                return Err(why);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Before the migration the VF carries the pings: its guest tx counter and the source server's tap both grew.
    fn check_before(&mut self, rep: &mut Report) {
        let (from, to) = (self.ready.unwrap_or(self.begin), Instant::now());
        let hosts = self.sampler.as_ref().map(Sampler::snapshot).unwrap_or_default();
        let (vf, all) = analysis::tap_share(&hosts, "vfS", from, to);
        let g = self.console.state();
        // iavf's counters lag up to 2 s: look from the boot.
        let (gvf, gall) = analysis::guest_vf_share(&g.counters, self.begin, to);
        drop(g);
        let ok = vf > 0 && vf as f64 >= SHARE * all as f64 && gvf > 0 && 2 * gvf >= gall;
        rep.check(
            "VF carried the traffic before the migration",
            ok,
            format!(
                "source tap vfS received {vf} of {all} frames from the guest; guest VF sent {gvf} of {gall} packets"
            ),
        );
    }

    fn migration_uri(&self) -> String {
        format!("unix:{}", self.dir().join("migration.sock").display())
    }

    /// Polls the source's migration to its end; `cancel_at_active` cancels it once the status is `active` (the
    /// unplug is done). Fills the report's migration part.
    fn migrate(&mut self, rep: &mut Report, cancel_at_active: bool) -> Res<Value> {
        let uri = self.migration_uri();
        self.qemu(Side::Destination)?.qmp()?.execute("migrate-incoming", json!({ "uri": uri }))?;
        // The failover flows start here; the unplug flow started at the unplug.
        let t0 = *self.t0.get_or_insert_with(Instant::now);
        self.say(&format!(
            "migrate to {uri}{}",
            if cancel_at_active { " (to be cancelled after the unplug)" } else { "" }
        ));
        self.qemu(Side::Source)?.qmp()?.execute("migrate", json!({ "uri": uri }))?;
        let mut changes: Vec<StatusChange> = Vec::new();
        let deadline = Instant::now() + self.cfg.migration_timeout;
        let stop = self.cfg.stop.clone();
        let mut cancelled = false;
        let src = self.src.as_mut().ok_or("no source QEMU")?;
        let Qemu { proc, qmp, .. } = src;
        let qmp = qmp.as_mut().ok_or("no source QMP")?;
        let result = qmp::poll_migration(
            qmp,
            Duration::from_millis(50),
            &mut changes,
            &mut |q, status| {
                if cancel_at_active && status == "active" && !cancelled {
                    cancelled = true;
                    q.execute("migrate_cancel", Value::Null)?;
                }
                Ok(())
            },
            &|| {
                if stop.load(Ordering::SeqCst) {
                    Some("interrupted (signal)".into())
                } else if Instant::now() > deadline {
                    Some("migration did not end in time".into())
                } else {
                    None
                }
            },
        );
        let died = proc.try_wait();
        let mut m = Migration {
            statuses: changes.iter().map(|c| (c.status.clone(), rel(t0, c.at))).collect(),
            ..Default::default()
        };
        for c in &changes {
            rep.timeline_ms.entry(format!("status {}", c.status)).or_insert(rel(t0, c.at));
        }
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                rep.migration = Some(m);
                return Err(match died {
                    Some(st) => format!("{e}; the source QEMU exited ({st})"),
                    None => e,
                });
            }
        };
        m.status = r["status"].as_str().unwrap_or("?").to_string();
        m.total_time_ms = r["total-time"].as_u64();
        m.downtime_ms = r["downtime"].as_u64();
        m.setup_time_ms = r["setup-time"].as_u64();
        m.ram_transferred_bytes = r["ram"]["transferred"].as_u64();
        m.query_migrate = r.clone();
        rep.figures.migration_total_ms = m.total_time_ms;
        rep.figures.downtime_ms = m.downtime_ms;
        rep.migration = Some(m);
        let end = changes.last().map(|c| c.at).unwrap_or_else(Instant::now);
        if r["status"] == "completed" {
            // The guest runs on the destination once it resumes.
            let dst = self.qemu(Side::Destination)?.qmp()?;
            let resume = dst.wait_event("RESUME", None, t0, Duration::from_secs(10), &|| false);
            let sw = resume.map(|e| e.at).unwrap_or(end);
            rep.timeline_ms.insert("destination RESUME".into(), rel(t0, sw));
            self.switchover = Some(sw);
            self.guest_on = Side::Destination;
        } else if r["status"] == "cancelled" {
            self.switchover = Some(end);
        }
        Ok(r)
    }

    /// The failover flow (and, with `cancel`, the cancel flow).
    fn failover(&mut self, rep: &mut Report, cancel: bool) -> Res<()> {
        if cancel {
            let bw = self.cfg.cancel_bandwidth;
            self.qemu(Side::Source)?.qmp()?.execute("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
        }
        let r = self.migrate(rep, cancel)?;
        let t0 = self.t0.expect("t0");
        let src_events = self.qemu(Side::Source)?.qmp()?.events();
        let unplug_ev = src_events.iter().find(|e| e.name == "UNPLUG_PRIMARY" && e.at >= t0).map(|e| e.at);
        self.note_vf_gone(rep);
        if let Some(u) = unplug_ev {
            rep.timeline_ms.insert("UNPLUG_PRIMARY (source)".into(), rel(t0, u));
        }
        // UNPLUG_PRIMARY comes when QEMU asks the guest to unplug; the guest releasing the VF is what counts.
        rep.figures.start_to_unplug_ms = self.vf_gone.map(|u| rel(t0, u));
        let wait_end = rep.migration.as_ref().and_then(|m| {
            let w = m.statuses.iter().position(|(s, _)| s == "wait-unplug")?;
            m.statuses.get(w + 1).map(|(_, t)| *t)
        });
        let never = || "never".to_string();
        rep.check(
            "primary unplugged on the source",
            self.vf_gone.is_some(),
            format!(
                "UNPLUG_PRIMARY {}; the guest released the VF {}; wait-unplug ended {}",
                unplug_ev.map(|u| format!("{:.0} ms after migrate", rel(t0, u))).unwrap_or_else(never),
                self.vf_gone.map(|u| format!("after {:.0} ms", rel(t0, u))).unwrap_or_else(never),
                wait_end.map(|t| format!("after {t:.0} ms")).unwrap_or_else(never),
            ),
        );
        let status = r["status"].as_str().unwrap_or("?").to_string();
        let downtime = r["downtime"].as_u64().map(|d| format!(", downtime {d} ms")).unwrap_or_default();
        let last_status = rep.migration.as_ref().and_then(|m| m.statuses.last().map(|s| s.1));
        let total = r["total-time"]
            .as_u64()
            .map(|d| d as f64)
            .or(last_status)
            .map(|d| format!("{d:.0} ms"))
            .unwrap_or_else(|| "?".into());
        if cancel {
            let ok = status == "cancelled";
            rep.check("migration cancelled after the unplug", ok, format!("status {status} after {total}"));
            if !ok {
                return Err(format!("the migration ended {status}, not cancelled"));
            }
            // The destination QEMU's incoming migration failed: it exits by itself.
        } else {
            let ok = status == "completed";
            rep.check("migration completed", ok, format!("status {status}, {total} total{downtime}"));
            if !ok {
                return Err(format!("migration {status}: {}", r["error-desc"].as_str().unwrap_or("")));
            }
        }
        Ok(())
    }

    /// The unplug flow: the VF leaves (the guest releases it, or QMP device_del), migrate, device_add on the
    /// destination.
    fn unplug(&mut self, rep: &mut Report, dsock: &Path) -> Res<()> {
        let t0 = Instant::now();
        self.t0 = Some(t0);
        match self.cfg.unplug {
            UnplugMethod::Guest => {
                self.say("the guest releases the VF (console: release)");
                self.qemu(Side::Source)?.send("release")?;
                let gone = self.wait_guest(Duration::from_secs(30), |g| {
                    g.event_after("vf-gone", t0)
                        .and_then(|_| g.event_after("pci-vf", t0))
                        .is_some_and(|e| e.arg(0) == "0")
                })?;
                self.note_vf_gone(rep);
                rep.check(
                    "VF unplugged on the source",
                    gone,
                    match self.vf_gone {
                        Some(g) if gone => format!("the guest released the VF in {:.0} ms", rel(t0, g)),
                        _ => "the guest did not release the VF within 30 s".into(),
                    },
                );
                if !gone {
                    return Err("the VF did not leave the guest".into());
                }
            }
            UnplugMethod::Qmp => {
                self.say("device_del primary0 on the source");
                self.qemu(Side::Source)?.qmp()?.execute("device_del", json!({"id": "primary0"}))?;
                let deadline = Instant::now() + Duration::from_secs(30);
                let deleted = loop {
                    self.interrupted()?;
                    let q = self.qemu(Side::Source)?;
                    if let Some(e) = q.qmp()?.find_event("DEVICE_DELETED", Some("primary0"), t0) {
                        break Some(e.at);
                    }
                    if let Some(st) = q.proc.try_wait() {
                        let err = q.stderr();
                        if let Some(bug) = guest::match_qemu_unplug_abort(&err) {
                            rep.check("VF unplugged on the source", false, format!("the source QEMU died ({st})"));
                            return Err(self.known(rep, bug));
                        }
                        let why = format!("the source QEMU exited during device_del ({st})");
                        rep.check("VF unplugged on the source", false, why.clone());
                        return Err(why);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                self.note_vf_gone(rep);
                if let Some(d) = deleted {
                    rep.timeline_ms.insert("DEVICE_DELETED (source)".into(), rel(t0, d));
                }
                rep.check(
                    "VF unplugged on the source",
                    deleted.is_some(),
                    match deleted {
                        Some(d) => format!("DEVICE_DELETED {:.0} ms after device_del", rel(t0, d)),
                        None => "no DEVICE_DELETED within 30 s".into(),
                    },
                );
                if deleted.is_none() {
                    return Err("device_del did not complete".into());
                }
            }
        }
        rep.figures.start_to_unplug_ms = self.vf_gone.map(|g| rel(t0, g));
        let r = self.migrate(rep, false)?;
        let status = r["status"].as_str().unwrap_or("?").to_string();
        let downtime = r["downtime"].as_u64().map(|d| format!(", downtime {d} ms")).unwrap_or_default();
        let total = r["total-time"].as_u64().map(|d| format!("{d} ms")).unwrap_or_else(|| "?".into());
        rep.check("migration completed", status == "completed", format!("status {status}, {total} total{downtime}"));
        if status != "completed" {
            return Err(format!("migration {status}: {}", r["error-desc"].as_str().unwrap_or("")));
        }
        let add = primary_json(dsock, false);
        self.say("device_add primary0 on the destination");
        let t_add = Instant::now();
        let res = self.qemu(Side::Destination)?.qmp()?.execute("device_add", add);
        rep.timeline_ms.insert("device_add (destination)".into(), rel(t0, t_add));
        rep.check(
            "device_add on the destination",
            res.is_ok(),
            match &res {
                Ok(_) => format!("vfio-user-pci primary0 on rp1, socket {}", dsock.display()),
                Err(e) => e.clone(),
            },
        );
        res.map(|_| ())
    }

    /// Records when the guest's VF left (the first vf-gone after t0).
    fn note_vf_gone(&mut self, rep: &mut Report) {
        let Some(t0) = self.t0 else { return };
        if self.vf_gone.is_none() {
            // The watcher polls; the kernel log says when it happened: iavf's remove, or the failover master or the
            // bond letting the VF go, whichever came first (mapped to host time through the ping lines).
            let g = self.console.state();
            self.vf_gone = g.event_after("vf-gone", t0).map(|e| {
                let vf = e.arg(0);
                let slave = format!("(slave {vf}): Releasing");
                let failover = format!("slave:{vf} unregistered");
                [
                    g.kernel_line(&["iavf", "Removing device"], t0, Some(e.at)),
                    g.kernel_line(&[&failover], t0, Some(e.at)),
                    g.kernel_line(&[&slave], t0, Some(e.at)),
                    g.host_time(e.uptime).filter(|&t| t >= t0 && t <= e.at),
                ]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(e.at)
            });
        }
        if let Some(g) = self.vf_gone {
            rep.timeline_ms.insert("guest: VF gone".into(), rel(t0, g));
        }
    }

    /// Waits until `f(guest)` holds; false after `timeout`.
    fn wait_guest(&mut self, timeout: Duration, f: impl Fn(&guest::GuestState) -> bool) -> Res<bool> {
        let end = Instant::now() + timeout;
        loop {
            self.interrupted()?;
            self.alive(self.guest_on)?;
            if f(&self.console.state()) {
                return Ok(true);
            }
            if Instant::now() > end {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn known(&mut self, rep: &mut Report, bug: KnownBug) -> String {
        let title = bug.title.clone();
        rep.check("no known guest or QEMU bug", false, title.clone());
        rep.known_bug = Some(bug);
        title
    }

    /// After the switchover (or cancel): the VF comes back into the guest, is enslaved and gets carrier. If it gets
    /// stuck, collects the guest's task stacks and looks for known bugs.
    fn replugged(&mut self, rep: &mut Report) -> Res<()> {
        let t0 = self.t0.expect("t0");
        self.note_vf_gone(rep);
        let since = self.vf_gone.or(self.switchover).unwrap_or(t0);
        let side = self.vf_side;
        let where_ = side_name(side);
        self.say(&format!("waiting for the VF to come back on the {where_}"));
        let sw = self.switchover.unwrap_or(t0);
        let deadline = sw + self.cfg.replug_timeout;
        let mut stuck = false;
        loop {
            self.interrupted()?;
            self.alive(self.guest_on)?;
            {
                let g = self.console.state();
                if let Some(a) = g.event_after("vf-active", since) {
                    // When it really happened, from the kernel log: the bond made it the active slave, or the
                    // failover master registered it and its link came up.
                    let vf = a.arg(0);
                    let precise = if self.cfg.flow == Flow::Unplug {
                        g.kernel_line(
                            &[&format!("(slave {vf}): making interface the new active one")],
                            since,
                            Some(a.at),
                        )
                    } else {
                        let reg = g.kernel_line(&[&format!("slave:{vf} registered")], since, Some(a.at));
                        let link = g.kernel_line(&[vf, "NIC Link is Up"], since, Some(a.at));
                        reg.zip(link).map(|(r, l)| r.max(l))
                    };
                    self.vf_back =
                        Some(precise.or(g.host_time(a.uptime).filter(|&t| t >= since && t <= a.at)).unwrap_or(a.at));
                    break;
                }
                if g.event_after("vf-stuck", since).is_some() {
                    stuck = true;
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.vf_back.is_none() {
            if !stuck {
                let on = self.guest_on;
                self.say("VF not back in time: asking the guest for its blocked tasks");
                let _ = self.qemu(on)?.send("dump");
            }
            // The guest prints the stacks, then "stacks-done"; the kernel log (hung-task traces) follows it within
            // a second.
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end && self.console.state().event_after("stacks-done", since).is_none() {
                self.interrupted()?;
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(1200));
        }
        let g = self.console.state();
        let new = g.event_after("vf-new", since).cloned();
        let enslaved = g.event_after("vf-enslaved", since).cloned();
        let stuck_ev = g.event_after("vf-stuck", since).cloned();
        let bug = guest::match_failover_deadlock(&g);
        drop(g);
        let ms = |t: Instant| format!("{:.0} ms after the switchover", rel(sw, t));
        for (k, e) in [("guest: VF new", &new), ("guest: VF enslaved", &enslaved), ("guest: VF stuck", &stuck_ev)] {
            if let Some(e) = e {
                rep.timeline_ms.insert(k.into(), rel(t0, e.at));
            }
        }
        let replug_name = format!("VF re-plugged on the {where_}");
        rep.check(
            &replug_name,
            new.as_ref().is_some_and(|e| e.side == side),
            match &new {
                Some(e) => format!("new iavf netdev {} on the {} QEMU, {}", e.arg(0), side_name(e.side), ms(e.at)),
                None => format!("no new iavf netdev within {} s", self.cfg.replug_timeout.as_secs()),
            },
        );
        let master =
            if self.cfg.flow == Flow::Unplug { "enslaved into bond0" } else { "enslaved by the failover master" };
        rep.check(
            &format!("VF {master}"),
            enslaved.is_some(),
            match &enslaved {
                Some(e) => format!("{} {}, {}", e.arg(0), e.arg(1), ms(e.at)),
                None => "never enslaved".into(),
            },
        );
        let up_name =
            if self.cfg.flow == Flow::Unplug { "VF is the bond's active slave" } else { "VF up with carrier" };
        rep.check(
            up_name,
            self.vf_back.is_some(),
            match (self.vf_back, &stuck_ev) {
                (Some(b), _) => ms(b),
                (None, Some(s)) => {
                    format!("stuck: {} not up after {} s", s.arg(0), s.arg(1).trim_start_matches("secs="))
                }
                (None, None) => format!("not up within {} s", self.cfg.replug_timeout.as_secs()),
            },
        );
        if let Some(b) = self.vf_back {
            rep.timeline_ms.insert("guest: VF active".into(), rel(t0, b));
            rep.figures.switchover_to_replug_ms = Some(rel(sw, b));
            rep.figures.unplug_to_replug_ms = self.vf_gone.map(|g| rel(g, b));
            return Ok(());
        }
        if let Some(bug) = bug {
            return Err(self.known(rep, bug));
        }
        Err(format!("the VF did not come back on the {where_}"))
    }

    /// Stops the guest's ping (its totals arrive), the QEMUs, the servers; analyses; decides the outcome.
    fn finish(&mut self, rep: &mut Report, result: Res<()>) {
        let t0 = self.t0.unwrap_or(self.begin);
        // Stop the ping where the guest runs now (if the guest is still reachable).
        let on = self.guest_on;
        if self.qemu(on).ok().is_some_and(|q| q.proc.is_running()) {
            self.stopped_at = Some(Instant::now());
            if self.qemu(on).and_then(|q| q.send("stop")).is_ok() {
                let end = Instant::now() + Duration::from_secs(15);
                while Instant::now() < end && self.console.state().done.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let cancel_src_running = if self.cfg.flow == Flow::Cancel && self.vf_back.is_some() {
            self.qemu(Side::Source).ok().and_then(|q| q.qmp.as_mut()).map(|q| q.run_state())
        } else {
            None
        };
        for side in [Side::Destination, Side::Source] {
            if let Ok(q) = self.qemu(side) {
                if q.proc.is_running() {
                    if let Some(m) = q.qmp.as_mut() {
                        let _ = m.execute_timeout("quit", Value::Null, Duration::from_secs(3));
                    }
                    q.proc.wait_timeout(Duration::from_secs(5));
                }
                q.proc.stop(Duration::from_secs(5));
                if let Some(r) = q.reader.take() {
                    let _ = r.join();
                }
            }
        }
        self.src = None;
        self.dst = None;
        // Servers: both still alive (they serve until told), no panic.
        let mut health = Vec::new();
        for p in [self.srv_src.as_mut(), self.srv_dst.as_mut()].into_iter().flatten() {
            let died = p.try_wait();
            p.stop(Duration::from_secs(5));
            let log = p.log_text();
            if let Some(st) = died {
                health.push(format!("{} exited during the run ({st})", p.name));
            }
            if log.contains("panicked at") {
                health.push(format!("{} panicked (see {})", p.name, p.log.display()));
            }
        }
        let ran_servers = self.srv_src.is_some();
        self.srv_src = None;
        self.srv_dst = None;
        let hosts = self.sampler.as_ref().map(Sampler::snapshot).unwrap_or_default();
        self.sampler = None;
        self.ns = None;

        // Analysis.
        let g = self.console.state();
        if let Some(k) = &g.kernel {
            rep.guest_kernel = k.clone();
        }
        // The VF is back once the guest has it enslaved and up AND it carried the guest's first frame (its server's
        // tap saw it; 100 ms resolution). Until that frame, net_failover still sends on the standby (the primary has
        // no carrier yet) and drops what comes back on the standby once a primary is registered
        // (net_failover_handle_frame: RX_HANDLER_EXACT), so a ping sent then can be lost: that is the switchover,
        // counted in the "during" window.
        let tap = vf_tap(self.vf_side);
        let first = self.switchover.and_then(|sw| analysis::first_growth(&hosts, tap, sw));
        let back = self.vf_back.map(|b| first.map_or(b, |f| f.max(b)));
        if let (Some(b), Some(v)) = (back, self.vf_back) {
            if b > v {
                rep.timeline_ms.insert("VF back and carrying (after window starts)".into(), rel(t0, b));
            }
        }
        let b = Bounds {
            unplug: self.t0.map(|_| 0.0),
            vf_back: back.map(|t| rel(t0, t)),
            stop: self.stopped_at.map(|t| rel(t0, t)),
        };
        rep.pings = analysis::pings(&g, t0, self.cfg.ping_interval_ms, b);
        rep.carriers = analysis::carriers(&g, &hosts, t0);
        rep.guest_samples = analysis::guest_samples(&g.counters, t0);
        rep.host_samples = analysis::host_samples(&hosts, t0);
        if let Some(up) = &g.up {
            rep.figures.boot_to_network_ms = Some(rel(self.begin, up.at));
            rep.timeline_ms.insert("guest network up".into(), rel(t0, up.at));
        }
        if let Some(s) = self.stopped_at {
            rep.timeline_ms.insert("stop".into(), rel(t0, s));
        }
        if self.t0.is_some() {
            rep.timeline_ms.insert("start".into(), 0.0);
        }
        if let (Some(back), Some(sw)) = (back, self.switchover) {
            let end = self.stopped_at.unwrap_or_else(Instant::now);
            if let Some(f) = first {
                rep.figures.switchover_to_vf_traffic_ms = Some(rel(sw, f));
                rep.timeline_ms.insert(format!("host: first frame on {tap}"), rel(t0, f));
            }
            let vf_name = g.event_after("vf-new", self.vf_gone.unwrap_or(t0)).map(|e| e.arg(0).to_string());
            let gfirst = vf_name.as_ref().and_then(|n| {
                g.counters.iter().find(|c| c.at > sw && c.iface(n).is_some_and(|i| i.driver == "iavf" && i.tx > 0))
            });
            if let Some(c) = gfirst {
                rep.figures.switchover_to_vf_traffic_guest_ms = Some(rel(sw, c.at));
                rep.timeline_ms.insert("guest: VF counters moving".into(), rel(t0, c.at));
            }
            // Shares over the after window: the host's from the re-plug (+0.5 s); the guest's from the re-plug, and
            // the VF only needs the larger part there (its counters lag up to 2 s behind the standby's).
            let (vf, all) = analysis::tap_share(&hosts, tap, back + Duration::from_millis(500), end);
            let (gvf, gall) = analysis::guest_vf_share(&g.counters, back, end);
            let where_ = side_name(self.vf_side);
            rep.check(
                &format!("VF carries the traffic on the {where_} (guest counters)"),
                gvf > 0 && 2 * gvf >= gall,
                format!("VF {} sent {gvf} of {gall} packets after the re-plug", vf_name.as_deref().unwrap_or("?")),
            );
            rep.check(
                &format!("VF carries the traffic on the {where_} (server tap {tap})"),
                vf > 0 && vf as f64 >= SHARE * all as f64,
                format!(
                    "{tap} received {vf} of {all} frames the guest sent after the re-plug; first {}",
                    first
                        .map(|f| format!("{:.0} ms after the switchover", rel(sw, f)))
                        .unwrap_or_else(|| "never".into())
                ),
            );
            let p = &rep.pings;
            rep.check(
                "zero pings lost after re-plug",
                p.after.lost == 0 && p.after.sent > 0,
                format!(
                    "{} of {} lost after the re-plug (during the unplug/switchover window: {} of {})",
                    p.after.lost, p.after.sent, p.during.lost, p.during.sent
                ),
            );
        }
        drop(g);
        if let Some(st) = cancel_src_running {
            let st = st.unwrap_or_else(|e| e);
            rep.check("guest kept running on the source", st == "running", format!("source run state {st}"));
        }
        if ran_servers {
            rep.check(
                "servers healthy",
                health.is_empty(),
                if health.is_empty() { "both servers ran to the end, no panic".into() } else { health.join("; ") },
            );
        }

        rep.duration_s = self.begin.elapsed().as_secs_f64();
        let failed = rep.failed_checks().next().map(|c| format!("{}: {}", c.name, c.message));
        rep.outcome = match (&result, &failed) {
            _ if rep.known_bug.is_some() => Outcome::KnownBug,
            (Err(_), None) => Outcome::Error,
            (_, Some(_)) => Outcome::Fail,
            (Ok(()), None) => Outcome::Pass,
        };
        rep.reason = match (result, failed) {
            _ if rep.known_bug.is_some() => rep.known_bug.as_ref().map(|b| b.title.clone()),
            (Err(e), _) => Some(e),
            (Ok(()), f) => f,
        };
        if let Some(d) = self.dir.as_mut() {
            if rep.outcome != Outcome::Pass || self.cfg.pcap {
                d.remove = false;
            }
            if d.remove {
                rep.logs = None;
            }
        }
        self.dir = None;
        self.say(&format!("{:?} in {:.1} s", rep.outcome, rep.duration_s));
    }
}

/// The VF as a `device_add` / `-device` JSON object.
fn primary_json(sock: &Path, failover: bool) -> Value {
    let mut v = json!({
        "driver": "vfio-user-pci",
        "id": "primary0",
        "bus": "rp1",
        "socket": {"path": sock.display().to_string(), "type": "unix"},
    });
    if failover {
        v["failover_pair_id"] = json!("standby0");
    }
    v
}

fn tail(g: &guest::GuestState) -> String {
    g.tail.iter().rev().take(12).rev().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join(" | ")
}
