//! vfio-user protocol server: owns the socket, the wire format and the event loop, and drives a
//! [`device::VfioDevice`].

pub mod backend;
#[doc(hidden)]
pub mod bench;
pub mod conn;
pub mod control;
pub mod dma;
#[doc(hidden)]
pub mod fuzz;
pub mod handlers;
pub mod limits;
pub mod migration;
pub mod server;
pub mod sys;
pub mod wire;

pub use limits::Limits;
pub use server::{Endpoint, Server};
