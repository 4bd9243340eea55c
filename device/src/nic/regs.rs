//! BAR0 register offsets (i40e VF, as the iavf driver uses them) and the register file's storage.

use serde::{Deserialize, Serialize};

pub const QTX_TAIL1: u64 = 0x0000;
pub const QRX_TAIL1: u64 = 0x2000;
pub const VFINT_ITRN1: u64 = 0x2800;
pub const VFINT_DYN_CTLN1: u64 = 0x3800;
pub const VFINT_ICR01: u64 = 0x4800;
pub const VFINT_ITR01: u64 = 0x4c00;
pub const VFINT_ICR0_ENA1: u64 = 0x5000;
pub const VFINT_STAT_CTL01: u64 = 0x5400;
pub const VFINT_DYN_CTL01: u64 = 0x5c00;
pub const VF_ARQBAH1: u64 = 0x6000;
pub const VF_ATQH1: u64 = 0x6400;
pub const VF_ATQLEN1: u64 = 0x6800;
pub const VF_ARQBAL1: u64 = 0x6c00;
pub const VF_ARQT1: u64 = 0x7000;
pub const VF_ARQH1: u64 = 0x7400;
pub const VF_ATQBAH1: u64 = 0x7800;
pub const VF_ATQBAL1: u64 = 0x7c00;
pub const VF_ARQLEN1: u64 = 0x8000;
pub const VF_ATQT1: u64 = 0x8400;
pub const VFGEN_RSTAT: u64 = 0x8800;
pub const VFQF_HENA: u64 = 0xc400;
pub const VFQF_HKEY: u64 = 0xcc00;
pub const VFQF_HLUT: u64 = 0xd000;

pub const MAX_QUEUES: u64 = 16;

/// AQ length register bits.
pub const AQ_LEN_MASK: u32 = 0x3ff;
pub const AQ_ENABLE: u32 = 1 << 31;
/// VFE, OVFL, CRIT: error bits the device sets and the driver clears.
pub const AQ_ERR_BITS: u32 = 0x7 << 28;
pub const AQ_CRIT: u32 = 1 << 30;

/// VFGEN_RSTAT values (bits 0-1).
pub const RSTAT_INPROGRESS: u32 = 0;
pub const RSTAT_COMPLETED: u32 = 1;
pub const RSTAT_VFACTIVE: u32 = 2;

/// DYN_CTL bits.
pub const DYN_INTENA: u32 = 1 << 0;
pub const DYN_CLEARPBA: u32 = 1 << 1;
pub const DYN_SWINT_TRIG: u32 = 1 << 2;
pub const DYN_INTENA_MSK: u32 = 1 << 31;

/// ICR01 cause bits.
pub const ICR0_ADMINQ: u32 = 1 << 30;
pub const ICR0_SWINT: u32 = 1 << 31;

/// Whether a dword offset is a register the VF implements. The RSS key and LUT ranges include one entry past the
/// end because iavf's register RSS path writes it (`i <= size / 4`).
pub fn is_register(off: u64) -> bool {
    let within =
        |base: u64, n: u64, stride: u64| off >= base && off < base + n * stride && (off - base).is_multiple_of(stride);
    within(QTX_TAIL1, MAX_QUEUES, 4)
        || within(QRX_TAIL1, MAX_QUEUES, 4)
        || (0..3).any(|i| within(VFINT_ITRN1 + 64 * i, MAX_QUEUES, 4))
        || within(VFINT_DYN_CTLN1, MAX_QUEUES, 4)
        || within(VFINT_ITR01, 3, 4)
        || within(VFQF_HENA, 2, 4)
        || within(VFQF_HKEY, 14, 4)
        || within(VFQF_HLUT, 17, 4)
        || matches!(
            off,
            VFINT_ICR01
                | VFINT_ICR0_ENA1
                | VFINT_STAT_CTL01
                | VFINT_DYN_CTL01
                | VF_ARQBAH1
                | VF_ATQH1
                | VF_ATQLEN1
                | VF_ARQBAL1
                | VF_ARQT1
                | VF_ARQH1
                | VF_ATQBAH1
                | VF_ATQBAL1
                | VF_ARQLEN1
                | VF_ATQT1
                | VFGEN_RSTAT
        )
}

/// BAR0's size: 64 KiB of dword registers.
pub const BAR0_SIZE: u64 = 64 * 1024;

/// BAR0's dword registers; semantics live in the device, storage here. Saved sparsely: the implemented registers
/// that are not zero, as (offset, value) pairs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<(u32, u32)>", try_from = "Vec<(u32, u32)>")]
pub struct RegFile {
    words: Vec<u32>,
}

impl std::fmt::Debug for RegFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nonzero: Vec<(u32, u32)> = self.clone().into();
        f.debug_map().entries(nonzero.iter().map(|(o, v)| (format!("{o:#06x}"), format!("{v:#x}")))).finish()
    }
}

impl From<RegFile> for Vec<(u32, u32)> {
    fn from(r: RegFile) -> Self {
        r.words
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, &v)| ((i * 4) as u32, v))
            .filter(|&(o, _)| is_register(u64::from(o)))
            .collect()
    }
}

impl TryFrom<Vec<(u32, u32)>> for RegFile {
    type Error = String;

    fn try_from(v: Vec<(u32, u32)>) -> Result<Self, String> {
        let mut r = RegFile { words: vec![0; (BAR0_SIZE / 4) as usize] };
        let mut last = None;
        for (o, val) in v {
            if !is_register(u64::from(o)) {
                return Err(format!("saved register at {o:#x}: not a register of this VF"));
            }
            if last.is_some_and(|l| l >= o) {
                return Err(format!("saved registers out of order or repeated at {o:#x}"));
            }
            last = Some(o);
            r.set(u64::from(o), val);
        }
        Ok(r)
    }
}

#[cfg(test)]
impl proptest::arbitrary::Arbitrary for RegFile {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<RegFile>;

    /// Any values in any set of implemented registers.
    fn arbitrary_with(_: ()) -> Self::Strategy {
        use proptest::prelude::*;
        proptest::collection::btree_map(0u32..(BAR0_SIZE as u32 / 4), any::<u32>(), 0..64)
            .prop_map(|m| {
                let mut r = RegFile { words: vec![0; (BAR0_SIZE / 4) as usize] };
                for (i, v) in m {
                    if is_register(u64::from(i) * 4) {
                        r.set(u64::from(i) * 4, v);
                    }
                }
                r
            })
            .boxed()
    }
}

impl RegFile {
    /// Power-on values: everything 0 except VFGEN_RSTAT, which reads VFACTIVE.
    pub fn power_on() -> Self {
        let mut r = RegFile { words: vec![0; (BAR0_SIZE / 4) as usize] };
        r.set(VFGEN_RSTAT, RSTAT_VFACTIVE);
        r
    }

    pub fn get(&self, off: u64) -> u32 {
        self.words[(off / 4) as usize]
    }

    pub fn set(&mut self, off: u64, v: u32) {
        self.words[(off / 4) as usize] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_map() {
        for off in
            [QTX_TAIL1, QRX_TAIL1 + 60, VFINT_ITRN1 + 128 + 4, VF_ATQT1, VFGEN_RSTAT, VFQF_HKEY + 52, VFQF_HLUT + 64]
        {
            assert!(is_register(off), "{off:#x}");
        }
        for off in [QTX_TAIL1 + 64, 0x2002, 0x9000, VFQF_HKEY + 56, VFQF_HLUT + 68] {
            assert!(!is_register(off), "{off:#x}");
        }
        assert_eq!(RegFile::power_on().get(VFGEN_RSTAT), RSTAT_VFACTIVE);
    }

    #[test]
    fn saved_sparsely_and_validated() {
        let mut r = RegFile::power_on();
        r.set(VF_ATQBAL1, 0x1000);
        r.set(QRX_TAIL1 + 4, 7);
        let v: Vec<(u32, u32)> = r.clone().into();
        assert_eq!(v, vec![(QRX_TAIL1 as u32 + 4, 7), (VF_ATQBAL1 as u32, 0x1000), (VFGEN_RSTAT as u32, 2)]);
        assert_eq!(RegFile::try_from(v).unwrap(), r);
        assert!(RegFile::try_from(vec![(0x9000, 1)]).is_err(), "not a register");
        assert!(RegFile::try_from(vec![(2, 1)]).is_err(), "unaligned");
        assert!(RegFile::try_from(vec![(0x8800, 1), (0x8800, 2)]).is_err(), "repeated");
    }
}
