//! The guest as the harness sees it: its serial console (QEMU's stdout, one reader thread per QEMU), parsed line by
//! line as it arrives into [`GuestState`], each line stamped with the host time it arrived. The guest scripts
//! (`qemu-configs/guest/failover.sh`, `bond.sh`) print `MIG: ...` lines; their format is documented there.
//!
//! The guest is one guest even though two QEMUs print it: the source until the switchover, the destination after.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ChildStdout;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

/// Which QEMU printed a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

/// `MIG: e T KIND ARGS...`
#[derive(Debug, Clone)]
pub struct GuestEvent {
    pub at: Instant,
    pub side: Side,
    pub uptime: f64,
    pub kind: String,
    pub args: Vec<String>,
}

impl GuestEvent {
    pub fn arg(&self, i: usize) -> &str {
        self.args.get(i).map(String::as_str).unwrap_or("")
    }
}

/// One interface in a counters line.
#[derive(Debug, Clone, Serialize)]
pub struct IfSample {
    pub name: String,
    pub driver: String,
    pub master: String,
    pub operstate: String,
    pub tx: u64,
    pub rx: u64,
}

/// `MIG: c T ...`: the guest's per-interface counters at one moment.
#[derive(Debug, Clone)]
pub struct CounterSample {
    pub at: Instant,
    pub side: Side,
    pub uptime: f64,
    pub ifaces: Vec<IfSample>,
}

impl CounterSample {
    pub fn iface(&self, name: &str) -> Option<&IfSample> {
        self.ifaces.iter().find(|i| i.name == name)
    }

    /// The sum of tx packets of the interfaces bound to `driver` that have a master (lower devices only).
    pub fn tx_of_driver(&self, driver: &str) -> u64 {
        self.ifaces.iter().filter(|i| i.driver == driver && i.master != "-").map(|i| i.tx).sum()
    }
}

/// An echo reply: when its line arrived and the round trip busybox measured.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub at: Instant,
    pub rtt_ms: f64,
}

/// `MIG: up ...`
#[derive(Debug, Clone)]
pub struct Up {
    pub at: Instant,
    pub master: String,
    pub standby: String,
    pub vf: String,
}

/// Everything the guest said so far.
#[derive(Debug, Default)]
pub struct GuestState {
    /// `GUEST: kernel <release>` from the guest's /init.
    pub kernel: Option<String>,
    pub up: Option<Up>,
    pub events: Vec<GuestEvent>,
    pub counters: Vec<CounterSample>,
    /// Echo replies by sequence number (duplicates counted apart).
    pub replies: BTreeMap<u64, Reply>,
    pub duplicates: u64,
    /// Ping output that is neither a reply nor its header or totals (errors such as "sendto: ...").
    pub ping_other: Vec<String>,
    /// busybox ping's totals: (transmitted, received).
    pub totals: Option<(u64, u64)>,
    /// The guest's kernel log, as the script forwards it (`MIG: k`).
    pub kernel_log: Vec<String>,
    /// Kernel stacks of blocked or suspicious tasks (`MIG: s PID ...`): (pid, line).
    pub stacks: Vec<(u32, String)>,
    pub done: Option<Instant>,
    pub last_line: Option<Instant>,
    /// The last console lines of each side (for failure messages).
    pub tail: Vec<(Side, String)>,
    /// (guest uptime, host arrival) of every ping line: the clock that maps guest times to host times.
    pub clock: Vec<(f64, Instant)>,
}

const TAIL: usize = 80;

impl GuestState {
    /// The first event of `kind` that arrived at or after `since`.
    pub fn event_after(&self, kind: &str, since: Instant) -> Option<&GuestEvent> {
        self.events.iter().find(|e| e.kind == kind && e.at >= since)
    }

    /// The last event of `kind` that arrived before `before`.
    pub fn event_before(&self, kind: &str, before: Instant) -> Option<&GuestEvent> {
        self.events.iter().rev().find(|e| e.kind == kind && e.at < before)
    }

    /// The host time at which the guest's uptime was `uptime`: from the ping line printed closest to it (ping
    /// lines come every 50 ms and reach us within milliseconds; the watcher's events can lag by a poll period
    /// and a TCG time slice).
    pub fn host_time(&self, uptime: f64) -> Option<Instant> {
        let i = self.clock.partition_point(|(u, _)| *u < uptime);
        let near = [i.checked_sub(1), Some(i)]
            .into_iter()
            .flatten()
            .filter_map(|j| self.clock.get(j))
            .min_by(|a, b| (a.0 - uptime).abs().total_cmp(&(b.0 - uptime).abs()))?;
        let d = std::time::Duration::from_secs_f64((uptime - near.0).abs());
        if uptime >= near.0 {
            near.1.checked_add(d)
        } else {
            near.1.checked_sub(d)
        }
    }

    /// The host time of the first kernel log line, stamped at or after host time `since` (and, if given, at or
    /// before `until`), that contains all of `words`.
    pub fn kernel_line(&self, words: &[&str], since: Instant, until: Option<Instant>) -> Option<Instant> {
        self.kernel_log.iter().find_map(|l| {
            if !words.iter().all(|w| l.contains(w)) {
                return None;
            }
            let up: f64 = l.strip_prefix('[')?.split(']').next()?.trim().parse().ok()?;
            let t = self.host_time(up)?;
            (t >= since && until.is_none_or(|u| t <= u)).then_some(t)
        })
    }

    /// Replies whose lines arrived at or after `since`.
    pub fn replies_since(&self, since: Instant) -> usize {
        self.replies.values().filter(|r| r.at >= since).count()
    }

    fn feed(&mut self, side: Side, line: &str) {
        let now = Instant::now();
        self.last_line = Some(now);
        if !line.starts_with("MIG: p ") && !line.starts_with("MIG: c ") {
            if self.tail.len() >= TAIL {
                self.tail.remove(0);
            }
            self.tail.push((side, line.to_string()));
        }
        if let Some(k) = line.split("GUEST: kernel ").nth(1) {
            self.kernel.get_or_insert_with(|| k.trim().to_string());
            return;
        }
        let Some(rest) = line.find("MIG: ").map(|i| &line[i + 5..]) else { return };
        let (tag, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match tag {
            "up" => {
                let kv = |k: &str| {
                    rest.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("").trim_start_matches('=')
                };
                self.up = Some(Up {
                    at: now,
                    master: kv("master").to_string(),
                    standby: kv("standby").to_string(),
                    vf: kv("vf").to_string(),
                });
            }
            "e" => {
                let mut w = rest.split_whitespace();
                let uptime = w.next().and_then(|u| u.parse().ok()).unwrap_or(0.0);
                let kind = w.next().unwrap_or("").to_string();
                let args = w.map(str::to_string).collect();
                self.events.push(GuestEvent { at: now, side, uptime, kind, args });
            }
            "c" => {
                let mut w = rest.split_whitespace();
                let uptime = w.next().and_then(|u| u.parse().ok()).unwrap_or(0.0);
                let ifaces = w
                    .filter_map(|f| {
                        let p: Vec<&str> = f.split(',').collect();
                        (p.len() == 6).then(|| IfSample {
                            name: p[0].into(),
                            driver: p[1].into(),
                            master: p[2].into(),
                            operstate: p[3].into(),
                            tx: p[4].parse().unwrap_or(0),
                            rx: p[5].parse().unwrap_or(0),
                        })
                    })
                    .collect();
                self.counters.push(CounterSample { at: now, side, uptime, ifaces });
            }
            "p" => {
                let (up, text) = rest.split_once(' ').unwrap_or(("", ""));
                if let Ok(up) = up.parse::<f64>() {
                    if self.clock.last().is_none_or(|l| l.0 <= up) {
                        self.clock.push((up, now));
                    }
                }
                if let Some(seq) = field(text, "seq=").and_then(|s| s.parse::<u64>().ok()) {
                    if text.contains("DUP!") || self.replies.contains_key(&seq) {
                        self.duplicates += 1;
                    } else {
                        let rtt_ms = field(text, "time=").and_then(|s| s.parse().ok()).unwrap_or(0.0);
                        self.replies.insert(seq, Reply { at: now, rtt_ms });
                    }
                } else if text.contains("packets transmitted") {
                    let n: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                    if n.len() >= 2 {
                        self.totals = Some((n[0], n[1]));
                    }
                } else if !(text.is_empty()
                    || text.starts_with("PING ")
                    || text.starts_with("---")
                    || text.starts_with("round-trip"))
                {
                    self.ping_other.push(text.to_string());
                }
            }
            "k" => self.kernel_log.push(rest.to_string()),
            "s" => {
                let (pid, text) = rest.split_once(' ').unwrap_or((rest, ""));
                if let Ok(pid) = pid.parse() {
                    self.stacks.push((pid, text.to_string()));
                }
            }
            "done" => self.done = Some(now),
            _ => {}
        }
    }
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// The guest's console, fed by one reader thread per QEMU.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<GuestState>>);

impl Console {
    pub fn state(&self) -> MutexGuard<'_, GuestState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `out` (a QEMU's stdout: the serial console) line by line until EOF, copying it to `log`.
    pub fn attach(&self, side: Side, out: ChildStdout, log: &Path) -> Result<JoinHandle<()>, String> {
        let mut file = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("console-{side:?}"))
            .spawn(move || {
                let mut r = BufReader::new(out);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = file.write_all(&buf);
                            let line = String::from_utf8_lossy(&buf);
                            me.state().feed(side, line.trim_end_matches(['\n', '\r']));
                        }
                    }
                }
            })
            .map_err(|e| format!("spawning a console reader: {e}"))
    }
}

/// A recognised guest or QEMU bug.
#[derive(Debug, Clone, Serialize)]
pub struct KnownBug {
    /// Stable identifier: `iavf-net-failover-deadlock`, `qemu-vfio-user-unplug-abort`.
    pub id: String,
    /// What to tell a person, e.g. "known guest bug: 6.1 iavf deadlocks under net_failover".
    pub title: String,
    /// The lines that matched.
    pub evidence: Vec<String>,
}

/// The frames that identify the iavf / net_failover deadlock: iavf_finish_config registers the netdev holding the
/// adapter lock, net_failover's register notifier opens it, and iavf_open spins on that lock with rtnl held.
pub const DEADLOCK_FRAMES: [&str; 3] = ["iavf_finish_config", "net_failover_slave_register", "iavf_open"];

/// Looks for one task stack (from the script's /proc/PID/stack dump, or a hung-task or sysrq trace in the kernel
/// log) that holds all of [`DEADLOCK_FRAMES`]. `kernel` is the guest's release, for the title.
pub fn match_failover_deadlock(g: &GuestState) -> Option<KnownBug> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut by_pid: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (pid, l) in &g.stacks {
        by_pid.entry(*pid).or_default().push(l.clone());
    }
    groups.extend(by_pid.into_values());
    let mut cur: Vec<String> = Vec::new();
    for l in &g.kernel_log {
        if (l.contains("task:") || l.contains("blocked for more than")) && !cur.is_empty() {
            groups.push(std::mem::take(&mut cur));
        }
        cur.push(l.clone());
    }
    groups.push(cur);
    let hit = groups.into_iter().find(|grp| DEADLOCK_FRAMES.iter().all(|f| grp.iter().any(|l| l.contains(f))))?;
    let release = g.kernel.clone().unwrap_or_default();
    let short: String = release.split(['.', '-', '+']).take(2).collect::<Vec<_>>().join(".");
    let short = if short.is_empty() { "this".to_string() } else { short };
    Some(KnownBug {
        id: "iavf-net-failover-deadlock".into(),
        title: format!("known guest bug: {short} iavf deadlocks under net_failover"),
        evidence: hit,
    })
}

/// QEMU 11.1.3 aborts when a vfio-user-pci device is unplugged for good (device_del): vfio_user_msix_teardown
/// deletes the MSI-X PBA subregion from a BAR region unrealize already took apart. Fixed upstream by
/// "vfio-user: Do not delete the subregion" (Akihiko Odaki, 2025).
pub fn match_qemu_unplug_abort(qemu_stderr: &str) -> Option<KnownBug> {
    let l = qemu_stderr.lines().find(|l| l.contains("memory_region_del_subregion") && l.contains("container == mr"))?;
    Some(KnownBug {
        id: "qemu-vfio-user-unplug-abort".into(),
        title: "known QEMU bug: device_del of a vfio-user-pci device aborts QEMU (memory_region_del_subregion \
                assertion; upstream fix \"vfio-user: Do not delete the subregion\")"
            .into(),
        evidence: vec![l.to_string()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        let mut g = GuestState::default();
        g.feed(Side::Source, "Booting from ROM..GUEST: kernel 6.1.0-50-amd64");
        g.feed(Side::Source, "MIG: up 5.18 master=eth0 standby=eth1 vf=eth2");
        g.feed(Side::Source, "MIG: e 6.02 vf-enslaved eth2 master=eth0");
        g.feed(Side::Source, "MIG: c 7.1 eth0,virtio_net,-,up,10,11 eth2,iavf,eth0,up,8,9 bad");
        g.feed(Side::Source, "MIG: p 7.2 64 bytes from 10.77.0.1: seq=3 ttl=64 time=2.337 ms");
        g.feed(Side::Source, "MIG: p 7.3 64 bytes from 10.77.0.1: seq=3 ttl=64 time=2.337 ms (DUP!)");
        g.feed(Side::Destination, "MIG: p 9.0 120 packets transmitted, 118 packets received, 1% packet loss");
        g.feed(Side::Destination, "MIG: s 9 [<0>] iavf_open+0x43/0x230 [iavf]");
        assert_eq!(g.kernel.as_deref(), Some("6.1.0-50-amd64"));
        let up = g.up.as_ref().unwrap();
        assert_eq!((up.master.as_str(), up.standby.as_str(), up.vf.as_str()), ("eth0", "eth1", "eth2"));
        assert_eq!(g.events[0].kind, "vf-enslaved");
        assert_eq!(g.events[0].arg(1), "master=eth0");
        assert_eq!(g.counters[0].ifaces.len(), 2);
        assert_eq!(g.counters[0].tx_of_driver("iavf"), 8);
        assert_eq!(g.replies.len(), 1);
        assert!((g.replies[&3].rtt_ms - 2.337).abs() < 1e-9);
        assert_eq!(g.duplicates, 1);
        assert_eq!(g.totals, Some((120, 118)));
        assert_eq!(g.stacks[0].0, 9);
    }

    #[test]
    fn the_deadlock_is_recognised_in_a_stack_dump_and_in_the_kernel_log() {
        let stack = [
            "[<0>] iavf_open+0x43/0x230 [iavf]",
            "[<0>] dev_open+0x4b/0x90",
            "[<0>] net_failover_slave_register+0x4e/0x170 [net_failover]",
            "[<0>] register_netdevice+0x601/0x7e0",
            "[<0>] iavf_finish_config+0xbd/0xf0 [iavf]",
        ];
        let mut g = GuestState { kernel: Some("6.1.0-50-amd64".into()), ..Default::default() };
        for l in stack {
            g.stacks.push((48, "[<0>] netdev_notify_peers+0xe/0x20".into()));
            g.stacks.push((9, l.into()));
        }
        let b = match_failover_deadlock(&g).expect("recognised");
        assert_eq!(b.title, "known guest bug: 6.1 iavf deadlocks under net_failover");
        assert!(b.evidence.iter().all(|l| !l.contains("notify_peers")));

        let mut k = GuestState { kernel: Some("6.12.95+deb12-amd64".into()), ..Default::default() };
        k.kernel_log.push("[ 41.6] task:kworker/u2:0 state:D stack:0 pid:9".into());
        k.kernel_log.extend(stack.iter().map(|s| format!("[ 41.7]  {}", &s[6..])));
        k.kernel_log.push("[ 41.8] task:kworker/0:2 state:D".into());
        assert!(match_failover_deadlock(&k).unwrap().title.contains("6.12 iavf"));
        // Frames spread over two tasks are not the deadlock.
        let mut split = GuestState::default();
        split.stacks.push((1, stack[0].into()));
        split.stacks.push((2, stack[2].into()));
        split.stacks.push((2, stack[4].into()));
        assert!(match_failover_deadlock(&split).is_none());
    }

    #[test]
    fn the_qemu_abort_is_recognised() {
        let err = "qemu-system-x86_64: system/memory.c:2617: memory_region_del_subregion: Assertion \
                   `subregion->container == mr' failed.\n";
        assert_eq!(match_qemu_unplug_abort(err).unwrap().id, "qemu-vfio-user-unplug-abort");
        assert!(match_qemu_unplug_abort("qemu-system-x86_64: terminating on signal 15").is_none());
    }
}
