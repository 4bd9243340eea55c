//! The vfio-user wire format: header, command numbers, and little-endian field access that cannot read past a
//! payload's end.

pub const HEADER_SIZE: usize = 16;

pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DMA_READ: u16 = 11;
pub const CMD_DMA_WRITE: u16 = 12;
pub const CMD_DEVICE_RESET: u16 = 13;
pub const CMD_REGION_WRITE_MULTI: u16 = 15;
pub const CMD_DEVICE_FEATURE: u16 = 16;
pub const CMD_MIG_DATA_READ: u16 = 17;
pub const CMD_MIG_DATA_WRITE: u16 = 18;

// The remap IRQ's info capability chain (docs/remap-irq.md): a vfio-user extension, not in the kernel's uapi.
pub const VFU_IRQ_INFO_FLAG_CAPS: u32 = 1 << 4;
pub const VFU_IRQ_INFO_CAP_TYPE: u16 = 1;
pub const VFU_IRQ_INFO_CAP_REMAP_REGIONS: u16 = 2;

pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const TYPE_COMMAND: u32 = 0;
pub const TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;
const FLAGS_KNOWN: u32 = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        CMD_DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        CMD_DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DMA_READ => "DMA_READ",
        CMD_DMA_WRITE => "DMA_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        CMD_REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        CMD_DEVICE_FEATURE => "DEVICE_FEATURE",
        CMD_MIG_DATA_READ => "MIG_DATA_READ",
        CMD_MIG_DATA_WRITE => "MIG_DATA_WRITE",
        _ => "unknown",
    }
}

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
        let mut r = Reader::new(b);
        // The caller has 16 bytes, so none of these can fail.
        Header {
            id: r.u16().unwrap_or(0),
            cmd: r.u16().unwrap_or(0),
            size: r.u32().unwrap_or(0),
            flags: r.u32().unwrap_or(0),
            errno: r.u32().unwrap_or(0),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.cmd.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.errno.to_le_bytes());
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    pub fn has_unknown_flags(&self) -> bool {
        self.flags & !FLAGS_KNOWN != 0
    }
}

/// Builds one message: header with the final size, then the payload.
pub fn message(id: u16, cmd: u16, flags: u32, errno: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    Header { id, cmd, size: (HEADER_SIZE + payload.len()) as u32, flags, errno }.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Sequential little-endian reads that return `None` instead of reading past the end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

/// Little-endian payload builder.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let m = message(7, CMD_REGION_READ, TYPE_REPLY | FLAG_ERROR, 22, &[1, 2, 3]);
        let h = Header::parse(&m);
        assert_eq!(h, Header { id: 7, cmd: 9, size: 19, flags: 0x21, errno: 22 });
        assert_eq!(h.msg_type(), TYPE_REPLY);
        assert!(!h.has_unknown_flags());
    }

    #[test]
    fn reader_stops_at_end() {
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.bytes(usize::MAX), None);
        assert_eq!(r.rest(), &[0]);
    }
}
