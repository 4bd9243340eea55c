//! The result of a run: [`Report`], written as JSON (`serde_json`) and as JUnit XML (one `<testsuite>`, one
//! `<testcase>` per check).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::guest::{IfSample, KnownBug};
use super::{Flow, UnplugMethod};
use crate::netns::IfCounters;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every check passed.
    Pass,
    /// A check failed.
    Fail,
    /// The run hit a bug the harness recognises (guest kernel or QEMU); `known_bug` says which.
    KnownBug,
    /// The harness could not run the flow (missing prerequisite, a process that did not start, a signal).
    Error,
}

impl Outcome {
    /// The process exit status `vfu-migtest run` uses: 0 pass, 1 fail, 2 error, 3 known bug.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Pass => 0,
            Outcome::Fail => 1,
            Outcome::Error => 2,
            Outcome::KnownBug => 3,
        }
    }
}

/// One check: a JUnit test case.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub message: String,
}

/// QEMU's own account of the migration (the source's last `query-migrate`) and the status changes the harness saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Migration {
    pub status: String,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub ram_transferred_bytes: Option<u64>,
    /// (status, ms since the migration started) as polled every 50 ms.
    pub statuses: Vec<(String, f64)>,
    /// The source's last query-migrate answer, verbatim.
    pub query_migrate: serde_json::Value,
}

/// Echo requests sent and lost in one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub from_ms: Option<f64>,
    pub to_ms: Option<f64>,
    pub sent: u64,
    pub lost: u64,
}

/// The guest's pings (busybox, every `interval_ms`) and where they were lost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pings {
    pub interval_ms: u32,
    /// busybox ping's own totals when it stopped.
    pub transmitted: Option<u64>,
    pub received: u64,
    pub duplicates: u64,
    /// From the first reply to the start: `migrate` (QEMU asks the guest to unplug the failover primary at once),
    /// or the unplug flow's release / device_del.
    pub before: Window,
    /// From the start to the VF being back: the unplug and switchover window.
    pub during: Window,
    /// From the VF being back (the guest has it enslaved and up, and its server's tap saw its first frame) to the
    /// end (requests in flight when the ping was stopped are not counted).
    pub after: Window,
    /// Sequence numbers never answered (the first 200).
    pub lost_seqs: Vec<u64>,
    /// The longest time between two replies, and when it began (ms since the migration started).
    pub longest_gap_ms: f64,
    pub longest_gap_at_ms: Option<f64>,
    /// Ping error messages (e.g. "sendto: Network unreachable").
    pub errors: Vec<String>,
}

/// A span of time during which one device carried the guest's transmitted traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub from_ms: f64,
    pub to_ms: f64,
    /// e.g. "vf eth2 (iavf)", "standby eth1 (virtio_net)" in the guest; "vfS (source VF tap)" on the host.
    pub device: String,
    pub packets: u64,
}

/// Guest counters as sampled (every second).
#[derive(Debug, Clone, Serialize)]
pub struct GuestSample {
    pub t_ms: f64,
    pub side: super::guest::Side,
    pub ifaces: Vec<IfSample>,
}

/// Host-side tap counters in the namespace (every 100 ms): vfS / vfD are the source / destination servers' tap
/// backends, nvS / nvD the source / destination QEMUs' virtio-net taps. rx = frames the guest sent.
#[derive(Debug, Clone, Serialize)]
pub struct HostSample {
    pub t_ms: f64,
    pub taps: BTreeMap<String, IfCounters>,
}

/// Which device carried the traffic when.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Carriers {
    /// From the guest's per-interface tx counters (iavf refreshes its counters every 2 s).
    pub guest: Vec<Segment>,
    /// From the host taps' rx counters, in 500 ms buckets.
    pub host: Vec<Segment>,
}

/// The headline numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub boot_to_network_ms: Option<f64>,
    pub migration_total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// Migration (or unplug) start to the source's primary being unplugged (QEMU's UNPLUG_PRIMARY or
    /// DEVICE_DELETED event, or the guest releasing it).
    pub start_to_unplug_ms: Option<f64>,
    /// The VF leaving the guest to the new VF active again (enslaved, carrier).
    pub unplug_to_replug_ms: Option<f64>,
    /// The switchover (destination RESUME; for a cancel, the source's cancelled status) to the VF active again.
    pub switchover_to_replug_ms: Option<f64>,
    /// The switchover to the first frame from the guest on the VF's tap (host side, 100 ms resolution).
    pub switchover_to_vf_traffic_ms: Option<f64>,
    /// The same from the guest's counters (1-2 s resolution).
    pub switchover_to_vf_traffic_guest_ms: Option<f64>,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub flow: Flow,
    pub unplug_method: Option<UnplugMethod>,
    pub outcome: Outcome,
    /// Why the run failed or could not run (the first failed check, or the error).
    pub reason: Option<String>,
    pub known_bug: Option<KnownBug>,
    /// The guest label (e.g. "7.x") and its kernel release as the guest printed it.
    pub guest: String,
    pub guest_kernel: String,
    pub qemu_version: String,
    pub qemu: String,
    pub server: String,
    pub server_args: Vec<String>,
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub figures: Figures,
    pub migration: Option<Migration>,
    /// Milestones, ms since the migration (or unplug) started; negative = before.
    pub timeline_ms: BTreeMap<String, f64>,
    pub pings: Pings,
    pub carriers: Carriers,
    pub checks: Vec<Check>,
    pub guest_samples: Vec<GuestSample>,
    pub host_samples: Vec<HostSample>,
    /// The QEMU command lines (source, destination).
    pub qemu_commands: Vec<String>,
    /// Where the logs are (consoles, QEMU stderr, server logs); kept unless the run passed.
    pub logs: Option<String>,
}

impl Report {
    pub fn new(flow: Flow, guest: &str) -> Report {
        Report {
            tool: "vfu-migtest",
            version: env!("CARGO_PKG_VERSION"),
            flow,
            unplug_method: None,
            outcome: Outcome::Error,
            reason: None,
            known_bug: None,
            guest: guest.to_string(),
            guest_kernel: String::new(),
            qemu_version: String::new(),
            qemu: String::new(),
            server: String::new(),
            server_args: Vec::new(),
            started_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            duration_s: 0.0,
            figures: Figures::default(),
            migration: None,
            timeline_ms: BTreeMap::new(),
            pings: Pings::default(),
            carriers: Carriers::default(),
            checks: Vec::new(),
            guest_samples: Vec::new(),
            host_samples: Vec::new(),
            qemu_commands: Vec::new(),
            logs: None,
        }
    }

    pub fn check(&mut self, name: &str, passed: bool, message: impl Into<String>) {
        self.checks.push(Check { name: name.to_string(), passed, message: message.into() });
    }

    /// The check named `name`, if it was made.
    pub fn get_check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn failed_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// A short human summary: outcome, figures, checks.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let f = &self.figures;
        let o = |v: Option<f64>| v.map(|x| format!("{x:.0} ms")).unwrap_or_else(|| "-".into());
        let u = |v: Option<u64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "vfu-migtest {:?} on guest {} ({}), QEMU {}: {:?}{}",
            self.flow,
            self.guest,
            self.guest_kernel,
            self.qemu_version,
            self.outcome,
            self.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        );
        if let Some(b) = &self.known_bug {
            let _ = writeln!(s, "  {}", b.title);
        }
        let _ = writeln!(
            s,
            "  migration {} total, {} downtime; start->unplug {}; unplug->re-plug {}; switchover->re-plug {}; \
             switchover->VF traffic {} (host) / {} (guest)",
            u(f.migration_total_ms),
            u(f.downtime_ms),
            o(f.start_to_unplug_ms),
            o(f.unplug_to_replug_ms),
            o(f.switchover_to_replug_ms),
            o(f.switchover_to_vf_traffic_ms),
            o(f.switchover_to_vf_traffic_guest_ms)
        );
        let p = &self.pings;
        let _ = writeln!(
            s,
            "  pings every {} ms: before {}/{} lost, during {}/{} lost, after {}/{} lost; longest gap {:.0} ms",
            p.interval_ms,
            p.before.lost,
            p.before.sent,
            p.during.lost,
            p.during.sent,
            p.after.lost,
            p.after.sent,
            p.longest_gap_ms
        );
        for (name, segs) in [("guest", &self.carriers.guest), ("host", &self.carriers.host)] {
            let list: Vec<String> =
                segs.iter().map(|g| format!("{} [{:.1}s..{:.1}s]", g.device, g.from_ms / 1e3, g.to_ms / 1e3)).collect();
            let _ = writeln!(s, "  carried ({name}): {}", list.join(", "));
        }
        for c in &self.checks {
            let _ = writeln!(s, "  [{}] {}: {}", if c.passed { "ok" } else { "FAIL" }, c.name, c.message);
        }
        if let Some(l) = &self.logs {
            let _ = writeln!(s, "  logs: {l}");
        }
        s
    }

    /// JUnit XML: one `<testsuite>` named after the flow and guest, one `<testcase>` per check (failures carry
    /// their message), an `<error>` test case when the harness could not run, properties with the figures.
    pub fn to_junit(&self) -> String {
        let mut cases = String::new();
        let mut failures = 0;
        let mut errors = 0;
        let class = format!("vfu-migtest.{}.{}", flow_name(self.flow), self.guest);
        for c in &self.checks {
            let _ = write!(cases, "  <testcase classname=\"{}\" name=\"{}\" time=\"0\"", xml(&class), xml(&c.name));
            if c.passed {
                let _ = writeln!(cases, "/>");
            } else {
                failures += 1;
                let _ = writeln!(
                    cases,
                    ">\n    <failure message=\"{}\" type=\"check\">{}</failure>\n  </testcase>",
                    xml(&c.message),
                    xml(&c.message)
                );
            }
        }
        if self.outcome == Outcome::Error {
            errors += 1;
            let why = self.reason.clone().unwrap_or_else(|| "the harness could not run".into());
            let _ = writeln!(
                cases,
                "  <testcase classname=\"{}\" name=\"harness ran the flow\" time=\"{:.3}\">\n    <error message=\"{}\" \
                 type=\"error\">{}</error>\n  </testcase>",
                xml(&class),
                self.duration_s,
                xml(&why),
                xml(&why)
            );
        }
        let tests = self.checks.len() + errors;
        let mut props = String::new();
        let mut prop = |k: &str, v: String| {
            let _ = writeln!(props, "    <property name=\"{}\" value=\"{}\"/>", xml(k), xml(&v));
        };
        prop(
            "outcome",
            serde_json::to_value(self.outcome).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        );
        prop("guest_kernel", self.guest_kernel.clone());
        prop("qemu_version", self.qemu_version.clone());
        if let Some(b) = &self.known_bug {
            prop("known_bug", b.title.clone());
        }
        let f = &self.figures;
        for (k, v) in [
            ("migration_total_ms", f.migration_total_ms.map(|v| v as f64)),
            ("downtime_ms", f.downtime_ms.map(|v| v as f64)),
            ("start_to_unplug_ms", f.start_to_unplug_ms),
            ("unplug_to_replug_ms", f.unplug_to_replug_ms),
            ("switchover_to_replug_ms", f.switchover_to_replug_ms),
            ("switchover_to_vf_traffic_ms", f.switchover_to_vf_traffic_ms),
        ] {
            if let Some(v) = v {
                prop(k, format!("{v:.0}"));
            }
        }
        let p = &self.pings;
        prop("pings_lost_before", format!("{}/{}", p.before.lost, p.before.sent));
        prop("pings_lost_during", format!("{}/{}", p.during.lost, p.during.sent));
        prop("pings_lost_after", format!("{}/{}", p.after.lost, p.after.sent));
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" \
             errors=\"{errors}\" skipped=\"0\" time=\"{:.3}\" timestamp=\"{}\">\n  <properties>\n{props}  </properties>\n\
             {cases}  <system-out>{}</system-out>\n</testsuite>\n",
            xml(&format!("vfu-migtest {} guest {} ({})", flow_name(self.flow), self.guest, self.guest_kernel)),
            self.duration_s,
            iso8601(self.started_unix_s),
            xml(&self.summary())
        )
    }
}

pub fn flow_name(f: Flow) -> &'static str {
    match f {
        Flow::Failover => "failover",
        Flow::Unplug => "unplug",
        Flow::Cancel => "cancel",
    }
}

/// Escapes text for XML attributes and content (and drops characters XML 1.0 forbids).
fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\n' | '\t' | '\r' => o.push(c),
            c if (c as u32) < 0x20 => {}
            c => o.push(c),
        }
    }
    o
}

/// UTC date and time for a Unix time, e.g. 2026-12-03T15:48:09 (JUnit's timestamp attribute).
fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(iso8601(1_796_312_889), "2026-12-03T15:48:09");
    }

    #[test]
    fn junit_has_one_case_per_check_and_escapes() {
        let mut r = Report::new(Flow::Failover, "7.x");
        r.outcome = Outcome::Fail;
        r.check("vf re-plugged on the destination", true, "eth2 after 1.2 s");
        r.check("zero pings lost after re-plug", false, "3 lost: seq <7> & \"8\"");
        let x = r.to_junit();
        assert!(x.starts_with("<?xml"));
        assert_eq!(x.matches("<testsuite ").count(), 1);
        assert_eq!(x.matches("<testcase ").count(), 2);
        assert!(x.contains("tests=\"2\" failures=\"1\" errors=\"0\""));
        assert!(x.contains("seq &lt;7&gt; &amp; &quot;8&quot;"));
        let mut e = Report::new(Flow::Unplug, "6.1");
        e.reason = Some("no QEMU".into());
        assert!(e.to_junit().contains("errors=\"1\""));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["outcome"], "fail");
        assert_eq!(v["flow"], "failover");
    }
}
