//! Test harness for the `vfu-i40evf` vfio-user server: a process wrapper ([`ServerProcess`]) and a raw protocol
//! client ([`Client`]) that also serves the server's DMA_READ/DMA_WRITE requests from fd-less guest memory.
//!
//! Everything here follows `docs/protocol.md` (the server's contract) and the vfio-user specification; the
//! integration tests in `tests/` assert that contract.

#![forbid(unsafe_code)]

pub mod client;
pub mod control;
pub mod migtest;
pub mod netns;
pub mod refvmm;
pub mod server;
pub mod util;
pub mod wire;

pub use client::{Client, DmaStats, Reply};
pub use server::ServerProcess;
pub use wire::*;
