//! The PF side of virtchnl, driven through registers and guest memory by the iavf driver model, and every op's
//! handling of malformed requests.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use device::nic::adminq::{Desc, FLAG_CMP, FLAG_DD, FLAG_ERR, OP_QUEUE_SHUTDOWN};
use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::pci::msix as irq;
use device::{IrqAction, IrqData, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel, VfBus};

const RINGS: u64 = dm::RINGS;
const SEC: Duration = Duration::from_secs(2);

fn driver_with(cfg: VfConfig) -> DriverModel<VfBus> {
    let _ = env_logger::builder().is_test(true).try_init();
    dm::testbed(cfg)
}

fn driver() -> DriverModel<VfBus> {
    driver_with(VfConfig::default())
}

/// A driver past VERSION and GET_VF_RESOURCES.
fn probed() -> DriverModel<VfBus> {
    let mut d = driver();
    d.init_aq();
    assert_eq!(d.request(OP_VERSION, &dm::msg_version(1, 1)).status, 0);
    let caps = (CAP_L2 | CAP_RSS_PF | CAP_ADV_LINK_SPEED).to_le_bytes();
    assert_eq!(d.request(OP_GET_VF_RESOURCES, &caps).status, 0);
    d
}

fn status(d: &mut DriverModel<VfBus>, op: u32, msg: &[u8]) -> i32 {
    d.request(op, msg).status
}

/// Asserts `msg` is rejected with ERR_PARAM and that the device still answers a good request afterwards.
fn rejects(d: &mut DriverModel<VfBus>, op: u32, msg: &[u8], what: &str) {
    assert_eq!(status(d, op, msg), STATUS_ERR_PARAM, "{what}");
    assert_eq!(status(d, OP_GET_STATS, &dm::msg_queue_select(0, 0)), 0, "device unusable after {what}");
}

#[test]
fn probe_conversation_grants_only_what_is_implemented() {
    let cfg = VfConfig { mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55], queue_pairs: 2, ..Default::default() };
    let mut d = driver_with(cfg);
    d.init_aq();
    let v = d.request(OP_VERSION, &dm::msg_version(1, 1));
    assert_eq!((v.status, v.payload), (0, dm::msg_version(1, 1)));
    let asked = 0xffff_ffffu32.to_le_bytes();
    let r = d.request(OP_GET_VF_RESOURCES, &asked);
    assert_eq!(r.status, 0);
    let p = r.payload;
    assert_eq!(p.len(), 36);
    let u16_at = |o: usize| u16::from_le_bytes([p[o], p[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
    assert_eq!(u16_at(0), 1, "num_vsis");
    assert_eq!(u16_at(2), 2, "num_queue_pairs");
    assert_eq!(u16_at(4), 5, "max_vectors = MSI-X table size");
    assert_eq!(u32_at(8), CAPS_IMPLEMENTED, "granted caps");
    assert_eq!((u32_at(12), u32_at(16)), (52, 64), "RSS key/LUT sizes");
    assert_eq!(u16_at(20), VSI_ID);
    assert_eq!(i32::from_le_bytes(p[24..28].try_into().unwrap()), 6, "vsi_type SR-IOV");
    assert_eq!(&p[30..36], &[0x02, 0x11, 0x22, 0x33, 0x44, 0x55], "the --mac address");
}

#[test]
fn link_up_follows_enable_queues_with_the_configured_speed() {
    let cfg = VfConfig { link_speed: LinkSpeed(25000), ..Default::default() };
    let mut d = driver_with(cfg);
    d.bring_up(2, RINGS);
    let ev = d.wait_event(EVENT_LINK_CHANGE, SEC).expect("LINK_CHANGE after ENABLE_QUEUES");
    assert_eq!(u32::from_le_bytes(ev.payload[4..8].try_into().unwrap()), 25000, "Mbps with ADV_LINK_SPEED");
    assert_eq!(ev.payload[8], 1, "link up");
}

#[test]
fn every_runtime_op_succeeds_on_a_configured_vf() {
    let mut d = driver();
    d.bring_up(4, RINGS);
    assert_eq!(status(&mut d, OP_CONFIG_PROMISCUOUS_MODE, &[1, 0, 3, 0]), 0);
    let stats = d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    assert_eq!((stats.status, stats.payload.len()), (0, 96));
    let mut key = [VSI_ID.to_le_bytes(), (RSS_KEY_SIZE as u16).to_le_bytes()].concat();
    key.extend_from_slice(&[0x6d; RSS_KEY_SIZE + 1]); // iavf sends sizeof(struct) + len - 1
    assert_eq!(status(&mut d, OP_CONFIG_RSS_KEY, &key), 0);
    let mut lut = [VSI_ID.to_le_bytes(), (RSS_LUT_SIZE as u16).to_le_bytes()].concat();
    lut.extend((0..=RSS_LUT_SIZE).map(|i| (i % 4) as u8));
    assert_eq!(status(&mut d, OP_CONFIG_RSS_LUT, &lut), 0);
    let caps = d.request(OP_GET_RSS_HENA_CAPS, &[]);
    assert_eq!((caps.status, caps.payload.len()), (0, 8));
    assert_eq!(status(&mut d, OP_SET_RSS_HENA, &caps.payload), 0);
    assert_eq!(status(&mut d, OP_DEL_ETH_ADDR, &dm::msg_eth_addrs(&[[2, 0, 0, 0, 0, 9]])), 0);
    assert_eq!(status(&mut d, OP_DISABLE_QUEUES, &dm::msg_queue_select(0xf, 0xf)), 0);
    assert_eq!(status(&mut d, 9999, &[]), STATUS_ERR_NOT_SUPPORTED, "unknown op");
}

#[test]
fn malformed_requests_get_err_param_and_the_vf_stays_usable() {
    let mut d = probed();
    rejects(&mut d, OP_VERSION, &[1, 0, 0], "short VERSION");
    rejects(&mut d, OP_GET_VF_RESOURCES, &[1, 0], "short GET_VF_RESOURCES");
    rejects(&mut d, OP_CONFIG_IRQ_MAP, &[1], "short IRQ map");
    let mut bad = dm::msg_irq_map(&[(1, 1, 1)]);
    bad.pop();
    rejects(&mut d, OP_CONFIG_IRQ_MAP, &bad, "IRQ map one byte short");
    rejects(&mut d, OP_CONFIG_IRQ_MAP, &dm::msg_irq_map(&[(5, 1, 1)]), "vector past max_vectors");
    rejects(&mut d, OP_CONFIG_IRQ_MAP, &dm::msg_irq_map(&[(1, 0x10, 0)]), "IRQ map names queue 4 of 4");
    let good = dm::msg_config_queues(1, RINGS, 512, 2048, 1522);
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &good[..good.len() - 1], "short CONFIG_VSI_QUEUES");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(5, RINGS, 512, 2048, 1522), "5 pairs of 4");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 500, 2048, 1522), "ring not x32");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 8192, 2048, 1522), "ring too long");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 32, 2048, 1522), "ring too short");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS + 64, 512, 2048, 1522), "misaligned");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 512, 100, 1522), "buffer not x128");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 512, 0, 1522), "no buffer");
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 512, 2048, 65000), "huge frame");
    let mut wrong_qid = good.clone();
    wrong_qid[10] = 3; // TX queue_id of pair 0
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &wrong_qid, "queue id out of order");
    let mut wrong_vsi = good.clone();
    wrong_vsi[0] = 9;
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &wrong_vsi, "wrong VSI");
    rejects(&mut d, OP_ENABLE_QUEUES, &dm::msg_queue_select(1, 1), "enable before configure");
    rejects(&mut d, OP_ENABLE_QUEUES, &dm::msg_queue_select(0x10, 0), "queue 4 of 4");
    rejects(&mut d, OP_ENABLE_QUEUES, &[1, 0], "short queue select");
    rejects(&mut d, OP_ADD_ETH_ADDR, &dm::msg_eth_addrs(&[[0; 6]]), "zero MAC");
    rejects(&mut d, OP_ADD_ETH_ADDR, &[1, 0, 2, 0, 1, 2, 3, 4, 5, 6, 0, 0], "2 addresses, 1 sent");
    rejects(&mut d, OP_CONFIG_PROMISCUOUS_MODE, &[1, 0, 0x10, 0], "unknown promiscuous flag");
    rejects(&mut d, OP_GET_STATS, &[1], "short GET_STATS");
    rejects(&mut d, OP_CONFIG_RSS_KEY, &[1, 0, 10, 0, 0, 0], "short key");
    rejects(&mut d, OP_CONFIG_RSS_LUT, &[1, 0, 64, 0, 1], "LUT shorter than it says");
    let mut lut = [VSI_ID.to_le_bytes(), 64u16.to_le_bytes()].concat();
    lut.extend([9u8; 64]);
    rejects(&mut d, OP_CONFIG_RSS_LUT, &lut, "LUT names queue 9");
    rejects(&mut d, OP_SET_RSS_HENA, &[0xff; 8], "hash types outside caps");
    // And after all that, the interface comes up.
    assert_eq!(status(&mut d, OP_CONFIG_VSI_QUEUES, &good), 0);
    assert_eq!(status(&mut d, OP_ENABLE_QUEUES, &dm::msg_queue_select(1, 1)), 0);
}

#[test]
fn rss_ops_need_the_rss_capability() {
    let mut d = driver();
    d.init_aq();
    d.request(OP_VERSION, &dm::msg_version(1, 1));
    assert_eq!(d.request(OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes()).status, 0);
    assert_eq!(status(&mut d, OP_GET_RSS_HENA_CAPS, &[]), STATUS_ERR_NOT_SUPPORTED);
}

#[test]
fn non_virtchnl_and_unknown_aq_opcodes_complete() {
    let mut d = driver();
    d.init_aq();
    for opcode in [OP_QUEUE_SHUTDOWN, 0x0abc] {
        d.send_desc(Desc { opcode, param0: 1, ..Default::default() }, &[]);
        let wb = d.wait_atq_done(SEC).expect("ATQH advanced");
        assert_eq!(wb.flags & (FLAG_DD | FLAG_CMP | FLAG_ERR), FLAG_DD | FLAG_CMP, "opcode {opcode:#x}: {wb:?}");
    }
    assert!(d.recv(Duration::from_millis(100)).is_none(), "no virtchnl reply for non-virtchnl opcodes");
}

#[test]
fn reset_vf_gets_no_reply_and_forgets_all_but_the_version() {
    let mut d = driver();
    d.bring_up(2, RINGS);
    d.send(OP_RESET_VF, &[]);
    assert!(d.wait_reset_done(SEC), "ARQLEN.ENABLE must drop, then RSTAT reach VFACTIVE");
    assert_eq!(d.bus.read32(VF_ATQLEN1), 0);
    assert_eq!((d.bus.read32(VF_ATQBAL1), d.bus.read32(VF_ARQBAL1)), (0, 0));
    d.init_aq();
    // No VERSION again (iavf does not resend it): 1.1 still holds, so GET_VF_RESOURCES takes a cap mask.
    let r = d.request(OP_GET_VF_RESOURCES, &CAP_RSS_PF.to_le_bytes());
    assert_eq!(u32::from_le_bytes(r.payload[8..12].try_into().unwrap()), CAP_L2 | CAP_RSS_PF);
    // Queue configuration is gone.
    assert_eq!(status(&mut d, OP_ENABLE_QUEUES, &dm::msg_queue_select(1, 1)), STATUS_ERR_PARAM);
    assert!(d.unsolicited.iter().all(|m| m.op != OP_RESET_VF), "RESET_VF has no reply");
}

#[test]
fn pf_initiated_reset_warns_first() {
    let mut d = driver();
    d.bring_up(1, RINGS);
    d.bus.vf.pf_reset();
    let ev = d.wait_event(EVENT_RESET_IMPENDING, SEC).expect("RESET_IMPENDING");
    assert_eq!(i32::from_le_bytes(ev.payload[12..16].try_into().unwrap()), 255, "severity certain doom");
    assert!(d.wait_reset_done(SEC));
}

#[test]
fn device_reset_returns_to_power_on() {
    let mut d = driver();
    d.bring_up(1, RINGS);
    d.bus.vf.reset();
    assert_eq!(d.bus.read32(VF_ARQLEN1), 0);
    assert_eq!(d.bus.read32(VFGEN_RSTAT), RSTAT_VFACTIVE);
    d.init_aq();
    assert_eq!(d.request(OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes()).status, 0);
}

#[test]
fn full_arq_holds_messages_until_buffers_return() {
    let mut d = probed();
    // Stop returning buffers: the driver model's ARQT stays where it is while 40 requests queue up.
    for _ in 0..40 {
        d.send(OP_GET_STATS, &dm::msg_queue_select(0, 0));
        assert!(d.wait_atq_done(SEC).is_some());
    }
    let mut got = 0;
    while let Some(m) = d.recv(Duration::from_millis(300)) {
        if m.op == OP_EVENT {
            continue; // the link event GET_VF_RESOURCES left behind
        }
        assert_eq!((m.op, m.status), (OP_GET_STATS, 0));
        got += 1;
    }
    assert_eq!(got, 40, "every reply arrives once buffers are returned");
}

#[test]
fn admin_queue_interrupt_auto_masks_and_refires() {
    let mut d = probed();
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    d.bus.vf.set_irqs(irq::MSIX, IrqAction::Trigger, 0, 1, IrqData::Eventfd(vec![a.into()])).unwrap();
    let signals = |b: &UnixStream| {
        let mut buf = [0u8; 64];
        std::io::Read::read(&mut &*b, &mut buf).map(|n| n / 8).unwrap_or(0)
    };
    d.bus.write32(VFINT_ICR0_ENA1, ICR0_ADMINQ);
    d.bus.write32(VFINT_DYN_CTL01, 0x19);
    d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    assert_eq!(signals(&b), 1, "ARQ message raises vector 0");
    assert_eq!(d.bus.read32(VFINT_ICR01) & ICR0_ADMINQ, ICR0_ADMINQ, "cause visible, cleared on read");
    assert_eq!(d.bus.read32(VFINT_ICR01), 0);
    d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0));
    assert_eq!(signals(&b), 0, "auto-masked until the driver re-arms");
    d.bus.write32(VFINT_DYN_CTL01, 0x19);
    assert_eq!(signals(&b), 1, "pending cause fires on re-arm");
}

#[test]
fn queue_count_and_vectors_follow_the_flag() {
    let mut d = driver_with(VfConfig { queue_pairs: 16, ..Default::default() });
    d.init_aq();
    let r = d.request(OP_GET_VF_RESOURCES, &CAP_L2.to_le_bytes());
    assert_eq!(u16::from_le_bytes([r.payload[2], r.payload[3]]), 16);
    assert_eq!(u16::from_le_bytes([r.payload[4], r.payload[5]]), 17);
    assert_eq!(d.bus.vf.irq_info(irq::MSIX).unwrap().count, 17);
}

/// Admin queue bases at the top of the address space stall the queue (LEN.CRIT) instead of overflowing.
#[test]
fn admin_queue_base_wrapping_the_address_space_stalls_the_queue() {
    let mut d = driver();
    d.bus.config_write16(dm::PCI_COMMAND, dm::PCI_COMMAND_MEMORY | dm::PCI_COMMAND_MASTER);
    d.bus.write32(VF_ATQLEN1, 2 | AQ_ENABLE);
    d.bus.write32(VF_ATQBAL1, 0xffff_ffe0);
    d.bus.write32(VF_ATQBAH1, 0xffff_ffff);
    d.bus.write32(VF_ATQH1, 1);
    d.bus.write32(VF_ATQT1, 0);
    let t = std::time::Instant::now();
    while d.bus.read32(VF_ATQLEN1) & AQ_CRIT == 0 {
        assert!(t.elapsed() < SEC, "ATQLEN.CRIT never set");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The device still works after a reset and a proper setup.
    d.bus.vf.reset();
    d.init_aq();
    assert_eq!(d.request(OP_VERSION, &dm::msg_version(1, 1)).status, 0);
}

#[test]
fn mac_filter_list_is_capped_at_64() {
    let mut pf = Pf::new([2, 0, 0, 0, 0, 1], 4, 5, LinkSpeed(10000));
    let mac = |i: usize| [0x33, 0x33, 0, 0, (i >> 8) as u8, i as u8];
    let status =
        |pf: &mut Pf, addrs: &[[u8; 6]]| pf.handle(OP_ADD_ETH_ADDR, &dm::msg_eth_addrs(addrs)).reply.unwrap().0;
    let first: Vec<[u8; 6]> = (0..63).map(mac).collect();
    assert_eq!(status(&mut pf, &first), STATUS_SUCCESS);
    assert_eq!(status(&mut pf, &[mac(0), mac(63)]), STATUS_SUCCESS, "64 filters, a known one again is fine");
    assert_eq!(pf.macs.len(), MAX_MACS);
    assert_eq!(status(&mut pf, &[mac(64)]), STATUS_ERR_PARAM, "a 65th filter");
    let del = pf.handle(OP_DEL_ETH_ADDR, &dm::msg_eth_addrs(&[mac(0)])).reply.unwrap().0;
    assert_eq!(del, STATUS_SUCCESS);
    assert_eq!(status(&mut pf, &[mac(64), mac(65)]), STATUS_ERR_PARAM, "65 after the add: all or nothing");
    assert_eq!(pf.macs.len(), 63, "the rejected add changed nothing");
    assert!(!pf.macs.contains(&mac(64)));
    assert_eq!(status(&mut pf, &[mac(64)]), STATUS_SUCCESS);
}

#[test]
fn rings_that_wrap_the_address_space_are_rejected() {
    let mut d = probed();
    let top: u64 = !0x1fff; // 128-aligned, but 512 descriptors from here wrap past 2^64
    rejects(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, top, 512, 2048, 1522), "wrapping rings");
    assert_eq!(status(&mut d, OP_CONFIG_VSI_QUEUES, &dm::msg_config_queues(1, RINGS, 512, 2048, 1522)), 0);
}
