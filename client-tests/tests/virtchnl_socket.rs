//! The iavf driver model over a real vfio-user socket: the whole virtchnl conversation with guest memory the
//! client shares without an fd, so every descriptor and message crosses the socket as DMA_READ/DMA_WRITE.

use std::time::Duration;

use client_tests::{Client, ServerProcess};
use device::nic::regs::{VFGEN_RSTAT, VF_ARQLEN1};
use device::nic::virtchnl::*;
use testkit::{Bus, DriverModel};

struct SocketBus(Client);

impl Bus for SocketBus {
    fn read32(&mut self, off: u64) -> u32 {
        self.0.read32(0, off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.0.write32(0, off, v)
    }
    fn config_write16(&mut self, off: u64, v: u16) {
        self.0.region_write(client_tests::CONFIG, off, &v.to_le_bytes()).ok("config write");
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0.guest_read(addr, buf.len()));
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.0.guest_write(addr, data)
    }
}

#[test]
fn virtchnl_over_dma_messages() {
    let mut s = ServerProcess::start_with(&["--mac", "02:de:ad:be:ef:01", "--queues", "2", "--link-speed", "40000"]);
    let mut c = s.connect_negotiated();
    c.dma_map(0, 4 << 20, 3, None).ok("DMA_MAP without fd");
    let mut d = DriverModel::new(SocketBus(c), 0x10_0000);
    assert!(d.wait_active(Duration::from_secs(2)));
    let res = d.bring_up(2, 0x20_0000);
    assert_eq!(&res[30..36], &[0x02, 0xde, 0xad, 0xbe, 0xef, 0x01], "--mac reaches the driver");
    assert_eq!(u16::from_le_bytes([res[2], res[3]]), 2, "--queues reaches the driver");
    let ev = d.wait_event(EVENT_LINK_CHANGE, Duration::from_secs(2)).expect("link event");
    assert_eq!((u32::from_le_bytes(ev.payload[4..8].try_into().unwrap()), ev.payload[8]), (40000, 1));

    // A VF reset over the socket, then the driver comes back without VERSION.
    d.send(OP_RESET_VF, &[]);
    assert!(d.wait_reset_done(Duration::from_secs(2)));
    assert_eq!(d.bus.read32(VF_ARQLEN1), 0);
    assert_eq!(d.bus.read32(VFGEN_RSTAT) & 3, 2);
    d.init_aq();
    assert_eq!(d.request(OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes()).status, 0);
    let served = &d.bus.0.dma;
    assert!(served.reads > 10 && served.writes > 10, "descriptors and messages went through DMA messages: {served:?}");
    s.assert_alive();
}
