//! Page-granular dirty tracking for memory the device writes.
//!
//! Every DMA write into guest memory goes through the device's memory accessor, which marks the pages it touched
//! here. The bitmap is lock-free so device workers can mark while the protocol thread harvests.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page of a contiguous range of guest memory.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    len: u64,
    page_shift: u32,
}

impl PageBitmap {
    /// A clean bitmap covering `len` bytes in pages of `page_size` bytes (a power of two).
    pub fn new(len: u64, page_size: u64) -> Self {
        assert!(page_size.is_power_of_two(), "page size must be a power of two");
        let page_shift = page_size.trailing_zeros();
        let pages = len.div_ceil(page_size);
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        PageBitmap { words, len, page_shift }
    }

    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks every page that `[offset, offset + len)` touches. Bytes past the end are ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.len {
            return;
        }
        let end = offset.saturating_add(len).min(self.len);
        let first = offset >> self.page_shift;
        let last = (end - 1) >> self.page_shift;
        let mut page = first;
        while page <= last {
            let word = (page / 64) as usize;
            let bit = page % 64;
            // Set a whole word's worth of bits at once where the range allows.
            let run = (64 - bit).min(last - page + 1);
            let mask = if run == 64 { u64::MAX } else { ((1u64 << run) - 1) << bit };
            self.words[word].fetch_or(mask, Ordering::Relaxed);
            page += run;
        }
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }

    /// Returns the bitmap words (bit n = page n) and clears them atomically word by word, so a mark racing with
    /// the harvest lands either in this snapshot or in the next, never in neither.
    pub fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_page() {
        let b = PageBitmap::new(1 << 20, 4096);
        b.mark(4095, 2); // straddles pages 0 and 1
        assert!(b.is_dirty(0) && b.is_dirty(1) && !b.is_dirty(2));
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn long_runs_cross_words() {
        let b = PageBitmap::new(1 << 30, 4096);
        b.mark(10 * 4096, 200 * 4096);
        assert_eq!(b.count(), 200);
        assert!(!b.is_dirty(9) && b.is_dirty(10) && b.is_dirty(209) && !b.is_dirty(210));
    }

    #[test]
    fn out_of_range_and_empty_marks_are_ignored() {
        let b = PageBitmap::new(8192, 4096);
        b.mark(8192, 10);
        b.mark(0, 0);
        b.mark(4096, u64::MAX);
        assert_eq!(b.count(), 1);
        assert!(b.is_dirty(1));
    }

    #[test]
    fn take_clears() {
        let b = PageBitmap::new(64 * 4096 * 2, 4096);
        b.mark(0, 1);
        b.mark(65 * 4096, 1);
        assert_eq!(b.take(), vec![1, 2]);
        assert_eq!(b.count(), 0);
    }
}
