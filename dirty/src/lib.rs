//! Page-granular dirty tracking for memory the device writes.
//!
//! Every DMA write into guest memory goes through the device's memory accessor, which marks the pages it touched
//! in a [`PageBitmap`]. Bits are indexed by absolute page number (address / page size), so bitmaps of adjacent
//! mappings line up and a report can span several. Marking is one atomic OR per 64 pages touched, with no lock,
//! so device workers mark while the protocol thread harvests; harvesting swaps whole words, so a mark racing with
//! a harvest lands in this report or the next, never in neither.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page of a contiguous range of guest addresses.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    /// Absolute number of the page bit 0 stands for.
    first_page: u64,
    pages: u64,
    page_shift: u32,
}

impl PageBitmap {
    /// A clean bitmap for the pages (of `page_size` bytes, a power of two) that `[start, start + len)` touches.
    pub fn new(start: u64, len: u64, page_size: u64) -> Self {
        assert!(page_size.is_power_of_two(), "page size must be a power of two");
        let page_shift = page_size.trailing_zeros();
        let first_page = start >> page_shift;
        let pages = if len == 0 { 0 } else { ((start + (len - 1)) >> page_shift) - first_page + 1 };
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        PageBitmap { words, first_page, pages, page_shift }
    }

    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Absolute page numbers covered: `first_page()..first_page() + pages()`.
    pub fn first_page(&self) -> u64 {
        self.first_page
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks every page `[addr, addr + len)` touches; pages outside the bitmap are ignored.
    #[inline]
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (addr >> self.page_shift).max(self.first_page);
        let last = (addr.saturating_add(len - 1) >> self.page_shift).min(self.first_page + self.pages.max(1) - 1);
        if self.pages == 0 || first > last {
            return;
        }
        let (mut page, last) = (first - self.first_page, last - self.first_page);
        while page <= last {
            let word = (page / 64) as usize;
            let bit = page % 64;
            // A whole word's worth of bits at once where the range allows.
            let run = (64 - bit).min(last - page + 1);
            let mask = if run == 64 { u64::MAX } else { ((1u64 << run) - 1) << bit };
            let w = &self.words[word];
            // Test before set: a page written again before the next report (an RX buffer, a ring) costs a plain
            // load, not a locked read-modify-write.
            if w.load(Ordering::Relaxed) & mask != mask {
                w.fetch_or(mask, Ordering::Relaxed);
            }
            page += run;
        }
    }

    /// Whether absolute page `page` is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        let Some(i) = page.checked_sub(self.first_page).filter(|&i| i < self.pages) else { return false };
        self.words[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }

    /// Calls `f(page)` for every dirty absolute page in `pages` (a range of absolute page numbers), clearing the
    /// ones it reports when `clear`. Whole words are swapped (or read) at once, and empty ones skipped, so a
    /// sparse bitmap of millions of pages is walked in a fraction of a millisecond.
    pub fn drain(&self, pages: std::ops::Range<u64>, clear: bool, mut f: impl FnMut(u64)) {
        self.drain_words(pages, clear, |first, mut bits| {
            while bits != 0 {
                f(first + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
    }

    /// As [`PageBitmap::drain`], a word at a time: `f(first, bits)` where bit n of `bits` is absolute page
    /// `first + n` (only non-zero words, masked to `pages`).
    pub fn drain_words(&self, pages: std::ops::Range<u64>, clear: bool, mut f: impl FnMut(u64, u64)) {
        let lo = pages.start.max(self.first_page);
        let hi = pages.end.min(self.first_page + self.pages);
        if lo >= hi {
            return;
        }
        let (lo, hi) = (lo - self.first_page, hi - self.first_page);
        let (first_w, last_w) = (lo / 64, (hi - 1) / 64);
        if first_w == last_w {
            self.drain_edge(first_w, word_mask(lo % 64, hi - first_w * 64), clear, &mut f);
            return;
        }
        self.drain_edge(first_w, word_mask(lo % 64, 64), clear, &mut f);
        // Whole interior words need no mask: a sparse bitmap costs a load per word.
        let base = self.first_page + (first_w + 1) * 64;
        for (i, word) in self.words[(first_w + 1) as usize..last_w as usize].iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            if bits != 0 {
                if clear {
                    bits = word.swap(0, Ordering::AcqRel);
                }
                f(base + i as u64 * 64, bits);
            }
        }
        self.drain_edge(last_w, word_mask(0, hi - last_w * 64), clear, &mut f);
    }

    /// One word of [`PageBitmap::drain_words`], masked.
    fn drain_edge(&self, w: u64, mask: u64, clear: bool, f: &mut impl FnMut(u64, u64)) {
        let word = &self.words[w as usize];
        let mut bits = word.load(Ordering::Relaxed) & mask;
        if bits != 0 && clear {
            bits = word.fetch_and(!mask, Ordering::AcqRel) & mask;
        }
        if bits != 0 {
            f(self.first_page + w * 64, bits);
        }
    }

    /// Returns the bitmap words (bit n = page first_page + n) and clears them.
    pub fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// Bits `lo..hi` of a word (0 <= lo < hi <= 64).
fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_page() {
        let b = PageBitmap::new(0, 1 << 20, 4096);
        b.mark(4095, 2); // straddles pages 0 and 1
        assert!(b.is_dirty(0) && b.is_dirty(1) && !b.is_dirty(2));
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn long_runs_cross_words() {
        let b = PageBitmap::new(0, 1 << 30, 4096);
        b.mark(10 * 4096, 200 * 4096);
        assert_eq!(b.count(), 200);
        assert!(!b.is_dirty(9) && b.is_dirty(10) && b.is_dirty(209) && !b.is_dirty(210));
    }

    #[test]
    fn absolute_pages_and_out_of_range_marks() {
        let b = PageBitmap::new(0x10_0000, 8192, 4096);
        assert_eq!((b.first_page(), b.pages()), (256, 2));
        b.mark(0x10_2000, 10); // past the end
        b.mark(0xf_f000, 4096); // before the start
        b.mark(0, 0);
        b.mark(0x10_1000, u64::MAX);
        assert_eq!(b.count(), 1);
        assert!(b.is_dirty(257));
        // An unaligned start with a large page size covers the pages it touches.
        let big = PageBitmap::new(0x1000, 0x20_0000, 0x20_0000);
        assert_eq!((big.first_page(), big.pages()), (0, 2));
    }

    #[test]
    fn drain_reports_and_clears_only_its_range() {
        let b = PageBitmap::new(0, 200 * 4096, 4096);
        for p in [1u64, 63, 64, 65, 130, 199] {
            b.mark(p * 4096, 1);
        }
        let mut got = Vec::new();
        b.drain(63..131, true, |p| got.push(p));
        assert_eq!(got, vec![63, 64, 65, 130]);
        assert_eq!(b.count(), 2, "pages outside the range stay");
        let mut peeked = Vec::new();
        b.drain(0..1000, false, |p| peeked.push(p));
        assert_eq!(peeked, vec![1, 199]);
        assert_eq!(b.count(), 2, "a peek clears nothing");
    }

    #[test]
    fn take_clears() {
        let b = PageBitmap::new(0, 64 * 4096 * 2, 4096);
        b.mark(0, 1);
        b.mark(65 * 4096, 1);
        assert_eq!(b.take(), vec![1, 2]);
        assert_eq!(b.count(), 0);
    }
}
