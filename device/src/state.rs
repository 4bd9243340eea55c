//! The device's state as plain data: everything a destination needs to continue where the source stopped, and
//! nothing that belongs to a process (eventfds, the packet backend, memfds, guest memory). Every struct here
//! derives serde's traits; [`DeviceState::validate`] checks one that came from outside against the device it is
//! about to be loaded into, because a migration stream is untrusted input.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cfg::{Doorbells, VfConfig};
use crate::nic::adminq::{ArqMsg, MAX_MSG};
use crate::nic::regs::{is_register, RegFile};
use crate::nic::stats::QueueStats;
use crate::nic::virtchnl::{LinkSpeed, Pf};
use crate::pci::MsixState;

/// BAR0 writes held while the device is paused, at most; more are dropped (logged and counted).
pub const MAX_HELD_WRITES: usize = 4096;

/// What a destination checks before anything else: the device it would become.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// PCI vendor and device ID.
    pub vendor: u16,
    pub device: u16,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub msix_vectors: u16,
    pub doorbells: Doorbells,
    pub link_speed: LinkSpeed,
}

impl Identity {
    pub fn of(cfg: &VfConfig) -> Self {
        Identity {
            vendor: crate::pci::config::VENDOR_INTEL,
            device: crate::pci::config::DEVICE_I40E_VF,
            mac: cfg.mac,
            queue_pairs: cfg.queue_pairs,
            msix_vectors: cfg.msix_vectors(),
            doorbells: cfg.doorbells,
            link_speed: cfg.link_speed,
        }
    }

    /// Every way `self` (saved) differs from `here`, or Ok.
    pub fn check(&self, here: &Identity) -> Result<(), StateError> {
        let mut diffs = Vec::new();
        if (self.vendor, self.device) != (here.vendor, here.device) {
            diffs.push(format!(
                "device {:04x}:{:04x}, this one is {:04x}:{:04x}",
                self.vendor, self.device, here.vendor, here.device
            ));
        }
        if self.mac != here.mac {
            diffs.push(format!("MAC {}, this device's is {}", mac_str(&self.mac), mac_str(&here.mac)));
        }
        if self.queue_pairs != here.queue_pairs {
            diffs.push(format!("{} queue pairs, this device has {}", self.queue_pairs, here.queue_pairs));
        }
        if self.msix_vectors != here.msix_vectors {
            diffs.push(format!("{} MSI-X vectors, this device has {}", self.msix_vectors, here.msix_vectors));
        }
        if self.doorbells != here.doorbells {
            diffs.push(format!("doorbells {}, this device's are {}", self.doorbells.name(), here.doorbells.name()));
        }
        if self.link_speed != here.link_speed {
            diffs.push(format!("link speed {} Mbps, this device's is {}", self.link_speed.0, here.link_speed.0));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(StateError::Mismatch(diffs))
        }
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// One MSI-X vector as the i40e interrupt logic sees it (DYN_CTL).
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorState {
    /// INTENA: the vector may fire; cleared when it fires (auto-mask).
    pub intena: bool,
    /// A cause arrived while INTENA was clear: fire on the next INTENA write.
    pub pending: bool,
}

/// One queue pair's progress through its rings (their addresses and sizes are in the PF state).
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// The next TX descriptor the device reads.
    pub tx_head: u32,
    /// The next RX descriptor the device fills.
    pub rx_head: u32,
    pub stats: QueueStats,
}

/// Device-level counters beyond the VSI statistics.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames that arrived while the device was paused, or waited for RX buffers when the state was saved (a
    /// NIC's internal FIFO does not migrate). Also counted in rx_discards.
    pub rx_dropped_paused: u64,
    /// Queues shut down by malicious driver detection.
    pub mdd_events: u64,
    /// PF -> VF messages dropped because the driver posted no ARQ buffers for too long.
    pub arq_dropped: u64,
    /// BAR0 writes dropped while paused because [`MAX_HELD_WRITES`] were already held.
    pub held_writes_dropped: u64,
}

/// Where a VF reset is. The VF-side register VFGEN_RSTAT shows it to the driver; the phase is what the device
/// does next, so a device restored mid-reset finishes it.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetPhase {
    /// No reset under way (RSTAT reads VFACTIVE).
    #[default]
    Idle,
    /// The PF warned the driver (RESET_IMPENDING) and resets the VF shortly.
    Impending,
    /// State cleared, RSTAT reads INPROGRESS.
    InProgress,
    /// RSTAT reads COMPLETED; VFACTIVE follows.
    Completed,
}

/// The NIC function's state: registers, the PF's view of the VF, interrupts, admin queue, queues, counters.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NicState {
    /// BAR0 as the driver sees it, doorbell-page tails included (in `--doorbells mmap` mode they live in the page
    /// while running and are copied here on save).
    pub regs: RegFile,
    /// virtchnl negotiation (version, granted caps, VSI), queue contexts, IRQ map, MAC filters, promiscuous flags,
    /// RSS key/LUT/hash types, link, VSI statistics.
    pub pf: Pf,
    pub vectors: Vec<VectorState>,
    /// PF -> VF messages waiting for ARQ buffers.
    pub arq: VecDeque<ArqMsg>,
    pub queues: Vec<QueueState>,
    pub counters: Counters,
    pub reset: ResetPhase,
    /// BAR0 writes (offset, value) the client made while the device was paused, applied in order at resume.
    pub held_writes: Vec<(u32, u32)>,
    /// A Function Level Reset requested while paused, carried out at resume.
    pub held_flr: bool,
}

/// Everything saved: the device's identity, PCI config space, MSI-X, and the NIC function.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub identity: Identity,
    /// Config space header and capabilities (256 bytes).
    pub config: Vec<u8>,
    pub msix: MsixState,
    pub nic: NicState,
}

/// Why state cannot be saved or loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The state belongs to a differently configured device; each entry names one difference.
    Mismatch(Vec<String>),
    /// The state is inconsistent or out of range.
    Invalid(String),
    /// Saving and loading need a paused device.
    NotPaused,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Mismatch(d) => write!(f, "saved state is for another device: {}", d.join("; ")),
            StateError::Invalid(why) => write!(f, "saved state is invalid: {why}"),
            StateError::NotPaused => f.write_str("the device must be paused to save or load its state"),
        }
    }
}

impl std::error::Error for StateError {}

impl DeviceState {
    /// Checks a state from outside against the device it would be loaded into: identity first, then every rule
    /// the device otherwise enforces as the driver configures it. Config space and MSI-X are checked as they are
    /// loaded (their layout lives with them).
    pub fn validate(&self, cfg: &VfConfig) -> Result<(), StateError> {
        self.identity.check(&Identity::of(cfg))?;
        let bad = |why: String| Err(StateError::Invalid(why));
        let n = &self.nic;
        let pf = &n.pf;
        let id = &self.identity;
        if (pf.mac, pf.queue_pairs, pf.max_vectors, pf.link_speed)
            != (id.mac, id.queue_pairs, id.msix_vectors, id.link_speed)
        {
            return bad("the PF state disagrees with the identity".into());
        }
        pf.validate().map_err(StateError::Invalid)?;
        if n.vectors.len() != usize::from(id.msix_vectors) || n.queues.len() != usize::from(id.queue_pairs) {
            return bad(format!("{} vectors and {} queues saved", n.vectors.len(), n.queues.len()));
        }
        for (q, s) in n.queues.iter().enumerate() {
            let tx_len = pf.tx[q].map_or(u32::MAX, |t| t.len);
            let rx_len = pf.rx[q].map_or(u32::MAX, |r| r.len);
            if s.tx_head >= tx_len || s.rx_head >= rx_len {
                return bad(format!("queue {q}: head past the end of its ring"));
            }
        }
        if n.arq.len() > cfg.max_arq_queued.max(1) || n.arq.iter().any(|m| m.payload.len() > MAX_MSG) {
            return bad(format!(
                "{} queued ARQ messages (at most {}, each <= {MAX_MSG} bytes)",
                n.arq.len(),
                cfg.max_arq_queued
            ));
        }
        if n.held_writes.len() > MAX_HELD_WRITES || n.held_writes.iter().any(|&(o, _)| !is_register(u64::from(o))) {
            return bad(format!("{} held register writes, or one to a non-register", n.held_writes.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mem::GuestMem;
    use crate::nic::adminq::ArqMsg;
    use crate::nic::virtchnl::{CAPS_IMPLEMENTED, HENA_CAPS, MAX_MACS, RSS_KEY_SIZE, RSS_LUT_SIZE};
    use crate::pci;
    use crate::I40eVf;

    /// Turns any state into one a device configured by `cfg` accepts, keeping as much of it as the rules allow.
    fn sanitize(mut s: DeviceState, cfg: &VfConfig) -> DeviceState {
        let id = Identity::of(cfg);
        let (n, v) = (usize::from(id.queue_pairs), usize::from(id.msix_vectors));
        let mut config = pci::vf_config(id.msix_vectors);
        let mut bytes = s.config.clone();
        bytes.resize(pci::config::SAVED_SIZE, 0);
        config.write(0, &bytes);
        s.config = config.save();
        s.msix.table.resize(v * pci::msix::TABLE_ENTRY, 0);
        s.msix.pending.resize(v, false);
        let nic = &mut s.nic;
        let pf = &mut nic.pf;
        (pf.mac, pf.queue_pairs, pf.max_vectors, pf.link_speed) =
            (id.mac, id.queue_pairs, id.msix_vectors, id.link_speed);
        pf.version = pf.version.map(|v| v.min((1, 1)));
        pf.caps &= CAPS_IMPLEMENTED;
        pf.tx.resize(n, None);
        pf.rx.resize(n, None);
        for t in pf.tx.iter_mut().flatten() {
            (t.ring, t.len) = ((t.ring >> 8 << 7).max(128), 64 + 32 * (t.len % 125));
        }
        for r in pf.rx.iter_mut().flatten() {
            (r.ring, r.len) = ((r.ring >> 8 << 7).max(128), 64 + 32 * (r.len % 125));
            r.buf_size = 128 * (1 + r.buf_size % 126);
            r.max_frame = 64 + r.max_frame % (9728 - 64 + 1);
        }
        let all = (1u32 << n) - 1;
        pf.irq_map.resize(v, (0, 0));
        for m in &mut pf.irq_map {
            *m = (m.0 & all as u16, m.1 & all as u16);
        }
        let configured =
            |q: &[Option<_>]| q.iter().enumerate().fold(0u32, |m, (i, c)| m | (u32::from(c.is_some()) << i));
        pf.tx_enabled &= configured(&pf.tx.iter().map(|t| t.map(|_| ())).collect::<Vec<_>>());
        pf.rx_enabled &= configured(&pf.rx.iter().map(|r| r.map(|_| ())).collect::<Vec<_>>());
        let mut macs = Vec::new();
        for m in pf.macs.drain(..).filter(|m| *m != [0; 6]) {
            if !macs.contains(&m) && macs.len() < MAX_MACS {
                macs.push(m);
            }
        }
        pf.macs = macs;
        pf.promisc &= 3;
        pf.rss_key.resize(RSS_KEY_SIZE, 0);
        pf.rss_lut.resize(RSS_LUT_SIZE, 0);
        pf.rss_lut.iter_mut().for_each(|q| *q %= n as u8);
        pf.hena &= HENA_CAPS;
        nic.vectors.resize(v, VectorState::default());
        nic.queues.resize(n, QueueState::default());
        for (q, st) in nic.queues.iter_mut().enumerate() {
            st.tx_head %= nic.pf.tx[q].map_or(u32::MAX, |t| t.len);
            st.rx_head %= nic.pf.rx[q].map_or(u32::MAX, |r| r.len);
        }
        nic.arq.truncate(cfg.max_arq_queued);
        nic.arq.iter_mut().for_each(|m: &mut ArqMsg| m.payload.truncate(MAX_MSG));
        nic.held_writes.retain(|&(o, _)| is_register(u64::from(o)));
        s.identity = id;
        s
    }

    fn cfg(doorbells: Doorbells) -> VfConfig {
        VfConfig { queue_pairs: 3, mac: [2, 1, 2, 3, 4, 5], doorbells, ..Default::default() }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Every state struct, with arbitrary values, survives serialization unchanged.
        #[test]
        fn serde_round_trip(s in any::<DeviceState>()) {
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), s);
        }

        /// A valid state survives the migration stream (docs/migration-stream.md) unchanged.
        #[test]
        fn stream_round_trip(s in any::<DeviceState>()) {
            let s = sanitize(s, &cfg(Doorbells::Remap));
            let rec = crate::stream::encode_state(&s, &[]);
            let (back, _) = crate::stream::decode_state(&crate::stream::parse_record(&rec).unwrap(), &[]).unwrap();
            prop_assert_eq!(back, s);
        }

        /// A valid state loaded into a device and saved again is the same state, in both doorbell modes.
        #[test]
        fn load_then_save_is_identity(s in any::<DeviceState>(), doorbells in any::<Doorbells>()) {
            let cfg = cfg(doorbells);
            let s = sanitize(s, &cfg);
            prop_assert_eq!(s.validate(&cfg), Ok(()));
            let vf = I40eVf::restore(cfg, GuestMem::new(), &s).unwrap();
            prop_assert_eq!(vf.save().unwrap(), s);
        }
    }

    #[test]
    fn another_mac_or_queue_count_is_refused_by_name() {
        let vf = I40eVf::new(cfg(Doorbells::Remap), GuestMem::new());
        vf.pause();
        let saved = vf.save().unwrap();
        let other = VfConfig { mac: [2, 9, 9, 9, 9, 9], queue_pairs: 2, ..cfg(Doorbells::Remap) };
        let e = I40eVf::restore(other, GuestMem::new(), &saved).err().expect("refused");
        let msg = e.to_string();
        assert!(msg.contains("MAC 02:01:02:03:04:05, this device's is 02:09:09:09:09:09"), "{msg}");
        assert!(msg.contains("3 queue pairs, this device has 2"), "{msg}");
        let e = I40eVf::restore(cfg(Doorbells::Trap), GuestMem::new(), &saved).err().expect("refused").to_string();
        assert!(e.contains("doorbells remap, this device's are trap"), "{e}");
        assert!(vf.load(&saved).is_ok());
        vf.resume();
        assert_eq!(vf.save(), Err(StateError::NotPaused));
        assert_eq!(vf.load(&saved), Err(StateError::NotPaused));
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let vf = I40eVf::new(cfg(Doorbells::Remap), GuestMem::new());
        vf.pause();
        let good = vf.save().unwrap();
        type Breaker = Box<dyn Fn(&mut DeviceState)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("read-only config byte", Box::new(|s| s.config[0] = 0x11)),
            ("short config", Box::new(|s| s.config.truncate(64))),
            ("MSI-X table size", Box::new(|s| s.msix.table.push(0))),
            ("queue past the VF's enabled", Box::new(|s| s.nic.pf.tx_enabled = 1 << 7)),
            ("unconfigured queue enabled", Box::new(|s| s.nic.pf.rx_enabled = 1)),
            ("LUT past the queues", Box::new(|s| s.nic.pf.rss_lut[0] = 9)),
            (
                "too many queued ARQ messages",
                Box::new(|s| s.nic.arq = (0..1000).map(|_| ArqMsg { op: 1, status: 0, payload: vec![] }).collect()),
            ),
            (
                "oversized ARQ message",
                Box::new(|s| s.nic.arq.push_back(ArqMsg { op: 1, status: 0, payload: vec![0; 5000] })),
            ),
            ("held write to a non-register", Box::new(|s| s.nic.held_writes.push((0x9000, 1)))),
            ("vector count", Box::new(|s| s.nic.vectors.pop().map(|_| ()).unwrap_or(()))),
            ("PF MAC differs from identity", Box::new(|s| s.nic.pf.mac[5] ^= 1)),
        ];
        for (what, break_it) in cases {
            let mut bad = good.clone();
            break_it(&mut bad);
            let e = vf.load(&bad);
            assert!(matches!(e, Err(StateError::Invalid(_))), "{what}: {e:?}");
            assert_eq!(vf.save().unwrap(), good, "{what}: a refused load changed the device");
        }
    }
}
