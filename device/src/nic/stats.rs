//! Statistics, by name: the VSI counters virtchnl's GET_STATS reports (`struct virtchnl_eth_stats`, in its
//! order), and per-queue frame counts.

use serde::{Deserialize, Serialize};

#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EthStats {
    pub rx_bytes: u64,
    pub rx_unicast: u64,
    pub rx_multicast: u64,
    pub rx_broadcast: u64,
    /// Frames the device could not deliver: no enabled queue, a full backlog, a frame that can never fit, a
    /// frame that arrived while the device was paused.
    pub rx_discards: u64,
    pub rx_unknown_protocol: u64,
    pub tx_bytes: u64,
    pub tx_unicast: u64,
    pub tx_multicast: u64,
    pub tx_broadcast: u64,
    pub tx_discards: u64,
    /// Frames dropped for an invalid offload request, and queues shut down by malicious driver detection.
    pub tx_errors: u64,
}

impl EthStats {
    /// GET_STATS' reply payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            self.rx_bytes,
            self.rx_unicast,
            self.rx_multicast,
            self.rx_broadcast,
            self.rx_discards,
            self.rx_unknown_protocol,
            self.tx_bytes,
            self.tx_unicast,
            self.tx_multicast,
            self.tx_broadcast,
            self.tx_discards,
            self.tx_errors,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }

    pub fn count_rx(&mut self, frame: &[u8]) {
        self.rx_bytes += frame.len() as u64;
        match cast(frame) {
            Cast::Broadcast => self.rx_broadcast += 1,
            Cast::Multicast => self.rx_multicast += 1,
            Cast::Unicast => self.rx_unicast += 1,
        }
    }

    pub fn count_tx(&mut self, frame: &[u8]) {
        self.tx_bytes += frame.len() as u64;
        match cast(frame) {
            Cast::Broadcast => self.tx_broadcast += 1,
            Cast::Multicast => self.tx_multicast += 1,
            Cast::Unicast => self.tx_unicast += 1,
        }
    }
}

enum Cast {
    Unicast,
    Multicast,
    Broadcast,
}

fn cast(frame: &[u8]) -> Cast {
    match frame.first() {
        _ if frame.len() >= 6 && frame[..6] == [0xff; 6] => Cast::Broadcast,
        Some(b) if b & 1 == 1 => Cast::Multicast,
        _ => Cast::Unicast,
    }
}

/// Frames through one queue pair since power-on.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_cast_and_reports_in_virtchnl_order() {
        let mut s = EthStats::default();
        s.count_rx(&[0xff; 60]);
        s.count_rx(&[0x01; 60]);
        s.count_tx(&[0x02; 100]);
        s.tx_errors = 9;
        let b = s.to_bytes();
        let word = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        assert_eq!((word(0), word(2), word(3), word(6), word(7), word(11)), (120, 1, 1, 100, 1, 9));
    }
}
