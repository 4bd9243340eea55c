//! From what was recorded (guest console, host tap counters, milestones) to the report's figures: ping losses per
//! window, which device carried the traffic when, and when the VF carried traffic again.

use std::collections::BTreeMap;
use std::time::Instant;

use super::guest::{CounterSample, GuestState};
use super::report::{Carriers, GuestSample, HostSample, Pings, Segment, Window};
use crate::netns::IfCounters;

/// Milliseconds from `t0` to `t` (negative when `t` is earlier).
pub fn rel(t0: Instant, t: Instant) -> f64 {
    if t >= t0 {
        (t - t0).as_secs_f64() * 1e3
    } else {
        -((t0 - t).as_secs_f64() * 1e3)
    }
}

/// One host sample: when, and the namespace's interface counters.
#[derive(Debug, Clone)]
pub struct TapSample {
    pub at: Instant,
    pub taps: BTreeMap<String, IfCounters>,
}

impl TapSample {
    pub fn rx(&self, tap: &str) -> u64 {
        self.taps.get(tap).map(|c| c.rx_packets).unwrap_or(0)
    }
}

/// The window boundaries, as ms since the migration started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bounds {
    /// The unplug was asked for: the migration started (failover: QEMU asks the guest to unplug at once), or the
    /// unplug flow's release / device_del. The VF stops carrying traffic from here.
    pub unplug: Option<f64>,
    /// The VF was back (enslaved, carrier) after that.
    pub vf_back: Option<f64>,
    /// The ping was told to stop; requests sent in the 500 ms before are "in flight" and not judged.
    pub stop: Option<f64>,
}

/// Pings per window. Send times: a reply's arrival minus its round trip; a lost request's is interpolated between
/// its answered neighbours by sequence number.
pub fn pings(g: &GuestState, t0: Instant, interval_ms: u32, b: Bounds) -> Pings {
    let mut p = Pings {
        interval_ms,
        transmitted: g.totals.map(|t| t.0),
        received: g.replies.len() as u64,
        duplicates: g.duplicates,
        errors: g.ping_other.iter().take(20).cloned().collect(),
        ..Default::default()
    };
    let sent_at: BTreeMap<u64, f64> = g.replies.iter().map(|(&s, r)| (s, rel(t0, r.at) - r.rtt_ms)).collect();
    let Some((&first, _)) = sent_at.iter().next() else { return p };
    let last_received = *sent_at.keys().next_back().unwrap_or(&first);
    let last = g.totals.map(|t| t.0.saturating_sub(1)).unwrap_or(last_received).max(last_received);
    let step = f64::from(interval_ms);
    let estimate = |seq: u64| -> f64 {
        if let Some(&t) = sent_at.get(&seq) {
            return t;
        }
        let prev = sent_at.range(..seq).next_back();
        let next = sent_at.range(seq..).next();
        match (prev, next) {
            (Some((&a, &ta)), Some((&n, &tn))) => ta + (tn - ta) * (seq - a) as f64 / (n - a) as f64,
            (Some((&a, &ta)), None) => ta + (seq - a) as f64 * step,
            (None, Some((&n, &tn))) => tn - (n - seq) as f64 * step,
            (None, None) => 0.0,
        }
    };
    let cutoff = b.stop.map(|s| s - 500.0).unwrap_or(f64::INFINITY);
    let mut before = Window { to_ms: b.unplug, from_ms: Some(estimate(first)), ..Default::default() };
    let mut during = Window { from_ms: b.unplug, to_ms: b.vf_back, ..Default::default() };
    let mut after = Window { from_ms: b.vf_back, to_ms: Some(cutoff.min(estimate(last))), ..Default::default() };
    for seq in first..=last {
        let t = estimate(seq);
        if t > cutoff {
            continue;
        }
        let lost = !sent_at.contains_key(&seq);
        let w = match (b.unplug, b.vf_back) {
            (Some(g), _) if t < g => &mut before,
            (None, _) => &mut before,
            (Some(_), Some(back)) if t >= back => &mut after,
            _ => &mut during,
        };
        w.sent += 1;
        if lost {
            w.lost += 1;
            if p.lost_seqs.len() < 200 {
                p.lost_seqs.push(seq);
            }
        }
    }
    // Longest silence between two replies (by arrival).
    let mut arrivals: Vec<f64> = g.replies.values().map(|r| rel(t0, r.at)).filter(|&t| t <= cutoff + 500.0).collect();
    arrivals.sort_by(f64::total_cmp);
    for w in arrivals.windows(2) {
        if w[1] - w[0] > p.longest_gap_ms {
            p.longest_gap_ms = w[1] - w[0];
            p.longest_gap_at_ms = Some(w[0]);
        }
    }
    (p.before, p.during, p.after) = (before, during, after);
    p
}

fn label(i: &super::guest::IfSample) -> String {
    let role = if i.driver == "iavf" { "vf" } else { "standby" };
    format!("{role} {} ({})", i.name, i.driver)
}

fn push_segment(segs: &mut Vec<Segment>, from: f64, to: f64, device: String, packets: u64) {
    if let Some(last) = segs.last_mut() {
        if last.device == device {
            last.to_ms = to;
            last.packets += packets;
            return;
        }
    }
    segs.push(Segment { from_ms: from, to_ms: to, device, packets });
}

/// Which guest interface carried the transmitted traffic, second by second: the lower device (one with a master:
/// the VF or the standby) whose tx counter grew most. iavf refreshes its counters only every 2 s, so an interval
/// where nothing grew keeps the previous carrier.
pub fn guest_carriers(samples: &[CounterSample], t0: Instant) -> Vec<Segment> {
    let mut segs = Vec::new();
    let mut current: Option<String> = None;
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let best = b
            .ifaces
            .iter()
            .filter(|i| i.master != "-" && i.driver != "-")
            .map(|i| (i, i.tx.saturating_sub(a.iface(&i.name).map(|x| x.tx).unwrap_or(0))))
            .max_by_key(|(_, d)| *d);
        let (dev, n) = match best {
            Some((i, d)) if d > 0 => (label(i), d),
            _ => (current.clone().unwrap_or_else(|| "none".into()), 0),
        };
        current = Some(dev.clone());
        push_segment(&mut segs, rel(t0, a.at), rel(t0, b.at), dev, n);
    }
    segs
}

/// The host's view: which tap received the guest's frames, in 500 ms buckets (vfS/vfD: the source/destination
/// server's tap, that is the VF; nvS/nvD: the source/destination QEMU's virtio-net tap).
pub fn host_carriers(samples: &[TapSample], t0: Instant) -> Vec<Segment> {
    const TAPS: [(&str, &str); 4] = [
        ("vfS", "vfS (source VF)"),
        ("vfD", "vfD (destination VF)"),
        ("nvS", "nvS (source standby)"),
        ("nvD", "nvD (destination standby)"),
    ];
    let mut segs = Vec::new();
    let Some(first) = samples.first() else { return segs };
    let mut start = first;
    for s in samples.iter().skip(1) {
        if (s.at - start.at).as_millis() < 500 && !std::ptr::eq(s, samples.last().unwrap_or(s)) {
            continue;
        }
        let best = TAPS.iter().map(|(t, l)| (*l, s.rx(t).saturating_sub(start.rx(t)))).max_by_key(|(_, d)| *d);
        let (dev, n) = match best {
            Some((l, d)) if d > 0 => (l.to_string(), d),
            _ => ("idle".to_string(), 0),
        };
        push_segment(&mut segs, rel(t0, start.at), rel(t0, s.at), dev, n);
        start = s;
    }
    segs
}

/// The first host sample after `since` in which `tap` received more frames than at `since`: the device carrying
/// the guest's traffic again. Returns its time.
pub fn first_growth(samples: &[TapSample], tap: &str, since: Instant) -> Option<Instant> {
    let base = samples.iter().rev().find(|s| s.at <= since).map(|s| s.rx(tap)).unwrap_or(0);
    samples.iter().find(|s| s.at > since && s.rx(tap) > base).map(|s| s.at)
}

/// Frames `tap` received in [from, to] and the frames all guest-facing taps received then.
pub fn tap_share(samples: &[TapSample], tap: &str, from: Instant, to: Instant) -> (u64, u64) {
    let at = |t: Instant| samples.iter().rev().find(|s| s.at <= t).or(samples.first());
    let (Some(a), Some(b)) = (at(from), at(to)) else { return (0, 0) };
    let d = |t: &str| b.rx(t).saturating_sub(a.rx(t));
    (d(tap), ["vfS", "vfD", "nvS", "nvD"].iter().map(|t| d(t)).sum())
}

/// The guest's VF tx packets and all lower devices' tx packets between the last sample at or before `from` and the
/// last sample at or before `to`. Interfaces are matched by name, so a VF that left and came back counts from 0.
pub fn guest_vf_share(samples: &[CounterSample], from: Instant, to: Instant) -> (u64, u64) {
    let a = samples.iter().rev().find(|s| s.at <= from);
    let Some(b) = samples.iter().rev().find(|s| s.at <= to) else { return (0, 0) };
    let mut vf = 0;
    let mut all = 0;
    for i in b.ifaces.iter().filter(|i| i.master != "-" && i.driver != "-") {
        let before = a.and_then(|a| a.iface(&i.name)).map(|x| x.tx).unwrap_or(0);
        let d = i.tx.saturating_sub(before);
        all += d;
        if i.driver == "iavf" {
            vf += d;
        }
    }
    (vf, all)
}

/// Whether a guest sample after `from` shows the VF's tx counter above what the last sample at or before `from`
/// showed (iavf refreshes its counters every 2 s, and the guest samples them every second, later under load).
pub fn vf_tx_grew(samples: &[CounterSample], from: Instant) -> bool {
    let base = samples.iter().rev().find(|s| s.at <= from).map(|s| s.tx_of_driver("iavf")).unwrap_or(0);
    samples.iter().any(|s| s.at > from && s.tx_of_driver("iavf") > base)
}

/// Samples for the report.
pub fn guest_samples(samples: &[CounterSample], t0: Instant) -> Vec<GuestSample> {
    samples.iter().map(|s| GuestSample { t_ms: rel(t0, s.at), side: s.side, ifaces: s.ifaces.clone() }).collect()
}

/// Host samples for the report, thinned to one a second plus the last.
pub fn host_samples(samples: &[TapSample], t0: Instant) -> Vec<HostSample> {
    let mut out = Vec::new();
    let mut last: Option<Instant> = None;
    for (i, s) in samples.iter().enumerate() {
        if last.is_none_or(|l| (s.at - l).as_millis() >= 1000) || i + 1 == samples.len() {
            let taps = s.taps.iter().filter(|(k, _)| k.as_str() != "lo").map(|(k, v)| (k.clone(), *v)).collect();
            out.push(HostSample { t_ms: rel(t0, s.at), taps });
            last = Some(s.at);
        }
    }
    out
}

/// Both carriers tables.
pub fn carriers(g: &GuestState, hosts: &[TapSample], t0: Instant) -> Carriers {
    Carriers { guest: guest_carriers(&g.counters, t0), host: host_carriers(hosts, t0) }
}

#[cfg(test)]
mod tests {
    use super::super::guest::Reply;
    use super::*;
    use std::time::Duration;

    #[test]
    fn pings_are_split_by_window_and_lost_ones_interpolated() {
        let t0 = Instant::now();
        let mut g = GuestState::default();
        // seq n sent at n*50 ms, answered 1 ms later, except 10..=19 (during) and 30 (after).
        for seq in 0..40u64 {
            if (10..20).contains(&seq) || seq == 30 {
                continue;
            }
            g.replies.insert(seq, Reply { at: t0 + Duration::from_millis(seq * 50 + 1), rtt_ms: 1.0 });
        }
        g.totals = Some((42, 29));
        let b = Bounds { unplug: Some(475.0), vf_back: Some(1025.0), stop: Some(2100.0) };
        let p = pings(&g, t0, 50, b);
        assert_eq!((p.before.sent, p.before.lost), (10, 0));
        assert_eq!((p.during.sent, p.during.lost), (11, 10)); // 10..=20 (20 sent at 1000 ms)
                                                              // 21..=41 minus those in flight at the stop (sent after 1600 ms: 33..): 21..=32.
        assert_eq!((p.after.sent, p.after.lost), (12, 1));
        assert_eq!(p.lost_seqs[..3], [10, 11, 12]);
        assert!((p.longest_gap_ms - 550.0).abs() < 1.0, "{}", p.longest_gap_ms);
    }
}
