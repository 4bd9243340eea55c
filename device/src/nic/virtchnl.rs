//! The PF side of virtchnl: what the VF driver asks over the admin queue and what the PF answers.
//!
//! Pure logic over byte buffers: no registers, no guest memory, so every op, including malformed ones, is unit
//! tested directly. The admin queue engine (`aq.rs`) carries the bytes.

use serde::{Deserialize, Serialize};

use crate::nic::le::{get_u16, get_u32, get_u64};
use crate::nic::stats::EthStats;

pub const OP_VERSION: u32 = 1;
pub const OP_RESET_VF: u32 = 2;
pub const OP_GET_VF_RESOURCES: u32 = 3;
pub const OP_CONFIG_TX_QUEUE: u32 = 4;
pub const OP_CONFIG_RX_QUEUE: u32 = 5;
pub const OP_CONFIG_VSI_QUEUES: u32 = 6;
pub const OP_CONFIG_IRQ_MAP: u32 = 7;
pub const OP_ENABLE_QUEUES: u32 = 8;
pub const OP_DISABLE_QUEUES: u32 = 9;
pub const OP_ADD_ETH_ADDR: u32 = 10;
pub const OP_DEL_ETH_ADDR: u32 = 11;
pub const OP_CONFIG_PROMISCUOUS_MODE: u32 = 14;
pub const OP_GET_STATS: u32 = 15;
pub const OP_EVENT: u32 = 17;
pub const OP_CONFIG_RSS_KEY: u32 = 23;
pub const OP_CONFIG_RSS_LUT: u32 = 24;
pub const OP_GET_RSS_HENA_CAPS: u32 = 25;
pub const OP_SET_RSS_HENA: u32 = 26;

pub const STATUS_SUCCESS: i32 = 0;
pub const STATUS_ERR_PARAM: i32 = -5;
pub const STATUS_ERR_NOT_SUPPORTED: i32 = -64;

pub const CAP_L2: u32 = 0x0000_0001;
pub const CAP_ADV_LINK_SPEED: u32 = 0x0000_0080;
pub const CAP_RSS_PF: u32 = 0x0008_0000;
/// What this PF implements; the VF gets the intersection with what it asks for.
pub const CAPS_IMPLEMENTED: u32 = CAP_L2 | CAP_ADV_LINK_SPEED | CAP_RSS_PF;

pub const EVENT_LINK_CHANGE: i32 = 1;
pub const EVENT_RESET_IMPENDING: i32 = 2;
const SEVERITY_INFO: i32 = 0;
const SEVERITY_CERTAIN_DOOM: i32 = 255;

pub const VSI_ID: u16 = 1;
const VSI_TYPE_SRIOV: i32 = 6;
pub const RSS_KEY_SIZE: usize = 52;
pub const RSS_LUT_SIZE: usize = 64;
/// The largest frame the port takes, which i40e reports as max_mtu (iavf 6.12 derives max_pkt_size from it).
pub const MAX_MTU: u16 = 9728;
/// Hash types (i40e packet classifier types) the PF lets the VF enable: i40e's default set.
pub const HENA_CAPS: u64 = (1 << 31)
    | (1 << 33)
    | (1 << 34)
    | (1 << 35)
    | (1 << 36)
    | (1 << 41)
    | (1 << 43)
    | (1 << 44)
    | (1 << 45)
    | (1 << 46)
    | (1 << 63);

pub const MIN_RING: u32 = 64;
pub const MAX_RING: u32 = 4096;
pub const RING_MULTIPLE: u32 = 32;
pub const RING_ALIGN: u64 = 128;
const MAX_FRAME: u32 = 9728;
/// MAC filters per VF: iavf adds its unicast address and a few multicast ones.
pub const MAX_MACS: usize = 64;

/// A TX queue as CONFIG_VSI_QUEUES set it up.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxQueue {
    pub ring: u64,
    pub len: u32,
}

/// An RX queue as CONFIG_VSI_QUEUES set it up.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxQueue {
    pub ring: u64,
    pub len: u32,
    pub buf_size: u32,
    pub max_frame: u32,
}

/// Link speed in Mbps, as `--link-speed` gives it.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpeed(pub u32);

impl LinkSpeed {
    pub const VALID: [u32; 9] = [100, 1000, 2500, 5000, 10000, 20000, 25000, 40000, 100000];

    /// The legacy `enum virtchnl_link_speed` encoding, for VFs without ADV_LINK_SPEED.
    fn legacy(self) -> u32 {
        match self.0 {
            100 => 0x2,
            1000 => 0x4,
            2500 => 0x1,
            5000 => 0x80,
            10000 => 0x8,
            20000 => 0x20,
            25000 => 0x40,
            40000 => 0x10,
            _ => 0,
        }
    }
}

/// The PF's view of its one VF. Everything but the negotiated version goes back to defaults on a VF reset.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pf {
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub max_vectors: u16,
    pub link_speed: LinkSpeed,
    pub version: Option<(u32, u32)>,
    pub caps: u32,
    pub tx: Vec<Option<TxQueue>>,
    pub rx: Vec<Option<RxQueue>>,
    /// Per MSI-X vector: (rx queue bitmap, tx queue bitmap).
    pub irq_map: Vec<(u16, u16)>,
    pub rx_enabled: u32,
    pub tx_enabled: u32,
    pub macs: Vec<[u8; 6]>,
    pub promisc: u16,
    pub rss_key: Vec<u8>,
    pub rss_lut: Vec<u8>,
    pub hena: u64,
    pub stats: EthStats,
    /// The link as the PF reports it (up unless a fault or the control interface takes it down).
    pub link_up: bool,
}

/// What the PF wants done after an op, besides its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// Send a link-up event after the reply (the driver drops link events that precede ENABLE_QUEUES' reply).
    LinkUp,
    /// RESET_VF: reset the VF; no reply.
    ResetVf,
}

/// The PF's answer to one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// (status, payload), or None for ops that get no reply.
    pub reply: Option<(i32, Vec<u8>)>,
    pub after: After,
}

impl Outcome {
    fn ok(payload: Vec<u8>) -> Self {
        Outcome { reply: Some((STATUS_SUCCESS, payload)), after: After::Nothing }
    }
    fn status(s: i32) -> Self {
        Outcome { reply: Some((s, Vec::new())), after: After::Nothing }
    }
}

/// Rejects with ERR_PARAM, logging why.
macro_rules! param {
    ($($arg:tt)*) => {{
        log::warn!("virtchnl: {}", format!($($arg)*));
        return Outcome::status(STATUS_ERR_PARAM);
    }};
}

impl Pf {
    pub fn new(mac: [u8; 6], queue_pairs: u16, max_vectors: u16, link_speed: LinkSpeed) -> Self {
        let n = queue_pairs as usize;
        Pf {
            mac,
            queue_pairs,
            max_vectors,
            link_speed,
            version: None,
            caps: 0,
            tx: vec![None; n],
            rx: vec![None; n],
            irq_map: vec![(0, 0); max_vectors as usize],
            rx_enabled: 0,
            tx_enabled: 0,
            macs: Vec::new(),
            promisc: 0,
            rss_key: vec![0; RSS_KEY_SIZE],
            rss_lut: (0..RSS_LUT_SIZE).map(|i| (i % n.max(1)) as u8).collect(),
            // The i40e PF programs its default hash types at VSI setup; iavf never sends SET_RSS_HENA itself.
            hena: HENA_CAPS,
            stats: EthStats::default(),
            link_up: true,
        }
    }

    /// VF reset: forget everything the driver configured, remember the negotiated version and the link.
    pub fn reset(&mut self) {
        let (version, link_up) = (self.version, self.link_up);
        *self = Pf::new(self.mac, self.queue_pairs, self.max_vectors, self.link_speed);
        self.version = version;
        self.link_up = link_up;
    }

    /// Checks a PF state that came from outside (a migration stream) for everything the device relies on: the
    /// same rules virtchnl enforces when the driver configures it.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.queue_pairs as usize;
        let all = (1u32 << n) - 1;
        if self.version.is_some_and(|v| v > (1, 1)) {
            return Err(format!("virtchnl version {:?} is newer than 1.1", self.version));
        }
        if self.caps & !CAPS_IMPLEMENTED != 0 {
            return Err(format!("granted caps {:#x} include some this PF lacks", self.caps));
        }
        if self.tx.len() != n || self.rx.len() != n || self.irq_map.len() != self.max_vectors as usize {
            return Err("queue or vector tables of the wrong length".into());
        }
        for (i, t) in self.tx.iter().enumerate() {
            if let Some(t) = t {
                if !ring_ok(t.len, t.ring) {
                    return Err(format!("TX queue {i}: ring of {} at {:#x}", t.len, t.ring));
                }
            }
        }
        for (i, r) in self.rx.iter().enumerate() {
            if let Some(r) = r {
                rx_queue_ok(r).map_err(|e| format!("RX queue {i}: {e}"))?;
            }
        }
        if self.irq_map.iter().any(|&(rx, tx)| u32::from(rx | tx) & !all != 0) {
            return Err("IRQ map names a queue past the VF's".into());
        }
        let configured =
            |qs: &mut dyn Iterator<Item = bool>| qs.enumerate().fold(0u32, |m, (i, c)| m | (u32::from(c) << i));
        let (tx_cfg, rx_cfg) = (
            configured(&mut self.tx.iter().map(Option::is_some)),
            configured(&mut self.rx.iter().map(Option::is_some)),
        );
        if self.rx_enabled & !rx_cfg != 0 || self.tx_enabled & !tx_cfg != 0 {
            return Err(format!(
                "queues enabled (rx {:#x}, tx {:#x}) but not configured",
                self.rx_enabled, self.tx_enabled
            ));
        }
        if self.macs.len() > MAX_MACS || self.macs.contains(&[0; 6]) {
            return Err(format!("{} MAC filters (at most {MAX_MACS}, none all-zero)", self.macs.len()));
        }
        if self.macs.iter().enumerate().any(|(i, m)| self.macs[..i].contains(m)) {
            return Err("a MAC filter is listed twice".into());
        }
        if self.promisc & !0x3 != 0 {
            return Err(format!("promiscuous flags {:#x}", self.promisc));
        }
        if self.rss_key.len() != RSS_KEY_SIZE || self.rss_lut.len() != RSS_LUT_SIZE {
            return Err("RSS key or LUT of the wrong size".into());
        }
        if self.rss_lut.iter().any(|&q| usize::from(q) >= n) {
            return Err("RSS LUT names a queue past the VF's".into());
        }
        if self.hena & !HENA_CAPS != 0 {
            return Err(format!("RSS hash types {:#x} outside {HENA_CAPS:#x}", self.hena));
        }
        Ok(())
    }

    pub fn queues_enabled(&self) -> bool {
        self.rx_enabled | self.tx_enabled != 0
    }

    /// Handles one op from the VF.
    pub fn handle(&mut self, op: u32, msg: &[u8]) -> Outcome {
        match op {
            OP_VERSION => self.version(msg),
            OP_RESET_VF => {
                log::info!("virtchnl: VF requested a reset");
                Outcome { reply: None, after: After::ResetVf }
            }
            OP_GET_VF_RESOURCES => self.get_resources(msg),
            OP_CONFIG_VSI_QUEUES => self.config_queues(msg),
            OP_CONFIG_IRQ_MAP => self.config_irq_map(msg),
            OP_ENABLE_QUEUES | OP_DISABLE_QUEUES => self.enable_queues(op == OP_ENABLE_QUEUES, msg),
            OP_ADD_ETH_ADDR | OP_DEL_ETH_ADDR => self.eth_addr(op == OP_ADD_ETH_ADDR, msg),
            OP_CONFIG_PROMISCUOUS_MODE => self.promisc(msg),
            OP_GET_STATS => self.get_stats(msg),
            OP_CONFIG_RSS_KEY | OP_CONFIG_RSS_LUT | OP_GET_RSS_HENA_CAPS | OP_SET_RSS_HENA
                if self.caps & CAP_RSS_PF == 0 =>
            {
                log::warn!("virtchnl: RSS op {op} without the RSS_PF capability");
                Outcome::status(STATUS_ERR_NOT_SUPPORTED)
            }
            OP_CONFIG_RSS_KEY => self.rss_key(msg),
            OP_CONFIG_RSS_LUT => self.rss_lut(msg),
            OP_GET_RSS_HENA_CAPS => Outcome::ok(HENA_CAPS.to_le_bytes().to_vec()),
            OP_SET_RSS_HENA => self.set_hena(msg),
            op => {
                log::warn!("virtchnl: op {op} not supported");
                Outcome::status(STATUS_ERR_NOT_SUPPORTED)
            }
        }
    }

    fn version(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() != 8 {
            param!("VERSION of {} bytes", msg.len());
        }
        let (major, minor) = (get_u32(msg, 0), get_u32(msg, 4));
        // We speak 1.1; a driver asking for less gets what it asked for.
        let ours = if (major, minor) < (1, 1) { (major, minor) } else { (1, 1) };
        log::info!("virtchnl: VF driver speaks {major}.{minor}; using {}.{}", ours.0, ours.1);
        self.version = Some(ours);
        let mut p = ours.0.to_le_bytes().to_vec();
        p.extend_from_slice(&ours.1.to_le_bytes());
        Outcome::ok(p)
    }

    fn get_resources(&mut self, msg: &[u8]) -> Outcome {
        let wanted = match (self.version, msg.len()) {
            (Some((1, 0)), _) | (_, 0) => CAP_L2, // 1.0 drivers send no capability mask
            (_, 4) => get_u32(msg, 0),
            (_, n) => param!("GET_VF_RESOURCES of {n} bytes"),
        };
        self.caps = wanted & CAPS_IMPLEMENTED | CAP_L2;
        log::info!("virtchnl: VF asked for caps {wanted:#x}, granted {:#x}", self.caps);
        let mut p = Vec::with_capacity(36);
        p.extend_from_slice(&1u16.to_le_bytes()); // num_vsis
        p.extend_from_slice(&self.queue_pairs.to_le_bytes());
        p.extend_from_slice(&self.max_vectors.to_le_bytes());
        p.extend_from_slice(&MAX_MTU.to_le_bytes());
        p.extend_from_slice(&self.caps.to_le_bytes());
        p.extend_from_slice(&(RSS_KEY_SIZE as u32).to_le_bytes());
        p.extend_from_slice(&(RSS_LUT_SIZE as u32).to_le_bytes());
        p.extend_from_slice(&VSI_ID.to_le_bytes());
        p.extend_from_slice(&self.queue_pairs.to_le_bytes());
        p.extend_from_slice(&VSI_TYPE_SRIOV.to_le_bytes());
        p.extend_from_slice(&0u16.to_le_bytes()); // qset_handle
        p.extend_from_slice(&self.mac);
        // The i40e PF reports the link right away; a driver not yet running ignores it.
        Outcome { reply: Some((STATUS_SUCCESS, p)), after: After::LinkUp }
    }

    fn config_queues(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() < 8 {
            param!("CONFIG_VSI_QUEUES of {} bytes", msg.len());
        }
        let (vsi, n) = (get_u16(msg, 0), get_u16(msg, 2) as usize);
        if vsi != VSI_ID {
            param!("CONFIG_VSI_QUEUES for VSI {vsi}");
        }
        if n == 0 || n > self.queue_pairs as usize || !array_len_ok(msg.len(), 8, 64, n) {
            param!("CONFIG_VSI_QUEUES: {n} queue pairs (have {}) in {} bytes", self.queue_pairs, msg.len());
        }
        let mut tx = Vec::with_capacity(n);
        let mut rx = Vec::with_capacity(n);
        for i in 0..n {
            let q = &msg[8 + 64 * i..8 + 64 * (i + 1)];
            let (t, r) = (&q[..24], &q[24..]);
            let (tvsi, tqid, tlen, headwb, tring) =
                (get_u16(t, 0), get_u16(t, 2), get_u16(t, 4), get_u16(t, 6), get_u64(t, 8));
            if tvsi != VSI_ID || usize::from(tqid) != i || headwb != 0 {
                param!("TX queue {i}: vsi {tvsi} qid {tqid} headwb {headwb}");
            }
            if !ring_ok(u32::from(tlen), tring) {
                param!("TX queue {i}: ring of {tlen} at {tring:#x}");
            }
            let (rvsi, rqid, rlen, hdr, split) = (get_u16(r, 0), get_u16(r, 2), get_u32(r, 4), get_u16(r, 8), r[10]);
            let (buf, max_frame, crc, rxdid, ring) = (get_u32(r, 12), get_u32(r, 16), r[20], r[21], get_u64(r, 24));
            if rvsi != VSI_ID || usize::from(rqid) != i {
                param!("RX queue {i}: vsi {rvsi} qid {rqid}");
            }
            if split != 0 || hdr != 0 || crc != 0 || rxdid > 1 {
                param!("RX queue {i}: header split {split}/{hdr}, crc_disable {crc}, rxdid {rxdid} not supported");
            }
            let rq = RxQueue { ring, len: rlen, buf_size: buf, max_frame };
            if let Err(e) = rx_queue_ok(&rq) {
                param!("RX queue {i}: {e}");
            }
            tx.push(TxQueue { ring: tring, len: u32::from(tlen) });
            rx.push(rq);
        }
        for (i, (t, r)) in tx.into_iter().zip(rx).enumerate() {
            log::debug!("virtchnl: queue pair {i}: {t:?} {r:?}");
            self.tx[i] = Some(t);
            self.rx[i] = Some(r);
        }
        Outcome::ok(Vec::new())
    }

    fn config_irq_map(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() < 2 {
            param!("CONFIG_IRQ_MAP of {} bytes", msg.len());
        }
        let n = get_u16(msg, 0) as usize;
        if n == 0 || n > self.max_vectors as usize || !array_len_ok(msg.len(), 2, 12, n) {
            param!("CONFIG_IRQ_MAP: {n} vectors (max {}) in {} bytes", self.max_vectors, msg.len());
        }
        let all = (1u32 << self.queue_pairs) - 1;
        let mut map = vec![(0u16, 0u16); self.max_vectors as usize];
        for i in 0..n {
            let e = &msg[2 + 12 * i..];
            let (vsi, v, rxq, txq) = (get_u16(e, 0), get_u16(e, 2), get_u16(e, 4), get_u16(e, 6));
            if vsi != VSI_ID || v >= self.max_vectors || u32::from(rxq | txq) & !all != 0 {
                param!("CONFIG_IRQ_MAP entry {i}: vsi {vsi} vector {v} rx {rxq:#x} tx {txq:#x}");
            }
            map[v as usize] = (rxq, txq);
        }
        self.irq_map = map;
        Outcome::ok(Vec::new())
    }

    fn enable_queues(&mut self, enable: bool, msg: &[u8]) -> Outcome {
        if msg.len() != 12 || get_u16(msg, 0) != VSI_ID {
            param!("{}_QUEUES of {} bytes", if enable { "ENABLE" } else { "DISABLE" }, msg.len());
        }
        let (rxq, txq) = (get_u32(msg, 4), get_u32(msg, 8));
        let all = (1u32 << self.queue_pairs) - 1;
        if rxq | txq == 0 || (rxq | txq) & !all != 0 {
            param!("queue bitmaps rx {rxq:#x} tx {txq:#x} (have {} pairs)", self.queue_pairs);
        }
        if enable {
            let unconfigured = (0..self.queue_pairs as usize)
                .filter(|&i| (rxq >> i) & 1 == 1 && self.rx[i].is_none() || (txq >> i) & 1 == 1 && self.tx[i].is_none())
                .count();
            if unconfigured > 0 {
                param!("ENABLE_QUEUES rx {rxq:#x} tx {txq:#x}: {unconfigured} queues not configured");
            }
            self.rx_enabled |= rxq;
            self.tx_enabled |= txq;
            log::info!("virtchnl: queues enabled rx {:#x} tx {:#x}", self.rx_enabled, self.tx_enabled);
            return Outcome { reply: Some((STATUS_SUCCESS, Vec::new())), after: After::LinkUp };
        }
        self.rx_enabled &= !rxq;
        self.tx_enabled &= !txq;
        log::info!("virtchnl: queues disabled rx {rxq:#x} tx {txq:#x}");
        Outcome::ok(Vec::new())
    }

    fn eth_addr(&mut self, add: bool, msg: &[u8]) -> Outcome {
        if msg.len() < 4 || get_u16(msg, 0) != VSI_ID {
            param!("ETH_ADDR list of {} bytes", msg.len());
        }
        let n = get_u16(msg, 2) as usize;
        if n == 0 || !array_len_ok(msg.len(), 4, 8, n) {
            param!("ETH_ADDR list of {n} entries in {} bytes", msg.len());
        }
        let addrs: Vec<[u8; 6]> = (0..n).map(|i| msg[4 + 8 * i..10 + 8 * i].try_into().unwrap()).collect();
        if let Some(bad) = addrs.iter().find(|a| **a == [0; 6]) {
            param!("ETH_ADDR {bad:02x?} is not a valid address");
        }
        if add {
            let mut after = self.macs.clone();
            for a in &addrs {
                if !after.contains(a) {
                    after.push(*a);
                }
            }
            if after.len() > MAX_MACS {
                param!("ADD_ETH_ADDR: {} filters would exceed the limit of {MAX_MACS}", after.len());
            }
        }
        for a in addrs {
            if add {
                if !self.macs.contains(&a) {
                    self.macs.push(a);
                }
            } else {
                self.macs.retain(|m| *m != a);
            }
        }
        log::debug!("virtchnl: MAC filters now {:02x?}", self.macs);
        Outcome::ok(Vec::new())
    }

    fn promisc(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() != 4 || get_u16(msg, 0) != VSI_ID {
            param!("CONFIG_PROMISCUOUS_MODE of {} bytes", msg.len());
        }
        let flags = get_u16(msg, 2);
        if flags & !0x3 != 0 {
            param!("promiscuous flags {flags:#x}");
        }
        self.promisc = flags;
        log::info!("virtchnl: promiscuous unicast {} multicast {}", flags & 1 != 0, flags & 2 != 0);
        Outcome::ok(Vec::new())
    }

    fn get_stats(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() != 12 || get_u16(msg, 0) != VSI_ID {
            param!("GET_STATS of {} bytes", msg.len());
        }
        Outcome::ok(self.stats.to_bytes())
    }

    fn rss_key(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() < 4 || get_u16(msg, 0) != VSI_ID {
            param!("CONFIG_RSS_KEY of {} bytes", msg.len());
        }
        let n = get_u16(msg, 2) as usize;
        if n != RSS_KEY_SIZE || msg.len() < 4 + n {
            param!("CONFIG_RSS_KEY: key of {n} bytes in {} (need {RSS_KEY_SIZE})", msg.len());
        }
        self.rss_key = msg[4..4 + n].to_vec();
        Outcome::ok(Vec::new())
    }

    fn rss_lut(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() < 4 || get_u16(msg, 0) != VSI_ID {
            param!("CONFIG_RSS_LUT of {} bytes", msg.len());
        }
        let n = get_u16(msg, 2) as usize;
        if n != RSS_LUT_SIZE || msg.len() < 4 + n {
            param!("CONFIG_RSS_LUT: {n} entries in {} bytes (need {RSS_LUT_SIZE})", msg.len());
        }
        let lut = &msg[4..4 + n];
        if let Some(q) = lut.iter().find(|&&q| u16::from(q) >= self.queue_pairs) {
            param!("CONFIG_RSS_LUT: queue {q} out of range");
        }
        self.rss_lut = lut.to_vec();
        Outcome::ok(Vec::new())
    }

    fn set_hena(&mut self, msg: &[u8]) -> Outcome {
        if msg.len() != 8 {
            param!("SET_RSS_HENA of {} bytes", msg.len());
        }
        let hena = get_u64(msg, 0);
        if hena & !HENA_CAPS != 0 {
            param!("SET_RSS_HENA {hena:#x} outside caps {HENA_CAPS:#x}");
        }
        self.hena = hena;
        Outcome::ok(Vec::new())
    }

    /// The enabled RX queue a frame goes to: RSS over the driver's key and LUT when RSS is granted and the frame's
    /// hash type is enabled, else the lowest enabled queue.
    pub fn rx_queue_for(&self, frame: &[u8]) -> Option<u16> {
        self.rx_steer(frame).map(|(q, _)| q)
    }

    /// [`Pf::rx_queue_for`] with the RSS hash it was chosen by (the one the writeback reports), computed once.
    pub fn rx_steer(&self, frame: &[u8]) -> Option<(u16, Option<u32>)> {
        if self.rx_enabled == 0 {
            return None;
        }
        let hash = self.rss_hash(frame);
        if let Some(h) = hash {
            let q = u16::from(crate::nic::rss::queue_for(h, &self.rss_lut));
            if self.rx_enabled & (1 << q) != 0 {
                return Some((q, hash));
            }
        }
        Some((self.rx_enabled.trailing_zeros() as u16, hash))
    }

    /// The RSS hash of a frame (Toeplitz over the driver's key), when RSS is granted and enabled for its type.
    pub fn rss_hash(&self, frame: &[u8]) -> Option<u32> {
        if self.caps & CAP_RSS_PF == 0 {
            return None;
        }
        crate::nic::rss::hash_frame(&self.rss_key, self.hena, frame).map(|(h, _)| h)
    }

    /// EVENT LINK_CHANGE, in the format the granted caps call for.
    pub fn link_event(&self, up: bool) -> Vec<u8> {
        let speed = if self.caps & CAP_ADV_LINK_SPEED != 0 { self.link_speed.0 } else { self.link_speed.legacy() };
        event(EVENT_LINK_CHANGE, speed, up, SEVERITY_INFO)
    }

    pub fn reset_impending_event() -> Vec<u8> {
        event(EVENT_RESET_IMPENDING, 0, false, SEVERITY_CERTAIN_DOOM)
    }
}

fn event(code: i32, speed: u32, up: bool, severity: i32) -> Vec<u8> {
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&code.to_le_bytes());
    p.extend_from_slice(&speed.to_le_bytes());
    p.extend_from_slice(&[u8::from(up), 0, 0, 0]);
    p.extend_from_slice(&severity.to_le_bytes());
    p
}

/// Array messages come in two sizes: `fixed + n * elem` (the spec) and one element more, which is what iavf
/// sends (it sizes them as `struct_size` of the old one-element array declarations).
fn array_len_ok(len: usize, fixed: usize, elem: usize, n: usize) -> bool {
    len == fixed + n * elem || len == fixed + (n + 1) * elem
}

/// The largest descriptor (RX 32-byte format): the bound for both rings' extent.
const MAX_DESC_SIZE: u64 = 32;

fn rx_queue_ok(q: &RxQueue) -> Result<(), String> {
    if !ring_ok(q.len, q.ring) {
        return Err(format!("ring of {} at {:#x}", q.len, q.ring));
    }
    if !(128..=16 * 1024 - 128).contains(&q.buf_size) || !q.buf_size.is_multiple_of(128) {
        return Err(format!("buffer size {}", q.buf_size));
    }
    if !(64..=MAX_FRAME).contains(&q.max_frame) {
        return Err(format!("max frame {}", q.max_frame));
    }
    Ok(())
}

fn ring_ok(len: u32, addr: u64) -> bool {
    (MIN_RING..=MAX_RING).contains(&len)
        && addr.checked_add(u64::from(len) * MAX_DESC_SIZE).is_some()
        && len.is_multiple_of(RING_MULTIPLE)
        && addr.is_multiple_of(RING_ALIGN)
        && addr != 0
}
