//! Fault injection (`--fault NAME[=ARG]`, docs/faults.md): which faults are set, their arguments, the counters and
//! the seeded random stream that decide when one fires. One [`Faults`] is shared by the device (its engines and
//! register front), guest memory (dirty-miss) and the server (slow-mmio, migration faults, disconnect-after), and
//! changed at run time by the control socket. A fault that is not set costs one relaxed atomic load where it hooks.
//!
//! Determinism: every decision is a counter (every Nth) or a draw from one xorshift stream seeded by `--seed`,
//! so the same seed and the same sequence of events give the same faults.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::nic::virtchnl::*;

/// A fault with its argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// VF resets never finish: VFGEN_RSTAT stays in reset, the driver never sees VFACTIVE.
    ResetStuck,
    /// Every VF reset takes this many milliseconds longer before VFACTIVE.
    ResetSlow(u64),
    /// Every Nth virtchnl reply from the PF is dropped (never delivered to the ARQ).
    AqDrop(u32),
    /// Requests with this virtchnl opcode are answered with an error status (VIRTCHNL_STATUS_ERR_PARAM).
    AqError(u32),
    /// The link is reported down (and stays down while set).
    LinkDown,
    /// The link goes down and up every this many milliseconds.
    LinkFlap(u64),
    /// TX descriptors are no longer completed (no write-back, no head advance, no frame sent).
    TxHang,
    /// This percentage of received frames is dropped before they reach an RX ring.
    RxDrop(u8),
    /// This percentage of MSI-X interrupts is not delivered.
    IrqDrop(u8),
    /// The next guest-memory access of a device engine fails; the device reports it as hardware does (the
    /// queue stops and the PF resets the VF, like a malicious-driver detection). One-shot: cleared when it fires.
    DmaError,
    /// Every BAR access is answered this many microseconds late.
    SlowMmio(u64),
    /// The migration transition into this state fails: the device goes to ERROR.
    MigFail(u32),
    /// The device-state stream is corrupted in flight (one byte of the data the source gives is flipped).
    MigCorrupt,
    /// Every Nth page the device writes is left out of the dirty log.
    DirtyMiss(u32),
    /// The server drops the client after this many messages.
    DisconnectAfter(u64),
}

/// Each fault's name, its argument's form and what it does: the list an error for a bad `--fault` shows.
pub const FAULTS: &[(&str, &str, &str)] = &[
    ("reset-stuck", "", "VF resets never finish (VFGEN_RSTAT never reaches VFACTIVE)"),
    ("reset-slow", "MS", "VF resets take MS milliseconds longer"),
    ("aq-drop", "N", "drop every Nth virtchnl reply"),
    ("aq-error", "OP", "answer virtchnl opcode OP (a number or a name such as config_rss_key) with an error"),
    ("link-down", "", "report the link down"),
    ("link-flap", "MS", "take the link down and up every MS milliseconds"),
    ("tx-hang", "", "stop completing TX descriptors"),
    ("rx-drop", "PERCENT", "drop PERCENT of received frames"),
    ("irq-drop", "PERCENT", "drop PERCENT of MSI-X interrupts"),
    ("dma-error", "", "fail the next guest-memory access (the PF resets the VF)"),
    ("slow-mmio", "US", "answer every BAR access US microseconds late"),
    ("mig-fail", "STATE", "the migration transition into STATE (stop, running, stop_copy, resuming, pre_copy) fails"),
    ("mig-corrupt", "", "corrupt the device-state stream in flight"),
    ("dirty-miss", "N", "leave every Nth page the device writes out of the dirty log"),
    ("disconnect-after", "N", "drop the client after N messages"),
];

/// Migration states by name (vfio uapi numbers), for mig-fail.
pub const MIG_STATES: &[(&str, u32)] =
    &[("stop", 1), ("running", 2), ("stop_copy", 3), ("resuming", 4), ("running_p2p", 5), ("pre_copy", 6)];

/// virtchnl opcodes by name, for aq-error.
pub const VIRTCHNL_OPS: &[(&str, u32)] = &[
    ("version", OP_VERSION),
    ("reset_vf", OP_RESET_VF),
    ("get_vf_resources", OP_GET_VF_RESOURCES),
    ("config_tx_queue", OP_CONFIG_TX_QUEUE),
    ("config_rx_queue", OP_CONFIG_RX_QUEUE),
    ("config_vsi_queues", OP_CONFIG_VSI_QUEUES),
    ("config_irq_map", OP_CONFIG_IRQ_MAP),
    ("enable_queues", OP_ENABLE_QUEUES),
    ("disable_queues", OP_DISABLE_QUEUES),
    ("add_eth_addr", OP_ADD_ETH_ADDR),
    ("del_eth_addr", OP_DEL_ETH_ADDR),
    ("config_promiscuous_mode", OP_CONFIG_PROMISCUOUS_MODE),
    ("get_stats", OP_GET_STATS),
    ("config_rss_key", OP_CONFIG_RSS_KEY),
    ("config_rss_lut", OP_CONFIG_RSS_LUT),
    ("get_rss_hena_caps", OP_GET_RSS_HENA_CAPS),
    ("set_rss_hena", OP_SET_RSS_HENA),
];

fn valid_list() -> String {
    FAULTS
        .iter()
        .map(|(n, a, _)| if a.is_empty() { (*n).to_string() } else { format!("{n}={a}") })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Fault {
    /// The fault's name (its `--fault` spelling without the argument).
    pub fn name(&self) -> &'static str {
        FAULTS[self.index()].0
    }

    fn index(&self) -> usize {
        match self {
            Fault::ResetStuck => 0,
            Fault::ResetSlow(_) => 1,
            Fault::AqDrop(_) => 2,
            Fault::AqError(_) => 3,
            Fault::LinkDown => 4,
            Fault::LinkFlap(_) => 5,
            Fault::TxHang => 6,
            Fault::RxDrop(_) => 7,
            Fault::IrqDrop(_) => 8,
            Fault::DmaError => 9,
            Fault::SlowMmio(_) => 10,
            Fault::MigFail(_) => 11,
            Fault::MigCorrupt => 12,
            Fault::DirtyMiss(_) => 13,
            Fault::DisconnectAfter(_) => 14,
        }
    }

    fn bit(&self) -> u32 {
        1 << self.index()
    }

    /// The argument as `--fault` spells it, if the fault takes one.
    pub fn arg(&self) -> Option<String> {
        match *self {
            Fault::ResetSlow(v) | Fault::LinkFlap(v) | Fault::SlowMmio(v) | Fault::DisconnectAfter(v) => {
                Some(v.to_string())
            }
            Fault::AqDrop(v) | Fault::DirtyMiss(v) => Some(v.to_string()),
            Fault::RxDrop(v) | Fault::IrqDrop(v) => Some(v.to_string()),
            Fault::AqError(op) => Some(
                VIRTCHNL_OPS.iter().find(|(_, o)| *o == op).map(|(n, _)| (*n).to_string()).unwrap_or(op.to_string()),
            ),
            Fault::MigFail(s) => {
                Some(MIG_STATES.iter().find(|(_, v)| *v == s).map(|(n, _)| (*n).to_string()).unwrap_or(s.to_string()))
            }
            Fault::ResetStuck | Fault::LinkDown | Fault::TxHang | Fault::DmaError | Fault::MigCorrupt => None,
        }
    }

    /// Parses `NAME[=ARG]`. Errors name the valid faults and arguments.
    pub fn parse(spec: &str) -> Result<Fault, String> {
        let (name, arg) = match spec.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (spec.trim(), None),
        };
        let Some((_, form, _)) = FAULTS.iter().find(|(n, _, _)| *n == name) else {
            return Err(format!("unknown fault '{name}'; valid: {}", valid_list()));
        };
        let need = |what: &str| -> Result<&str, String> {
            arg.filter(|a| !a.is_empty()).ok_or_else(|| format!("fault {name} needs an argument: {name}={what}"))
        };
        let num = |max: u64, min: u64| -> Result<u64, String> {
            let a = need(form)?;
            let v: u64 = a.parse().map_err(|_| format!("fault {name}: '{a}' is not a number ({name}={form})"))?;
            if v < min || v > max {
                return Err(format!("fault {name}: {v} is out of range ({min} to {max})"));
            }
            Ok(v)
        };
        if form.is_empty() {
            if let Some(a) = arg {
                return Err(format!("fault {name} takes no argument (got '{a}')"));
            }
        }
        const DAY_MS: u64 = 86_400_000;
        Ok(match name {
            "reset-stuck" => Fault::ResetStuck,
            "reset-slow" => Fault::ResetSlow(num(DAY_MS, 1)?),
            "aq-drop" => Fault::AqDrop(num(u32::MAX as u64, 1)? as u32),
            "aq-error" => {
                let a = need(form)?;
                let op = match a.parse::<u32>() {
                    Ok(v) => v,
                    Err(_) => {
                        let key = a.to_ascii_lowercase().replace('-', "_");
                        let key = key.strip_prefix("virtchnl_op_").unwrap_or(&key);
                        VIRTCHNL_OPS.iter().find(|(n, _)| *n == key).map(|(_, o)| *o).ok_or_else(|| {
                            format!(
                                "fault aq-error: '{a}' is not a virtchnl opcode; use a number or one of {}",
                                VIRTCHNL_OPS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                            )
                        })?
                    }
                };
                Fault::AqError(op)
            }
            "link-down" => Fault::LinkDown,
            "link-flap" => Fault::LinkFlap(num(DAY_MS, 10)?),
            "tx-hang" => Fault::TxHang,
            "rx-drop" => Fault::RxDrop(num(100, 0)? as u8),
            "irq-drop" => Fault::IrqDrop(num(100, 0)? as u8),
            "dma-error" => Fault::DmaError,
            "slow-mmio" => Fault::SlowMmio(num(10_000_000, 1)?),
            "mig-fail" => {
                let a = need(form)?.to_ascii_lowercase().replace('-', "_");
                let s = MIG_STATES.iter().find(|(n, _)| *n == a).map(|(_, v)| *v).ok_or_else(|| {
                    format!(
                        "fault mig-fail: '{a}' is not a migration state; use one of {}",
                        MIG_STATES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    )
                })?;
                Fault::MigFail(s)
            }
            "mig-corrupt" => Fault::MigCorrupt,
            "dirty-miss" => Fault::DirtyMiss(num(u32::MAX as u64, 1)? as u32),
            "disconnect-after" => Fault::DisconnectAfter(num(u64::MAX, 1)?),
            _ => unreachable!("every name in FAULTS is parsed"),
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.arg() {
            Some(a) => write!(f, "{}={a}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// What happens to a virtchnl reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AqVerdict {
    Deliver,
    /// aq-drop: never delivered.
    Drop,
    /// aq-error: delivered with an error status instead of the real answer.
    Error,
}

#[derive(Debug)]
struct Inner {
    set: Vec<Fault>,
    rng: u64,
    aq_replies: u64,
    dirty_pages: u64,
    fired: [u64; FAULTS.len()],
}

/// The faults set on one server, shared by everything that hooks one.
#[derive(Debug)]
pub struct Faults {
    /// Bit i: FAULTS[i] is set. Hooks test it before taking the lock.
    active: AtomicU32,
    inner: Mutex<Inner>,
    seed: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::new(0)
    }
}

/// splitmix64: turns any seed (0 too) into a good xorshift state.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

impl Faults {
    /// No fault set; random decisions drawn from `seed`.
    pub fn new(seed: u64) -> Faults {
        Faults {
            active: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                set: Vec::new(),
                rng: mix(seed),
                aq_replies: 0,
                dirty_pages: 0,
                fired: [0; FAULTS.len()],
            }),
            seed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Sets `f`, replacing the same fault's earlier argument. Counters restart.
    pub fn set(&self, f: Fault) {
        let mut g = self.lock();
        g.set.retain(|x| x.name() != f.name());
        g.set.push(f);
        g.aq_replies = 0;
        g.dirty_pages = 0;
        self.active.fetch_or(f.bit(), Ordering::SeqCst);
        log::warn!("fault set: {f}");
    }

    /// Clears the fault named `name`; false if it was not set.
    pub fn clear(&self, name: &str) -> bool {
        let mut g = self.lock();
        let before = g.set.len();
        g.set.retain(|x| x.name() != name);
        let cleared = g.set.len() != before;
        if cleared {
            let bit = 1 << FAULTS.iter().position(|(n, _, _)| *n == name).expect("a set fault has a known name");
            self.active.fetch_and(!bit, Ordering::SeqCst);
            log::warn!("fault cleared: {name}");
        }
        cleared
    }

    /// Clears every fault.
    pub fn clear_all(&self) {
        let mut g = self.lock();
        g.set.clear();
        self.active.store(0, Ordering::SeqCst);
    }

    /// The faults set, in the order they were set.
    pub fn list(&self) -> Vec<Fault> {
        self.lock().set.clone()
    }

    /// How many times each fault has fired (taken effect), by name, for every fault that fired at least once.
    pub fn fired(&self) -> Vec<(&'static str, u64)> {
        let g = self.lock();
        FAULTS.iter().zip(g.fired.iter()).filter(|(_, n)| **n > 0).map(|((name, _, _), n)| (*name, *n)).collect()
    }

    /// The fault named like `probe` if set (its argument is the set one's). One atomic load when none is.
    fn get(&self, probe: Fault) -> Option<Fault> {
        if self.active.load(Ordering::Relaxed) & probe.bit() == 0 {
            return None;
        }
        self.lock().set.iter().copied().find(|x| x.name() == probe.name())
    }

    fn count(&self, probe: Fault) {
        self.lock().fired[probe.index()] += 1;
    }

    /// True with probability `pct`%, from the seeded stream.
    fn draw(&self, pct: u8) -> bool {
        if pct >= 100 {
            return true;
        }
        if pct == 0 {
            return false;
        }
        let mut g = self.lock();
        let mut x = g.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        g.rng = x;
        x % 100 < u64::from(pct)
    }

    // ---- hooks: each answers one question at the place the fault acts ----

    /// Whether the fault named `name` is set, without counting it as fired: for a hook that re-checks a fault it
    /// already acted on (a reset held by reset-stuck). One atomic load.
    pub fn is_set(&self, name: &str) -> bool {
        FAULTS
            .iter()
            .position(|(n, _, _)| *n == name)
            .is_some_and(|i| self.active.load(Ordering::Relaxed) & (1 << i) != 0)
    }

    /// reset-stuck: the VF reset in progress must never finish.
    pub fn reset_stuck(&self) -> bool {
        let on = self.get(Fault::ResetStuck).is_some();
        if on {
            self.count(Fault::ResetStuck);
        }
        on
    }

    /// reset-slow: extra time before a VF reset finishes.
    pub fn reset_delay(&self) -> Option<Duration> {
        match self.get(Fault::ResetSlow(0)) {
            Some(Fault::ResetSlow(ms)) => {
                self.count(Fault::ResetSlow(0));
                Some(Duration::from_millis(ms))
            }
            _ => None,
        }
    }

    /// aq-drop / aq-error: what to do with the PF's reply to virtchnl `op`.
    pub fn aq_reply(&self, op: u32) -> AqVerdict {
        if self.active.load(Ordering::Relaxed) & (Fault::AqDrop(0).bit() | Fault::AqError(0).bit()) == 0 {
            return AqVerdict::Deliver;
        }
        if let Some(Fault::AqError(e)) = self.get(Fault::AqError(0)) {
            if e == op {
                self.count(Fault::AqError(0));
                return AqVerdict::Error;
            }
        }
        // RESET_VF gets no reply: nothing to drop, and it does not count.
        if op == OP_RESET_VF {
            return AqVerdict::Deliver;
        }
        if let Some(Fault::AqDrop(n)) = self.get(Fault::AqDrop(0)) {
            let mut g = self.lock();
            g.aq_replies += 1;
            if g.aq_replies.is_multiple_of(u64::from(n)) {
                g.fired[Fault::AqDrop(0).index()] += 1;
                return AqVerdict::Drop;
            }
        }
        AqVerdict::Deliver
    }

    /// link-down: the link is forced down.
    pub fn link_down(&self) -> bool {
        self.get(Fault::LinkDown).is_some()
    }

    /// link-flap: the flap period.
    pub fn link_flap(&self) -> Option<Duration> {
        match self.get(Fault::LinkFlap(0)) {
            Some(Fault::LinkFlap(ms)) => Some(Duration::from_millis(ms)),
            _ => None,
        }
    }

    /// Counts one link transition made by link-down or link-flap.
    pub fn link_fired(&self, flap: bool) {
        self.count(if flap { Fault::LinkFlap(0) } else { Fault::LinkDown });
    }

    /// tx-hang: TX descriptors are not completed.
    pub fn tx_hang(&self) -> bool {
        self.get(Fault::TxHang).is_some()
    }

    /// Counts descriptors tx-hang held back.
    pub fn tx_hang_fired(&self) {
        self.count(Fault::TxHang);
    }

    /// rx-drop: drop this received frame.
    pub fn drop_rx(&self) -> bool {
        match self.get(Fault::RxDrop(0)) {
            Some(Fault::RxDrop(p)) if self.draw(p) => {
                self.count(Fault::RxDrop(0));
                true
            }
            _ => false,
        }
    }

    /// irq-drop: do not deliver this interrupt.
    pub fn drop_irq(&self) -> bool {
        match self.get(Fault::IrqDrop(0)) {
            Some(Fault::IrqDrop(p)) if self.draw(p) => {
                self.count(Fault::IrqDrop(0));
                true
            }
            _ => false,
        }
    }

    /// dma-error: true once (the fault clears itself): this guest-memory access fails.
    pub fn take_dma_error(&self) -> bool {
        if self.active.load(Ordering::Relaxed) & Fault::DmaError.bit() == 0 {
            return false;
        }
        let mut g = self.lock();
        let before = g.set.len();
        g.set.retain(|x| *x != Fault::DmaError);
        if g.set.len() == before {
            return false;
        }
        g.fired[Fault::DmaError.index()] += 1;
        self.active.fetch_and(!Fault::DmaError.bit(), Ordering::SeqCst);
        true
    }

    /// slow-mmio: how late to answer a BAR access.
    pub fn mmio_delay(&self) -> Option<Duration> {
        match self.get(Fault::SlowMmio(0)) {
            Some(Fault::SlowMmio(us)) => {
                self.count(Fault::SlowMmio(0));
                Some(Duration::from_micros(us))
            }
            _ => None,
        }
    }

    /// mig-fail: the transition into migration state `to` must fail.
    pub fn mig_fail(&self, to: u32) -> bool {
        match self.get(Fault::MigFail(0)) {
            Some(Fault::MigFail(s)) if s == to => {
                self.count(Fault::MigFail(0));
                true
            }
            _ => false,
        }
    }

    /// mig-corrupt: corrupt the device-state data being read.
    pub fn mig_corrupt(&self) -> bool {
        self.get(Fault::MigCorrupt).is_some()
    }

    /// Counts one corrupted chunk.
    pub fn mig_corrupt_fired(&self) {
        self.count(Fault::MigCorrupt);
    }

    /// dirty-miss is set: the dirty log's hot path looks at this (one relaxed atomic load) before going page by page.
    #[inline]
    pub fn dirty_miss_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) & Fault::DirtyMiss(0).bit() != 0
    }

    /// dirty-miss: leave this newly written page out of the dirty log (every Nth page the device marks).
    pub fn miss_dirty_page(&self) -> bool {
        let Some(Fault::DirtyMiss(n)) = self.get(Fault::DirtyMiss(0)) else { return false };
        let mut g = self.lock();
        g.dirty_pages += 1;
        if g.dirty_pages.is_multiple_of(u64::from(n)) {
            g.fired[Fault::DirtyMiss(0).index()] += 1;
            return true;
        }
        false
    }

    /// disconnect-after: the message count at which the server drops the client.
    pub fn disconnect_after(&self) -> Option<u64> {
        match self.get(Fault::DisconnectAfter(0)) {
            Some(Fault::DisconnectAfter(n)) => Some(n),
            _ => None,
        }
    }

    /// Counts one disconnect made by disconnect-after.
    pub fn disconnect_fired(&self) {
        self.count(Fault::DisconnectAfter(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_parses_and_prints_back() {
        for (name, form, _) in FAULTS {
            let spec = match *form {
                "" => name.to_string(),
                "OP" => format!("{name}=config_rss_key"),
                "STATE" => format!("{name}=stop_copy"),
                _ => format!("{name}=70"),
            };
            let f = Fault::parse(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(f.to_string(), spec);
            assert_eq!(f.name(), *name);
        }
        assert_eq!(Fault::parse("aq-error=24"), Ok(Fault::AqError(OP_CONFIG_RSS_LUT)));
        assert_eq!(Fault::parse("aq-error=VIRTCHNL_OP_ENABLE_QUEUES"), Ok(Fault::AqError(OP_ENABLE_QUEUES)));
        assert_eq!(Fault::parse("mig-fail=PRE-COPY"), Ok(Fault::MigFail(6)));
    }

    #[test]
    fn bad_specs_say_what_is_valid() {
        let e = Fault::parse("frobnicate").unwrap_err();
        assert!(e.contains("unknown fault 'frobnicate'") && e.contains("reset-stuck") && e.contains("rx-drop=PERCENT"));
        assert!(Fault::parse("rx-drop").unwrap_err().contains("needs an argument: rx-drop=PERCENT"));
        assert!(Fault::parse("rx-drop=101").unwrap_err().contains("out of range"));
        assert!(Fault::parse("rx-drop=x").unwrap_err().contains("not a number"));
        assert!(Fault::parse("tx-hang=1").unwrap_err().contains("takes no argument"));
        assert!(Fault::parse("aq-drop=0").unwrap_err().contains("out of range"));
        assert!(Fault::parse("aq-error=nope").unwrap_err().contains("config_rss_key"));
        assert!(Fault::parse("mig-fail=flying").unwrap_err().contains("stop_copy"));
        assert!(Fault::parse("link-flap=1").unwrap_err().contains("out of range"));
    }

    #[test]
    fn counters_fire_every_nth_and_draws_follow_the_seed() {
        let f = Faults::new(1);
        f.set(Fault::AqDrop(3));
        let v: Vec<_> = (0..6).map(|_| f.aq_reply(OP_GET_STATS)).collect();
        assert_eq!(v.iter().filter(|x| **x == AqVerdict::Drop).count(), 2);
        assert_eq!(v[2], AqVerdict::Drop);
        f.set(Fault::AqError(OP_GET_STATS));
        assert_eq!(f.aq_reply(OP_GET_STATS), AqVerdict::Error);
        assert!(f.clear("aq-error") && f.clear("aq-drop") && !f.clear("aq-drop"));
        assert_eq!(f.aq_reply(OP_GET_STATS), AqVerdict::Deliver);

        let run = |seed| {
            let f = Faults::new(seed);
            f.set(Fault::RxDrop(30));
            (0..1000).map(|_| f.drop_rx()).collect::<Vec<_>>()
        };
        let (a, b, c) = (run(42), run(42), run(43));
        assert_eq!(a, b, "the same seed gives the same drops");
        assert_ne!(a, c);
        let n = a.iter().filter(|x| **x).count();
        assert!((220..380).contains(&n), "about 30% dropped: {n}");
    }

    #[test]
    fn dma_error_fires_once_and_unset_faults_do_nothing() {
        let f = Faults::new(0);
        assert!(!f.take_dma_error() && !f.tx_hang() && !f.drop_irq() && f.mmio_delay().is_none());
        f.set(Fault::DmaError);
        assert!(f.take_dma_error());
        assert!(!f.take_dma_error());
        assert!(f.list().is_empty());
        assert_eq!(f.fired(), vec![("dma-error", 1)]);
    }
}
