//! The remap IRQ's handshake (docs/remap-irq.md): which regions offer their fast path, what the client has been
//! told, and which regions it may still have mapped. Plain state and one eventfd; the device asks
//! [`Remap::offers`] when it answers REGION_INFO and [`Remap::maybe_mapped`] when it decides whether to poll.

use std::fs::File;
use std::io::Write;

/// The remap IRQ's index: the first after the five vfio-pci defines.
pub const IRQ_INDEX: u32 = 5;
/// Its type and subtype in the IRQ info capability chain.
pub const IRQ_TYPE: u32 = 1;
pub const IRQ_SUBTYPE_SPARSE_MMAP: u32 = 0;

pub struct Remap {
    /// Regions this IRQ may signal (the capability's bitmap).
    regions: u64,
    /// `--doorbells mmap`: the fast path is offered without the IRQ.
    unasked: bool,
    fd: Option<File>,
    masked: bool,
    /// False in migration's saving and resuming states.
    allowed: bool,
    /// Regions whose REGION_INFO lists fast-path areas now.
    offered: u64,
    /// Layout changes not signalled yet.
    pending: u64,
    /// The last signal's value, until acknowledged.
    in_flight: u64,
    /// Regions the client may hold a mapping of: offered at some point and not since acknowledged as revoked.
    maybe_mapped: u64,
}

impl Remap {
    pub fn new(regions: u64, unasked: bool) -> Self {
        let mut r = Remap {
            regions,
            unasked,
            fd: None,
            masked: false,
            allowed: true,
            offered: 0,
            pending: 0,
            in_flight: 0,
            maybe_mapped: 0,
        };
        r.update();
        r.pending = 0; // the first REGION_INFO shows the initial layout: nothing to signal
        r
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    pub fn offers(&self, region: u32) -> bool {
        region < 64 && self.offered & (1 << region) != 0
    }

    pub fn maybe_mapped(&self) -> u64 {
        self.maybe_mapped
    }

    pub fn enabled(&self) -> bool {
        self.fd.is_some()
    }

    /// SET_IRQS TRIGGER with an eventfd. The client may still map regions an earlier, disabled IRQ could not tell
    /// it about: those are signalled too.
    pub fn enable(&mut self, fd: File) {
        self.fd = Some(fd);
        self.masked = false;
        self.in_flight = 0;
        self.pending |= self.maybe_mapped & !self.offered;
        self.update();
    }

    /// SET_IRQS TRIGGER without an eventfd, or count 0. Mappings the client holds are still served: nothing can
    /// tell it to drop them now.
    pub fn disable(&mut self) {
        self.fd = None;
        self.masked = false;
        self.in_flight = 0;
        self.update();
    }

    pub fn mask(&mut self) {
        self.masked = true;
    }

    /// SET_IRQS UNMASK: the client has read the last signal and brought its mappings of those regions in line with
    /// REGION_INFO. Returns the regions it now certainly has no mapping of (the caller looks at their memory one
    /// last time); signals again if changes accumulated meanwhile.
    pub fn ack(&mut self) -> u64 {
        let acked = std::mem::take(&mut self.in_flight);
        self.masked = false;
        let released = self.maybe_mapped & acked & !self.pending & !self.offered;
        self.maybe_mapped &= !released;
        self.signal();
        released
    }

    /// Migration state changes: the fast path is allowed in RUNNING (and STOP), not while saving or resuming.
    pub fn set_allowed(&mut self, allowed: bool) {
        if self.allowed != allowed {
            self.allowed = allowed;
            self.update();
        }
    }

    /// The client is gone: nothing of its handshake survives.
    pub fn client_gone(&mut self) {
        *self = Remap::new(self.regions, self.unasked);
    }

    fn update(&mut self) {
        let offered = if self.allowed && (self.unasked || self.fd.is_some()) { self.regions } else { 0 };
        self.pending |= offered ^ self.offered;
        self.offered = offered;
        self.maybe_mapped |= offered;
        self.signal();
    }

    fn signal(&mut self) {
        if self.masked || self.pending == 0 {
            return;
        }
        let Some(fd) = &self.fd else { return };
        let v = self.pending;
        log::info!(
            "remap IRQ: signalling regions {v:#x} ({})",
            if self.offered & v != 0 { "offered" } else { "revoked" }
        );
        if let Err(e) = (&*fd).write_all(&v.to_ne_bytes()) {
            // Only when the counter would overflow: the client stopped reading it; it stays masked.
            log::warn!("remap IRQ: eventfd write failed: {e}");
        }
        self.in_flight = v;
        self.pending = 0;
        self.masked = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A socket pair stands in for the eventfd: each signal arrives as its own 8 bytes.
    fn irq() -> (File, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (File::from(std::os::fd::OwnedFd::from(a)), b)
    }

    fn signals(s: &mut UnixStream) -> Vec<u64> {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        buf[..n].chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn nothing_is_offered_until_the_client_enables_the_irq() {
        let mut r = Remap::new(0b1, false);
        assert!(!r.offers(0));
        assert_eq!(r.maybe_mapped(), 0);
        r.set_allowed(false);
        r.set_allowed(true);
        assert!(!r.offers(0));
        let (fd, mut s) = irq();
        r.enable(fd);
        assert!(r.offers(0));
        assert_eq!(signals(&mut s), vec![1]);
    }

    #[test]
    fn changes_while_masked_make_one_signal_after_the_ack() {
        let mut r = Remap::new(0b1, false);
        let (fd, mut s) = irq();
        r.enable(fd);
        assert_eq!(signals(&mut s), vec![1]);
        // Migration starts before the client acknowledged the offer: no second write into the counter.
        r.set_allowed(false);
        assert!(!r.offers(0));
        assert_eq!(signals(&mut s), Vec::<u64>::new());
        assert_eq!(r.ack(), 0, "the client may have mapped the offer: not released");
        assert_eq!(signals(&mut s), vec![1]);
        assert_eq!(r.maybe_mapped(), 1);
        assert_eq!(r.ack(), 1, "revocation acknowledged");
        assert_eq!(r.maybe_mapped(), 0);
        // Revoked and offered again while masked: the client is told to look again (it finds the fast path).
        r.set_allowed(true);
        assert_eq!(signals(&mut s), vec![1]);
        r.set_allowed(false);
        r.set_allowed(true);
        assert_eq!(r.ack(), 0);
        assert_eq!(signals(&mut s), vec![1]);
        assert_eq!(r.maybe_mapped(), 1);
    }

    #[test]
    fn two_regions_in_one_signal_and_a_late_ack_keeps_both_mapped() {
        let mut r = Remap::new(0b1001, false);
        let (fd, mut s) = irq();
        r.enable(fd);
        assert_eq!(signals(&mut s), vec![0b1001]);
        r.ack();
        r.set_allowed(false);
        assert_eq!(signals(&mut s), vec![0b1001]);
        assert_eq!(r.maybe_mapped(), 0b1001, "limping along until the ack");
        assert_eq!(r.ack(), 0b1001);
        assert_eq!(r.maybe_mapped(), 0);
    }

    #[test]
    fn disabling_keeps_serving_what_may_be_mapped_and_reenabling_tells_the_client() {
        let mut r = Remap::new(0b1, false);
        let (fd, mut s) = irq();
        r.enable(fd);
        signals(&mut s);
        r.ack();
        r.disable();
        assert!(!r.offers(0));
        assert_eq!(r.maybe_mapped(), 1);
        r.set_allowed(false);
        let (fd, mut s) = irq();
        r.enable(fd);
        assert_eq!(signals(&mut s), vec![1], "its old mapping is stale");
        assert_eq!(r.ack(), 1);
        assert_eq!(r.maybe_mapped(), 0);
    }

    #[test]
    fn mmap_mode_offers_from_the_start_and_signals_a_client_that_enables() {
        let mut r = Remap::new(0b1, true);
        assert!(r.offers(0));
        assert_eq!(r.maybe_mapped(), 1);
        let (fd, mut s) = irq();
        r.enable(fd);
        assert_eq!(signals(&mut s), Vec::<u64>::new(), "the layout it read is current");
        r.set_allowed(false);
        assert_eq!(signals(&mut s), vec![1]);
        r.client_gone();
        assert!(r.offers(0) && !r.enabled());
    }
}
