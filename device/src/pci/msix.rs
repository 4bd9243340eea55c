//! Interrupt delivery: MSI-X vectors, ERR and REQ, each an eventfd from SET_IRQS.
//!
//! Delivery follows vfio semantics: a vector fires when the client gave it an eventfd and has not masked it with
//! SET_IRQS. The MSI-X table in BAR3 is storage only: clients such as QEMU emulate the table themselves and never
//! forward its writes, so its mask bits cannot gate delivery. A vector that fires while masked, or while the device
//! is frozen, is remembered in the PBA and delivered when that ends.
//!
//! The table and the PBA are device state ([`MsixState`], saved and restored); the eventfds and the client's
//! SET_IRQS masks are the client's resources and configuration, never saved.

use std::fs::File;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::vfio::{DevResult, Errno, IrqAction, IrqData};

pub const INTX: u32 = 0;
pub const MSI: u32 = 1;
pub const MSIX: u32 = 2;
pub const ERR: u32 = 3;
pub const REQ: u32 = 4;
pub const NUM_IRQS: u32 = 5;

pub const TABLE_ENTRY: usize = 16;

/// MSI-X as the guest sees it: the table and the pending bits.
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MsixState {
    /// 16 bytes per vector: address, data, vector control.
    pub table: Vec<u8>,
    /// The PBA: fired while masked by the client or while the device was frozen, not yet delivered.
    pub pending: Vec<bool>,
}

impl MsixState {
    fn power_on(vectors: usize) -> Self {
        let mut table = vec![0; vectors * TABLE_ENTRY];
        for e in table.chunks_mut(TABLE_ENTRY) {
            e[12] = 1; // vector control: masked at reset, as the MSI-X spec requires
        }
        MsixState { table, pending: vec![false; vectors] }
    }
}

/// One interrupt line's client side: its eventfd and SET_IRQS mask.
#[derive(Default)]
struct Line {
    fd: Option<File>,
    masked: bool,
}

impl Line {
    fn write(&self) {
        if let Some(f) = &self.fd {
            // An eventfd write only fails when the counter would overflow, which means the client stopped
            // reading; the interrupt is then already pending on its side.
            if let Err(e) = (&*f).write_all(&1u64.to_ne_bytes()) {
                log::debug!("eventfd write failed: {e}");
            }
        }
    }
}

pub struct Interrupts {
    state: MsixState,
    msix: Vec<Line>,
    err: Line,
    req: Line,
    /// ERR and REQ fired while frozen.
    err_req_pending: [bool; 2],
    /// The device is paused: nothing is delivered, everything pends.
    frozen: bool,
}

impl Interrupts {
    pub fn new(vectors: usize) -> Self {
        let mut msix = Vec::new();
        msix.resize_with(vectors, Line::default);
        Interrupts {
            state: MsixState::power_on(vectors),
            msix,
            err: Line::default(),
            req: Line::default(),
            err_req_pending: [false; 2],
            frozen: false,
        }
    }

    pub fn vectors(&self) -> usize {
        self.msix.len()
    }

    /// Device reset: table and PBA go back to power-on values; eventfds belong to the client and stay.
    pub fn reset(&mut self) {
        self.state = MsixState::power_on(self.msix.len());
    }

    /// Drops every eventfd and mask the client set.
    pub fn forget_client(&mut self) {
        for l in self.msix.iter_mut().chain([&mut self.err, &mut self.req]) {
            *l = Line::default();
        }
    }

    pub fn save(&self) -> MsixState {
        self.state.clone()
    }

    /// Loads saved table and PBA; pending vectors are delivered once the device runs and the client has given them
    /// eventfds.
    pub fn load(&mut self, s: &MsixState) -> Result<(), String> {
        let n = self.msix.len();
        if s.table.len() != n * TABLE_ENTRY || s.pending.len() != n {
            return Err(format!(
                "MSI-X state for {} vectors ({}-byte table), this device has {n}",
                s.pending.len(),
                s.table.len()
            ));
        }
        self.state = s.clone();
        Ok(())
    }

    /// Pause: from now on every signal pends.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Resume: delivers what pended while frozen, where the client's masks allow.
    pub fn thaw(&mut self) {
        self.frozen = false;
        for v in 0..self.msix.len() {
            self.deliver_pending(v);
        }
        for (i, l) in [&self.err, &self.req].into_iter().enumerate() {
            if std::mem::take(&mut self.err_req_pending[i]) {
                l.write();
            }
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    fn deliver_pending(&mut self, v: usize) {
        let l = &self.msix[v];
        if self.state.pending[v] && !l.masked && l.fd.is_some() && !self.frozen {
            self.state.pending[v] = false;
            l.write();
        }
    }

    /// Fires MSI-X vector `v`; true when an eventfd was signalled now.
    pub fn fire(&mut self, v: usize) -> bool {
        let Some(l) = self.msix.get(v) else { return false };
        if l.fd.is_none() {
            return false;
        }
        if l.masked || self.frozen {
            self.state.pending[v] = true;
            return false;
        }
        l.write();
        true
    }

    pub fn fire_req(&mut self) -> bool {
        if self.req.fd.is_none() {
            return false;
        }
        if self.frozen {
            self.err_req_pending[1] = true;
            return false;
        }
        self.req.write();
        true
    }

    pub fn has_eventfd(&self, v: usize) -> bool {
        self.msix.get(v).is_some_and(|l| l.fd.is_some())
    }

    /// SET_IRQS for an index whose range the server already checked.
    pub fn set_irqs(&mut self, index: u32, action: IrqAction, start: u32, count: u32, data: IrqData) -> DevResult<()> {
        if index == INTX || index == MSI {
            // No INTx or MSI: only "disable" (count 0) is meaningful, and the server let nothing else through.
            return Ok(());
        }
        let n = match index {
            MSIX => self.msix.len(),
            ERR | REQ => 1,
            _ => return Err(Errno::EINVAL),
        };
        let start = start as usize;
        if count == 0 {
            // DATA_NONE + TRIGGER with count 0 disables the whole index.
            for i in 0..n {
                *self.line(index, i) = Line::default();
            }
            return Ok(());
        }
        let range = start..start + count as usize;
        if range.end > n {
            return Err(Errno::EINVAL);
        }
        let selected: Vec<bool> = match &data {
            IrqData::Bool(b) => b.clone(),
            _ => vec![true; range.len()],
        };
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfd(fds)) if fds.is_empty() => {
                range.for_each(|i| self.line(index, i).fd = None);
            }
            (IrqAction::Trigger, IrqData::Eventfd(fds)) => {
                for (i, fd) in range.zip(fds) {
                    self.line(index, i).fd = Some(File::from(fd));
                    if index == MSIX {
                        self.deliver_pending(i); // fired before it had an eventfd (a restored PBA)
                    }
                }
            }
            (IrqAction::Trigger, _) => {
                for (i, _) in range.zip(&selected).filter(|(_, s)| **s) {
                    match index {
                        MSIX => {
                            self.fire(i);
                        }
                        ERR if self.frozen => self.err_req_pending[0] = true,
                        REQ => {
                            self.fire_req();
                        }
                        _ => self.err.write(),
                    }
                }
            }
            (IrqAction::Mask, IrqData::Eventfd(_)) | (IrqAction::Unmask, IrqData::Eventfd(_)) => {
                return Err(Errno::EINVAL)
            }
            (IrqAction::Mask, _) => {
                for (i, _) in range.zip(&selected).filter(|(_, s)| **s) {
                    self.line(index, i).masked = true;
                }
            }
            (IrqAction::Unmask, _) => {
                for (i, _) in range.zip(&selected).filter(|(_, s)| **s) {
                    self.line(index, i).masked = false;
                    if index == MSIX {
                        self.deliver_pending(i);
                    }
                }
            }
        }
        Ok(())
    }

    fn line(&mut self, index: u32, i: usize) -> &mut Line {
        match index {
            ERR => &mut self.err,
            REQ => &mut self.req,
            _ => &mut self.msix[i],
        }
    }

    /// BAR3 read: the table at 0, the PBA at 0x2000, zeros elsewhere.
    pub fn bar_read(&self, offset: u64, out: &mut [u8]) {
        let table = &self.state.table;
        for (i, b) in out.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if o < table.len() {
                table[o]
            } else if o >= super::config::MSIX_PBA_OFFSET as usize {
                let bit = (o - super::config::MSIX_PBA_OFFSET as usize) * 8;
                let p = &self.state.pending;
                (0..8).filter(|k| p.get(bit + k).is_some_and(|&x| x)).fold(0u8, |acc, k| acc | (1 << k))
            } else {
                0
            };
        }
    }

    /// BAR3 write: table storage; the PBA is read-only.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = self.state.table.get_mut(offset as usize + i) {
                *b = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    /// A socket pair stands in for an eventfd: each 8-byte signal shows up the same way.
    fn eventfd() -> (OwnedFd, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (OwnedFd::from(a), b)
    }

    fn signals(f: &mut UnixStream) -> usize {
        let mut buf = [0u8; 64];
        f.read(&mut buf).map(|n| n / 8).unwrap_or(0)
    }

    #[test]
    fn mask_pends_and_unmask_delivers() {
        let mut irq = Interrupts::new(5);
        let (w, mut r) = eventfd();
        irq.set_irqs(MSIX, IrqAction::Trigger, 1, 1, IrqData::Eventfd(vec![w])).unwrap();
        assert!(irq.fire(1));
        assert_eq!(signals(&mut r), 1);
        irq.set_irqs(MSIX, IrqAction::Mask, 1, 1, IrqData::None).unwrap();
        assert!(!irq.fire(1));
        assert_eq!(signals(&mut r), 0);
        let mut pba = [0u8; 8];
        irq.bar_read(0x2000, &mut pba);
        assert_eq!(pba[0], 0b10);
        irq.set_irqs(MSIX, IrqAction::Unmask, 0, 2, IrqData::Bool(vec![false, true])).unwrap();
        assert_eq!(signals(&mut r), 1);
        irq.bar_read(0x2000, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn trigger_bool_and_disable() {
        let mut irq = Interrupts::new(5);
        let (w0, mut r0) = eventfd();
        let (w1, mut r1) = eventfd();
        irq.set_irqs(MSIX, IrqAction::Trigger, 0, 2, IrqData::Eventfd(vec![w0, w1])).unwrap();
        irq.set_irqs(MSIX, IrqAction::Trigger, 0, 2, IrqData::Bool(vec![false, true])).unwrap();
        assert_eq!((signals(&mut r0), signals(&mut r1)), (0, 1));
        irq.set_irqs(MSIX, IrqAction::Trigger, 0, 0, IrqData::None).unwrap();
        assert!(!irq.fire(0) && !irq.has_eventfd(1));
        assert_eq!(irq.set_irqs(ERR, IrqAction::Mask, 0, 1, IrqData::Eventfd(vec![])).unwrap_err(), Errno::EINVAL);
    }

    #[test]
    fn table_is_storage_masked_at_reset() {
        let mut irq = Interrupts::new(5);
        let mut e = [0u8; 16];
        irq.bar_read(16, &mut e);
        assert_eq!(e[12], 1);
        irq.bar_write(16, &[0xaa; 16]);
        irq.bar_read(16, &mut e);
        assert_eq!(e, [0xaa; 16]);
        irq.reset();
        irq.bar_read(16, &mut e);
        assert_eq!(e[12], 1);
    }

    #[test]
    fn frozen_vectors_pend_and_are_delivered_on_thaw() {
        let mut irq = Interrupts::new(5);
        let (w, mut r) = eventfd();
        irq.set_irqs(MSIX, IrqAction::Trigger, 2, 1, IrqData::Eventfd(vec![w])).unwrap();
        irq.freeze();
        assert!(!irq.fire(2));
        assert_eq!(signals(&mut r), 0);
        let saved = irq.save();
        assert!(saved.pending[2]);
        irq.thaw();
        assert_eq!(signals(&mut r), 1);
        // A restored PBA is delivered when the new client gives the vector an eventfd.
        let mut other = Interrupts::new(5);
        other.load(&saved).unwrap();
        let (w, mut r) = eventfd();
        other.set_irqs(MSIX, IrqAction::Trigger, 2, 1, IrqData::Eventfd(vec![w])).unwrap();
        assert_eq!(signals(&mut r), 1);
        assert!(Interrupts::new(4).load(&saved).is_err());
    }
}
