//! vfio-user wire constants and the 16-byte message header (little endian).

/// Header size in bytes.
pub const HDR_SIZE: usize = 16;

/// Command numbers.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const DIRTY_PAGES_RETIRED: u16 = 14;
    pub const REGION_WRITE_MULTI: u16 = 15;
    pub const DEVICE_FEATURE: u16 = 16;
    pub const MIG_DATA_READ: u16 = 17;
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flag bits.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const TYPE_COMMAND: u32 = 0;
pub const TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

/// Our advertised (and the server's) max_data_xfer_size.
pub const MAX_DATA_XFER: u64 = 1 << 20;

/// VFIO device info flags.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// VFIO region info flags.
pub const REGION_FLAG_READ: u32 = 1 << 0;
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_FLAG_MMAP: u32 = 1 << 2;
pub const REGION_FLAG_CAPS: u32 = 1 << 3;

/// Region indexes (vfio-pci).
pub const BAR0: u32 = 0;
pub const BAR3: u32 = 3;
pub const CONFIG: u32 = 7;
pub const NUM_REGIONS: u32 = 9;

/// IRQ indexes.
pub const IRQ_INTX: u32 = 0;
pub const IRQ_MSI: u32 = 1;
pub const IRQ_MSIX: u32 = 2;
pub const IRQ_ERR: u32 = 3;
pub const IRQ_REQ: u32 = 4;
/// The five vfio-pci indexes and the remap IRQ (docs/remap-irq.md), with the default `--doorbells remap`.
pub const NUM_IRQS: u32 = 6;

/// IRQ info flags.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;

/// SET_IRQS flags.
pub const IRQ_DATA_NONE: u32 = 1 << 0;
pub const IRQ_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_ACTION_TRIGGER: u32 = 1 << 5;

/// DMA_MAP / DMA_UNMAP flags.
pub const DMA_READ_FLAG: u32 = 1 << 0;
pub const DMA_WRITE_FLAG: u32 = 1 << 1;
pub const DMA_RW: u32 = DMA_READ_FLAG | DMA_WRITE_FLAG;
pub const UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
pub const UNMAP_ALL: u32 = 1 << 1;

/// BAR0 registers (i40e VF).
pub mod reg {
    pub const VFINT_ICR01: u64 = 0x4800;
    pub const VFINT_DYN_CTL01: u64 = 0x5c00;
    pub const VF_ATQH1: u64 = 0x6400;
    pub const VF_ATQLEN1: u64 = 0x6800;
    pub const VF_ARQBAL1: u64 = 0x6c00;
    pub const VF_ATQBAH1: u64 = 0x7800;
    pub const VF_ATQBAL1: u64 = 0x7c00;
    pub const VF_ATQT1: u64 = 0x8400;
    pub const VFGEN_RSTAT: u64 = 0x8800;
    pub const DYN_INTENA: u32 = 1 << 0;
    pub const DYN_SWINT_TRIG: u32 = 1 << 2;
    pub const AQ_ENABLE: u32 = 1 << 31;
    pub const RSTAT_VFACTIVE: u32 = 2;
}

/// BAR3 offset of the MSI-X PBA.
pub const MSIX_PBA_OFFSET: u64 = 0x2000;

/// Admin queue descriptor flags / opcodes.
pub const AQ_FLAG_DD: u16 = 0x1;
pub const AQ_FLAG_CMP: u16 = 0x2;
pub const AQ_FLAG_ERR: u16 = 0x4;
pub const AQ_OP_QUEUE_SHUTDOWN: u16 = 0x0003;

/// A vfio-user message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u16,
    pub cmd: u16,
    pub size: u32,
    pub flags: u32,
    pub errno: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.errno.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8; HDR_SIZE]) -> Self {
        Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            cmd: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            flags: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            errno: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        }
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }
}

/// A whole message: header (with `size` = 16 + payload length) followed by the payload.
pub fn message(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header { id, cmd, size: (HDR_SIZE + payload.len()) as u32, flags, errno: 0 };
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Little-endian payload builder.
#[derive(Default, Clone, Debug)]
pub struct Payload(pub Vec<u8>);

impl Payload {
    pub fn new() -> Self {
        Payload(Vec::new())
    }
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
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

pub fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

pub fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The QEMU-like capabilities we offer in VERSION, NUL-terminated.
pub const QEMU_LIKE_CAPS: &str = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;

/// A 32-byte admin queue descriptor with only flags and opcode set.
pub fn aq_desc(opcode: u16, flags: u16) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[0..2].copy_from_slice(&flags.to_le_bytes());
    d[2..4].copy_from_slice(&opcode.to_le_bytes());
    d
}
