//! The test kit: a model of the iavf driver's side of the admin queue (it programs the AQ registers, places
//! descriptors and buffers in guest memory and exchanges virtchnl messages the way iavf does) and test-bench guest
//! memory. Tests and benchmarks drive the device with it, directly ([`VfBus`]) or over a vfio-user socket
//! (client-tests implement [`Bus`] on their client). Not part of the product.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device::nic::adminq::{ArqMsg, Desc, FLAG_BUF, FLAG_DD, FLAG_LB, OP_SEND_TO_PF, OP_SEND_TO_VF};
use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::{DmaTransport, GuestMem, I40eVf, VfConfig, VfioDevice};

/// Register and memory access as the VF driver has it.
pub trait Bus {
    fn read32(&mut self, off: u64) -> u32;
    fn write32(&mut self, off: u64, v: u32);
    /// A 16-bit write to the VF's PCI config space.
    fn config_write16(&mut self, off: u64, v: u16);
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]);
    fn mem_write(&mut self, addr: u64, data: &[u8]);
}

pub const AQ_LEN: u32 = 32;
/// PCI command register offset and bits.
pub const PCI_COMMAND: u64 = 0x04;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const AQ_BUF: u64 = 4096;
const FLAG_RD: u16 = 0x0400;
const FLAG_SI: u16 = 0x2000;

/// Driver-owned memory: ATQ ring, ARQ ring, then one 4 KiB buffer per slot of each.
pub const AREA: u64 = 0x2000 + 2 * AQ_LEN as u64 * AQ_BUF;

pub struct DriverModel<B: Bus> {
    pub bus: B,
    base: u64,
    atq_ntu: u32,
    arq_ntc: u32,
    /// Messages received while waiting for another op (events, mostly).
    pub unsolicited: Vec<ArqMsg>,
}

impl<B: Bus> DriverModel<B> {
    /// `base` is 4 KiB-aligned guest memory of at least [`AREA`] bytes the driver may use.
    pub fn new(bus: B, base: u64) -> Self {
        DriverModel { bus, base, atq_ntu: 0, arq_ntc: 0, unsolicited: Vec::new() }
    }

    fn atq(&self) -> u64 {
        self.base
    }
    fn arq(&self) -> u64 {
        self.base + 0x1000
    }
    fn atq_buf(&self, i: u32) -> u64 {
        self.base + 0x2000 + u64::from(i) * AQ_BUF
    }
    fn arq_buf(&self, i: u32) -> u64 {
        self.base + 0x2000 + u64::from(AQ_LEN + i) * AQ_BUF
    }

    /// Waits for VFGEN_RSTAT to read VFACTIVE, as the driver's probe does.
    pub fn wait_active(&mut self, within: Duration) -> bool {
        poll(within, || self.bus.read32(VFGEN_RSTAT) & 3 == RSTAT_VFACTIVE)
    }

    /// Sets both queues up as iavf_init_adminq does: ATQ first, ARQ with every buffer posted and ARQT = len - 1.
    /// First, as iavf's probe does (pci_enable_device, pci_set_master), memory decoding and bus mastering on.
    pub fn init_aq(&mut self) {
        self.bus.config_write16(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
        self.atq_ntu = 0;
        self.arq_ntc = 0;
        self.bus.mem_write(self.atq(), &[0; 32 * AQ_LEN as usize]);
        self.bus.write32(VF_ATQH1, 0);
        self.bus.write32(VF_ATQT1, 0);
        self.bus.write32(VF_ATQLEN1, AQ_LEN | AQ_ENABLE);
        self.bus.write32(VF_ATQBAL1, self.atq() as u32);
        self.bus.write32(VF_ATQBAH1, (self.atq() >> 32) as u32);
        for i in 0..AQ_LEN {
            self.post_arq_buffer(i);
        }
        self.bus.write32(VF_ARQH1, 0);
        self.bus.write32(VF_ARQT1, 0);
        self.bus.write32(VF_ARQLEN1, AQ_LEN | AQ_ENABLE);
        self.bus.write32(VF_ARQBAL1, self.arq() as u32);
        self.bus.write32(VF_ARQBAH1, (self.arq() >> 32) as u32);
        self.bus.write32(VF_ARQT1, AQ_LEN - 1);
    }

    fn post_arq_buffer(&mut self, i: u32) {
        let buf = self.arq_buf(i);
        let d = Desc {
            flags: FLAG_BUF | FLAG_LB,
            datalen: AQ_BUF as u16,
            addr_high: (buf >> 32) as u32,
            addr_low: buf as u32,
            ..Default::default()
        };
        self.bus.mem_write(self.arq() + u64::from(i) * 32, &d.to_bytes());
    }

    /// Places a raw descriptor (with `msg` in its buffer) and bumps ATQT.
    pub fn send_desc(&mut self, mut d: Desc, msg: &[u8]) {
        let i = self.atq_ntu;
        if !msg.is_empty() {
            let buf = self.atq_buf(i);
            self.bus.mem_write(buf, msg);
            d.addr_high = (buf >> 32) as u32;
            d.addr_low = buf as u32;
        }
        self.bus.mem_write(self.atq() + u64::from(i) * 32, &d.to_bytes());
        self.atq_ntu = (i + 1) % AQ_LEN;
        self.bus.write32(VF_ATQT1, self.atq_ntu);
    }

    /// Sends a virtchnl message the way iavf_aq_send_msg_to_pf builds it.
    pub fn send(&mut self, op: u32, msg: &[u8]) {
        let mut flags = FLAG_SI;
        if !msg.is_empty() {
            flags |= FLAG_BUF | FLAG_RD;
            if msg.len() > 512 {
                flags |= FLAG_LB;
            }
        }
        let d = Desc { flags, opcode: OP_SEND_TO_PF, datalen: msg.len() as u16, cookie_high: op, ..Default::default() };
        self.send_desc(d, msg);
    }

    /// The last descriptor sent, as the device wrote it back, once ATQH has moved past it.
    pub fn wait_atq_done(&mut self, within: Duration) -> Option<Desc> {
        let ntu = self.atq_ntu;
        if !poll(within, || self.bus.read32(VF_ATQH1) == ntu) {
            return None;
        }
        let last = (ntu + AQ_LEN - 1) % AQ_LEN;
        let mut raw = [0u8; 32];
        self.bus.mem_read(self.atq() + u64::from(last) * 32, &mut raw);
        Some(Desc::from_bytes(&raw))
    }

    /// The next ARQ message, returning its slot to the device as iavf_clean_arq_element does.
    pub fn recv(&mut self, within: Duration) -> Option<ArqMsg> {
        let ntc = self.arq_ntc;
        if !poll(within, || self.bus.read32(VF_ARQH1) & AQ_LEN_MASK != ntc) {
            return None;
        }
        let mut raw = [0u8; 32];
        self.bus.mem_read(self.arq() + u64::from(ntc) * 32, &mut raw);
        let d = Desc::from_bytes(&raw);
        assert_eq!(d.flags & FLAG_DD, FLAG_DD, "ARQ descriptor {ntc} without DD: {d:?}");
        assert_eq!(d.opcode, OP_SEND_TO_VF);
        let mut payload = vec![0u8; usize::from(d.datalen)];
        self.bus.mem_read((u64::from(d.addr_high) << 32) | u64::from(d.addr_low), &mut payload);
        self.post_arq_buffer(ntc);
        self.arq_ntc = (ntc + 1) % AQ_LEN;
        self.bus.write32(VF_ARQT1, ntc);
        Some(ArqMsg { op: d.cookie_high, status: d.cookie_low as i32, payload })
    }

    /// Sends `op` and waits for its reply; other messages (events) are kept in `unsolicited`.
    pub fn request(&mut self, op: u32, msg: &[u8]) -> ArqMsg {
        self.send(op, msg);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Some(m) = self.recv(Duration::from_millis(100)) {
                if m.op == op {
                    return m;
                }
                self.unsolicited.push(m);
            }
        }
        panic!("no reply to virtchnl op {op}");
    }

    /// [`DriverModel::request`] for tools that report rather than panic: the reply if its status is success,
    /// else an error naming `what`.
    pub fn request_ok(&mut self, what: &str, op: u32, msg: &[u8]) -> Result<ArqMsg, String> {
        let m = self.request(op, msg);
        if m.status == 0 {
            Ok(m)
        } else {
            Err(format!("{what}: status {}", m.status))
        }
    }

    /// The next event of `code` (from `unsolicited` or the ARQ).
    pub fn wait_event(&mut self, code: i32, within: Duration) -> Option<ArqMsg> {
        let is = |m: &ArqMsg| {
            m.op == OP_EVENT && m.payload.len() == 16 && i32::from_le_bytes(m.payload[..4].try_into().unwrap()) == code
        };
        if let Some(i) = self.unsolicited.iter().position(is) {
            return Some(self.unsolicited.remove(i));
        }
        let t = Instant::now();
        while t.elapsed() < within {
            match self.recv(Duration::from_millis(50)) {
                Some(m) if is(&m) => return Some(m),
                Some(m) => self.unsolicited.push(m),
                None => {}
            }
        }
        None
    }

    /// What iavf does after asking for a reset: wait for ARQLEN.ENABLE to drop, then for VFACTIVE.
    pub fn wait_reset_done(&mut self, within: Duration) -> bool {
        poll(within, || self.bus.read32(VF_ARQLEN1) & AQ_ENABLE == 0) && self.wait_active(within)
    }

    /// The probe conversation up to a configured, enabled interface with `pairs` queue pairs, rings at `rings`
    /// (4 KiB apart per ring). Returns the GET_VF_RESOURCES reply.
    pub fn bring_up(&mut self, pairs: u16, rings: u64) -> Vec<u8> {
        let layout: Vec<(u64, u64)> = (0..pairs).map(|i| default_rings(rings, i)).collect();
        self.bring_up_with(&layout, 512, &[(1, 1, 1), (0, 0, 0)])
    }

    /// [`DriverModel::bring_up`] with the driver's own ring layout: `rings[i]` is (TX ring, RX ring) of pair i, each
    /// `ring_len` descriptors, and `irq_map` the CONFIG_IRQ_MAP entries (vector, rx bitmap, tx bitmap).
    pub fn bring_up_with(&mut self, rings: &[(u64, u64)], ring_len: u16, irq_map: &[(u16, u16, u16)]) -> Vec<u8> {
        let pairs = rings.len() as u16;
        self.init_aq();
        let v = self.request(OP_VERSION, &msg_version(1, 1));
        assert_eq!((v.status, v.payload.clone()), (0, msg_version(1, 1)));
        let res = self.request(OP_GET_VF_RESOURCES, &(CAP_L2 | CAP_RSS_PF | CAP_ADV_LINK_SPEED).to_le_bytes());
        assert_eq!(res.status, 0);
        let irq = self.request(OP_CONFIG_IRQ_MAP, &msg_irq_map(irq_map));
        assert_eq!(irq.status, 0);
        let mac: [u8; 6] = res.payload[30..36].try_into().unwrap();
        assert_eq!(self.request(OP_ADD_ETH_ADDR, &msg_eth_addrs(&[mac])).status, 0);
        let q = self.request(OP_CONFIG_VSI_QUEUES, &msg_config_queue_list(rings, ring_len, 2048, 1522));
        assert_eq!(q.status, 0);
        let all = (1u32 << pairs) - 1;
        assert_eq!(self.request(OP_ENABLE_QUEUES, &msg_queue_select(all, all)).status, 0);
        res.payload
    }
}

fn poll(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn msg_version(major: u32, minor: u32) -> Vec<u8> {
    [major.to_le_bytes(), minor.to_le_bytes()].concat()
}

/// CONFIG_IRQ_MAP entries (vector, rx bitmap, tx bitmap).
pub fn msg_irq_map(entries: &[(u16, u16, u16)]) -> Vec<u8> {
    let mut m = (entries.len() as u16).to_le_bytes().to_vec();
    for &(v, rx, tx) in entries {
        for x in [VSI_ID, v, rx, tx, 0, 1] {
            m.extend_from_slice(&x.to_le_bytes());
        }
    }
    m
}

/// CONFIG_RSS_KEY with a fixed key of no pattern a hash would hide, sized as iavf sizes the message: one byte
/// longer than the key.
pub fn msg_rss_key() -> Vec<u8> {
    let mut m = [VSI_ID.to_le_bytes(), (RSS_KEY_SIZE as u16).to_le_bytes()].concat();
    m.extend((0..=RSS_KEY_SIZE).map(|i| (i as u8).wrapping_mul(37).wrapping_add(0x6d)));
    m
}

pub fn msg_eth_addrs(addrs: &[[u8; 6]]) -> Vec<u8> {
    let mut m = [VSI_ID.to_le_bytes(), (addrs.len() as u16).to_le_bytes()].concat();
    for a in addrs {
        m.extend_from_slice(a);
        m.extend_from_slice(&[1, 0]); // primary
    }
    m
}

/// The default ring layout: TX ring of pair i at `rings + 0x2000 i`, RX at `+ 0x1000`.
fn default_rings(rings: u64, i: u16) -> (u64, u64) {
    let tx = rings + 0x2000 * u64::from(i);
    (tx, tx + 0x1000)
}

/// CONFIG_VSI_QUEUES for `pairs` pairs: TX ring of pair i at `rings + 0x2000 i`, RX at `+ 0x1000`.
pub fn msg_config_queues(pairs: u16, rings: u64, ring_len: u16, buf: u32, max_frame: u32) -> Vec<u8> {
    let layout: Vec<(u64, u64)> = (0..pairs).map(|i| default_rings(rings, i)).collect();
    msg_config_queue_list(&layout, ring_len, buf, max_frame)
}

/// CONFIG_VSI_QUEUES with pair i's TX ring at `rings[i].0` and its RX ring at `rings[i].1`.
pub fn msg_config_queue_list(rings: &[(u64, u64)], ring_len: u16, buf: u32, max_frame: u32) -> Vec<u8> {
    let pairs = rings.len() as u16;
    let mut m = [VSI_ID.to_le_bytes(), pairs.to_le_bytes()].concat();
    m.extend_from_slice(&[0; 4]);
    for (i, &(tx, rx_ring)) in (0..pairs).zip(rings) {
        m.extend_from_slice(&VSI_ID.to_le_bytes());
        m.extend_from_slice(&i.to_le_bytes());
        m.extend_from_slice(&ring_len.to_le_bytes());
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&tx.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        let mut rx = Vec::with_capacity(40);
        rx.extend_from_slice(&VSI_ID.to_le_bytes());
        rx.extend_from_slice(&i.to_le_bytes());
        rx.extend_from_slice(&u32::from(ring_len).to_le_bytes());
        rx.extend_from_slice(&[0; 4]); // hdr_size, splithdr, pad
        rx.extend_from_slice(&buf.to_le_bytes());
        rx.extend_from_slice(&max_frame.to_le_bytes());
        rx.extend_from_slice(&[0, 0, 0, 0]); // crc_disable, rxdid, flags, pad
        rx.extend_from_slice(&rx_ring.to_le_bytes());
        rx.extend_from_slice(&[0; 8]); // rx_split_pos, pad
        m.extend_from_slice(&rx);
    }
    m
}

pub fn msg_queue_select(rx: u32, tx: u32) -> Vec<u8> {
    let mut m = [VSI_ID.to_le_bytes(), [0, 0]].concat();
    m.extend_from_slice(&rx.to_le_bytes());
    m.extend_from_slice(&tx.to_le_bytes());
    m
}

/// Guest memory of the test bench: a plain buffer the "driver" writes directly and the device reaches through a
/// DMA transport, as it reaches fd-less QEMU RAM. It counts the device's writes, so a test can see that a paused
/// device writes nothing.
pub struct Ram {
    bytes: Mutex<Vec<u8>>,
    device_writes: AtomicU64,
}

impl Ram {
    pub fn new(size: u64) -> Self {
        Ram::from_bytes(vec![0; size as usize])
    }

    /// Memory with these contents (a copy of another bench's memory, for a migration).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Ram { bytes: Mutex::new(bytes), device_writes: AtomicU64::new(0) }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    /// Writes made by the device (through [`DmaTransport`]) so far.
    pub fn device_writes(&self) -> u64 {
        self.device_writes.load(Ordering::SeqCst)
    }

    /// The driver's own access: not counted.
    pub fn peek(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let v = self.bytes.lock().unwrap();
        let s = v.get(addr as usize..addr as usize + buf.len()).ok_or(io::ErrorKind::InvalidInput)?;
        buf.copy_from_slice(s);
        Ok(())
    }

    /// The driver's own access: not counted.
    pub fn poke(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        let mut v = self.bytes.lock().unwrap();
        v.get_mut(addr as usize..addr as usize + data.len()).ok_or(io::ErrorKind::InvalidInput)?.copy_from_slice(data);
        Ok(())
    }

    /// Guest memory for a device: all of this RAM at guest address 0, reached through this transport.
    pub fn guest_mem(self: &Arc<Self>) -> GuestMem {
        let mem = GuestMem::new();
        let size = self.bytes.lock().unwrap().len() as u64;
        mem.map(0, size, true, true, None).expect("mapping test RAM");
        mem.set_transport(Some(self.clone()));
        mem
    }
}

impl DmaTransport for Ram {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.peek(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.device_writes.fetch_add(1, Ordering::SeqCst);
        self.poke(addr, data)
    }
}

/// The VF driven directly through [`VfioDevice`], with [`Ram`] as guest memory.
pub struct VfBus {
    pub vf: I40eVf,
    pub ram: Arc<Ram>,
}

impl Bus for VfBus {
    fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.vf.region_read(0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.vf.region_write(0, off, &v.to_le_bytes()).unwrap();
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.vf.region_write(device::CONFIG_REGION, off, &v.to_le_bytes()).unwrap();
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.ram.peek(addr, buf).unwrap();
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.ram.poke(addr, data).unwrap();
    }
}

/// Test bench memory size; the admin queue area and rings sit at [`AQ_BASE`] and [`RINGS`].
pub const TESTBED_RAM: u64 = 4 << 20;
pub const AQ_BASE: u64 = 0x10_0000;
pub const RINGS: u64 = 0x20_0000;

/// A fresh VF with `TESTBED_RAM` of guest memory mapped at 0, and a driver model past power-on.
pub fn testbed(cfg: VfConfig) -> DriverModel<VfBus> {
    let ram = Arc::new(Ram::new(TESTBED_RAM));
    let vf = I40eVf::new(cfg, ram.guest_mem());
    let mut d = DriverModel::new(VfBus { vf, ram }, AQ_BASE);
    assert!(d.wait_active(Duration::from_secs(2)), "RSTAT must read VFACTIVE at power-on");
    d
}
