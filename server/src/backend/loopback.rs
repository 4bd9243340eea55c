//! `loopback`: every frame the guest transmits is received back (through the same size checks and capture as
//! frames from a wire). Before [`Backend::start`](super::Backend::start), transmitted frames are dropped.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::{Ingress, Transport};

#[derive(Default)]
pub(crate) struct Loopback {
    ingress: OnceLock<Arc<Ingress>>,
}

impl Transport for Loopback {
    fn send(&self, frame: &[u8]) {
        if let Some(i) = self.ingress.get() {
            i.receive(frame);
        }
    }

    fn spawn(self: Arc<Self>, ingress: Arc<Ingress>, _stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
        self.ingress
            .set(ingress)
            .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "loopback: already started"))?;
        Ok(Vec::new())
    }
}
