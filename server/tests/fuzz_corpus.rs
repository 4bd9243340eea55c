//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and the crashes kept in `fuzz/regressions/<target>/`)
//! through the same entry points the fuzzers call, so the corpora are checked on stable too, and every crash a
//! fuzzer ever found stays a regression test. `cargo test -p server --test fuzz_corpus -- --ignored write_seeds`
//! regenerates the hand-made seeds (`seed-*` files) from the encoders below.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use device::fuzz::{MEM_A, MEM_B};
use device::nic::virtchnl::*;
use testkit::{msg_config_queues, msg_eth_addrs, msg_irq_map, msg_queue_select, msg_version};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 8] = [
    ("framer", server::fuzz::framer),
    ("handlers", server::fuzz::handlers),
    ("region", server::fuzz::region),
    ("virtchnl", device::fuzz::virtchnl),
    ("admin_queue", device::fuzz::admin_queue),
    ("tx", device::fuzz::tx),
    ("rx", device::fuzz::rx),
    ("stream", device::fuzz::stream),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Panics on any thread (device workers included) since the hook went in.
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn replay_committed_corpora() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let mut total = 0;
    for (name, run) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            seeds.iter().any(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-"))),
            "fuzz/corpus/{name} has no hand-made seed"
        );
        let all: Vec<PathBuf> = seeds.into_iter().chain(inputs(&fuzz_dir().join("regressions").join(name))).collect();
        for p in &all {
            let data = std::fs::read(p).unwrap();
            run(&data);
            assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{name}: {} panicked", p.display());
        }
        println!("{name}: {} inputs replayed", all.len());
        total += all.len();
    }
    println!("{total} fuzz inputs replayed");
}

// ---- seeds -------------------------------------------------------------------------------------------------

#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Pads (or truncates) to `len` bytes: places the next field at a fixed offset of an image.
    fn at(mut self, len: usize) -> Self {
        self.0.resize(len, 0);
        self
    }
}

fn msg(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    B::default().u16(id).u16(cmd).u32(16 + payload.len() as u32).u32(flags).u32(0).bytes(payload).0
}

const CAPS: &[u8] = b"{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,\"write_multiple\":true}}\0";

fn version_payload() -> Vec<u8> {
    B::default().u16(0).u16(0).bytes(CAPS).0
}

fn framer_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let stream = [
        msg(1, 1, 0, &version_payload()),
        msg(2, 2, 0, &B::default().u32(32).u32(3).u64(0).u64(0x10000).u64(0x1000).0),
        msg(3, 9, 0, &B::default().u64(0).u32(7).u32(4).0),
        msg(4, 10, 0x10, &B::default().u64(0x8400).u32(0).u32(4).u32(1).0),
        msg(5, 11, 1, &B::default().u64(0x1000).u64(4).u32(7).0),
    ]
    .concat();
    let cuts = [1u16, 15, 16, 17, 3, 100, 2, 40];
    let mut a = B::default().u16(2048).u8(cuts.len() as u8);
    for c in cuts {
        a = a.u16(c);
    }
    let over = [msg(6, 10, 0, &[0xaa; 300]), msg(7, 9, 0, &B::default().u64(0).u32(7).u32(4).0)].concat();
    vec![
        ("seed-qemu-attach", a.bytes(&stream).0),
        ("seed-oversized", B::default().u16(100).u8(2).u16(20).u16(5).bytes(&over).0),
        ("seed-corrupt", B::default().u16(100).u8(0).bytes(&B::default().u16(1).u16(1).u32(8).u32(0).u32(0).0).0),
        (
            "seed-impossible",
            B::default().u16(100).u8(0).bytes(&B::default().u16(1).u16(10).u32(u32::MAX).u32(0).u32(0).0).0,
        ),
    ]
}

/// One message for the `handlers` target: cmd, flags, payload, fd count (and memfd pages for a memfd).
fn hmsg(b: B, cmd: u8, flags: u8, payload: &[u8], fds: u8, pages: Option<u16>) -> B {
    let b = b.u8(cmd).u8(flags).u16(payload.len() as u16).bytes(payload).u8(fds);
    match pages {
        Some(p) => b.u16(p),
        None => b,
    }
}

fn handlers_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut b = hmsg(B::default().u8(0), 1, 0, &version_payload(), 0, None);
    b = hmsg(b, 4, 0, &B::default().u32(16).u32(0).u32(0).u32(0).0, 0, None);
    for i in 0..9 {
        b = hmsg(b, 5, 0, &B::default().u32(64).u32(0).u32(i).u32(0).u64(0).u64(0).0, 0, None);
    }
    b = hmsg(b, 7, 0, &B::default().u32(16).u32(0).u32(2).u32(0).0, 0, None);
    b = hmsg(b, 9, 0, &B::default().u64(0).u32(7).u32(256).0, 0, None);
    b = hmsg(b, 2, 0, &B::default().u32(32).u32(3).u64(0).u64(0x10000).u64(0x10000).0, 1, Some(16));
    b = hmsg(b, 2, 0, &B::default().u32(32).u32(3).u64(0).u64(0x20000).u64(0x1000).0, 0, None);
    b = hmsg(b, 8, 0, &B::default().u32(20).u32(0x24).u32(2).u32(0).u32(3).0, 3, None);
    for (off, v) in [(0x7c00u64, 0x10000u32), (0x7800, 0), (0x6800, 0x8000_0008), (0x8400, 1), (0x5c00, 1)] {
        b = hmsg(b, 10, 0x10, &B::default().u64(off).u32(0).u32(4).u32(v).0, 0, None);
    }
    b = hmsg(b, 15, 0, &B::default().u64(1).u64(0x5000).u32(0).u32(4).u64(1).0, 0, None);
    b = hmsg(b, 3, 0, &B::default().u32(24).u32(0).u64(0x20000).u64(0x1000).0, 0, None);
    b = hmsg(b, 13, 0, &[], 0, None);
    b = hmsg(b, 3, 0, &B::default().u32(24).u32(2).u64(0).u64(0).0, 0, None);
    vec![("seed-attach", b.0)]
}

fn region_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut b = B::default().u8(3);
    for (index, off, v) in
        [(7u8, 4u64, 6u32), (0, 0x7c00, 0x10000), (0, 0x6800, 0x8000_0008), (0, 0x5c00, 7), (3, 0, 1)]
    {
        b = b.u8(index).u8(1).u64(off).u16(3).u32(v);
    }
    for (index, off) in [(0u8, 0x8800u64), (0, 0x4800), (3, 0x2000), (7, 0)] {
        b = b.u8(index).u8(0).u64(off).u16(3);
    }
    vec![("seed-registers", b.0)]
}

fn vc(b: B, op: u32, m: &[u8]) -> B {
    b.u8(op as u8).u16(m.len() as u16).bytes(m)
}

fn virtchnl_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut b = vc(B::default().u8(1), OP_VERSION, &msg_version(1, 1));
    b = vc(b, OP_GET_VF_RESOURCES, &(CAP_L2 | CAP_RSS_PF | CAP_ADV_LINK_SPEED).to_le_bytes());
    b = vc(b, OP_CONFIG_IRQ_MAP, &msg_irq_map(&[(1, 3, 3), (0, 0, 0)]));
    b = vc(b, OP_ADD_ETH_ADDR, &msg_eth_addrs(&[[2, 0, 0, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]]));
    b = vc(b, OP_CONFIG_VSI_QUEUES, &msg_config_queues(2, 0x20_0000, 512, 2048, 1522));
    b = vc(b, OP_ENABLE_QUEUES, &msg_queue_select(3, 3));
    b = vc(b, OP_CONFIG_RSS_KEY, &B::default().u16(VSI_ID).u16(52).bytes(&[0x6d; 52]).0);
    b = vc(b, OP_CONFIG_RSS_LUT, &B::default().u16(VSI_ID).u16(64).bytes(&[1; 64]).0);
    b = vc(b, OP_SET_RSS_HENA, &HENA_CAPS.to_le_bytes());
    b = vc(b, OP_CONFIG_PROMISCUOUS_MODE, &B::default().u16(VSI_ID).u16(3).0);
    b = vc(b, OP_GET_STATS, &B::default().u16(VSI_ID).at(12).0);
    b = vc(b, OP_DEL_ETH_ADDR, &msg_eth_addrs(&[[0x33, 0x33, 0, 0, 0, 1]]));
    b = vc(b, OP_DISABLE_QUEUES, &msg_queue_select(1, 1));
    b = vc(b, OP_RESET_VF, &[]);
    vec![("seed-bring-up", b.0)]
}

/// An admin queue descriptor (32 bytes).
fn aq_desc(flags: u16, opcode: u16, datalen: u16, cookie_high: u32, addr: u64) -> Vec<u8> {
    B::default()
        .u16(flags)
        .u16(opcode)
        .u16(datalen)
        .u16(0)
        .u32(cookie_high)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32((addr >> 32) as u32)
        .u32(addr as u32)
        .0
}

fn admin_queue_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // ATQ at MEM_A, 8 slots, two messages; ARQ at MEM_A + 0x800 with every slot posted.
    let mut regs = B::default().u32(MEM_A as u32).u32(0).u32(0x8000_0008).u32(0).u32(3);
    regs = regs.u32((MEM_A + 0x800) as u32).u32(0).u32(0x8000_0008).u32(0).u32(7);
    let mut img = B::default()
        .bytes(&aq_desc(0x1400, 0x0801, 8, OP_VERSION, MEM_A + 0x1000))
        .bytes(&aq_desc(0x1400, 0x0801, 4, OP_GET_VF_RESOURCES, MEM_A + 0x1100))
        .bytes(&aq_desc(0x1400, 0x0801, 16, OP_CONFIG_PROMISCUOUS_MODE, MEM_B - 8))
        .at(0x800);
    for i in 0..8u64 {
        img = img.bytes(&aq_desc(0x1200, 0, 4096, 0, MEM_A + 0x2000 + i * 0x100));
    }
    img = img.at(0x1000).bytes(&msg_version(1, 1)).at(0x1100).bytes(&(CAP_L2 | CAP_RSS_PF).to_le_bytes());
    vec![("seed-version-resources", regs.bytes(&img.0).0)]
}

/// A TX data descriptor: buffer, size, EOP|RS when `eop`, with checksum offload command bits.
fn tx_desc(addr: u64, size: u64, eop: bool, cmd_extra: u64) -> Vec<u8> {
    let cmd = if eop { 0x3 } else { 0 } | cmd_extra;
    B::default().u64(addr).u64((cmd << 4) | (size << 34)).0
}

fn eth_ipv4_udp(len: usize) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let ip_len = (len - 14) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (ip_len >> 8) as u8,
        ip_len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
        10,
        0,
        0,
        1,
        10,
        0,
        0,
        2,
    ]);
    let udp_len = ip_len - 20;
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x3a, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    f.resize(len, 0x5a);
    f
}

fn tx_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = eth_ipv4_udp(128);
    // L4 UDP checksum insertion: IIPT IPv4 (2 << 5), L4T UDP (3 << 8) with MACLEN/IPLEN/L4LEN offsets.
    let csum = (2 << 5) | (3 << 8);
    let offsets = (7u64 | (5 << 7) | (2 << 14)) << 12; // in cmd units (cmd is shifted by 4, offset field by 16)
    let img = B::default()
        .bytes(&tx_desc(MEM_A + 0x2000, 128, true, 0))
        .bytes(&tx_desc(MEM_A + 0x2000, 64, false, 0))
        .bytes(&tx_desc(MEM_A + 0x2040, 64, true, csum | offsets))
        .bytes(&tx_desc(MEM_B - 32, 64, true, 0))
        .at(0x2000)
        .bytes(&frame);
    vec![("seed-three-frames", B::default().u64(MEM_A).u16(64).u16(4).bytes(&img.0).0)]
}

fn rx_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // RX ring at MEM_A + 0x1000 (the TX ring's + 0x1000): 64 descriptors, buffers from MEM_A + 0x4000.
    let mut img = B::default().at(0x1000);
    for i in 0..64u64 {
        img = img.u64(MEM_A + 0x4000 + i * 0x800).u64(0).u64(0).u64(0);
    }
    let f1 = eth_ipv4_udp(200);
    let mut bcast = eth_ipv4_udp(1400);
    bcast[..6].copy_from_slice(&[0xff; 6]);
    let b = B::default().u64(MEM_A).u16(64).u16(63).u8(15).u8(1).u8(3);
    let b = b.u16(f1.len() as u16).bytes(&f1).u16(bcast.len() as u16).bytes(&bcast).u16(10).bytes(&[1; 10]);
    vec![("seed-three-frames", b.bytes(&img.0).0)]
}

/// Records of an idle device and of one a driver brought up (queues, filters, RSS, ARQ traffic), each as the
/// harness takes them: a mode byte, then the record without its length and checksum (the harness fixes them up),
/// and one raw (mode 1) as it comes off the wire.
fn stream_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use device::stream::encode_state;
    let idle = device::I40eVf::new(device::VfConfig::default(), device::GuestMem::new());
    idle.pause();
    let idle = encode_state(&idle.save().unwrap(), &[]);
    let mut d = testkit::testbed(device::VfConfig { queue_pairs: 2, ..Default::default() });
    d.bring_up(2, testkit::RINGS);
    d.bus.vf.pause();
    let busy = encode_state(&d.bus.vf.save().unwrap(), &[]);
    let strip = |r: &[u8]| [&[0u8][..], &r[..r.len() - 4]].concat();
    vec![
        ("seed-idle", strip(&idle)),
        ("seed-busy", strip(&busy)),
        ("seed-raw", [&[1u8][..], &busy[..]].concat()),
        ("seed-compat", strip(&device::stream::encode_compat(&d.bus.vf.identity()))),
    ]
}

#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run by hand after changing an input format"]
fn write_seeds() {
    let all = [
        ("framer", framer_seeds()),
        ("handlers", handlers_seeds()),
        ("region", region_seeds()),
        ("virtchnl", virtchnl_seeds()),
        ("admin_queue", admin_queue_seeds()),
        ("tx", tx_seeds()),
        ("rx", rx_seeds()),
        ("stream", stream_seeds()),
    ];
    for (target, seeds) in all {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
