//! `--dirty-log descriptors` (docs/remap-irq.md): instead of logging what the device writes, derive from the
//! descriptors the driver makes available the pages the device may write, as a hypervisor that traps tail writes
//! would. Whenever an engine reads a tail while deriving, [`Dev::observe`] returns the descriptors that became
//! available since it last looked, and the engine marks their pages before it writes anything. REPORT and
//! DMA_LOGGING_START call [`Dev::outstanding`] under the device lock around their own work, so descriptors handed
//! out but not yet used are marked again after every harvest: a buffer made available in one REPORT interval and
//! written in the next is reported in the next.

use crate::core::{Core, Dev};
use crate::mem::GuestMem;
use crate::nic::adminq::Desc;
use crate::nic::regs::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ring {
    Tx(u16),
    Rx(u16),
    Atq,
    Arq,
}

/// Descriptors `[from, to)` of a ring, and for RX the buffer size each one's buffer has.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    ring: Ring,
    base: u64,
    len: u32,
    from: u32,
    to: u32,
    buf: u64,
}

/// The last tail each ring's engine acted on while deriving; None: nothing since the ring was set up (derive
/// from the head).
#[derive(Clone, Debug, Default)]
pub(crate) struct Observed {
    tx: [Option<u32>; MAX_QUEUES as usize],
    rx: [Option<u32>; MAX_QUEUES as usize],
    atq: Option<u32>,
    arq: Option<u32>,
}

impl Observed {
    fn slot(&mut self, ring: Ring) -> &mut Option<u32> {
        match ring {
            Ring::Tx(q) => &mut self.tx[q as usize % MAX_QUEUES as usize],
            Ring::Rx(q) => &mut self.rx[q as usize % MAX_QUEUES as usize],
            Ring::Atq => &mut self.atq,
            Ring::Arq => &mut self.arq,
        }
    }

    /// CONFIG_VSI_QUEUES, ENABLE_QUEUES or DISABLE_QUEUES: rings start again from their heads.
    pub fn forget_queues(&mut self) {
        self.tx = Default::default();
        self.rx = Default::default();
    }

    pub fn forget(&mut self, ring: Ring) {
        *self.slot(ring) = None;
    }
}

impl Dev {
    /// An engine read `tail` of `ring` (`head` its own position): the descriptors that became available since it
    /// last looked, to be marked before it writes. Call only while deriving (`GuestMem::deriving`).
    pub(crate) fn observe(&mut self, ring: Ring, base: u64, len: u32, head: u32, tail: u32, buf: u64) -> Option<Span> {
        let slot = self.observed.slot(ring);
        let from = match *slot {
            Some(t) if t < len => t,
            _ => head,
        };
        *slot = Some(tail);
        (from != tail && len > 0 && from < len && tail < len).then_some(Span { ring, base, len, from, to: tail, buf })
    }

    /// Every ring's descriptors from the head to the tail register: what the device may still write without
    /// another doorbell. Engines look on from those tails.
    pub(crate) fn outstanding(&mut self) -> Vec<Span> {
        let mut rings = Vec::new();
        for q in 0..MAX_QUEUES as u16 {
            let qi = q as usize;
            let (pf, queue) = (&self.nic.pf, self.nic.queues.get(qi));
            if let (Some(Some(c)), Some(s)) = (pf.tx.get(qi), queue) {
                if pf.tx_enabled & 1 << q != 0 {
                    rings.push((Ring::Tx(q), c.ring, c.len, s.tx_head, self.tx_tail(q), 0));
                }
            }
            if let (Some(Some(c)), Some(s)) = (pf.rx.get(qi), queue) {
                if pf.rx_enabled & 1 << q != 0 {
                    rings.push((Ring::Rx(q), c.ring, c.len, s.rx_head, self.rx_tail(q), u64::from(c.buf_size)));
                }
            }
        }
        for (ring, len_reg, bal, bah, h, t) in [
            (Ring::Atq, VF_ATQLEN1, VF_ATQBAL1, VF_ATQBAH1, VF_ATQH1, VF_ATQT1),
            (Ring::Arq, VF_ARQLEN1, VF_ARQBAL1, VF_ARQBAH1, VF_ARQH1, VF_ARQT1),
        ] {
            let l = self.reg(len_reg);
            if l & AQ_ENABLE != 0 {
                let base = u64::from(self.reg(bal)) | u64::from(self.reg(bah)) << 32;
                rings.push((ring, base, l & AQ_LEN_MASK, self.reg(h) & AQ_LEN_MASK, self.reg(t) & AQ_LEN_MASK, 0));
            }
        }
        let mut spans = Vec::new();
        for (ring, base, len, head, tail, buf) in rings {
            *self.observed.slot(ring) = Some(tail);
            if head != tail && head < len && tail < len {
                spans.push(Span { ring, base, len, from: head, to: tail, buf });
            }
        }
        spans
    }
}

/// The guest memory `span` lets the device write: its ring entries (status writeback) and, for RX and ARQ, each
/// entry's buffer. Descriptors are read from fd-backed memory only (derived logging covers nothing else).
pub(crate) fn ranges(mem: &GuestMem, span: &Span, out: &mut Vec<(u64, u64)>) {
    let dsz: u64 = if matches!(span.ring, Ring::Tx(_)) { 16 } else { 32 };
    let mut i = span.from;
    while i != span.to {
        let Some(at) = u64::from(i).checked_mul(dsz).and_then(|o| span.base.checked_add(o)) else { return };
        // Contiguous entries merge into one range.
        match out.last_mut() {
            Some((a, l)) if *a + *l == at => *l += dsz,
            _ => out.push((at, dsz)),
        }
        match span.ring {
            Ring::Rx(_) => {
                let mut qw0 = [0u8; 8];
                if mem.read_local(at, &mut qw0).is_ok() {
                    out.push((u64::from_le_bytes(qw0), span.buf));
                }
            }
            Ring::Arq => {
                let mut raw = [0u8; 32];
                if mem.read_local(at, &mut raw).is_ok() {
                    let d = Desc::from_bytes(&raw);
                    out.push((u64::from(d.addr_high) << 32 | u64::from(d.addr_low), u64::from(d.datalen)));
                }
            }
            _ => {}
        }
        i = (i + 1) % span.len;
    }
}

/// Marks what `span` lets the device write (the engine calls this before writing through it).
pub(crate) fn mark(core: &Core, span: Option<Span>) {
    let Some(span) = span else { return };
    let mut out = Vec::new();
    ranges(&core.mem, &span, &mut out);
    for (a, l) in out {
        core.mem.mark_derived(a, l);
    }
}
