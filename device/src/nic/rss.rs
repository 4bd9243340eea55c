//! Receive-side scaling as the i40e VF does it: a Toeplitz hash over the packet's addresses (and ports), the hash
//! enabled per packet classifier type by the HENA bitmap, and the queue picked through the lookup table.
//!
//! Pure functions over byte slices; hostile frames yield `None`, never a panic.

use crate::nic::offload::parse_ip;

/// The i40e packet classifier type a frame is hashed as. Each maps to one HENA bit (`enum i40e_filter_pctype` in
/// Linux `i40e_type.h`, the same values as `iavf_filter_pctype` in `iavf_type.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashType {
    /// NONF_IPV4_UDP, 31
    Ipv4Udp,
    /// NONF_IPV4_TCP, 33
    Ipv4Tcp,
    /// NONF_IPV4_SCTP, 34
    Ipv4Sctp,
    /// NONF_IPV4_OTHER, 35
    Ipv4Other,
    /// FRAG_IPV4, 36
    Ipv4Frag,
    /// NONF_IPV6_UDP, 41
    Ipv6Udp,
    /// NONF_IPV6_TCP, 43
    Ipv6Tcp,
    /// NONF_IPV6_SCTP, 44
    Ipv6Sctp,
    /// NONF_IPV6_OTHER, 45
    Ipv6Other,
    /// FRAG_IPV6, 46
    Ipv6Frag,
}

/// The HENA bit (PCTYPE number) of a hash type.
pub fn hena_bit(t: HashType) -> u32 {
    match t {
        HashType::Ipv4Udp => 31,
        HashType::Ipv4Tcp => 33,
        HashType::Ipv4Sctp => 34,
        HashType::Ipv4Other => 35,
        HashType::Ipv4Frag => 36,
        HashType::Ipv6Udp => 41,
        HashType::Ipv6Tcp => 43,
        HashType::Ipv6Sctp => 44,
        HashType::Ipv6Other => 45,
        HashType::Ipv6Frag => 46,
    }
}

/// The standard (Microsoft RSS) Toeplitz hash of `input` under `key`: for every input bit set, most significant
/// first, XOR in the 32 key bits starting at that bit's position. A key shorter than `input.len() + 4` bytes is
/// treated as if padded with zero bits (the i40e VF key is 52 bytes, enough for the 36-byte IPv6 TCP input).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    // A byte at input position n sees the key bits [8n, 8n + 40): load them once as a 40-bit word and shift per
    // input bit, instead of gathering 32 key bits one by one (this was a fifth of the datapath's CPU at 64 B).
    let k = |i: usize| u64::from(key.get(i).copied().unwrap_or(0));
    let mut hash = 0;
    for (n, &byte) in input.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        let w = (k(n) << 32) | (k(n + 1) << 24) | (k(n + 2) << 16) | (k(n + 3) << 8) | k(n + 4);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= (w >> (8 - bit)) as u32;
            }
        }
    }
    hash
}

/// The hash input of a received frame (Ethernet, up to two VLAN tags, IPv4/IPv6) in Microsoft RSS order: source
/// address, destination address, then source and destination port for non-fragmented TCP, UDP and SCTP. Fragments
/// and other protocols hash on the addresses only. `None` for non-IP or malformed frames (i40e would classify them
/// as L2_PAYLOAD, pctype 63, which is not hashed here).
///
/// The SCTP input is addresses and ports; whether i40e also mixes in the verification tag is not modelled.
pub fn hash_input(frame: &[u8]) -> Option<(HashInput, HashType)> {
    let p = parse_ip(frame)?;
    let addrs = if p.v6 { frame.get(p.l3 + 8..p.l3 + 40)? } else { frame.get(p.l3 + 12..p.l3 + 20)? };
    let l4_len = p.end - p.l4;
    let (frag, other, tcp, udp, sctp) = if p.v6 {
        (HashType::Ipv6Frag, HashType::Ipv6Other, HashType::Ipv6Tcp, HashType::Ipv6Udp, HashType::Ipv6Sctp)
    } else {
        (HashType::Ipv4Frag, HashType::Ipv4Other, HashType::Ipv4Tcp, HashType::Ipv4Udp, HashType::Ipv4Sctp)
    };
    let with_ports = match p.proto {
        _ if p.frag => None,
        Some(6) if l4_len >= 20 => Some(tcp),
        Some(17) if l4_len >= 8 => Some(udp),
        Some(132) if l4_len >= 12 => Some(sctp),
        _ => None,
    };
    let mut input = HashInput::default();
    input.push(addrs);
    match with_ports {
        Some(t) => {
            input.push(frame.get(p.l4..p.l4 + 4)?);
            Some((input, t))
        }
        None => Some((input, if p.frag { frag } else { other })),
    }
}

/// A hash input on the stack: at most 36 bytes (two IPv6 addresses and two ports), so hashing a received frame
/// allocates nothing. Derefs to the input bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashInput {
    /// Zero past `len`, so that equality is the inputs' equality.
    buf: [u8; HashInput::MAX],
    len: u8,
}

impl HashInput {
    pub const MAX: usize = 36;

    /// Appends `b`; the callers above never exceed [`HashInput::MAX`] (32 address bytes plus 4 port bytes).
    fn push(&mut self, b: &[u8]) {
        let at = usize::from(self.len);
        self.buf[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }
}

impl Default for HashInput {
    fn default() -> Self {
        HashInput { buf: [0; HashInput::MAX], len: 0 }
    }
}

impl std::ops::Deref for HashInput {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for HashInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The RSS hash of a frame, if its hash type is enabled in `hena` (the 64-bit HENA bitmap the driver set).
pub fn hash_frame(key: &[u8], hena: u64, frame: &[u8]) -> Option<(u32, HashType)> {
    let (input, t) = hash_input(frame)?;
    (hena & (1u64 << hena_bit(t)) != 0).then(|| (toeplitz_table(key, &input), t))
}

/// [`toeplitz`] by table: the hash is linear in the input bits, so it is the XOR over input bytes of the hash of
/// each byte alone at its position, looked up in a table of 256 entries per position built once per key (36 KiB).
/// A byte costs a load and an XOR instead of up to eight shifts and XORs. The table of the last key used is kept
/// per thread (the datapath worker's), and rebuilt when the driver sets another key.
pub fn toeplitz_table(key: &[u8], input: &[u8]) -> u32 {
    if input.len() > HashInput::MAX {
        return toeplitz(key, input);
    }
    TABLE
        .try_with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().is_none_or(|t| t.key != key) {
                *c = Some(ByteTable::new(key));
            }
            let t = &c.as_ref().expect("just built").t;
            input.iter().zip(t.iter()).fold(0, |h, (&b, row)| h ^ row[usize::from(b)])
        })
        .unwrap_or_else(|_| toeplitz(key, input))
}

/// Per input position, the hash of each byte value alone at that position.
struct ByteTable {
    key: Vec<u8>,
    t: Vec<[u32; 256]>,
}

impl ByteTable {
    fn new(key: &[u8]) -> Self {
        let t = (0..HashInput::MAX)
            .map(|n| {
                let mut input = [0u8; HashInput::MAX];
                std::array::from_fn(|b| {
                    input[n] = b as u8;
                    toeplitz(key, &input[..=n])
                })
            })
            .collect();
        ByteTable { key: key.to_vec(), t }
    }
}

thread_local! {
    static TABLE: std::cell::RefCell<Option<ByteTable>> = const { std::cell::RefCell::new(None) };
}

/// The queue the lookup table picks for `hash`: entry `hash % lut.len()`, which for i40e's power-of-two tables is
/// the low bits of the hash. An empty table gives queue 0. The caller must still check the entry against the
/// number of enabled queues.
pub fn queue_for(hash: u32, lut: &[u8]) -> u8 {
    if lut.is_empty() {
        return 0;
    }
    lut[hash as usize % lut.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::offload::test_frames::{build, Spec};
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The key of Microsoft's "Verifying the RSS Hash Calculation".
    const MS_KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0, 0xd0, 0xca,
        0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b,
        0xbe, 0xac, 0x01, 0xfa,
    ];

    /// (source, source port, destination, destination port, IP-only hash, TCP hash).
    const V4: [(&str, u16, &str, u16, u32, u32); 5] = [
        ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323e8fc2, 0x51ccc178),
        ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xd718262a, 0xc626b0ea),
        ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xd2d0a5de, 0x5c2b394a),
        ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xafc7327f),
        ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5d1809c5, 0x10e828a2),
    ];

    const V6: [(&str, u16, &str, u16, u32, u32); 3] = [
        ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2cc18cd5, 0x40207d3d),
        ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0f0c461c, 0xdde51bbf),
        ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024, 0x4b61e985, 0x02d1feef),
    ];

    fn spec(src: Vec<u8>, sport: u16, dst: Vec<u8>, dport: u16, v6: bool, proto: u8) -> Spec {
        Spec { v6, proto, src, dst, sport, dport, ..Spec::default() }
    }

    /// The definition, one key bit at a time.
    fn toeplitz_by_bits(key: &[u8], input: &[u8]) -> u32 {
        let key_bit = |i: usize| -> u32 { key.get(i / 8).map_or(0, |b| u32::from(b >> (7 - i % 8)) & 1) };
        let mut window = (0..32).fold(0u32, |w, i| (w << 1) | key_bit(i));
        let mut hash = 0;
        for (n, byte) in input.iter().enumerate() {
            for bit in 0..8 {
                if byte & (0x80 >> bit) != 0 {
                    hash ^= window;
                }
                window = (window << 1) | key_bit(32 + n * 8 + bit);
            }
        }
        hash
    }

    #[test]
    fn the_word_at_a_time_hash_is_the_definition_for_any_key_length() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for klen in 0..60 {
            for ilen in [0, 1, 4, 8, 12, 36, 40, 56] {
                let key: Vec<u8> = (0..klen).map(|_| next()).collect();
                let input: Vec<u8> = (0..ilen).map(|_| next()).collect();
                assert_eq!(toeplitz(&key, &input), toeplitz_by_bits(&key, &input), "key {klen} input {ilen}");
            }
        }
    }

    #[test]
    fn microsoft_vectors_raw_input() {
        for (s, sp, d, dp, ip_hash, tcp_hash) in V4 {
            let mut input = s.parse::<Ipv4Addr>().unwrap().octets().to_vec();
            input.extend_from_slice(&d.parse::<Ipv4Addr>().unwrap().octets());
            assert_eq!(toeplitz(&MS_KEY, &input), ip_hash, "{s} -> {d}");
            input.extend_from_slice(&sp.to_be_bytes());
            input.extend_from_slice(&dp.to_be_bytes());
            assert_eq!(toeplitz(&MS_KEY, &input), tcp_hash, "{s}:{sp} -> {d}:{dp}");
        }
        for (s, sp, d, dp, ip_hash, tcp_hash) in V6 {
            let mut input = s.parse::<Ipv6Addr>().unwrap().octets().to_vec();
            input.extend_from_slice(&d.parse::<Ipv6Addr>().unwrap().octets());
            assert_eq!(toeplitz(&MS_KEY, &input), ip_hash, "{s} -> {d}");
            input.extend_from_slice(&sp.to_be_bytes());
            input.extend_from_slice(&dp.to_be_bytes());
            assert_eq!(toeplitz(&MS_KEY, &input), tcp_hash, "{s}:{sp} -> {d}:{dp}");
        }
    }

    #[test]
    fn microsoft_vectors_from_frames() {
        let all_hena = u64::MAX;
        for (s, sp, d, dp, ip_hash, tcp_hash) in V4 {
            let src = s.parse::<Ipv4Addr>().unwrap().octets().to_vec();
            let dst = d.parse::<Ipv4Addr>().unwrap().octets().to_vec();
            let tcp = build(&spec(src.clone(), sp, dst.clone(), dp, false, 6));
            assert_eq!(hash_frame(&MS_KEY, all_hena, &tcp), Some((tcp_hash, HashType::Ipv4Tcp)));
            let udp = build(&spec(src.clone(), sp, dst.clone(), dp, false, 17));
            assert_eq!(hash_frame(&MS_KEY, all_hena, &udp), Some((tcp_hash, HashType::Ipv4Udp)));
            let icmp = build(&spec(src, sp, dst, dp, false, 1));
            assert_eq!(hash_frame(&MS_KEY, all_hena, &icmp), Some((ip_hash, HashType::Ipv4Other)));
        }
        for (s, sp, d, dp, ip_hash, tcp_hash) in V6 {
            let src = s.parse::<Ipv6Addr>().unwrap().octets().to_vec();
            let dst = d.parse::<Ipv6Addr>().unwrap().octets().to_vec();
            let tcp = build(&spec(src.clone(), sp, dst.clone(), dp, true, 6));
            assert_eq!(hash_frame(&MS_KEY, all_hena, &tcp), Some((tcp_hash, HashType::Ipv6Tcp)));
            let udp = Spec { vlan: Some(10), ip_opts: 8, ..spec(src.clone(), sp, dst.clone(), dp, true, 17) };
            assert_eq!(hash_frame(&MS_KEY, all_hena, &build(&udp)), Some((tcp_hash, HashType::Ipv6Udp)));
            let icmp = build(&spec(src, sp, dst, dp, true, 58));
            assert_eq!(hash_frame(&MS_KEY, all_hena, &icmp), Some((ip_hash, HashType::Ipv6Other)));
        }
    }

    #[test]
    fn the_table_hash_is_the_definition_and_follows_key_changes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for round in 0..200 {
            // Keys change from call to call (and sometimes repeat), as a driver's CONFIG_RSS_KEY may.
            let klen = [0, 4, 40, 52][round % 4];
            let key: Vec<u8> = (0..klen).map(|_| next()).collect();
            for ilen in [0, 1, 8, 12, 32, 36, 37, 40] {
                let input: Vec<u8> = (0..ilen).map(|_| next()).collect();
                assert_eq!(toeplitz_table(&key, &input), toeplitz(&key, &input), "key {key:?} input {input:?}");
            }
        }
    }

    #[test]
    fn hash_input_layout_and_types() {
        let s = Spec { sport: 0x1122, dport: 0x3344, ..Spec::default() };
        let (input, t) = hash_input(&build(&s)).unwrap();
        assert_eq!(*input, [10, 0, 0, 1, 10, 0, 0, 2, 0x11, 0x22, 0x33, 0x44]);
        assert_eq!(t, HashType::Ipv4Tcp);
        let (input, t) = hash_input(&build(&Spec { proto: 132, ..s })).unwrap();
        assert_eq!((input.len(), t), (12, HashType::Ipv4Sctp));
        // IPv4 fragment: addresses only.
        let mut f = build(&Spec::default());
        f[20] |= 0x20;
        assert_eq!(
            hash_input(&f).map(|(i, t)| (i.to_vec(), t)),
            Some((vec![10, 0, 0, 1, 10, 0, 0, 2], HashType::Ipv4Frag))
        );
        // IPv6 fragment header.
        let mut fs = Spec { proto: 44, payload: vec![6, 0, 0, 1, 0, 0, 0, 7], ..Spec::default().v6() };
        fs.payload.extend_from_slice(&[0u8; 20]);
        let (input, t) = hash_input(&build(&fs)).unwrap();
        assert_eq!((input.len(), t), (32, HashType::Ipv6Frag));
        // Not IP / malformed / truncated.
        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(hash_input(&arp), None);
        assert_eq!(hash_input(&[]), None);
        let f = build(&Spec::default());
        for n in 0..f.len() {
            assert_eq!(hash_input(&f[..n]), None, "prefix {n}");
        }
        // TCP header cut by the IP length: hashed as "other".
        let mut f = build(&Spec { payload: vec![], ..Spec::default() });
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(hash_input(&f).unwrap().1, HashType::Ipv4Other);
    }

    #[test]
    fn hena_bits() {
        let bits: Vec<u32> = [
            HashType::Ipv4Udp,
            HashType::Ipv4Tcp,
            HashType::Ipv4Sctp,
            HashType::Ipv4Other,
            HashType::Ipv4Frag,
            HashType::Ipv6Udp,
            HashType::Ipv6Tcp,
            HashType::Ipv6Sctp,
            HashType::Ipv6Other,
            HashType::Ipv6Frag,
        ]
        .into_iter()
        .map(hena_bit)
        .collect();
        assert_eq!(bits, [31, 33, 34, 35, 36, 41, 43, 44, 45, 46]);
        // Disabled type: no hash.
        let f = build(&Spec::default());
        assert_eq!(hash_frame(&MS_KEY, !(1 << 33), &f), None);
        assert!(hash_frame(&MS_KEY, 1 << 33, &f).is_some());
    }

    #[test]
    fn short_key_is_zero_padded() {
        let input: Vec<u8> = (0..36).map(|i| i * 7 + 1).collect();
        for len in [0, 1, 3, 4, 5, 17, 40] {
            let short = &MS_KEY[..len];
            let mut padded = short.to_vec();
            padded.resize(64, 0);
            assert_eq!(toeplitz(short, &input), toeplitz(&padded, &input), "key length {len}");
        }
        assert_eq!(toeplitz(&[], &input), 0);
        assert_eq!(toeplitz(&MS_KEY, &[]), 0);
        // A 52-byte key (the VF's) covers every input.
        let key52: Vec<u8> = (0..52).map(|i| i as u8 ^ 0x5a).collect();
        assert_eq!(toeplitz(&key52[..40], &input), toeplitz(&key52, &input));
    }

    #[test]
    fn queue_selection() {
        let lut: Vec<u8> = (0..64).map(|i| i % 4).collect();
        assert_eq!(queue_for(0, &lut), 0);
        assert_eq!(queue_for(0x51ccc178, &lut), lut[0x38]);
        assert_eq!(queue_for(u32::MAX, &lut), lut[63]);
        let lut: Vec<u8> = (0..64).map(|i| i as u8).collect();
        for h in [0u32, 1, 63, 64, 0xdead_beef] {
            assert_eq!(u32::from(queue_for(h, &lut)), h & 63);
        }
        assert_eq!(queue_for(10, &[7, 8, 9]), 8);
        assert_eq!(queue_for(12345, &[]), 0);
    }
}
