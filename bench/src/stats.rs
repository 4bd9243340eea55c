//! Order statistics over per-iteration samples, in nanoseconds.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub iters: usize,
    pub median: u64,
    pub p99: u64,
    pub min: u64,
    pub mean: u64,
}

/// Median, 99th percentile (nearest rank), minimum and mean. `samples` must not be empty.
pub fn summarize(samples: &[u64]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut v = samples.to_vec();
    v.sort_unstable();
    let n = v.len();
    let rank = |p: usize| v[(n * p).div_ceil(100).clamp(1, n) - 1];
    Summary {
        iters: n,
        median: rank(50),
        p99: rank(99),
        min: v[0],
        mean: (v.iter().map(|&x| u128::from(x)).sum::<u128>() / n as u128) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks() {
        let v: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&v);
        assert_eq!((s.iters, s.median, s.p99, s.min, s.mean), (100, 50, 99, 1, 50));
        assert_eq!(summarize(&[7]).p99, 7);
    }
}
