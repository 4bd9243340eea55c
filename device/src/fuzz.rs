//! Entry points for the fuzzers in `fuzz/` and for replaying their corpora as ordinary tests on stable. Each runs
//! one device engine synchronously on the calling thread, over guest memory and state built from the input, so a
//! crash reproduces from its input alone. Not part of the device's API.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::cfg::VfConfig;
use crate::core::Core;
use crate::engine::{aq, rx, tx};
use crate::mem::{DmaTransport, GuestMem};
use crate::net::FrameSink;
use crate::nic::regs::*;
use crate::nic::virtchnl::{self, Pf};

/// Reads fixed-size fields from fuzz input; an exhausted input reads as zeros, so every input is usable.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let s = self.bytes(N);
        b[..s.len()].copy_from_slice(s);
        b
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Guest memory layout for the engine targets: [`MEM_A`] (memfd, mmap'd) and [`MEM_B`] (fd-less, through a
/// transport) are adjacent, so buffers may span the two backings; [`MEM_RO`] is read-only and must never change.
pub const MEM_A: u64 = 0x10000;
pub const MEM_A_SIZE: u64 = 0x10000;
pub const MEM_B: u64 = MEM_A + MEM_A_SIZE;
pub const MEM_B_SIZE: u64 = 0x4000;
pub const MEM_RO: u64 = 0x40000;
pub const MEM_RO_SIZE: u64 = 0x1000;

/// fd-less memory for the fuzzers: a buffer at a fixed guest address.
struct Ram {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl Ram {
    fn range(&self, addr: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = addr.checked_sub(self.base).ok_or(io::ErrorKind::InvalidInput)? as usize;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        (end <= self.bytes.lock().unwrap().len()).then_some(start..end).ok_or(io::ErrorKind::InvalidInput.into())
    }
}

impl DmaTransport for Ram {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        let r = self.range(addr, data.len())?;
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

fn memfd(size: u64) -> File {
    let fd = rustix::fs::memfd_create("vfu-fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    File::from(fd)
}

/// Guest memory filled with `image` (repeated), mapped as described at [`MEM_A`].
pub struct FuzzMem {
    pub mem: GuestMem,
    ro: File,
    ro_image: Vec<u8>,
}

impl FuzzMem {
    pub fn new(image: &[u8]) -> Self {
        let fill = |n: u64| -> Vec<u8> {
            if image.is_empty() {
                vec![0; n as usize]
            } else {
                image.iter().copied().cycle().take(n as usize).collect()
            }
        };
        let mem = GuestMem::new();
        let a = memfd(MEM_A_SIZE);
        a.write_all_at(&fill(MEM_A_SIZE), 0).expect("filling guest memory");
        mem.map(MEM_A, MEM_A_SIZE, true, true, Some((a, 0))).expect("mapping A");
        mem.map(MEM_B, MEM_B_SIZE, true, true, None).expect("mapping B");
        mem.set_transport(Some(Arc::new(Ram { base: MEM_B, bytes: Mutex::new(fill(MEM_B_SIZE)) })));
        let ro = memfd(MEM_RO_SIZE);
        let ro_image = fill(MEM_RO_SIZE);
        ro.write_all_at(&ro_image, 0).expect("filling read-only memory");
        mem.map(MEM_RO, MEM_RO_SIZE, true, false, Some((ro.try_clone().expect("dup"), 0))).expect("mapping RO");
        FuzzMem { mem, ro, ro_image }
    }

    /// The read-only mapping is as it was: the device never writes where the client did not allow it.
    pub fn check_read_only(&self) {
        let mut now = vec![0u8; MEM_RO_SIZE as usize];
        self.ro.read_exact_at(&mut now, 0).expect("reading back");
        assert!(now == self.ro_image, "the device wrote into a read-only DMA mapping");
    }
}

/// Counts frames and checks each is one a wire could carry.
#[derive(Default)]
struct CheckSink(Mutex<u64>);

impl FrameSink for CheckSink {
    fn transmit(&self, frame: &[u8]) {
        assert!(frame.len() <= 16 * 1024 + 512, "transmitted a {}-byte frame", frame.len());
        *self.0.lock().unwrap() += 1;
    }
}

/// A device without workers, so each engine runs on the caller's thread.
fn shared(queue_pairs: u16, mem: GuestMem) -> Core {
    let core = Core::new(VfConfig { queue_pairs, ..Default::default() }, mem);
    {
        let mut st = core.lock();
        st.sink = Arc::new(CheckSink::default());
        // The engines do no DMA without bus mastering (a guest driver turns it on before using the rings).
        st.config.write(crate::pci::config::CMD, &crate::pci::config::CMD_BUS_MASTER.to_le_bytes());
        assert!(st.bus_master(), "bus mastering did not turn on");
    }
    core
}

/// The virtchnl PF: a sequence of (op, message) against one PF, checking the invariants other code relies on.
pub fn virtchnl(data: &[u8]) {
    let mut inp = Input::new(data);
    let pairs = u16::from(inp.u8() % 16) + 1;
    let vectors = (pairs + 1).max(5);
    let mut pf = Pf::new([2, 0, 0, 0, 0, 1], pairs, vectors, virtchnl::LinkSpeed(10000));
    while !inp.is_empty() {
        let op = u32::from(inp.u8() % 32);
        let len = usize::from(inp.u16() % 4200);
        let msg = inp.bytes(len);
        let out = pf.handle(op, msg);
        if let Some((_, p)) = &out.reply {
            assert!(p.len() <= 4096, "a reply larger than an ARQ buffer");
        }
        check_pf(&pf);
        if out.after == virtchnl::After::ResetVf {
            pf.reset();
        }
    }
}

fn check_pf(pf: &Pf) {
    let n = pf.queue_pairs as usize;
    assert!(pf.tx.len() == n && pf.rx.len() == n && pf.irq_map.len() == pf.max_vectors as usize);
    let all = (1u32 << n) - 1;
    assert_eq!((pf.rx_enabled | pf.tx_enabled) & !all, 0, "a queue past the VF's enabled");
    for q in 0..n {
        if pf.tx_enabled & (1 << q) != 0 {
            assert!(pf.tx[q].is_some(), "TX queue {q} enabled unconfigured");
        }
        if pf.rx_enabled & (1 << q) != 0 {
            assert!(pf.rx[q].is_some(), "RX queue {q} enabled unconfigured");
        }
    }
    assert!(pf.rss_lut.iter().all(|&q| usize::from(q) < n), "RSS LUT names a queue past the VF's");
    assert!(pf.macs.len() <= virtchnl::MAX_MACS);
}

/// Programs both admin queues from the input over guest memory filled from it, then runs the ATQ engine and ARQ
/// delivery.
pub fn admin_queue(data: &[u8]) {
    let mut inp = Input::new(data);
    let regs = [
        (VF_ATQBAL1, inp.u32()),
        (VF_ATQBAH1, inp.u32() & 1),
        (VF_ATQLEN1, inp.u32()),
        (VF_ATQH1, inp.u32() & AQ_LEN_MASK),
        (VF_ATQT1, inp.u32() & AQ_LEN_MASK),
        (VF_ARQBAL1, inp.u32()),
        (VF_ARQBAH1, inp.u32() & 1),
        (VF_ARQLEN1, inp.u32()),
        (VF_ARQH1, inp.u32() & AQ_LEN_MASK),
        (VF_ARQT1, inp.u32() & AQ_LEN_MASK),
    ];
    let fm = FuzzMem::new(inp.rest());
    let s = shared(4, fm.mem.clone());
    {
        let mut st = s.lock();
        for (r, v) in regs {
            st.set_reg(r, v);
        }
    }
    aq::process_atq(&s);
    aq::deliver_arq(&s);
    fm.check_read_only();
    check_pf(&s.lock().nic.pf);
}

/// Sets up queue pair 0 through virtchnl (ring address and length from the input, else a valid default), then
/// runs the TX engine up to a tail from the input over guest memory filled from it.
pub fn tx(data: &[u8]) {
    let mut inp = Input::new(data);
    let (ring, len, tail) = (inp.u64(), inp.u16(), inp.u16());
    let fm = FuzzMem::new(inp.rest());
    let s = shared(1, fm.mem.clone());
    configure_pair(&s, ring, len, 2048, 9728);
    {
        let mut st = s.lock();
        let len = st.nic.pf.tx[0].map_or(64, |q| q.len);
        st.set_reg(QTX_TAIL1, u32::from(tail) % (len + 8)); // sometimes past the ring's end
    }
    tx::process_tx(&s, 0);
    fm.check_read_only();
}

/// Sets up queue pair 0 (as [`tx`]), posts RX buffers up to a tail from the input and delivers frames from it.
pub fn rx(data: &[u8]) {
    let mut inp = Input::new(data);
    let (ring, len, tail, buf) = (inp.u64(), inp.u16(), inp.u16(), inp.u8());
    let (rss, nframes) = (inp.u8(), inp.u8() % 8);
    let frames: Vec<Vec<u8>> = (0..nframes)
        .map(|_| {
            let n = usize::from(inp.u16() % 10000);
            inp.bytes(n).to_vec()
        })
        .collect();
    let fm = FuzzMem::new(inp.rest());
    let s = shared(1, fm.mem.clone());
    let buf_size = 128 * (u32::from(buf % 16) + 1);
    configure_pair(&s, ring, len, buf_size, 1522 + u32::from(rss) * 32);
    {
        let mut st = s.lock();
        if rss & 1 != 0 {
            st.nic.pf.caps |= virtchnl::CAP_RSS_PF;
        }
        st.nic.pf.macs.push([2, 0, 0, 0, 0, 1]);
        st.nic.pf.promisc = u16::from(rss >> 6);
        let len = st.nic.pf.rx[0].map_or(64, |q| q.len);
        st.set_reg(QRX_TAIL1, u32::from(tail) % (len + 8));
    }
    for f in frames {
        rx::receive(&s, &f);
    }
    rx::drain_rx(&s, 0);
    fm.check_read_only();
}

/// CONFIG_VSI_QUEUES for pair 0 with the given TX/RX ring (RX 0x1000 after TX); a valid default ring in MEM_A if
/// the PF refuses it. Then ENABLE_QUEUES.
fn configure_pair(s: &Core, ring: u64, len: u16, buf: u32, max_frame: u32) {
    let mut st = s.lock();
    st.nic.pf.handle(virtchnl::OP_VERSION, &[1, 0, 0, 0, 1, 0, 0, 0]);
    let try_cfg = |pf: &mut Pf, ring: u64, len: u16| {
        let m = queue_config(ring, len, buf, max_frame);
        pf.handle(virtchnl::OP_CONFIG_VSI_QUEUES, &m).reply.is_some_and(|(s, _)| s == 0)
    };
    if !try_cfg(&mut st.nic.pf, ring, len) {
        assert!(try_cfg(&mut st.nic.pf, MEM_A, 64), "default queue config refused");
    }
    let mut sel = [0u8; 12];
    sel[..2].copy_from_slice(&virtchnl::VSI_ID.to_le_bytes());
    sel[4] = 1;
    sel[8] = 1;
    st.nic.pf.handle(virtchnl::OP_ENABLE_QUEUES, &sel);
    st.nic.pf.irq_map[1] = (1, 1);
}

fn queue_config(ring: u64, len: u16, buf: u32, max_frame: u32) -> Vec<u8> {
    crate::bench::queue_config(ring, ring.wrapping_add(0x1000), len, buf, max_frame)
}

/// The device-state stream decoder (docs/migration-stream.md) over hostile bytes. The input's record header
/// length and checksum are fixed up unless its first byte says not to, so the fuzzer gets past the CRC into the
/// sections. A record that decodes and validates is loaded into a paused device, which must then save exactly
/// what was loaded.
pub fn stream(data: &[u8]) {
    use crate::state::StateError;
    use crate::stream::{decode_identity, decode_state, parse_record, record_len, section};
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut rec = rest.to_vec();
    if mode & 1 == 0 && rec.len() >= 16 {
        let len = (rec.len() + 4) as u32;
        rec[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crate::nic::offload::crc32c(&rec);
        rec.extend_from_slice(&crc.to_le_bytes());
    }
    let Ok(Some(len)) = record_len(&rec) else { return };
    let Ok(r) = parse_record(&rec[..len.min(rec.len())]) else { return };
    let _ = decode_identity(&r);
    let Ok((state, _)) = decode_state(&r, &[section::AUDIT]) else { return };
    let id = &state.identity;
    if !(1..=crate::cfg::MAX_QUEUE_PAIRS).contains(&id.queue_pairs) {
        return;
    }
    let cfg = VfConfig {
        mac: id.mac,
        queue_pairs: id.queue_pairs,
        link_speed: id.link_speed,
        doorbells: id.doorbells,
        ..Default::default()
    };
    if state.validate(&cfg).is_err() {
        return;
    }
    let vf = crate::I40eVf::new(cfg, GuestMem::new());
    vf.pause();
    match vf.load(&state) {
        Ok(()) => assert_eq!(vf.save().expect("paused"), state, "a loaded state must save as itself"),
        Err(StateError::Invalid(_)) => assert!(vf.save().is_ok()),
        Err(e) => panic!("validated state refused on load: {e}"),
    }
}
