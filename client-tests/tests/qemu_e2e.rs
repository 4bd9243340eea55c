//! End to end with an unmodified QEMU 11.1.3 (`-device vfio-user-pci`) and a Linux guest running the stock iavf
//! driver, under TCG. Needs `qemu-configs/provision.sh` to have run (the README's test command does it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use client_tests::ServerProcess;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Checks that provisioning ran, with a message that says how to fix it.
fn require_provisioned(kernel: &str) {
    let build = workspace().join("build");
    for p in [build.join("qemu/bin/qemu-system-x86_64"), build.join(format!("guest-{kernel}/initramfs.cpio.gz"))] {
        assert!(p.exists(), "{} is missing: run qemu-configs/provision.sh first", p.display());
    }
}

/// A VM started by `run-vm.sh`, which execs QEMU: the child's PID is QEMU's. Killed by PID if still running.
struct Vm(Option<Child>);

impl Vm {
    fn start(server: &ServerProcess, kernel: &str, ram: &str) -> Vm {
        Self::start_with(server, kernel, ram, &["--append", "guest.wait=3"])
    }

    /// Runs `qemu-configs/guest/<script>` in the guest instead of the plain report.
    fn start_script(server: &ServerProcess, kernel: &str, ram: &str, script: &str) -> Vm {
        let path = workspace().join("qemu-configs/guest").join(script);
        Self::start_with(server, kernel, ram, &["--script", path.to_str().unwrap()])
    }

    fn start_with(server: &ServerProcess, kernel: &str, ram: &str, extra: &[&str]) -> Vm {
        require_provisioned(kernel);
        let child = Command::new(workspace().join("qemu-configs/run-vm.sh"))
            .arg("--socket")
            .arg(server.socket_path())
            .args(["--kernel", kernel, "--ram", ram, "--timeout", "150"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting run-vm.sh");
        Vm(Some(child))
    }

    /// Waits for the guest to power off; returns its console output and QEMU's stderr.
    fn output(mut self) -> String {
        let out = self.0.take().unwrap().wait_with_output().expect("waiting for QEMU");
        format!(
            "{}\n--- QEMU stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn boot_and_check(server: &mut ServerProcess, kernel: &str, ram: &str) -> String {
    let out = Vm::start(server, kernel, ram).output();
    assert!(out.contains("GUEST: done"), "guest did not finish:\n{out}");
    assert!(out.contains("[020000] [8086:154c] driver=iavf"), "iavf did not bind to 8086:154c:\n{out}");
    // Let the server see the disconnect before reading its log.
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log();
    assert!(
        log.contains("VF driver enabled the admin queue ATQ"),
        "the driver never got past reset polling to enable the admin queue:\n{log}"
    );
    // The RAM kind really reached the server the intended way.
    let how = if ram == "memfd" { "mmap'd" } else { "via messages" };
    assert!(log.lines().any(|l| l.contains("DMA_MAP") && l.contains(how)), "no DMA_MAP {how} in:\n{log}");
    server.assert_alive();
    out
}

#[test]
fn iavf_binds_on_6_1_with_memfd_ram() {
    let mut s = ServerProcess::start();
    boot_and_check(&mut s, "6.1", "memfd");
}

#[test]
fn iavf_binds_on_6_1_with_plain_ram() {
    let mut s = ServerProcess::start();
    boot_and_check(&mut s, "6.1", "plain");
}

#[test]
fn iavf_binds_on_6_12_with_memfd_ram() {
    let mut s = ServerProcess::start();
    boot_and_check(&mut s, "6.12", "memfd");
}

/// Plain RAM on 6.12, then a second QEMU on the same server: the server drops the first client's mappings and
/// fds, keeps serving, and the second guest's driver binds too.
#[test]
fn iavf_binds_on_6_12_with_plain_ram_and_a_second_qemu_reattaches() {
    let mut s = ServerProcess::start_with(&["--mac", "02:aa:bb:cc:dd:ee"]);
    boot_and_check(&mut s, "6.12", "plain");
    boot_and_check(&mut s, "6.12", "memfd");
    let log = s.log();
    assert!(log.contains("client 1 disconnected"), "{log}");
    assert!(log.contains("client 2 connected"), "{log}");
}

/// The guest's `VFU: <step> ...` line, which must say ok.
fn step<'a>(out: &'a str, name: &str) -> &'a str {
    let prefix = format!("VFU: {name} ");
    let line = out.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no '{prefix}' line:\n{out}"));
    assert!(line.starts_with(&format!("{prefix}ok")), "{line}\n{out}");
    line
}

/// The interface comes up with the --mac address and carrier within 5 s (the guest script's bound), survives an
/// MTU change (a VF reset) and a driver reload, and the driver logs no errors.
fn link_comes_up(kernel: &str, ram: &str) {
    link_comes_up_with(kernel, ram, &[]);
}

fn link_comes_up_with(kernel: &str, ram: &str, server_args: &[&str]) {
    let mac = "02:5e:11:22:33:44";
    let mut args = vec!["--mac", mac];
    args.extend_from_slice(server_args);
    let mut s = ServerProcess::start_with(&args);
    let out = Vm::start_script(&s, kernel, ram, "link-up.sh").output();
    assert!(out.contains("GUEST: done"), "guest did not finish:\n{out}");
    step(&out, "netdev");
    assert!(step(&out, "up").contains(&format!("addr={mac}")), "{out}");
    assert!(step(&out, "mtu").contains("mtu=1400"), "{out}");
    step(&out, "rmmod");
    step(&out, "insmod");
    step(&out, "reload");
    assert!(out.contains("VFU: dmesg-errors 0"), "iavf logged errors:\n{out}");
    let log = s.log();
    assert!(log.contains("VF requested a reset"), "the MTU change should reset the VF:\n{log}");
    assert!(!log.contains("ERROR"), "server errors:\n{log}");
    // QEMU posts BAR0 writes only while no region is mmap-able: the remap IRQ (default) must not cost that, and
    // `--doorbells mmap` does (docs/remap-irq.md).
    let (posted, replied) = bar0_writes(&s);
    if server_args.contains(&"mmap") {
        assert!(posted == 0 && replied > 0, "mmap mode: {posted} posted, {replied} with a reply");
    } else {
        assert!(posted > 100 && replied == 0, "{posted} BAR0 writes posted, {replied} with a reply");
    }
    s.assert_alive();
}

/// The server's count of BAR0 REGION_WRITEs (posted, with a reply) over its clients, once QEMU's session (the one
/// with writes, not the test's readiness probe) has ended.
fn bar0_writes(s: &ServerProcess) -> (u64, u64) {
    let t = std::time::Instant::now();
    loop {
        let log = s.log();
        let (posted, replied) = log.lines().filter(|l| l.contains("BAR0 writes: ")).fold((0, 0), |(p, r), line| {
            let n: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            (p + n[n.len() - 2], r + n[n.len() - 1])
        });
        if posted + replied > 0 {
            return (posted, replied);
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "no BAR0 write count in the log:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn link_up_mtu_reset_and_reload_on_6_1_with_memfd_ram() {
    link_comes_up("6.1", "memfd");
}

#[test]
fn link_up_mtu_reset_and_reload_on_6_1_with_plain_ram() {
    link_comes_up("6.1", "plain");
}

#[test]
fn link_up_mtu_reset_and_reload_on_6_12_with_memfd_ram() {
    link_comes_up("6.12", "memfd");
}

#[test]
fn link_up_mtu_reset_and_reload_on_6_12_with_plain_ram() {
    link_comes_up("6.12", "plain");
}

/// BAR0's doorbell page offered as a sparse mmap area: QEMU takes the region info with the capability and its fd,
/// maps the page, and the driver still comes up, resets and reloads.
#[test]
fn link_up_with_mmap_doorbells_on_6_12() {
    link_comes_up_with("6.12", "memfd", &["--doorbells", "mmap"]);
}

#[test]
fn iavf_binds_on_7_x_with_memfd_ram() {
    let mut s = ServerProcess::start();
    boot_and_check(&mut s, "7.x", "memfd");
}

#[test]
fn link_up_mtu_reset_and_reload_on_7_x_with_memfd_ram() {
    link_comes_up("7.x", "memfd");
}
