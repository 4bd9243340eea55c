//! Network namespaces the tests create for themselves, and host-side endpoints inside them. Nothing here talks to
//! an address outside a namespace the test made.
//!
//! The panicking methods ([`NetNs::new`], [`NetNs::ip`], [`NetNs::adopt`]) are for tests; the `try_` ones return
//! errors for callers that must clean up and report instead (the migration harness, `crate::migtest`).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for an interface (15 bytes) or a namespace.
pub fn unique_name(tag: &str) -> String {
    format!("vfu{tag}{}x{}", std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add` on creation, `ip netns del` on drop (which also destroys virtual links moved into it).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        Self::create("ns").unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh namespace named after `tag` (see [`unique_name`]) with `lo` up.
    pub fn create(tag: &str) -> Result<NetNs, String> {
        let name = unique_name(tag);
        try_run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.try_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n <ns> ARGS`, failing with the command and its stderr.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        try_run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A bridge `name` with address `cidr`, up (no STP: ports forward as soon as they are up).
    pub fn add_bridge(&self, name: &str, cidr: &str) -> Result<(), String> {
        self.try_ip(&["link", "add", name, "type", "bridge", "stp_state", "0"])?;
        self.try_ip(&["addr", "add", cidr, "dev", name])?;
        self.try_ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A persistent tap `name` (`ip tuntap add ... mode tap`), a port of `bridge`, up. Whoever opens it later
    /// (a `vfu-i40evf --backend tap:NAME` or a QEMU `-netdev tap,ifname=NAME`) attaches to it.
    pub fn add_tap(&self, name: &str, bridge: &str) -> Result<(), String> {
        self.try_ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.try_ip(&["link", "set", name, "master", bridge])?;
        self.try_ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A command that runs `program` inside this namespace: `ip netns exec <ns> program`. `ip` execs the program,
    /// so the child's PID is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Moves a link from the root namespace into this one, gives it `addr` (CIDR) and brings it up.
    pub fn adopt(&self, ifname: &str, addr: &str) {
        run(Command::new("ip").args(["link", "set", ifname, "netns", &self.name]));
        self.ip(&["addr", "add", addr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
    }

    /// Runs `f` on a thread that lives in this namespace (setns affects only the calling thread).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).expect("setns");
            f()
        })
    }
}

/// Packet counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IfCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Parses `/proc/net/dev`: interface name to its packet counters (the same numbers as
/// `/sys/class/net/NAME/statistics/{rx,tx}_packets`).
pub fn parse_net_dev(text: &str) -> BTreeMap<String, IfCounters> {
    let mut m = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if f.len() >= 10 {
            m.insert(name.trim().to_string(), IfCounters { rx_packets: f[1], tx_packets: f[9] });
        }
    }
    m
}

/// The packet counters of the calling thread's network namespace (`/proc/thread-self/net/dev`): call it on a
/// thread made by [`NetNs::spawn`]. (`/sys/class/net` would show the namespace sysfs was mounted in, not ours.)
pub fn read_counters() -> std::io::Result<BTreeMap<String, IfCounters>> {
    Ok(parse_net_dev(&std::fs::read_to_string("/proc/thread-self/net/dev")?))
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Deterministic bytes for transfers (xorshift64), so a receiver can check content, not just length.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
