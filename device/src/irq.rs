//! Interrupt delivery: MSI-X vectors, ERR and REQ, each an eventfd from SET_IRQS.
//!
//! Delivery follows vfio semantics: a vector fires when the client gave it an eventfd and has not masked it with
//! SET_IRQS. The MSI-X table in BAR3 is storage only: clients such as QEMU emulate the table themselves and never
//! forward its writes, so its mask bits cannot gate delivery. A vector that fires while masked is remembered in
//! the PBA and delivered on unmask.

use std::fs::File;
use std::io::Write;

use crate::{DevResult, Errno, IrqAction, IrqData};

pub const INTX: u32 = 0;
pub const MSI: u32 = 1;
pub const MSIX: u32 = 2;
pub const ERR: u32 = 3;
pub const REQ: u32 = 4;
pub const NUM_IRQS: u32 = 5;

const TABLE_ENTRY: usize = 16;

#[derive(Default)]
struct Line {
    fd: Option<File>,
    masked: bool,
    pending: bool,
}

impl Line {
    fn signal(&mut self) -> bool {
        match &self.fd {
            Some(f) if !self.masked => {
                // An eventfd write only fails when the counter would overflow, which means the client stopped
                // reading; the interrupt is then already pending on its side.
                if let Err(e) = (&*f).write_all(&1u64.to_ne_bytes()) {
                    log::debug!("eventfd write failed: {e}");
                }
                true
            }
            Some(_) => {
                self.pending = true;
                false
            }
            None => false,
        }
    }
}

pub struct Interrupts {
    msix: Vec<Line>,
    err: Line,
    req: Line,
    table: Vec<u8>,
}

impl Interrupts {
    pub fn new(vectors: usize) -> Self {
        let mut i = Interrupts { msix: Vec::new(), err: Line::default(), req: Line::default(), table: Vec::new() };
        i.msix.resize_with(vectors, Line::default);
        i.reset_table();
        i
    }

    pub fn vectors(&self) -> usize {
        self.msix.len()
    }

    fn reset_table(&mut self) {
        self.table = vec![0; self.msix.len() * TABLE_ENTRY];
        for e in self.table.chunks_mut(TABLE_ENTRY) {
            e[12] = 1; // vector control: masked at reset, as the MSI-X spec requires
        }
    }

    /// Device reset: table contents go back to power-on values; eventfds belong to the client and stay.
    pub fn reset(&mut self) {
        self.reset_table();
        for l in &mut self.msix {
            l.pending = false;
        }
    }

    /// Drops every eventfd and mask the client set.
    pub fn forget_client(&mut self) {
        for l in self.msix.iter_mut().chain([&mut self.err, &mut self.req]) {
            *l = Line::default();
        }
    }

    /// Fires MSI-X vector `v`; true when an eventfd was signalled.
    pub fn fire(&mut self, v: usize) -> bool {
        self.msix.get_mut(v).is_some_and(Line::signal)
    }

    pub fn fire_req(&mut self) -> bool {
        self.req.signal()
    }

    pub fn has_eventfd(&self, v: usize) -> bool {
        self.msix.get(v).is_some_and(|l| l.fd.is_some())
    }

    fn lines(&mut self, index: u32) -> DevResult<&mut [Line]> {
        Ok(match index {
            MSIX => &mut self.msix[..],
            ERR => std::slice::from_mut(&mut self.err),
            REQ => std::slice::from_mut(&mut self.req),
            _ => return Err(Errno::EINVAL),
        })
    }

    /// SET_IRQS for an index whose range the server already checked.
    pub fn set_irqs(&mut self, index: u32, action: IrqAction, start: u32, count: u32, data: IrqData) -> DevResult<()> {
        if index == INTX || index == MSI {
            // No INTx or MSI: only "disable" (count 0) is meaningful, and the server let nothing else through.
            return Ok(());
        }
        let lines = self.lines(index)?;
        let start = start as usize;
        if count == 0 {
            // DATA_NONE + TRIGGER with count 0 disables the whole index.
            for l in lines.iter_mut() {
                *l = Line::default();
            }
            return Ok(());
        }
        let range = &mut lines[start..start + count as usize];
        let selected: Vec<bool> = match &data {
            IrqData::Bool(b) => b.clone(),
            _ => vec![true; range.len()],
        };
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfd(fds)) if fds.is_empty() => range.iter_mut().for_each(|l| l.fd = None),
            (IrqAction::Trigger, IrqData::Eventfd(fds)) => {
                for (l, fd) in range.iter_mut().zip(fds) {
                    l.fd = Some(File::from(fd));
                }
            }
            (IrqAction::Trigger, _) => {
                for (l, _) in range.iter_mut().zip(&selected).filter(|(_, s)| **s) {
                    l.signal();
                }
            }
            (IrqAction::Mask, IrqData::Eventfd(_)) | (IrqAction::Unmask, IrqData::Eventfd(_)) => {
                return Err(Errno::EINVAL)
            }
            (IrqAction::Mask, _) => {
                range.iter_mut().zip(&selected).filter(|(_, s)| **s).for_each(|(l, _)| l.masked = true)
            }
            (IrqAction::Unmask, _) => {
                for (l, _) in range.iter_mut().zip(&selected).filter(|(_, s)| **s) {
                    l.masked = false;
                    if std::mem::take(&mut l.pending) {
                        l.signal();
                    }
                }
            }
        }
        Ok(())
    }

    /// BAR3 read: the table at 0, the PBA at 0x2000, zeros elsewhere.
    pub fn bar_read(&self, offset: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = if o < self.table.len() {
                self.table[o]
            } else if o >= crate::pci::MSIX_PBA_OFFSET as usize {
                let bit = (o - crate::pci::MSIX_PBA_OFFSET as usize) * 8;
                (0..8).filter(|k| self.msix.get(bit + k).is_some_and(|l| l.pending)).fold(0u8, |acc, k| acc | (1 << k))
            } else {
                0
            };
        }
    }

    /// BAR3 write: table storage; the PBA is read-only.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = self.table.get_mut(offset as usize + i) {
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
}
