//! TX offloads (checksum insertion, TSO) and RX checksum verification / packet-type classification.
//!
//! Pure functions over byte slices: no I/O, no guest memory. Every input is untrusted (it comes from the guest or
//! from the wire); malformed input yields an error or a "not verified" answer, never a panic.
//!
//! Descriptor layouts (Linux `iavf_type.h`, same as `i40e_type.h`):
//!
//! - data descriptor qword1: DTYPE bits 0-3, CMD bits 4-13 (`IAVF_TXD_QW1_CMD_SHIFT` 4): EOP 0x1, RS 0x2,
//!   ICRC 0x4, IL2TAG1 0x8, IIPT 0x20/0x40/0x60 (CMD bits 5-6, qword1 bits 9-10: IPv6, IPv4 without header
//!   checksum, IPv4 with header checksum), L4T 0x100/0x200/0x300 (CMD bits 8-9, qword1 bits 12-13: TCP, SCTP,
//!   UDP); OFFSET bits 16-33 (`IAVF_TXD_QW1_OFFSET_SHIFT` 16): MACLEN in 2-byte words at offset bit 0 (7 bits,
//!   qword1 16-22), IPLEN in 4-byte words at offset bit 7 (7 bits, qword1 23-29), L4LEN in 4-byte words at offset
//!   bit 14 (4 bits, qword1 30-33); buffer size bits 34-47; L2TAG1 bits 48-63.
//! - context descriptor qword1: DTYPE 1 in bits 0-3, CMD bits 4-19 (`IAVF_TX_CTX_DESC_TSO` 0x01 = qword1 bit 4),
//!   TSO_LEN bits 30-47 (18 bits, payload bytes without headers), MSS bits 50-63 (14 bits).
//!
//! What iavf puts in the frame (`iavf_tso`, `iavf_tx_enable_csum`): for plain checksum offload the L4 checksum
//! field holds the pseudo-header sum *with* the L4 length and IIPT is "IPv4, no header checksum" (the stack already
//! computed it); for TSO the IPv4 total length and header checksum (or the IPv6 payload length) are zeroed, the
//! TCP checksum holds the pseudo-header sum *without* length, and IIPT is "IPv4 with header checksum". This module
//! ignores every seed and recomputes pseudo-headers and checksums from the headers, so both cases come out right.

use std::fmt;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SCTP_HLEN: usize = 12;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_SCTP: u8 = 132;
/// VLAN tags walked in front of the IP header (802.1Q, or 802.1ad + 802.1Q).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up on finding the upper-layer header.
const MAX_IPV6_EXT_HEADERS: usize = 8;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Data descriptor qword1: CMD field position.
pub const TXD_QW1_CMD_SHIFT: u32 = 4;
/// Data descriptor qword1: OFFSET field position (MACLEN, IPLEN, L4LEN).
pub const TXD_QW1_OFFSET_SHIFT: u32 = 16;
/// Context descriptor qword1: DTYPE value of a context descriptor.
pub const TX_DESC_DTYPE_CONTEXT: u64 = 1;
/// Context descriptor qword1: CMD.TSO.
pub const TXD_CTX_QW1_TSO: u64 = 1 << 4;
/// Context descriptor qword1: TSO_LEN field position (18 bits).
pub const TXD_CTX_QW1_TSO_LEN_SHIFT: u32 = 30;
/// Context descriptor qword1: MSS field position (14 bits).
pub const TXD_CTX_QW1_MSS_SHIFT: u32 = 50;

/// Most TSO payload bytes accepted for one frame. Linux iavf never sets a TSO max size, so its TSO frames stay
/// within the legacy 64 KiB GSO limit.
pub const MAX_TSO_PAYLOAD: usize = 64 * 1024;
/// Most segments one TSO frame may produce. iavf refuses hardware GSO for an MSS below 64
/// (`iavf_features_check`), so 64 KiB / 64 bounds what a well-behaved driver can ask for.
pub const MAX_TSO_SEGMENTS: usize = 1024;

/// IIPT: what the device is told about the (inner) IP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Iipt {
    /// Not IP, or no offload.
    #[default]
    None,
    Ipv6,
    /// IPv4, header checksum left as it is.
    Ipv4,
    /// IPv4, the device computes the header checksum.
    Ipv4Csum,
}

/// L4T: which L4 checksum the device computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum L4t {
    #[default]
    Unknown,
    Tcp,
    Sctp,
    Udp,
}

/// The context descriptor's TSO request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tso {
    /// Payload bytes per segment (headers excluded).
    pub mss: u16,
    /// Total payload bytes of the frame (headers excluded).
    pub tso_len: u32,
}

/// The offloads the descriptors of one frame ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxOffload {
    pub iipt: Iipt,
    pub l4t: L4t,
    /// MACLEN in bytes (Ethernet header including in-frame VLAN tags).
    pub maclen: usize,
    /// IPLEN in bytes (IPv4 header with options, IPv6 header with extension headers).
    pub iplen: usize,
    /// L4LEN in bytes (TCP header with options; 8 for UDP, 12 for SCTP).
    pub l4len: usize,
    /// TSO, from a context descriptor with CMD.TSO set.
    pub tso: Option<Tso>,
}

impl TxOffload {
    /// True when the frame goes out exactly as the driver wrote it.
    pub fn is_noop(&self) -> bool {
        self.iipt != Iipt::Ipv4Csum && self.l4t == L4t::Unknown && self.tso.is_none()
    }
}

/// Decodes the offload request of one frame. `data_qw1` is qword1 of any data descriptor of the frame (iavf writes
/// the same CMD offload bits and OFFSET into all of them); `ctx_qw1` is qword1 of the context descriptor in front
/// of the frame, if there was one. A context descriptor without CMD.TSO, or that is not DTYPE 1, requests no TSO.
pub fn decode(data_qw1: u64, ctx_qw1: Option<u64>) -> TxOffload {
    let cmd = (data_qw1 >> TXD_QW1_CMD_SHIFT) & 0x3ff;
    let iipt = match (cmd >> 5) & 3 {
        0 => Iipt::None,
        1 => Iipt::Ipv6,
        2 => Iipt::Ipv4,
        _ => Iipt::Ipv4Csum,
    };
    let l4t = match (cmd >> 8) & 3 {
        0 => L4t::Unknown,
        1 => L4t::Tcp,
        2 => L4t::Sctp,
        _ => L4t::Udp,
    };
    let offset = (data_qw1 >> TXD_QW1_OFFSET_SHIFT) & 0x3ffff;
    let tso = ctx_qw1.filter(|q| q & 0xf == TX_DESC_DTYPE_CONTEXT && q & TXD_CTX_QW1_TSO != 0).map(|q| Tso {
        mss: ((q >> TXD_CTX_QW1_MSS_SHIFT) & 0x3fff) as u16,
        tso_len: ((q >> TXD_CTX_QW1_TSO_LEN_SHIFT) & 0x3ffff) as u32,
    });
    TxOffload {
        iipt,
        l4t,
        maclen: (offset & 0x7f) as usize * 2,
        iplen: ((offset >> 7) & 0x7f) as usize * 4,
        l4len: ((offset >> 14) & 0xf) as usize * 4,
        tso,
    }
}

/// Why a frame's offload request cannot be carried out. Real hardware would flag most of these as a malicious
/// driver event; the caller decides whether to drop the frame or the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// The frame ends before a header the descriptor points at.
    Truncated,
    /// MACLEN differs from the frame's Ethernet header (with up to two VLAN tags), or its EtherType from IIPT.
    MacLen,
    /// IPLEN does not fit the IP header (IPv4: differs from IHL; IPv6: under 40 bytes).
    IpLen,
    /// L4LEN differs from the TCP data offset (TSO) or is under the minimum TCP header.
    L4Len,
    /// The IP version differs from IIPT, or L4T / TSO without IIPT.
    IpVersion,
    /// The IPv4 protocol (or the IPv6 next header, without extension headers) differs from L4T.
    Protocol,
    /// The IP total/payload length disagrees with the frame.
    IpTotalLen,
    /// TSO with MSS 0.
    MssZero,
    /// TSO of something other than TCP.
    TsoNotTcp,
    /// TSO_LEN is 0 or differs from the payload bytes in the frame.
    TsoLen,
    /// TSO beyond [`MAX_TSO_PAYLOAD`] or [`MAX_TSO_SEGMENTS`].
    TsoTooBig,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            OffloadError::Truncated => "frame shorter than its headers",
            OffloadError::MacLen => "MACLEN does not match the Ethernet header",
            OffloadError::IpLen => "IPLEN does not match the IP header",
            OffloadError::L4Len => "L4LEN does not match the TCP header",
            OffloadError::IpVersion => "IP version does not match IIPT",
            OffloadError::Protocol => "IP protocol does not match L4T",
            OffloadError::IpTotalLen => "IP length does not match the frame",
            OffloadError::MssZero => "TSO with MSS 0",
            OffloadError::TsoNotTcp => "TSO of a non-TCP frame",
            OffloadError::TsoLen => "TSO_LEN does not match the payload",
            OffloadError::TsoTooBig => "TSO frame too large",
        };
        f.write_str(s)
    }
}

impl std::error::Error for OffloadError {}

/// Applies the offloads to one frame and returns the frame(s) to put on the wire: the frame itself (copied, with
/// checksums filled in) or, with TSO, its segments.
///
/// Checksums: IPv4 header checksum with IIPT "IPv4 with checksum"; TCP/UDP checksum over IPv4 or IPv6 with a
/// pseudo-header recomputed from the headers (the driver's seed is ignored; a UDP result of 0 is sent as 0xFFFF);
/// SCTP CRC32c. The L4 checksum covers the IP payload as the IP length field gives it (trailing Ethernet padding
/// is left alone), or to the end of the frame when that field is 0.
///
/// TSO (TCP only, IPv4 or IPv6): headers replicated, IPv4 total length / IPv6 payload length set per segment, IPv4
/// id incremented per segment, TCP sequence advanced, FIN/PSH only on the last segment, CWR only on the first, IPv4
/// header and TCP checksums recomputed for every segment.
///
/// Limitations: IPv6 pseudo-headers use the destination in the fixed header (a routing header's final destination
/// is not looked up); no tunnels (context descriptor tunnelling fields are ignored); no UDP segmentation.
pub fn apply(frame: &[u8], off: &TxOffload) -> Result<Vec<Vec<u8>>, OffloadError> {
    if off.is_noop() {
        return Ok(vec![frame.to_vec()]);
    }
    match off.tso {
        Some(tso) => segment(frame, off, &locate(frame, off)?, tso),
        None => {
            let mut out = frame.to_vec();
            fill_checksums(&mut out, off)?;
            Ok(vec![out])
        }
    }
}

/// [`apply`] for a request without TSO, in place: the one frame that goes out is `frame` itself, so the
/// transmit path needs no copy. On error `frame` may be partly changed (it is dropped then).
pub fn fill_checksums(frame: &mut [u8], off: &TxOffload) -> Result<(), OffloadError> {
    if off.is_noop() {
        return Ok(());
    }
    debug_assert!(off.tso.is_none(), "TSO goes through apply");
    let lay = locate(frame, off)?;
    if off.iipt == Iipt::Ipv4Csum {
        fill_ipv4_csum(frame, lay.l3, off.iplen)?;
    }
    if off.l4t != L4t::Unknown {
        // The IPv4 header checksum just written is not part of what the payload end is read from.
        let end = ip_payload_end(frame, &lay, off.iplen)?;
        fill_l4_csum(frame, &lay, end - lay.l4, off.l4t)?;
    }
    Ok(())
}

/// Where the headers are, once MACLEN/IPLEN are validated against the frame.
struct Layout {
    l3: usize,
    v6: bool,
    l4: usize,
}

fn locate(frame: &[u8], off: &TxOffload) -> Result<Layout, OffloadError> {
    let v6 = match off.iipt {
        Iipt::None => return Err(OffloadError::IpVersion),
        Iipt::Ipv6 => true,
        Iipt::Ipv4 | Iipt::Ipv4Csum => false,
    };
    let (l3, ethertype) = l2_header(frame).ok_or(OffloadError::Truncated)?;
    let want_type = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
    if off.maclen != l3 || ethertype != want_type {
        return Err(OffloadError::MacLen);
    }
    let vihl = *frame.get(l3).ok_or(OffloadError::Truncated)?;
    if vihl >> 4 != if v6 { 6 } else { 4 } {
        return Err(OffloadError::IpVersion);
    }
    let iplen_ok = if v6 {
        off.iplen >= IPV6_HLEN
    } else {
        off.iplen >= IPV4_MIN_HLEN && off.iplen == usize::from(vihl & 0xf) * 4
    };
    if !iplen_ok {
        return Err(OffloadError::IpLen);
    }
    let l4 = l3 + off.iplen;
    if frame.len() < l4 {
        return Err(OffloadError::Truncated);
    }
    if let Some(proto) = l4_proto(off.l4t) {
        // Without extension headers the IPv6 next header must be the L4 protocol; with them, IPLEN says where the
        // L4 header is and the chain is the driver's business.
        let field = if v6 { (off.iplen == IPV6_HLEN).then(|| frame[l3 + 6]) } else { Some(frame[l3 + 9]) };
        if field.is_some_and(|p| p != proto) {
            return Err(OffloadError::Protocol);
        }
    }
    Ok(Layout { l3, v6, l4 })
}

fn l4_proto(l4t: L4t) -> Option<u8> {
    match l4t {
        L4t::Unknown => None,
        L4t::Tcp => Some(PROTO_TCP),
        L4t::Sctp => Some(PROTO_SCTP),
        L4t::Udp => Some(PROTO_UDP),
    }
}

/// End of the IP payload by the IP length field (or the frame's end when the field is 0).
fn ip_payload_end(frame: &[u8], lay: &Layout, iplen: usize) -> Result<usize, OffloadError> {
    let (field, base) = if lay.v6 {
        (be16(frame, lay.l3 + 4).ok_or(OffloadError::Truncated)?, lay.l3 + IPV6_HLEN)
    } else {
        (be16(frame, lay.l3 + 2).ok_or(OffloadError::Truncated)?, lay.l3)
    };
    if field == 0 {
        return Ok(frame.len());
    }
    let end = base + usize::from(field);
    if end < lay.l3 + iplen || end > frame.len() {
        return Err(OffloadError::IpTotalLen);
    }
    Ok(end)
}

fn segment(frame: &[u8], off: &TxOffload, lay: &Layout, tso: Tso) -> Result<Vec<Vec<u8>>, OffloadError> {
    if off.l4t != L4t::Tcp {
        return Err(OffloadError::TsoNotTcp);
    }
    if tso.mss == 0 {
        return Err(OffloadError::MssZero);
    }
    let doff = usize::from(*frame.get(lay.l4 + 12).ok_or(OffloadError::Truncated)? >> 4) * 4;
    if off.l4len < TCP_MIN_HLEN || off.l4len != doff {
        return Err(OffloadError::L4Len);
    }
    let hdr_len = lay.l4 + off.l4len;
    let payload = frame.get(hdr_len..).ok_or(OffloadError::Truncated)?;
    let tso_len = tso.tso_len as usize;
    if tso_len == 0 || tso_len != payload.len() {
        return Err(OffloadError::TsoLen);
    }
    let mss = usize::from(tso.mss);
    let nseg = tso_len.div_ceil(mss);
    if tso_len > MAX_TSO_PAYLOAD || nseg > MAX_TSO_SEGMENTS {
        return Err(OffloadError::TsoTooBig);
    }
    let headers = &frame[..hdr_len];
    let seq0 = be32(frame, lay.l4 + 4).ok_or(OffloadError::Truncated)?;
    let id0 = be16(frame, lay.l3 + 4).ok_or(OffloadError::Truncated)?;
    let mut out = Vec::with_capacity(nseg);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let mut seg = Vec::with_capacity(hdr_len + chunk.len());
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        let l4_len = off.l4len + chunk.len();
        if lay.v6 {
            let plen = u16::try_from(off.iplen - IPV6_HLEN + l4_len).map_err(|_| OffloadError::TsoTooBig)?;
            put16(&mut seg, lay.l3 + 4, plen)?;
        } else {
            let tot = u16::try_from(off.iplen + l4_len).map_err(|_| OffloadError::TsoTooBig)?;
            put16(&mut seg, lay.l3 + 2, tot)?;
            put16(&mut seg, lay.l3 + 4, id0.wrapping_add(i as u16))?;
            fill_ipv4_csum(&mut seg, lay.l3, off.iplen)?;
        }
        put32(&mut seg, lay.l4 + 4, seq0.wrapping_add((i * mss) as u32))?;
        let mut flags = frame[lay.l4 + 13];
        if i + 1 < nseg {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[lay.l4 + 13] = flags;
        fill_l4_csum(&mut seg, lay, l4_len, L4t::Tcp)?;
        out.push(seg);
    }
    Ok(out)
}

fn fill_ipv4_csum(buf: &mut [u8], l3: usize, iplen: usize) -> Result<(), OffloadError> {
    put16(buf, l3 + 10, 0)?;
    let hdr = buf.get(l3..l3 + iplen).ok_or(OffloadError::Truncated)?;
    let csum = !fold(sum16(0, hdr));
    put16(buf, l3 + 10, csum)
}

/// Computes the L4 checksum of `l4_len` bytes at `lay.l4` and stores it.
fn fill_l4_csum(buf: &mut [u8], lay: &Layout, l4_len: usize, l4t: L4t) -> Result<(), OffloadError> {
    let (proto, field, min_len) = match l4t {
        L4t::Unknown => return Ok(()),
        L4t::Tcp => (PROTO_TCP, 16, TCP_MIN_HLEN),
        L4t::Udp => (PROTO_UDP, 6, UDP_HLEN),
        L4t::Sctp => (PROTO_SCTP, 8, SCTP_HLEN),
    };
    if l4_len < min_len || buf.len() < lay.l4 + l4_len {
        return Err(OffloadError::Truncated);
    }
    let end = lay.l4 + l4_len;
    if l4t == L4t::Sctp {
        put32(buf, lay.l4 + field, 0)?;
        let crc = crc32c(&buf[lay.l4..end]);
        buf[lay.l4 + field..lay.l4 + field + 4].copy_from_slice(&crc.to_le_bytes());
        return Ok(());
    }
    if !lay.v6 && l4_len > usize::from(u16::MAX) {
        return Err(OffloadError::IpTotalLen);
    }
    put16(buf, lay.l4 + field, 0)?;
    let acc = pseudo_header_sum(buf, lay.l3, lay.v6, proto, l4_len).ok_or(OffloadError::Truncated)?;
    let mut csum = !fold(sum16(acc, &buf[lay.l4..end]));
    if l4t == L4t::Udp && csum == 0 {
        csum = 0xffff;
    }
    put16(buf, lay.l4 + field, csum)
}

/// Ones'-complement sum of the pseudo-header (not folded, not inverted).
fn pseudo_header_sum(frame: &[u8], l3: usize, v6: bool, proto: u8, l4_len: usize) -> Option<u64> {
    let addrs = if v6 { frame.get(l3 + 8..l3 + 40)? } else { frame.get(l3 + 12..l3 + 20)? };
    let len = l4_len as u64;
    Some(sum16(0, addrs) + u64::from(proto) + (len >> 16) + (len & 0xffff))
}

/// Adds `data` as big-endian 16-bit words to `acc` (an odd final byte is padded with zero). Callers start every
/// piece at an even offset of the checksummed data.
/// The unfolded ones' complement sum of `data` as big-endian 16-bit words (an odd last byte padded), added to
/// `acc`. The bulk is summed as little-endian 32-bit words, a loop the compiler vectorises: since 2^16 = 1
/// (mod 2^16 - 1) a 32-bit word counts as the sum of its two 16-bit halves once [`fold`]ed, and a ones' complement
/// sum of byte-swapped words is the byte-swapped sum (RFC 1071), so the folded little-endian sum is swapped once at
/// the end. A u64 holds 2^32 such words, far more than any frame.
fn sum16(acc: u64, data: &[u8]) -> u64 {
    let quads = data.chunks_exact(4);
    let rest = quads.remainder();
    let le: u64 = quads.map(|w| u64::from(u32::from_le_bytes(w.try_into().expect("4 bytes")))).sum();
    let mut sum = acc + u64::from(fold(le).swap_bytes());
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        sum += u64::from(*b) << 8;
    }
    sum
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC32c (Castagnoli, reflected, init and final XOR 0xFFFFFFFF), as SCTP uses it; SCTP stores the result
/// little-endian in its checksum field.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| CRC32C_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8))
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn put16(b: &mut [u8], off: usize, v: u16) -> Result<(), OffloadError> {
    b.get_mut(off..off + 2).ok_or(OffloadError::Truncated)?.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

fn put32(b: &mut [u8], off: usize, v: u32) -> Result<(), OffloadError> {
    b.get_mut(off..off + 4).ok_or(OffloadError::Truncated)?.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

fn is_vlan_tpid(t: u16) -> bool {
    matches!(t, 0x8100 | 0x88a8 | 0x9100)
}

/// The offset of the L3 header and its EtherType, after up to [`MAX_VLAN_TAGS`] VLAN tags.
pub(crate) fn l2_header(frame: &[u8]) -> Option<(usize, u16)> {
    let mut off = ETH_HLEN - 2;
    for _ in 0..MAX_VLAN_TAGS {
        let t = be16(frame, off)?;
        if !is_vlan_tpid(t) {
            return Some((off + 2, t));
        }
        off += 4;
    }
    Some((off + 2, be16(frame, off)?))
}

/// An IPv4 or IPv6 packet found in a received frame, with lengths checked against the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParsedIp {
    /// Offset of the IP header.
    pub l3: usize,
    pub v6: bool,
    /// IPv4 header length (with options); 40 for IPv6.
    pub l3_hlen: usize,
    /// Offset of the upper-layer header (after IPv4 options / IPv6 extension headers).
    pub l4: usize,
    /// End of the IP packet by its length field (anything after it is link padding).
    pub end: usize,
    /// The upper-layer protocol; `None` when an IPv6 extension header chain was not followed to its end.
    pub proto: Option<u8>,
    /// A fragment (IPv4 MF or offset, IPv6 fragment header).
    pub frag: bool,
    /// An IPv6 routing header is present: the pseudo-header destination may not be the fixed header's.
    pub routing: bool,
}

/// Parses Ethernet (+ VLAN tags) and an IPv4/IPv6 header. `None` for non-IP or malformed packets.
pub(crate) fn parse_ip(frame: &[u8]) -> Option<ParsedIp> {
    let (l3, ethertype) = l2_header(frame)?;
    match ethertype {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(l3)?;
            let hlen = usize::from(vihl & 0xf) * 4;
            let tot = usize::from(be16(frame, l3 + 2)?);
            if vihl >> 4 != 4 || hlen < IPV4_MIN_HLEN || tot < hlen || l3 + tot > frame.len() {
                return None;
            }
            let frag_field = be16(frame, l3 + 6)?;
            Some(ParsedIp {
                l3,
                v6: false,
                l3_hlen: hlen,
                l4: l3 + hlen,
                end: l3 + tot,
                proto: Some(frame[l3 + 9]),
                frag: frag_field & 0x3fff != 0,
                routing: false,
            })
        }
        ETHERTYPE_IPV6 => {
            if *frame.get(l3)? >> 4 != 6 {
                return None;
            }
            let plen = usize::from(be16(frame, l3 + 4)?);
            let end = l3 + IPV6_HLEN + plen;
            // A payload length of 0 (jumbogram) is not followed.
            if plen == 0 || end > frame.len() {
                return None;
            }
            let mut p = ParsedIp {
                l3,
                v6: true,
                l3_hlen: IPV6_HLEN,
                l4: l3 + IPV6_HLEN,
                end,
                proto: None,
                frag: false,
                routing: false,
            };
            let mut next = frame[l3 + 6];
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                match next {
                    // hop-by-hop, routing, destination options
                    0 | 43 | 60 => {
                        let hdr = frame.get(p.l4..p.l4 + 2).filter(|_| p.l4 + 2 <= end)?;
                        p.routing |= next == 43;
                        next = hdr[0];
                        p.l4 += (usize::from(hdr[1]) + 1) * 8;
                        if p.l4 > end {
                            return None;
                        }
                    }
                    // fragment
                    44 => {
                        if p.l4 + 8 > end {
                            return None;
                        }
                        p.frag = true;
                        next = frame[p.l4];
                        p.l4 += 8;
                        p.proto = Some(next);
                        return Some(p);
                    }
                    _ => {
                        p.proto = Some(next);
                        return Some(p);
                    }
                }
            }
            Some(p)
        }
        _ => None,
    }
}

/// The packet classes the device reports, each mapping to an i40e hardware ptype (see [`ptype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtypeClass {
    /// Not IP, or malformed IP.
    Other,
    /// IPv4, not TCP/UDP (ICMP and SCTP included: no L4 check is claimed for them).
    Ipv4,
    Ipv4Frag,
    Ipv4Tcp,
    Ipv4Udp,
    /// IPv6, not TCP/UDP.
    Ipv6,
    Ipv6Frag,
    Ipv6Tcp,
    Ipv6Udp,
}

/// The i40e/iavf ptype number (RX descriptor qword1 bits 30-37) of a non-tunnelled packet class, from iavf's
/// `iavf_ptype_lookup`: 1 L2 MAC PAY2; 22 IPv4 fragment; 23 IPv4 PAY3; 24 IPv4 UDP; 26 IPv4 TCP; 88 IPv6
/// fragment; 89 IPv6 PAY3; 90 IPv6 UDP; 92 IPv6 TCP.
pub fn ptype(class: PtypeClass) -> u8 {
    match class {
        PtypeClass::Other => 1,
        PtypeClass::Ipv4Frag => 22,
        PtypeClass::Ipv4 => 23,
        PtypeClass::Ipv4Udp => 24,
        PtypeClass::Ipv4Tcp => 26,
        PtypeClass::Ipv6Frag => 88,
        PtypeClass::Ipv6 => 89,
        PtypeClass::Ipv6Udp => 90,
        PtypeClass::Ipv6Tcp => 92,
    }
}

/// RX checksum verdict for one frame, in the terms of the RX descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxCsum {
    pub class: PtypeClass,
    /// Status L3L4P: the L3 (and for TCP/UDP classes the L4) checksum was checked. The driver ignores IPE/L4E
    /// without it and then verifies in software.
    pub l3l4p: bool,
    /// Error IPE: bad IPv4 header checksum.
    pub ipe: bool,
    /// Error L4E: bad TCP/UDP checksum (or an IPv6 UDP checksum of 0, or a UDP length that disagrees with IP).
    pub l4e: bool,
}

/// RX descriptor qword1 status bit L3L4P (`IAVF_RX_DESC_STATUS_L3L4P_SHIFT` 3).
pub const RXD_QW1_STATUS_L3L4P: u64 = 1 << 3;
/// RX descriptor qword1 error bit IPE (error field at bit 19, `IAVF_RX_DESC_ERROR_IPE_SHIFT` 3).
pub const RXD_QW1_ERROR_IPE: u64 = 1 << (19 + 3);
/// RX descriptor qword1 error bit L4E (error field at bit 19, `IAVF_RX_DESC_ERROR_L4E_SHIFT` 4).
pub const RXD_QW1_ERROR_L4E: u64 = 1 << (19 + 4);
/// RX descriptor qword1 ptype field position (8 bits).
pub const RXD_QW1_PTYPE_SHIFT: u32 = 30;

impl RxCsum {
    /// The L3L4P, IPE, L4E and ptype bits of RX descriptor writeback qword1, to OR with DD, EOF and the length.
    pub fn qword1_bits(&self) -> u64 {
        let mut q = u64::from(ptype(self.class)) << RXD_QW1_PTYPE_SHIFT;
        if self.l3l4p {
            q |= RXD_QW1_STATUS_L3L4P;
            if self.ipe {
                q |= RXD_QW1_ERROR_IPE;
            }
            if self.l4e {
                q |= RXD_QW1_ERROR_L4E;
            }
        }
        q
    }
}

/// Classifies a received frame (Ethernet, up to two VLAN tags, IPv4/IPv6, TCP/UDP) and checks its checksums.
/// A TCP/UDP class with `l3l4p` set and no error bit means the L4 checksum really verified: iavf then reports
/// CHECKSUM_UNNECESSARY. Fragments, IPv6 packets with a routing header and anything not parsed get no L4 claim.
pub fn rx_checksum_ok(frame: &[u8]) -> RxCsum {
    let other = RxCsum { class: PtypeClass::Other, l3l4p: false, ipe: false, l4e: false };
    let Some(p) = parse_ip(frame) else {
        return other;
    };
    let ipe = !p.v6 && fold(sum16(0, &frame[p.l3..p.l3 + p.l3_hlen])) != 0xffff;
    let l4_len = p.end - p.l4;
    let (frag_class, l3_class, tcp_class, udp_class) = if p.v6 {
        (PtypeClass::Ipv6Frag, PtypeClass::Ipv6, PtypeClass::Ipv6Tcp, PtypeClass::Ipv6Udp)
    } else {
        (PtypeClass::Ipv4Frag, PtypeClass::Ipv4, PtypeClass::Ipv4Tcp, PtypeClass::Ipv4Udp)
    };
    let l3_only = |class| RxCsum { class, l3l4p: true, ipe, l4e: false };
    if p.frag {
        return l3_only(frag_class);
    }
    let (class, proto, field) = match p.proto {
        Some(PROTO_TCP) if l4_len >= TCP_MIN_HLEN => (tcp_class, PROTO_TCP, 16),
        Some(PROTO_UDP) if l4_len >= UDP_HLEN => (udp_class, PROTO_UDP, 6),
        _ => return l3_only(l3_class),
    };
    if p.routing {
        return RxCsum { class, l3l4p: false, ipe: false, l4e: false };
    }
    let seg = &frame[p.l4..p.end];
    let l4e = if proto == PROTO_UDP && be16(seg, 4) != Some(l4_len as u16) {
        true
    } else if proto == PROTO_UDP && be16(seg, field) == Some(0) {
        // IPv4: no checksum sent; IPv6: a zero checksum is invalid.
        p.v6
    } else {
        match pseudo_header_sum(frame, p.l3, p.v6, proto, l4_len) {
            Some(acc) => fold(sum16(acc, seg)) != 0xffff,
            None => true,
        }
    };
    RxCsum { class, l3l4p: true, ipe, l4e }
}

#[cfg(test)]
pub(crate) mod test_frames {
    //! A small, independent frame builder and verifier for tests (its checksum code shares nothing with the
    //! module under test).

    pub(crate) struct Spec {
        pub vlan: Option<u16>,
        pub v6: bool,
        pub proto: u8,
        /// IPv4 option bytes (multiple of 4) or IPv6 destination-options header bytes (multiple of 8).
        pub ip_opts: usize,
        /// TCP option bytes (multiple of 4).
        pub tcp_opts: usize,
        pub src: Vec<u8>,
        pub dst: Vec<u8>,
        pub sport: u16,
        pub dport: u16,
        pub seq: u32,
        pub flags: u8,
        pub id: u16,
        pub payload: Vec<u8>,
    }

    impl Default for Spec {
        fn default() -> Self {
            Spec {
                vlan: None,
                v6: false,
                proto: 6,
                ip_opts: 0,
                tcp_opts: 0,
                src: vec![10, 0, 0, 1],
                dst: vec![10, 0, 0, 2],
                sport: 40000,
                dport: 80,
                seq: 0x1000_0000,
                flags: 0x18,
                id: 0x1234,
                payload: b"hello, world".to_vec(),
            }
        }
    }

    impl Spec {
        pub fn v6(mut self) -> Self {
            self.v6 = true;
            self.src = (0..16).map(|i| 0x20 + i).collect();
            self.dst = (0..16).map(|i| 0xf0 - i).collect();
            self
        }
    }

    /// Reference ones'-complement checksum over the concatenation of `parts` (result not inverted).
    pub(crate) fn ref_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut s: u32 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = u32::from(bytes[i]) << 8;
            let lo = if i + 1 < bytes.len() { u32::from(bytes[i + 1]) } else { 0 };
            s += hi | lo;
            s = (s & 0xffff) + (s >> 16);
            i += 2;
        }
        s as u16
    }

    pub(crate) struct Offsets {
        pub l3: usize,
        pub l4: usize,
        pub l4_hlen: usize,
    }

    pub(crate) fn offsets(s: &Spec) -> Offsets {
        let l3 = if s.vlan.is_some() { 18 } else { 14 };
        let l4 = l3 + if s.v6 { 40 + s.ip_opts } else { 20 + s.ip_opts };
        let l4_hlen = match s.proto {
            6 => 20 + s.tcp_opts,
            17 => 8,
            132 => 12,
            _ => 0,
        };
        Offsets { l3, l4, l4_hlen }
    }

    fn pseudo(s: &Spec, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&s.src);
        p.extend_from_slice(&s.dst);
        if s.v6 {
            p.extend_from_slice(&(l4_len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, s.proto]);
        } else {
            p.extend_from_slice(&[0, s.proto]);
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        p
    }

    /// Builds a frame with every length and checksum correct (SCTP checksum left 0).
    pub(crate) fn build(s: &Spec) -> Vec<u8> {
        let o = offsets(s);
        let mut l4 = Vec::new();
        match s.proto {
            6 => {
                l4.extend_from_slice(&s.sport.to_be_bytes());
                l4.extend_from_slice(&s.dport.to_be_bytes());
                l4.extend_from_slice(&s.seq.to_be_bytes());
                l4.extend_from_slice(&0x0bad_cafeu32.to_be_bytes());
                l4.push((((20 + s.tcp_opts) / 4) as u8) << 4);
                l4.push(s.flags);
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                l4.extend(std::iter::repeat_n(1u8, s.tcp_opts));
            }
            17 => {
                l4.extend_from_slice(&s.sport.to_be_bytes());
                l4.extend_from_slice(&s.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            132 => {
                l4.extend_from_slice(&s.sport.to_be_bytes());
                l4.extend_from_slice(&s.dport.to_be_bytes());
                l4.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
            }
            _ => {}
        }
        l4.extend_from_slice(&s.payload);
        let csum_at = match s.proto {
            6 => Some(16),
            17 => Some(6),
            _ => None,
        };
        if let Some(at) = csum_at {
            let mut c = !ref_sum(&[&pseudo(s, l4.len()), &l4]);
            if s.proto == 17 && c == 0 {
                c = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }

        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        if let Some(tci) = s.vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(if s.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        assert_eq!(f.len(), o.l3);
        if s.v6 {
            let next = if s.ip_opts > 0 { 60 } else { s.proto };
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((s.ip_opts + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[next, 64]);
            f.extend_from_slice(&s.src);
            f.extend_from_slice(&s.dst);
            if s.ip_opts > 0 {
                f.extend_from_slice(&[s.proto, (s.ip_opts / 8 - 1) as u8, 1, (s.ip_opts - 4) as u8]);
                f.extend(std::iter::repeat_n(0u8, s.ip_opts - 4));
            }
        } else {
            let hlen = 20 + s.ip_opts;
            let mut ip = vec![0x40 | (hlen / 4) as u8, 0];
            ip.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.id.to_be_bytes());
            ip.extend_from_slice(&[0x40, 0, 64, s.proto, 0, 0]);
            ip.extend_from_slice(&s.src);
            ip.extend_from_slice(&s.dst);
            ip.extend(std::iter::repeat_n(1u8, s.ip_opts));
            let c = !ref_sum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        assert_eq!(f.len(), o.l4);
        f.extend_from_slice(&l4);
        f
    }

    /// Verifies a frame laid out as `s` describes (addresses and protocol from `s`, lengths from the frame):
    /// (IPv4 header checksum ok, L4 checksum ok).
    pub(crate) fn verify(s: &Spec, f: &[u8]) -> (bool, bool) {
        let o = offsets(s);
        let ip_ok = s.v6 || ref_sum(&[&f[o.l3..o.l4]]) == 0xffff;
        let l4 = &f[o.l4..];
        let l4_ok = ref_sum(&[&pseudo(s, l4.len()), l4]) == 0xffff;
        (ip_ok, l4_ok)
    }
}

#[cfg(test)]
mod tests {
    use super::test_frames::{build, offsets, ref_sum, verify, Spec};
    use super::*;

    // Values as iavf spells them (iavf_type.h), to check the bit positions decode() assumes.
    const CMD_EOP: u64 = 0x1;
    const CMD_RS: u64 = 0x2;
    const CMD_ICRC: u64 = 0x4;
    const CMD_IIPT_IPV6: u64 = 0x20;
    const CMD_IIPT_IPV4: u64 = 0x40;
    const CMD_IIPT_IPV4_CSUM: u64 = 0x60;
    const CMD_L4T_TCP: u64 = 0x100;
    const CMD_L4T_SCTP: u64 = 0x200;
    const CMD_L4T_UDP: u64 = 0x300;

    fn data_qw1(cmd: u64, maclen: usize, iplen: usize, l4len: usize, size: u64) -> u64 {
        let offset = (maclen as u64 / 2) | ((iplen as u64 / 4) << 7) | ((l4len as u64 / 4) << 14);
        (cmd << 4) | (offset << 16) | (size << 34)
    }

    fn ctx_qw1(tso_len: usize, mss: u16) -> u64 {
        1 | (1 << 4) | ((tso_len as u64) << 30) | (u64::from(mss) << 50)
    }

    fn csum_off(s: &Spec) -> TxOffload {
        let o = offsets(s);
        let iipt = if s.v6 { CMD_IIPT_IPV6 } else { CMD_IIPT_IPV4 };
        let l4t = match s.proto {
            6 => CMD_L4T_TCP,
            17 => CMD_L4T_UDP,
            132 => CMD_L4T_SCTP,
            _ => 0,
        };
        decode(data_qw1(CMD_EOP | CMD_RS | CMD_ICRC | iipt | l4t, o.l3, o.l4 - o.l3, o.l4_hlen, 100), None)
    }

    /// What iavf leaves in a TSO frame: IPv4 total length and header checksum (or IPv6 payload length) zeroed,
    /// TCP checksum seeded with the pseudo-header sum without length.
    fn tso_input(s: &Spec) -> (Vec<u8>, TxOffload) {
        let o = offsets(s);
        let mut f = build(s);
        if s.v6 {
            f[o.l3 + 4..o.l3 + 6].fill(0);
        } else {
            f[o.l3 + 2..o.l3 + 4].fill(0);
            f[o.l3 + 10..o.l3 + 12].fill(0);
        }
        let mut p = s.src.clone();
        p.extend_from_slice(&s.dst);
        p.extend_from_slice(&[0, s.proto]);
        f[o.l4 + 16..o.l4 + 18].copy_from_slice(&ref_sum(&[&p]).to_be_bytes());
        let iipt = if s.v6 { CMD_IIPT_IPV6 } else { CMD_IIPT_IPV4_CSUM };
        let off = decode(
            data_qw1(CMD_EOP | CMD_RS | CMD_ICRC | iipt | CMD_L4T_TCP, o.l3, o.l4 - o.l3, o.l4_hlen, 2048),
            Some(ctx_qw1(s.payload.len(), 1448)),
        );
        (f, off)
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn decode_bit_positions() {
        let q = data_qw1(CMD_EOP | CMD_RS | CMD_ICRC | CMD_IIPT_IPV4_CSUM | CMD_L4T_TCP, 14, 20, 32, 1514);
        // IIPT at qword1 bits 9-10, L4T at 12-13, MACLEN 16-22, IPLEN 23-29, L4LEN 30-33.
        assert_eq!((q >> 9) & 3, 3);
        assert_eq!((q >> 12) & 3, 1);
        assert_eq!((q >> 16) & 0x7f, 7);
        assert_eq!((q >> 23) & 0x7f, 5);
        assert_eq!((q >> 30) & 0xf, 8);
        let off = decode(q, None);
        assert_eq!(off, TxOffload { iipt: Iipt::Ipv4Csum, l4t: L4t::Tcp, maclen: 14, iplen: 20, l4len: 32, tso: None });
        assert_eq!(decode(data_qw1(CMD_IIPT_IPV6 | CMD_L4T_UDP, 18, 40, 8, 0), None).iipt, Iipt::Ipv6);
        assert_eq!(decode(data_qw1(CMD_IIPT_IPV6 | CMD_L4T_UDP, 18, 40, 8, 0), None).l4t, L4t::Udp);
        assert_eq!(decode(data_qw1(CMD_IIPT_IPV4 | CMD_L4T_SCTP, 14, 20, 12, 0), None).iipt, Iipt::Ipv4);
        assert_eq!(decode(data_qw1(CMD_IIPT_IPV4 | CMD_L4T_SCTP, 14, 20, 12, 0), None).l4t, L4t::Sctp);
        // Largest field values.
        let max = decode(u64::MAX, Some(!0xe));
        assert_eq!((max.maclen, max.iplen, max.l4len), (254, 508, 60));
        assert_eq!(max.tso, Some(Tso { mss: 0x3fff, tso_len: 0x3ffff }));
        // Context: TSO bit 4, TSO_LEN bits 30-47, MSS bits 50-63.
        let c = ctx_qw1(10240, 1448);
        assert_eq!(decode(q, Some(c)).tso, Some(Tso { mss: 1448, tso_len: 10240 }));
        // Not a context descriptor, or no TSO bit: no TSO.
        assert_eq!(decode(q, Some(c & !0xf)).tso, None);
        assert_eq!(decode(q, Some(c & !(1 << 4))).tso, None);
        assert!(decode(data_qw1(CMD_EOP | CMD_RS | CMD_ICRC | CMD_IIPT_IPV4, 14, 20, 0, 60), None).is_noop());
    }

    #[test]
    fn noop_returns_frame_unchanged() {
        let f = build(&Spec::default());
        assert_eq!(apply(&f, &TxOffload::default()).unwrap(), vec![f.clone()]);
        let junk = [1u8, 2, 3];
        assert_eq!(apply(&junk, &TxOffload::default()).unwrap(), vec![junk.to_vec()]);
        assert_eq!(apply(&[], &TxOffload::default()).unwrap(), vec![Vec::<u8>::new()]);
    }

    /// Seeds the L4 checksum as iavf does for plain checksum offload (pseudo-header with length), or with junk,
    /// and checks apply() restores the reference frame.
    fn check_csum(s: &Spec) {
        let want = build(s);
        let o = offsets(s);
        let at = match s.proto {
            6 => o.l4 + 16,
            _ => o.l4 + 6,
        };
        let off = csum_off(s);
        for seed in [0u16, 0x1234, 0xffff] {
            let mut f = want.clone();
            f[at..at + 2].copy_from_slice(&seed.to_be_bytes());
            let out = apply(&f, &off).unwrap();
            assert_eq!(out, vec![want.clone()], "seed {seed:#x}");
            assert_eq!(verify(s, &out[0]), (true, true));
        }
    }

    #[test]
    fn the_four_byte_sum_folds_as_the_sum_of_16_bit_words() {
        let by_words = |mut acc: u64, d: &[u8]| {
            for (i, b) in d.iter().enumerate() {
                acc += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
            }
            fold(acc)
        };
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in (0..80).chain([1499, 1500, 1514, 9000, 65535]) {
            let d: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for acc in [0, 1, 0xffff, 0x1_2345, x >> 40] {
                assert_eq!(fold(sum16(acc, &d)), by_words(acc, &d), "{len} bytes, acc {acc:#x}");
            }
            assert_eq!(fold(sum16(0, &vec![0xff; len])), by_words(0, &vec![0xff; len]));
        }
    }

    #[test]
    fn checksum_ipv4_tcp_udp() {
        check_csum(&Spec::default());
        check_csum(&Spec { payload: payload(1001), ..Spec::default() });
        check_csum(&Spec { proto: 17, ..Spec::default() });
        check_csum(&Spec { proto: 17, payload: payload(333), ..Spec::default() });
        check_csum(&Spec { tcp_opts: 12, ip_opts: 8, ..Spec::default() });
        check_csum(&Spec { vlan: Some(0x0064), ..Spec::default() });
        check_csum(&Spec { vlan: Some(5), proto: 17, payload: vec![], ..Spec::default() });
    }

    #[test]
    fn checksum_ipv6_tcp_udp() {
        check_csum(&Spec::default().v6());
        check_csum(&Spec { payload: payload(1400), ..Spec::default().v6() });
        check_csum(&Spec { proto: 17, ..Spec::default().v6() });
        check_csum(&Spec { ip_opts: 16, ..Spec::default().v6() });
        check_csum(&Spec { ip_opts: 8, proto: 17, vlan: Some(7), ..Spec::default().v6() });
    }

    #[test]
    fn ipv4_header_checksum_only() {
        let s = Spec::default();
        let want = build(&s);
        let mut f = want.clone();
        f[24..26].copy_from_slice(&[0xde, 0xad]);
        let off = decode(data_qw1(CMD_EOP | CMD_IIPT_IPV4_CSUM, 14, 20, 0, 0), None);
        assert_eq!(apply(&f, &off).unwrap(), vec![want]);
    }

    #[test]
    fn udp_zero_checksum_sent_as_ffff() {
        // Pick the first payload word so the UDP checksum comes out as 0.
        let mut s = Spec { proto: 17, payload: payload(20), ..Spec::default() };
        s.payload[0] = 0;
        s.payload[1] = 0;
        let f = build(&s);
        let o = offsets(&s);
        let mut l4 = f[o.l4..].to_vec();
        l4[6..8].fill(0);
        let mut p = s.src.clone();
        p.extend_from_slice(&s.dst);
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let partial = ref_sum(&[&p, &l4]);
        s.payload[..2].copy_from_slice(&(0xffff - partial).to_be_bytes());
        let mut f = build(&s);
        f[o.l4 + 6..o.l4 + 8].fill(0);
        let out = apply(&f, &csum_off(&s)).unwrap();
        assert_eq!(&out[0][o.l4 + 6..o.l4 + 8], &[0xff, 0xff]);
        assert_eq!(verify(&s, &out[0]), (true, true));
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn sctp_crc32c() {
        for s in [Spec { proto: 132, ..Spec::default() }, Spec { proto: 132, ..Spec::default().v6() }] {
            let f = build(&s);
            let o = offsets(&s);
            let out = apply(&f, &csum_off(&s)).unwrap().remove(0);
            let stored = u32::from_le_bytes(out[o.l4 + 8..o.l4 + 12].try_into().unwrap());
            let mut z = out[o.l4..].to_vec();
            z[8..12].fill(0);
            assert_eq!(stored, crc32c(&z));
            assert_ne!(stored, 0);
            assert_eq!(out[..o.l4 + 8], f[..o.l4 + 8]);
            assert_eq!(out[o.l4 + 12..], f[o.l4 + 12..]);
        }
    }

    #[test]
    fn checksum_ignores_ethernet_padding() {
        let s = Spec { proto: 17, payload: vec![1, 2], ..Spec::default() };
        let want = build(&s);
        let mut f = want.clone();
        let o = offsets(&s);
        f[o.l4 + 6..o.l4 + 8].fill(0);
        f.resize(60, 0xee);
        let mut want_padded = want.clone();
        want_padded.resize(60, 0xee);
        assert_eq!(apply(&f, &csum_off(&s)).unwrap(), vec![want_padded]);
    }

    /// Checks a TSO result against the spec it was built from.
    fn check_segments(s: &Spec, segs: &[Vec<u8>], mss: usize) {
        let o = offsets(s);
        let hdr = o.l4 + o.l4_hlen;
        assert_eq!(segs.len(), s.payload.len().div_ceil(mss));
        let reference = build(s);
        let mut joined = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let body = &seg[hdr..];
            assert!(!body.is_empty() && body.len() <= mss);
            joined.extend_from_slice(body);
            assert_eq!(verify(s, seg), (true, true), "segment {i}");
            // Everything before the IP header is copied.
            assert_eq!(seg[..o.l3], reference[..o.l3]);
            if s.v6 {
                assert_eq!(usize::from(u16::from_be_bytes([seg[o.l3 + 4], seg[o.l3 + 5]])), seg.len() - o.l3 - 40);
            } else {
                assert_eq!(usize::from(u16::from_be_bytes([seg[o.l3 + 2], seg[o.l3 + 3]])), seg.len() - o.l3);
                assert_eq!(u16::from_be_bytes([seg[o.l3 + 4], seg[o.l3 + 5]]), s.id.wrapping_add(i as u16));
            }
            let seq = u32::from_be_bytes(seg[o.l4 + 4..o.l4 + 8].try_into().unwrap());
            assert_eq!(seq, s.seq.wrapping_add((i * mss) as u32));
            let flags = seg[o.l4 + 13];
            let last = i + 1 == segs.len();
            assert_eq!(flags & (TCP_FIN | TCP_PSH), if last { s.flags & (TCP_FIN | TCP_PSH) } else { 0 });
            assert_eq!(flags & TCP_CWR, if i == 0 { s.flags & TCP_CWR } else { 0 });
            assert_eq!(flags & 0x10, s.flags & 0x10, "ACK kept");
            // Options replicated.
            assert_eq!(seg[o.l4 + 20..hdr], reference[o.l4 + 20..hdr]);
        }
        assert_eq!(joined, s.payload);
    }

    #[test]
    fn tso_ipv4_10k_mss_1448() {
        let s = Spec { payload: payload(10 * 1024), flags: 0x10 | 0x08 | 0x01 | 0x80, tcp_opts: 12, ..Spec::default() };
        let (f, off) = tso_input(&s);
        assert_eq!(off.tso, Some(Tso { mss: 1448, tso_len: 10240 }));
        let segs = apply(&f, &off).unwrap();
        assert_eq!(segs.len(), 8);
        check_segments(&s, &segs, 1448);
        assert_eq!(segs[7].len(), 14 + 20 + 32 + 10240 - 7 * 1448);
    }

    #[test]
    fn tso_ipv4_id_and_seq_wrap() {
        let s = Spec { payload: payload(5000), id: 0xfffe, seq: 0xffff_f000, flags: 0x19, ..Spec::default() };
        let (f, off) = tso_input(&s);
        check_segments(&s, &apply(&f, &off).unwrap(), 1448);
    }

    #[test]
    fn tso_ipv6_with_ext_header_and_vlan() {
        let s = Spec {
            payload: payload(9000),
            ip_opts: 8,
            vlan: Some(0x2005),
            flags: 0x19,
            tcp_opts: 12,
            ..Spec::default().v6()
        };
        let (f, off) = tso_input(&s);
        assert_eq!((off.maclen, off.iplen, off.l4len), (18, 48, 32));
        let segs = apply(&f, &off).unwrap();
        assert_eq!(segs.len(), 7);
        check_segments(&s, &segs, 1448);
    }

    #[test]
    fn tso_exact_multiple_and_single_segment() {
        for n in [1448 * 3, 1448, 1, 1447] {
            for v6 in [false, true] {
                let base = if v6 { Spec::default().v6() } else { Spec::default() };
                let s = Spec { payload: payload(n), flags: 0x11, ..base };
                let (f, off) = tso_input(&s);
                check_segments(&s, &apply(&f, &off).unwrap(), 1448);
            }
        }
    }

    #[test]
    fn tso_fin_only_on_last() {
        let s = Spec { payload: payload(3000), flags: 0x19, ..Spec::default() };
        let (f, off) = tso_input(&s);
        let segs = apply(&f, &off).unwrap();
        let fins: Vec<bool> = segs.iter().map(|g| g[34 + 13] & TCP_FIN != 0).collect();
        assert_eq!(fins, vec![false, false, true]);
    }

    #[test]
    fn tso_errors() {
        let s = Spec { payload: payload(4000), ..Spec::default() };
        let (f, off) = tso_input(&s);
        let with_tso = |mss, tso_len| TxOffload { tso: Some(Tso { mss, tso_len }), ..off };
        assert_eq!(apply(&f, &with_tso(0, 4000)), Err(OffloadError::MssZero));
        assert_eq!(apply(&f, &with_tso(1448, 3999)), Err(OffloadError::TsoLen));
        assert_eq!(apply(&f, &with_tso(1448, 4001)), Err(OffloadError::TsoLen));
        assert_eq!(apply(&f, &with_tso(1448, 0)), Err(OffloadError::TsoLen));
        assert_eq!(apply(&f, &with_tso(1, 4000)), Err(OffloadError::TsoTooBig));
        assert_eq!(apply(&f, &TxOffload { l4t: L4t::Udp, ..off }), Err(OffloadError::Protocol));
        let su = Spec { proto: 17, payload: payload(4000), ..Spec::default() };
        let udp_tso = TxOffload { tso: Some(Tso { mss: 1448, tso_len: 4000 }), ..csum_off(&su) };
        assert_eq!(apply(&build(&su), &udp_tso), Err(OffloadError::TsoNotTcp));
        assert_eq!(apply(&f, &TxOffload { l4len: 24, ..off }), Err(OffloadError::L4Len));
        assert_eq!(apply(&f, &TxOffload { l4len: 0, ..off }), Err(OffloadError::L4Len));
        // Payload beyond 64 KiB.
        let big = Spec { payload: payload(MAX_TSO_PAYLOAD + 1), ..Spec::default() };
        let (bf, boff) = tso_input(&big);
        assert_eq!(apply(&bf, &boff), Err(OffloadError::TsoTooBig));
        // Header-only frame.
        assert_eq!(apply(&f[..54], &with_tso(1448, 0)), Err(OffloadError::TsoLen));
        assert_eq!(apply(&f[..50], &with_tso(1448, 0)), Err(OffloadError::Truncated));
    }

    #[test]
    fn descriptor_validation_errors() {
        let s = Spec::default();
        let f = build(&s);
        let off = csum_off(&s);
        assert_eq!(apply(&f, &TxOffload { maclen: 12, ..off }), Err(OffloadError::MacLen));
        assert_eq!(apply(&f, &TxOffload { maclen: 18, ..off }), Err(OffloadError::MacLen));
        assert_eq!(apply(&f, &TxOffload { maclen: 254, ..off }), Err(OffloadError::MacLen));
        assert_eq!(apply(&f, &TxOffload { iplen: 24, ..off }), Err(OffloadError::IpLen));
        assert_eq!(apply(&f, &TxOffload { iplen: 0, ..off }), Err(OffloadError::IpLen));
        assert_eq!(apply(&f, &TxOffload { iipt: Iipt::Ipv6, ..off }), Err(OffloadError::MacLen));
        assert_eq!(apply(&f, &TxOffload { iipt: Iipt::None, ..off }), Err(OffloadError::IpVersion));
        assert_eq!(apply(&f, &TxOffload { l4t: L4t::Udp, ..off }), Err(OffloadError::Protocol));
        // IPv6 IPLEN past the frame.
        let s6 = Spec::default().v6();
        let f6 = build(&s6);
        let off6 = csum_off(&s6);
        assert_eq!(apply(&f6, &TxOffload { iplen: 508, ..off6 }), Err(OffloadError::Truncated));
        assert_eq!(apply(&f6, &TxOffload { iplen: 36, ..off6 }), Err(OffloadError::IpLen));
        // Version nibble disagrees with the EtherType.
        let mut bad = f.clone();
        bad[14] = 0x65;
        assert_eq!(apply(&bad, &off), Err(OffloadError::IpVersion));
        // IP total length past the frame / shorter than the header.
        let mut bad = f.clone();
        bad[16..18].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(apply(&bad, &off), Err(OffloadError::IpTotalLen));
        bad[16..18].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(apply(&bad, &off), Err(OffloadError::IpTotalLen));
        // IP length leaves too little for a TCP header.
        bad[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(apply(&bad, &off), Err(OffloadError::Truncated));
        // Truncated L4 header.
        assert_eq!(apply(&f[..40], &off), Err(OffloadError::IpTotalLen));
        assert_eq!(apply(&f[..10], &off), Err(OffloadError::Truncated));
    }

    /// A tiny deterministic generator for the hostile-input tests.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 ^ (self.0 >> 29)
        }
    }

    #[test]
    fn hostile_prefixes_never_panic() {
        let specs = [
            Spec { payload: payload(3000), flags: 0x19, ..Spec::default() },
            Spec { payload: payload(3000), ip_opts: 8, vlan: Some(3), ..Spec::default().v6() },
            Spec { proto: 17, ..Spec::default() },
            Spec { proto: 132, ..Spec::default().v6() },
        ];
        for s in &specs {
            let (tf, toff) = tso_input(&Spec { payload: s.payload.clone(), ..Spec::default() });
            let f = build(s);
            let off = csum_off(s);
            for n in 0..=f.len() {
                let _ = apply(&f[..n], &off);
                let _ = rx_checksum_ok(&f[..n]);
            }
            for n in 0..=tf.len() {
                let _ = apply(&tf[..n], &toff);
                let tso = Some(Tso { mss: 64, tso_len: n.saturating_sub(54) as u32 });
                let _ = apply(&tf[..n], &TxOffload { tso, ..toff });
            }
        }
    }

    #[test]
    fn hostile_random_never_panic() {
        let mut rng = Lcg(0x5eed);
        let seeds =
            [build(&Spec::default()), build(&Spec::default().v6()), build(&Spec { vlan: Some(1), ..Spec::default() })];
        for i in 0..20000 {
            let mut f = seeds[i % seeds.len()].clone();
            // Corrupt a few bytes, maybe truncate, maybe extend.
            for _ in 0..(rng.next() % 6) {
                let at = (rng.next() as usize) % f.len();
                f[at] = rng.next() as u8;
            }
            match rng.next() % 4 {
                0 => f.truncate((rng.next() as usize) % (f.len() + 1)),
                1 => f.extend((0..rng.next() % 3000).map(|j| j as u8)),
                _ => {}
            }
            let ctx = if rng.next() & 1 == 0 { Some(rng.next() | 1 | (1 << 4)) } else { None };
            let off = decode(rng.next(), ctx);
            if let Ok(segs) = apply(&f, &off) {
                assert!(!segs.is_empty() && segs.len() <= MAX_TSO_SEGMENTS);
            }
            let rx = rx_checksum_ok(&f);
            let _ = rx.qword1_bits();
        }
    }

    #[test]
    fn rx_valid_frames() {
        let cases = [
            (Spec::default(), PtypeClass::Ipv4Tcp),
            (Spec { proto: 17, ..Spec::default() }, PtypeClass::Ipv4Udp),
            (Spec { vlan: Some(9), ip_opts: 4, ..Spec::default() }, PtypeClass::Ipv4Tcp),
            (Spec::default().v6(), PtypeClass::Ipv6Tcp),
            (Spec { proto: 17, ..Spec::default().v6() }, PtypeClass::Ipv6Udp),
            (Spec { ip_opts: 16, proto: 17, vlan: Some(2), ..Spec::default().v6() }, PtypeClass::Ipv6Udp),
            (Spec { proto: 1, ..Spec::default() }, PtypeClass::Ipv4),
            (Spec { proto: 132, ..Spec::default() }, PtypeClass::Ipv4),
            (Spec { proto: 58, ..Spec::default().v6() }, PtypeClass::Ipv6),
        ];
        for (s, class) in cases {
            let f = build(&s);
            assert_eq!(rx_checksum_ok(&f), RxCsum { class, l3l4p: true, ipe: false, l4e: false });
            // Link padding after the IP packet changes nothing.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0xaa; 30]);
            assert_eq!(rx_checksum_ok(&padded), rx_checksum_ok(&f));
        }
    }

    #[test]
    fn rx_bad_checksums() {
        let s = Spec::default();
        let mut f = build(&s);
        f[24] ^= 1;
        assert_eq!(rx_checksum_ok(&f), RxCsum { class: PtypeClass::Ipv4Tcp, l3l4p: true, ipe: true, l4e: false });
        let mut f = build(&s);
        let n = f.len();
        f[n - 1] ^= 0x40;
        assert_eq!(rx_checksum_ok(&f), RxCsum { class: PtypeClass::Ipv4Tcp, l3l4p: true, ipe: false, l4e: true });
        let s6 = Spec { proto: 17, ..Spec::default().v6() };
        let mut f = build(&s6);
        let n = f.len();
        f[n - 3] ^= 0x01;
        assert!(rx_checksum_ok(&f).l4e);
        // UDP checksum 0: fine over IPv4, an error over IPv6.
        let s4 = Spec { proto: 17, ..Spec::default() };
        let mut f = build(&s4);
        f[34 + 6..34 + 8].fill(0);
        assert!(!rx_checksum_ok(&f).l4e);
        let mut f = build(&s6);
        f[54 + 6..54 + 8].fill(0);
        assert!(rx_checksum_ok(&f).l4e);
        // UDP length disagreeing with IP.
        let mut f = build(&s4);
        f[34 + 4..34 + 6].copy_from_slice(&9u16.to_be_bytes());
        assert!(rx_checksum_ok(&f).l4e);
    }

    #[test]
    fn rx_fragments_and_others() {
        let mut f = build(&Spec::default());
        f[20] |= 0x20; // MF
        f[24..26].fill(0);
        let c = !ref_sum(&[&f[14..34]]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(rx_checksum_ok(&f), RxCsum { class: PtypeClass::Ipv4Frag, l3l4p: true, ipe: false, l4e: false });
        // IPv6 fragment header.
        let mut s = Spec { proto: 44, payload: vec![6, 0, 0, 1, 0, 0, 0, 7], ..Spec::default().v6() };
        s.payload.extend_from_slice(&[0u8; 20]);
        let f = build(&s);
        assert_eq!(rx_checksum_ok(&f).class, PtypeClass::Ipv6Frag);
        // Routing header: classified, but no checksum claim.
        let mut s = Spec { proto: 43, payload: vec![6, 0, 0, 0, 0, 0, 0, 0], ..Spec::default().v6() };
        s.payload.extend_from_slice(&[0u8; 20]);
        assert_eq!(
            rx_checksum_ok(&build(&s)),
            RxCsum { class: PtypeClass::Ipv6Tcp, l3l4p: false, ipe: false, l4e: false }
        );
        // ARP and short junk.
        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(rx_checksum_ok(&arp), RxCsum { class: PtypeClass::Other, l3l4p: false, ipe: false, l4e: false });
        assert_eq!(rx_checksum_ok(&[]).class, PtypeClass::Other);
        // IP length leaving less than a TCP header: L3 class only.
        let s = Spec { payload: vec![], ..Spec::default() };
        let mut f = build(&s);
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(rx_checksum_ok(&f).class, PtypeClass::Ipv4);
        // IP length past the frame: not parsed.
        let mut f = build(&s);
        f.truncate(44);
        assert_eq!(rx_checksum_ok(&f), RxCsum { class: PtypeClass::Other, l3l4p: false, ipe: false, l4e: false });
    }

    #[test]
    fn ptype_numbers_and_descriptor_bits() {
        assert_eq!(ptype(PtypeClass::Other), 1);
        assert_eq!(ptype(PtypeClass::Ipv4Frag), 22);
        assert_eq!(ptype(PtypeClass::Ipv4), 23);
        assert_eq!(ptype(PtypeClass::Ipv4Udp), 24);
        assert_eq!(ptype(PtypeClass::Ipv4Tcp), 26);
        assert_eq!(ptype(PtypeClass::Ipv6Frag), 88);
        assert_eq!(ptype(PtypeClass::Ipv6), 89);
        assert_eq!(ptype(PtypeClass::Ipv6Udp), 90);
        assert_eq!(ptype(PtypeClass::Ipv6Tcp), 92);
        let ok = RxCsum { class: PtypeClass::Ipv4Tcp, l3l4p: true, ipe: false, l4e: false };
        assert_eq!(ok.qword1_bits(), (26 << 30) | (1 << 3));
        let bad = RxCsum { ipe: true, l4e: true, ..ok };
        assert_eq!(bad.qword1_bits(), (26 << 30) | (1 << 3) | (1 << 22) | (1 << 23));
        let unchecked = RxCsum { class: PtypeClass::Other, l3l4p: false, ipe: true, l4e: true };
        assert_eq!(unchecked.qword1_bits(), 1 << 30);
    }
}
