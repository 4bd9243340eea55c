//! The device model: an Intel i40e-style Virtual Function (8086:154c) as a vfio-user server presents it, with no
//! knowledge of sockets.
//!
//! The server owns the wire protocol and calls [`VfioDevice`]; the device owns its regions, interrupts and
//! state. Guest memory reaches the device through [`GuestMem`], which the server fills from DMA_MAP. Migration
//! uses [`I40eVf::pause`], [`I40eVf::save`], [`I40eVf::load`] and [`I40eVf::resume`] over [`DeviceState`].
//!
//! Module map (docs/architecture.md explains it): `vfio` the trait; `pci` config space and MSI-X; `nic` the NIC
//! function's definitions and pure logic; `mem` guest memory; `state` the state as plain data; `core` live state
//! with its resources; `engine` what runs on the workers; `vf` the device front.

#![forbid(unsafe_code)]

mod cfg;
mod core;
mod engine;
pub mod event;
pub mod fault;
pub mod mem;
mod net;
pub mod nic;
pub mod pci;
pub mod remap;
mod state;
pub mod stream;
mod vf;
mod vfio;

#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod fuzz;

pub use cfg::{Doorbells, VfConfig, MAX_QUEUE_PAIRS, MSIX_VECTORS};
pub use engine::port::RxPort;
pub use mem::doorbell::{DOORBELL_PAGES, PAGE as DOORBELL_PAGE};
pub use mem::{DmaTransport, GuestMem, Mapping, MemError};
pub use net::{FrameSink, NoSink};
pub use nic::virtchnl::LinkSpeed;
pub use state::{
    mac_str, Counters, DeviceState, Identity, NicState, QueueState, ResetPhase, StateError, VectorState,
    MAX_HELD_WRITES,
};
pub use vf::{I40eVf, PfResetHandle, Stats, CONFIG_REGION, NUM_REGIONS};
pub use vfio::{DevResult, Errno, IrqAction, IrqData, IrqInfo, Migratable, RegionInfo, RegionMmap, VfioDevice};
