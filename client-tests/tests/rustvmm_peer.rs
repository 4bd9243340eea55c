//! The rust-vmm `vfio_user` 0.1.7 Client as an independent peer against `vfu-i40evf`.
//!
//! That client never looks at a reply's error flag and blocks forever on a short (error) reply, so every scenario
//! runs on a thread with a deadline: a hang fails the test, and dropping the server unblocks the thread.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use client_tests::reg::*;
use client_tests::util::{eventfd, eventfd_take, eventfd_wait, memfd};
use client_tests::*;
use vfio_user::Client as VmmClient;

const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f` with a fresh rust-vmm client on its own thread; panics if it does not finish within [`DEADLINE`].
fn with_client<T: Send + 'static>(
    s: &mut ServerProcess,
    f: impl FnOnce(&mut VmmClient) -> Result<T, String> + Send + 'static,
) -> T {
    let path: PathBuf = s.socket_path().to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = VmmClient::new(&path).map_err(|e| format!("Client::new: {e:?}")).and_then(|mut c| {
            let r = f(&mut c);
            let _ = c.shutdown();
            r
        });
        let _ = tx.send(r);
    });
    let out = match rx.recv_timeout(DEADLINE) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("rust-vmm client: {e}"),
        Err(RecvTimeoutError::Timeout) => panic!("rust-vmm client hung (> {DEADLINE:?}): a reply it cannot parse?"),
        Err(RecvTimeoutError::Disconnected) => panic!("rust-vmm client thread panicked (see its message above)"),
    };
    s.assert_alive();
    out
}

fn e<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err:?}")
}

fn rd32(c: &mut VmmClient, region: u32, off: u64) -> Result<u32, String> {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b).map_err(e("region_read"))?;
    Ok(u32::from_le_bytes(b))
}

fn wr32(c: &mut VmmClient, region: u32, off: u64, v: u32) -> Result<(), String> {
    c.region_write(region, off, &v.to_le_bytes()).map_err(e("region_write"))
}

#[test]
fn rustvmm_negotiates_and_lists_regions() {
    let mut s = ServerProcess::start();
    let (regions, msix) = with_client(&mut s, |c| {
        let mut regions = Vec::new();
        while let Some(r) = c.region(regions.len() as u32) {
            regions.push((r.index, r.size, r.flags, r.file_offset.is_some(), r.sparse_areas.len()));
        }
        let msix = c.get_irq_info(IRQ_MSIX).map_err(e("get_irq_info"))?;
        Ok((regions, (msix.index, msix.flags, msix.count)))
    });
    assert_eq!(regions.len(), NUM_REGIONS as usize, "regions: {regions:?}");
    let sizes: Vec<u64> = regions.iter().map(|r| r.1).collect();
    assert_eq!(sizes, [65536, 0, 0, 16384, 0, 0, 0, 4096, 0], "region sizes");
    for (i, (index, size, flags, fd, sparse)) in regions.iter().enumerate() {
        assert_eq!(*index as usize, i);
        if *size > 0 {
            assert_eq!(flags & 3, 3, "region {i} READ|WRITE");
        }
        assert!(!fd && *sparse == 0, "region {i}: no mmap offered");
    }
    assert_eq!(msix.0, IRQ_MSIX);
    assert_eq!(msix.2, 5, "MSI-X count");
    assert_eq!(msix.1 & 3, 3, "MSI-X eventfd + maskable");
}

#[test]
fn rustvmm_config_space_and_bar0_register() {
    let mut s = ServerProcess::start();
    let (id, class, before, after, rstat) = with_client(&mut s, |c| {
        let id = rd32(c, CONFIG, 0)?;
        let class = rd32(c, CONFIG, 8)?;
        let before = rd32(c, BAR0, VF_ATQBAL1)?;
        wr32(c, BAR0, VF_ATQBAL1, 0xdead_b000)?;
        let after = rd32(c, BAR0, VF_ATQBAL1)?;
        Ok((id, class, before, after, rd32(c, BAR0, VFGEN_RSTAT)?))
    });
    assert_eq!(id & 0xffff, 0x8086, "vendor");
    assert_eq!(id >> 16, 0x154c, "device");
    assert_eq!(class >> 8, 0x02_0000, "class");
    assert_eq!((before, after), (0, 0xdead_b000), "ATQBAL write/read-back");
    assert_eq!(rstat, RSTAT_VFACTIVE);
    // The next client gets a freshly reset device.
    let mut c = s.connect_negotiated();
    assert_eq!(c.read32(BAR0, VF_ATQBAL1), 0);
    s.assert_alive();
}

#[test]
fn rustvmm_dma_map_memfd_used_by_admin_queue_then_unmap() {
    let mut s = ServerProcess::start();
    let mem = memfd(1 << 20);
    mem.write_all_at(&aq_desc(AQ_OP_QUEUE_SHUTDOWN, 0), 0).unwrap();
    let fd = mem.try_clone().unwrap();
    let iova = 0x10_0000u64;
    let head = with_client(&mut s, move |c| {
        c.dma_map(0, iova, 1 << 20, fd.as_raw_fd()).map_err(e("dma_map"))?;
        wr32(c, BAR0, VF_ATQBAL1, iova as u32)?;
        wr32(c, BAR0, VF_ATQBAH1, 0)?;
        // Memory decoding and bus mastering on (the PCI command register), as a driver's probe does.
        c.region_write(CONFIG, 4, &6u16.to_le_bytes()).map_err(e("region_write"))?;
        wr32(c, BAR0, VF_ATQLEN1, 32 | AQ_ENABLE)?;
        wr32(c, BAR0, VF_ATQH1, 0)?;
        wr32(c, BAR0, VF_ATQT1, 1)?;
        let mut head = 0;
        for _ in 0..500 {
            head = rd32(c, BAR0, VF_ATQH1)?;
            if head == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        c.dma_unmap(iova, 1 << 20).map_err(e("dma_unmap"))?;
        // Unmapped: the same range maps again.
        c.dma_map(0, iova, 1 << 20, fd.as_raw_fd()).map_err(e("dma_map again"))?;
        c.dma_unmap(iova, 1 << 20).map_err(e("dma_unmap again"))?;
        Ok(head)
    });
    assert_eq!(head, 1, "ATQH after the device processed the descriptor");
    let mut d = [0u8; 32];
    mem.read_exact_at(&mut d, 0).unwrap();
    assert_eq!(le_u16(&d, 0) & 7, AQ_FLAG_DD | AQ_FLAG_CMP, "descriptor completed in the memfd");
}

#[test]
fn rustvmm_msix_eventfds_and_swint() {
    let mut s = ServerProcess::start();
    let efds: Vec<OwnedFd> = (0..5).map(|_| eventfd()).collect();
    let raw: Vec<i32> = efds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let (fired, after_disable) = {
        let raw = raw.clone();
        let efd0 = efds[0].try_clone().unwrap();
        with_client(&mut s, move |c| {
            c.set_irqs(IRQ_MSIX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 5, &raw).map_err(e("set_irqs"))?;
            wr32(c, BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG)?;
            let fired = eventfd_wait(&efd0, Duration::from_secs(1));
            c.set_irqs(IRQ_MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0, &[]).map_err(e("disable"))?;
            wr32(c, BAR0, VFINT_DYN_CTL01, DYN_INTENA | DYN_SWINT_TRIG)?;
            std::thread::sleep(Duration::from_millis(50));
            Ok((fired, eventfd_take(&efd0)))
        })
    };
    assert_eq!(fired, 1, "SWINT signalled vector 0's eventfd");
    assert_eq!(after_disable, 0, "no signal after disabling the index");
    for (v, f) in efds.iter().enumerate().skip(1) {
        assert_eq!(eventfd_take(f), 0, "vector {v}");
    }
}

#[test]
fn rustvmm_reset_restores_power_on() {
    let mut s = ServerProcess::start();
    let (set, after, rstat, cmd) = with_client(&mut s, |c| {
        wr32(c, BAR0, VF_ATQBAL1, 0x4000)?;
        wr32(c, CONFIG, 4, 0x6)?;
        let set = rd32(c, BAR0, VF_ATQBAL1)?;
        c.reset().map_err(e("reset"))?;
        Ok((set, rd32(c, BAR0, VF_ATQBAL1)?, rd32(c, BAR0, VFGEN_RSTAT)?, rd32(c, CONFIG, 4)? & 0xffff))
    });
    assert_eq!(set, 0x4000);
    assert_eq!(after, 0, "ATQBAL after reset");
    assert_eq!(rstat, RSTAT_VFACTIVE);
    assert_eq!(cmd, 0, "PCI command after reset");
}
