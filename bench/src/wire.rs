//! Just enough of the vfio-user wire format for the benchmark client: VERSION, 4-byte REGION_READ and
//! REGION_WRITE, and strict checking of every reply.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

pub const HEADER_SIZE: usize = 16;
pub const CMD_VERSION: u16 = 1;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_REGION_WRITE_MULTI: u16 = 15;
/// DMA_MAP flags: READ | WRITE.
pub const DMA_RW: u32 = 3;
pub const TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

/// A 4-byte REGION_READ: header + {u64 offset, u32 region, u32 count}.
pub const READ_REQ_LEN: usize = HEADER_SIZE + 16;
/// Its reply: header + {u64 offset, u32 region, u32 count} + 4 data bytes.
pub const READ_REPLY_LEN: usize = HEADER_SIZE + 16 + 4;
/// A 4-byte REGION_WRITE: header + {u64 offset, u32 region, u32 count} + 4 data bytes.
pub const WRITE_REQ_LEN: usize = HEADER_SIZE + 16 + 4;

/// What the benchmark sends to the server when negotiating.
pub const VERSION_CAPS: &str =
    r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"write_multiple":true}}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub cmd: u16,
    pub size: u32,
    pub flags: u32,
    pub errno: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            cmd: u16::from_le_bytes([b[2], b[3]]),
            size: u32_at(4),
            flags: u32_at(8),
            errno: u32_at(12),
        }
    }

    pub fn write_to(&self, b: &mut [u8]) {
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.errno.to_le_bytes());
    }
}

fn access_fields(b: &mut [u8], offset: u64, region: u32, count: u32) {
    b[16..24].copy_from_slice(&offset.to_le_bytes());
    b[24..28].copy_from_slice(&region.to_le_bytes());
    b[28..32].copy_from_slice(&count.to_le_bytes());
}

/// A 4-byte REGION_READ request.
pub fn read_request(id: u16, region: u32, offset: u64) -> [u8; READ_REQ_LEN] {
    let mut b = [0u8; READ_REQ_LEN];
    Header { id, cmd: CMD_REGION_READ, size: READ_REQ_LEN as u32, flags: 0, errno: 0 }.write_to(&mut b);
    access_fields(&mut b, offset, region, 4);
    b
}

/// The reply a server sends to [`read_request`]; the ping-pong peer sends exactly this too.
pub fn read_reply(id: u16, region: u32, offset: u64, value: u32) -> [u8; READ_REPLY_LEN] {
    let mut b = [0u8; READ_REPLY_LEN];
    Header { id, cmd: CMD_REGION_READ, size: READ_REPLY_LEN as u32, flags: TYPE_REPLY, errno: 0 }.write_to(&mut b);
    access_fields(&mut b, offset, region, 4);
    b[32..36].copy_from_slice(&value.to_le_bytes());
    b
}

/// A 4-byte posted (no_reply) REGION_WRITE.
pub fn posted_write(id: u16, region: u32, offset: u64, value: u32) -> [u8; WRITE_REQ_LEN] {
    let mut b = [0u8; WRITE_REQ_LEN];
    Header { id, cmd: CMD_REGION_WRITE, size: WRITE_REQ_LEN as u32, flags: FLAG_NO_REPLY, errno: 0 }.write_to(&mut b);
    access_fields(&mut b, offset, region, 4);
    b[32..36].copy_from_slice(&value.to_le_bytes());
    b
}

/// A posted (no_reply) REGION_WRITE_MULTI of 4-byte writes: header + {u64 wr_cnt} + per write {u64 offset,
/// u32 region, u32 count, 8 data bytes}.
pub fn posted_write_multi(id: u16, writes: &[(u32, u64, u32)]) -> Vec<u8> {
    let size = HEADER_SIZE + 8 + 24 * writes.len();
    let mut b = vec![0u8; size];
    Header { id, cmd: CMD_REGION_WRITE_MULTI, size: size as u32, flags: FLAG_NO_REPLY, errno: 0 }.write_to(&mut b);
    b[16..24].copy_from_slice(&(writes.len() as u64).to_le_bytes());
    for (i, &(region, offset, value)) in writes.iter().enumerate() {
        let e = &mut b[24 + 24 * i..48 + 24 * i];
        e[0..8].copy_from_slice(&offset.to_le_bytes());
        e[8..12].copy_from_slice(&region.to_le_bytes());
        e[12..16].copy_from_slice(&4u32.to_le_bytes());
        e[16..20].copy_from_slice(&value.to_le_bytes());
    }
    b
}

/// A DMA_MAP request: header + {u32 argsz 32, u32 flags, u64 fd offset, u64 iova, u64 size}; its fd (if any)
/// goes with it as SCM_RIGHTS.
pub fn dma_map_request(id: u16, flags: u32, offset: u64, iova: u64, size: u64) -> [u8; HEADER_SIZE + 32] {
    let mut b = [0u8; HEADER_SIZE + 32];
    Header { id, cmd: CMD_DMA_MAP, size: b.len() as u32, flags: 0, errno: 0 }.write_to(&mut b);
    b[16..20].copy_from_slice(&32u32.to_le_bytes());
    b[20..24].copy_from_slice(&flags.to_le_bytes());
    b[24..32].copy_from_slice(&offset.to_le_bytes());
    b[32..40].copy_from_slice(&iova.to_le_bytes());
    b[40..48].copy_from_slice(&size.to_le_bytes());
    b
}

/// A DMA_UNMAP request: header + {u32 argsz 24, u32 flags 0, u64 iova, u64 size}; the reply echoes the payload.
pub fn dma_unmap_request(id: u16, iova: u64, size: u64) -> [u8; HEADER_SIZE + 24] {
    let mut b = [0u8; HEADER_SIZE + 24];
    Header { id, cmd: CMD_DMA_UNMAP, size: b.len() as u32, flags: 0, errno: 0 }.write_to(&mut b);
    b[16..20].copy_from_slice(&24u32.to_le_bytes());
    b[24..32].copy_from_slice(&iova.to_le_bytes());
    b[32..40].copy_from_slice(&size.to_le_bytes());
    b
}

/// Sends one message with `fd` attached to its first byte (SCM_RIGHTS), all of it in one sendmsg.
pub fn send_with_fd(s: &UnixStream, msg: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    let n =
        sendmsg(s, &[io::IoSlice::new(msg)], &mut cmsg, SendFlags::NOSIGNAL).map_err(|e| format!("sendmsg: {e}"))?;
    if n != msg.len() {
        return Err(format!("sendmsg sent {n} of {} bytes", msg.len()));
    }
    Ok(())
}

/// Reads one reply of at most `buf.len()` bytes: normally a single read(2), like the ping-pong peer's. Only one
/// request may be outstanding: bytes past the reply's end mean the peer sent something unexpected (an error).
/// Returns the message length.
pub fn read_message(s: &mut UnixStream, buf: &mut [u8]) -> Result<usize, String> {
    let mut got = 0;
    let mut want = buf.len();
    loop {
        let n = match s.read(&mut buf[got..want]) {
            Ok(0) => return Err("peer closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err("no reply within the timeout".into())
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        got += n;
        if got >= HEADER_SIZE {
            let h = Header::parse(buf);
            let size = h.size as usize;
            if size < HEADER_SIZE || size > buf.len() {
                return Err(format!("reply {h:?}: size {size} outside 16..={}", buf.len()));
            }
            if got > size {
                return Err(format!("{} unexpected bytes after the reply {h:?}", got - size));
            }
            if got == size {
                return Ok(size);
            }
            want = size;
        }
    }
}

/// Checks a reply header: our id and command, the reply type, no error.
pub fn check_reply(h: &Header, id: u16, cmd: u16) -> Result<(), String> {
    if h.flags & FLAG_ERROR != 0 {
        return Err(format!("command {cmd} id {id} failed: errno {} ({h:?})", h.errno));
    }
    if h.id != id || h.cmd != cmd || h.flags != TYPE_REPLY || h.errno != 0 {
        return Err(format!("expected the reply to command {cmd} id {id}, got {h:?}"));
    }
    Ok(())
}

/// Checks a 4-byte REGION_READ reply and returns the value read.
pub fn parse_read_reply(b: &[u8], len: usize, id: u16, region: u32, offset: u64) -> Result<u32, String> {
    let h = Header::parse(b);
    check_reply(&h, id, CMD_REGION_READ)?;
    if len != READ_REPLY_LEN {
        return Err(format!("REGION_READ reply of {len} bytes, expected {READ_REPLY_LEN}"));
    }
    let off = u64::from_le_bytes(b[16..24].try_into().unwrap());
    let reg = u32::from_le_bytes(b[24..28].try_into().unwrap());
    let count = u32::from_le_bytes(b[28..32].try_into().unwrap());
    if (off, reg, count) != (offset, region, 4) {
        return Err(format!("REGION_READ reply echoes offset {off:#x} region {reg} count {count}"));
    }
    Ok(u32::from_le_bytes(b[32..36].try_into().unwrap()))
}

/// Sends VERSION 0.0 with [`VERSION_CAPS`] and checks the reply (major 0, NUL-terminated JSON capabilities).
pub fn negotiate(s: &mut UnixStream, id: u16) -> Result<serde_json::Value, String> {
    let mut payload = vec![0u8; 4];
    payload.extend_from_slice(VERSION_CAPS.as_bytes());
    payload.push(0);
    let mut msg = vec![0u8; HEADER_SIZE];
    Header { id, cmd: CMD_VERSION, size: (HEADER_SIZE + payload.len()) as u32, flags: 0, errno: 0 }.write_to(&mut msg);
    msg.extend_from_slice(&payload);
    s.write_all(&msg).map_err(|e| format!("sending VERSION: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let len = read_message(s, &mut buf).map_err(|e| format!("VERSION reply: {e}"))?;
    check_reply(&Header::parse(&buf), id, CMD_VERSION)?;
    let p = &buf[HEADER_SIZE..len];
    if p.len() < 5 || p[0..2] != [0, 0] || *p.last().unwrap() != 0 {
        return Err(format!("VERSION reply payload malformed: {p:?}"));
    }
    let json = std::str::from_utf8(&p[4..p.len() - 1]).map_err(|e| format!("VERSION reply JSON: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("VERSION reply JSON {json:?}: {e}"))?;
    if !v.get("capabilities").is_some_and(|c| c.is_object()) {
        return Err(format!("VERSION reply without a capabilities object: {json}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_region_read() {
        let r = read_request(3, 7, 0);
        let h = Header::parse(&r);
        assert_eq!((h.id, h.cmd, h.size as usize, h.flags), (3, CMD_REGION_READ, READ_REQ_LEN, 0));
        let a = read_reply(3, 7, 0, 0x154c_8086);
        assert_eq!(parse_read_reply(&a, a.len(), 3, 7, 0), Ok(0x154c_8086));
        assert!(parse_read_reply(&a, a.len(), 4, 7, 0).is_err());
        let w = posted_write(9, 0, 0x7c00, 1);
        assert_eq!(Header::parse(&w).flags, FLAG_NO_REPLY);
        assert_eq!((READ_REQ_LEN, READ_REPLY_LEN), (32, 36));
    }

    #[test]
    fn read_message_checks_sizes() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; READ_REPLY_LEN];
        a.write_all(&read_reply(1, 0, 8, 5)).unwrap();
        let n = read_message(&mut b, &mut buf).unwrap();
        assert_eq!(parse_read_reply(&buf, n, 1, 0, 8), Ok(5));
        // A stray reply (e.g. to a posted write) ahead of the expected one is caught.
        let mut stray = [0u8; 32];
        Header { id: 2, cmd: CMD_REGION_WRITE, size: 32, flags: TYPE_REPLY, errno: 0 }.write_to(&mut stray);
        a.write_all(&stray).unwrap();
        a.write_all(&read_reply(3, 0, 8, 5)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let err = read_message(&mut b, &mut buf).unwrap_err();
        assert!(err.contains("unexpected bytes"), "{err}");
        let mut rest = [0u8; 32];
        b.read_exact(&mut rest).unwrap();
        // An error reply (header only) is recognised without waiting for 36 bytes.
        let mut e = [0u8; HEADER_SIZE];
        Header { id: 3, cmd: CMD_REGION_READ, size: 16, flags: TYPE_REPLY | FLAG_ERROR, errno: 22 }.write_to(&mut e);
        a.write_all(&e).unwrap();
        let n = read_message(&mut b, &mut buf).unwrap();
        assert_eq!(n, HEADER_SIZE);
        assert!(parse_read_reply(&buf, n, 3, 0, 8).unwrap_err().contains("errno 22"));
    }
}
