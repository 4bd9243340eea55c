//! The VF's PCI personality: config space (identity, BARs, capabilities, FLR) and MSI-X.

pub mod config;
pub mod msix;

pub use config::{vf_config, PciConfig, BAR0_SIZE, BAR3_SIZE, CONFIG_SIZE};
pub use msix::{Interrupts, MsixState};
