//! PCI configuration space mechanics: storage, write masks, RW1C bits, BAR sizing and the capability chain.
//!
//! BAR sizing falls out of the write mask: the size bits of a BAR are not writable, so writing all ones reads
//! back the size mask with the type bits. The i40e-specific layout is built in [`vf_config`].

pub const CONFIG_SIZE: usize = 4096;
/// The part of config space that can change and is saved: the header and the capability list.
pub const SAVED_SIZE: usize = 256;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_I40E_VF: u16 = 0x154c;
pub const REVISION: u8 = 0x02;
pub const CLASS_ETHERNET: u32 = 0x020000;

pub const CMD: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const BAR0: usize = 0x10;
pub const CAP_PTR: usize = 0x34;

pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_WRITABLE: u16 = CMD_MEMORY | CMD_BUS_MASTER | (1 << 6) | (1 << 8) | (1 << 10);
const STATUS_CAP_LIST: u16 = 1 << 4;
const STATUS_RW1C: u16 = 0xf900;

pub const MSIX_CAP: usize = 0x70;
pub const PCIE_CAP: usize = 0xa0;
pub const PCIE_DEVCTL: usize = PCIE_CAP + 0x08;
pub const PCIE_DEVCTL_FLR: u16 = 1 << 15;
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub const MSIX_CTRL_MASKALL: u16 = 1 << 14;

/// BAR type bits: 64-bit (0b10 << 1), prefetchable (1 << 3).
const BAR_MEM64_PREFETCH: u32 = 0b1100;

/// Config space with per-bit write semantics.
#[derive(Clone)]
pub struct PciConfig {
    data: Box<[u8; CONFIG_SIZE]>,
    wmask: Box<[u8; CONFIG_SIZE]>,
    w1c: Box<[u8; CONFIG_SIZE]>,
}

impl Default for PciConfig {
    fn default() -> Self {
        PciConfig {
            data: Box::new([0; CONFIG_SIZE]),
            wmask: Box::new([0; CONFIG_SIZE]),
            w1c: Box::new([0; CONFIG_SIZE]),
        }
    }
}

impl PciConfig {
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.data[offset..offset + out.len()]);
    }

    /// Applies a write with hardware semantics: read-only bits keep their value, RW1C bits clear on 1.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            let (w, c) = (self.wmask[o], self.w1c[o]);
            self.data[o] = ((self.data[o] & !w) | (v & w)) & !(v & c);
        }
    }

    pub fn u8(&self, o: usize) -> u8 {
        self.data[o]
    }

    pub fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.data[o], self.data[o + 1]])
    }

    pub fn u32(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.data[o..o + 4].try_into().unwrap())
    }

    /// Sets a value regardless of write masks (device-side update).
    pub fn set_bytes(&mut self, o: usize, v: &[u8]) {
        self.data[o..o + v.len()].copy_from_slice(v);
    }

    fn init(&mut self, o: usize, v: &[u8], wmask: &[u8], w1c: &[u8]) {
        self.data[o..o + v.len()].copy_from_slice(v);
        self.wmask[o..o + wmask.len()].copy_from_slice(wmask);
        self.w1c[o..o + w1c.len()].copy_from_slice(w1c);
    }

    fn init16(&mut self, o: usize, v: u16, wmask: u16, w1c: u16) {
        self.init(o, &v.to_le_bytes(), &wmask.to_le_bytes(), &w1c.to_le_bytes());
    }

    fn init32(&mut self, o: usize, v: u32, wmask: u32) {
        self.init(o, &v.to_le_bytes(), &wmask.to_le_bytes(), &[]);
    }

    /// A 64-bit prefetchable memory BAR pair at BAR `n`, `n + 1`; `size` is a power of two.
    fn bar64(&mut self, n: usize, size: u64) {
        let o = BAR0 + 4 * n;
        self.init32(o, BAR_MEM64_PREFETCH, !(size as u32 - 1) & !0xf);
        self.init32(o + 4, 0, u32::MAX);
    }

    /// The standard header and capabilities (the first 256 bytes) as saved state. The extended space holds no
    /// capability and is never writable, so it is not saved.
    pub fn save(&self) -> Vec<u8> {
        self.data[..SAVED_SIZE].to_vec()
    }

    /// Loads saved bytes. Read-only bits (identity, BAR sizes, capability layout, MSI-X table size) must equal
    /// this device's: a difference means the state comes from another kind of device.
    pub fn load(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.len() != SAVED_SIZE {
            return Err(format!("config space of {} bytes, expected {SAVED_SIZE}", saved.len()));
        }
        for (o, &v) in saved.iter().enumerate() {
            let ro = !(self.wmask[o] | self.w1c[o]);
            if (v ^ self.data[o]) & ro != 0 {
                return Err(format!(
                    "config space byte {o:#05x} is {v:#04x}, but its read-only bits here are {:#04x}",
                    self.data[o] & ro
                ));
            }
        }
        self.data[..SAVED_SIZE].copy_from_slice(saved);
        Ok(())
    }

    /// The address a 64-bit BAR at `n` is programmed to.
    pub fn bar_address(&self, n: usize) -> u64 {
        let o = BAR0 + 4 * n;
        u64::from(self.u32(o) & !0xf) | (u64::from(self.u32(o + 4)) << 32)
    }
}

/// Geometry of the MSI-X table and PBA in BAR3.
pub const MSIX_BAR: usize = 3;
pub const MSIX_TABLE_OFFSET: u32 = 0;
pub const MSIX_PBA_OFFSET: u32 = 0x2000;
pub const BAR0_SIZE: u64 = 64 * 1024;
pub const BAR3_SIZE: u64 = 16 * 1024;

/// Power-on config space of the VF: 8086:154c, subsystem 8086:0000, class 020000, no INTx, BAR0 64 KiB and
/// BAR3 16 KiB (both 64-bit prefetchable), MSI-X at 0x70, a PCIe endpoint capability at 0xa0 with FLR, and no
/// extended capabilities (a zero header at 0x100 tells clients the list is empty).
pub fn vf_config(msix_vectors: u16) -> PciConfig {
    let mut c = PciConfig::default();
    c.init16(0x00, VENDOR_INTEL, 0, 0);
    c.init16(0x02, DEVICE_I40E_VF, 0, 0);
    c.init16(CMD, 0, CMD_WRITABLE, 0);
    c.init16(STATUS, STATUS_CAP_LIST, 0, STATUS_RW1C);
    c.init(0x08, &[REVISION], &[], &[]);
    c.init(0x09, &CLASS_ETHERNET.to_le_bytes()[..3], &[], &[]);
    c.init(0x0c, &[0], &[0xff], &[]); // cache line size is a scratch register
    c.bar64(0, BAR0_SIZE);
    c.bar64(MSIX_BAR, BAR3_SIZE);
    c.init16(0x2c, VENDOR_INTEL, 0, 0);
    c.init16(0x2e, 0x0000, 0, 0);
    c.init(CAP_PTR, &[MSIX_CAP as u8], &[], &[]);
    c.init(0x3c, &[0xff], &[0xff], &[]); // interrupt line: scratch; pin stays 0 (VFs have no INTx)

    // MSI-X: id 0x11, next -> PCIe; table size N-1; enable and function mask writable.
    c.init(MSIX_CAP, &[0x11, PCIE_CAP as u8], &[], &[]);
    c.init16(MSIX_CAP + 2, msix_vectors - 1, MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL, 0);
    c.init32(MSIX_CAP + 4, MSIX_TABLE_OFFSET | MSIX_BAR as u32, 0);
    c.init32(MSIX_CAP + 8, MSIX_PBA_OFFSET | MSIX_BAR as u32, 0);

    // PCIe v2 endpoint: DevCap = 512 B payload, extended tags, role-based errors, FLR.
    c.init(PCIE_CAP, &[0x10, 0x00], &[], &[]);
    c.init16(PCIE_CAP + 2, 0x0002, 0, 0);
    c.init32(PCIE_CAP + 4, 0x1000_8022, 0);
    c.init16(PCIE_DEVCTL, 0x2810, 0x7fff | PCIE_DEVCTL_FLR, 0);
    c.init16(PCIE_CAP + 0x0a, 0, 0, 0x000f);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &PciConfig, o: usize) -> u32 {
        let mut b = [0; 4];
        c.read(o, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity() {
        let c = vf_config(5);
        assert_eq!(rd32(&c, 0), 0x154c_8086);
        assert_eq!(rd32(&c, 8), 0x0200_0002);
        assert_eq!(rd32(&c, 0x2c), 0x0000_8086);
        assert_eq!(c.u8(0x3d), 0, "no interrupt pin");
        assert_eq!(c.u16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(rd32(&c, 0x100), 0, "empty extended capability list");
    }

    #[test]
    fn bar_sizing() {
        let mut c = vf_config(5);
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xffff_000c, "64 KiB, 64-bit, prefetchable");
        assert_eq!(rd32(&c, 0x14), u32::MAX);
        c.write(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x1c), 0xffff_c00c, "16 KiB");
        c.write(0x18, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x18), 0, "BAR2 not implemented");
        c.write(0x10, &0xfe00_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0x1_fe00_0000);
    }

    #[test]
    fn read_only_and_rw1c() {
        let mut c = vf_config(5);
        c.write(0, &[0xff; 4]);
        assert_eq!(rd32(&c, 0), 0x154c_8086);
        c.write(CMD, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16(CMD), CMD_WRITABLE);
        c.set_bytes(STATUS, &(STATUS_CAP_LIST | 0x8000).to_le_bytes());
        c.write(STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(c.u16(STATUS), STATUS_CAP_LIST);
    }

    #[test]
    fn save_and_load_keep_identity() {
        let mut c = vf_config(5);
        c.write(CMD, &6u16.to_le_bytes());
        c.write(0x10, &0xfe00_0000u32.to_le_bytes());
        let saved = c.save();
        let mut d = vf_config(5);
        d.load(&saved).unwrap();
        assert_eq!(d.save(), saved);
        let mut other = saved.clone();
        other[2] = 0x4d; // another device ID
        assert!(vf_config(5).load(&other).unwrap_err().contains("0x002"));
        assert!(vf_config(17).load(&saved).is_err(), "another MSI-X table size");
        assert!(vf_config(5).load(&saved[..100]).is_err());
    }

    #[test]
    fn capability_chain() {
        let c = vf_config(5);
        let msix = c.u8(CAP_PTR) as usize;
        assert_eq!((c.u8(msix), c.u16(msix + 2) & 0x7ff), (0x11, 4));
        assert_eq!(c.u32(msix + 4), 3);
        assert_eq!(c.u32(msix + 8), 0x2003);
        let pcie = c.u8(msix + 1) as usize;
        assert_eq!((c.u8(pcie), c.u8(pcie + 1)), (0x10, 0));
        assert_ne!(c.u32(pcie + 4) & (1 << 28), 0, "FLR capable");
    }
}
