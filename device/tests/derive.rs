//! `--dirty-log descriptors` (docs/remap-irq.md): the pages derived from descriptors are a superset of the pages
//! the device really writes, for the same traffic in the same run (the audit records the writes), while REPORTs
//! harvest concurrently with the device's workers. And the derivation is not "everything".

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device::mem::GuestMem;
use device::nic::regs::*;
use device::nic::virtchnl::*;
use device::{FrameSink, I40eVf, Migratable, RxPort, VfConfig, VfioDevice};
use testkit::{self as dm, Bus, DriverModel};

const RAM: u64 = 8 << 20;
const RX_BUFS: u64 = 0x30_0000;
const TX_BUFS: u64 = 0x50_0000;
/// Frames per burst, and RX buffers posted per burst.
const BURST: u32 = 10;

/// Guest memory in a memfd the device maps (only such memory is logged); the driver reaches it with pread/pwrite.
struct MemfdBus {
    vf: I40eVf,
    ram: File,
}

impl Bus for MemfdBus {
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
        self.ram.read_exact_at(buf, addr).unwrap();
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) {
        self.ram.write_all_at(data, addr).unwrap();
    }
}

#[derive(Default)]
struct Loop(Mutex<Option<RxPort>>);

impl FrameSink for Loop {
    fn transmit(&self, frame: &[u8]) {
        if let Some(p) = &*self.0.lock().unwrap() {
            p.receive(frame);
        }
    }
}

const TX_RING: u64 = dm::RINGS;
const RX_RING: u64 = dm::RINGS + 0x2000;

fn rx_buf(i: u32) -> u64 {
    RX_BUFS + u64::from(i) * 2048
}

fn frame(mac: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = mac.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xfe, 0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&(1000 + seq as u16).to_be_bytes());
    f.extend_from_slice(&[0x30, 0x39, 0, 26, 0, 0]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(64, 0);
    f
}

/// What the server does around DMA_LOGGING_START and each REPORT's harvest.
fn logging_step<R>(vf: &I40eVf, mem: &GuestMem, remark: bool, step: impl FnOnce() -> R) -> R {
    if !mem.derived_log() {
        return step();
    }
    let (mut step, mut out) = (Some(step), None);
    let ranges = vf.outstanding_dma(&mut || out = step.take().map(|f| f()));
    if remark {
        for (a, l) in ranges {
            mem.mark_derived(a, l);
        }
    }
    out.unwrap()
}

fn report(vf: &I40eVf, mem: &GuestMem, remark: bool, into: &mut BTreeSet<u64>) {
    let bits = logging_step(vf, mem, remark, || mem.report(0, RAM, 4096).unwrap());
    for (w, word) in bits.iter().enumerate() {
        for b in 0..64 {
            if word & 1 << b != 0 {
                into.insert(w as u64 * 64 + b);
            }
        }
    }
}

fn wait_rx(vf: &I40eVf, n: u32) {
    let t = Instant::now();
    while vf.stats().queues.iter().map(|q| q.rx_frames).sum::<u64>() < u64::from(n) {
        assert!(t.elapsed() < Duration::from_secs(5), "the looped-back frames did not all arrive");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One queue pair looped back (each TX frame comes back as an RX frame): RX buffers posted before logging starts,
/// then bursts that post new buffers and send the frames that fill them, admin queue requests, and a REPORT after
/// every burst. Returns (pages reported, pages written per the audit).
fn run(derived: bool, remark: bool) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let fd = rustix::fs::memfd_create("derive-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, RAM).unwrap();
    let ram = File::from(fd);
    let mem = GuestMem::new();
    mem.map(0, RAM, true, true, Some((ram.try_clone().unwrap(), 0))).unwrap();
    mem.set_derived_log(derived);
    let vf = I40eVf::new(VfConfig::default(), mem.clone());
    let mut d = DriverModel::new(MemfdBus { vf, ram }, dm::AQ_BASE);
    assert!(d.wait_active(Duration::from_secs(2)));
    let res = d.bring_up_with(&[(TX_RING, RX_RING)], 256, &[(1, 1, 1), (0, 0, 0)]);
    let mac: [u8; 6] = res[30..36].try_into().unwrap();
    let wire = Arc::new(Loop::default());
    *wire.0.lock().unwrap() = Some(d.bus.vf.rx_port());
    d.bus.vf.set_sink(wire.clone());
    let post = |d: &mut DriverModel<MemfdBus>, range: std::ops::Range<u32>| {
        for i in range.clone() {
            let desc = [rx_buf(i).to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat();
            d.bus.mem_write(RX_RING + 32 * u64::from(i), &desc);
        }
        d.bus.write32(QRX_TAIL1, range.end);
    };
    let send = |d: &mut DriverModel<MemfdBus>, sent: &mut u32| {
        for _ in 0..BURST {
            let (i, buf) = (*sent, TX_BUFS + u64::from(*sent) * 128);
            let f = frame(mac, i);
            d.bus.mem_write(buf, &f);
            let qw1 = 0x30u64 | ((f.len() as u64) << 34); // EOP | RS
            d.bus.mem_write(TX_RING + 16 * u64::from(i), &[buf.to_le_bytes(), qw1.to_le_bytes()].concat());
            *sent += 1;
            d.bus.write32(QTX_TAIL1, *sent);
        }
    };
    post(&mut d, 0..BURST);

    logging_step(&d.bus.vf, &mem, remark, || mem.start_logging(4096, &[], true).unwrap());
    let mut reported = BTreeSet::new();
    let mut sent = 0u32;
    send(&mut d, &mut sent); // fills the buffers posted before logging
    wait_rx(&d.bus.vf, sent);
    report(&d.bus.vf, &mem, remark, &mut reported);
    for burst in 1..9 {
        // New buffers and the frames that fill them between two harvests: only the RX engine's own look at the
        // tail can derive them before it writes them.
        post(&mut d, BURST * burst..BURST * (burst + 1));
        send(&mut d, &mut sent);
        if burst % 3 == 0 {
            assert_eq!(d.request(OP_GET_STATS, &dm::msg_queue_select(0, 0)).status, 0);
        }
        if burst % 2 == 0 {
            wait_rx(&d.bus.vf, sent);
        } // else the harvest races the workers still transmitting and receiving this burst
        report(&d.bus.vf, &mem, remark, &mut reported);
    }
    wait_rx(&d.bus.vf, sent);
    report(&d.bus.vf, &mem, remark, &mut reported);
    let written: BTreeSet<u64> = mem.written_pages().into_iter().collect();
    (reported, written)
}

#[test]
fn descriptor_log_is_a_superset_of_the_exact_log() {
    let (exact, written) = run(false, true);
    assert!(written.len() > 30, "the traffic wrote RX buffers, rings and ARQ buffers: {} pages", written.len());
    assert_eq!(exact, written, "the exact log reports exactly the pages written");

    let (derived, written) = run(true, true);
    let missed: Vec<u64> = written.difference(&derived).copied().collect();
    assert!(missed.is_empty(), "pages written but not derived: {missed:x?}");
    assert!(derived.len() < (RAM / 4096 / 4) as usize, "{} pages: derived, not everything", derived.len());
    println!("written {} pages, derived {} pages", written.len(), derived.len());
}

/// The check has teeth: without marking what was outstanding at logging start and at each harvest, the RX
/// buffers posted before logging started are written unseen.
#[test]
fn without_marking_outstanding_descriptors_writes_are_missed() {
    let (derived, written) = run(true, false);
    assert!(!written.is_subset(&derived), "the RX buffers posted before logging should be missed");
}
