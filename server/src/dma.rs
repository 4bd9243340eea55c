//! Guest memory without an fd, reached with DMA_READ/DMA_WRITE messages.
//!
//! A device worker calls [`RemoteDma`]; the request travels over a channel to the protocol thread, which owns the
//! socket, sends it, and keeps processing commands until the client's reply arrives. The worker alone waits.
//! This matters because QEMU serves DMA requests under its big lock, which a vCPU may hold while it waits for our
//! reply to an MMIO read: a server that stopped reading commands while its DMA request was outstanding would
//! deadlock with it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use device::mem::DmaTransport;

pub const DMA_TIMEOUT: Duration = Duration::from_secs(10);

pub enum DmaOp {
    Read(u64),
    Write(Vec<u8>),
}

/// One DMA message for the protocol thread to send; the answer is the data read (empty for a write).
pub struct DmaRequest {
    pub session: u64,
    pub addr: u64,
    pub op: DmaOp,
    pub reply: Sender<io::Result<Vec<u8>>>,
}

pub struct RemoteDma {
    pub session: u64,
    pub tx: Sender<DmaRequest>,
    pub waker: Arc<mio::Waker>,
    /// The client's max_data_xfer_size: no message we send may carry more.
    pub chunk: usize,
}

impl RemoteDma {
    fn call(&self, addr: u64, op: DmaOp) -> io::Result<Vec<u8>> {
        let (reply, rx) = bounded(1);
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "client disconnected");
        self.tx.send(DmaRequest { session: self.session, addr, op, reply }).map_err(|_| gone())?;
        self.waker.wake()?;
        match rx.recv_timeout(DMA_TIMEOUT) {
            Ok(r) => r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "client did not answer a DMA request in 10 s"))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

impl DmaTransport for RemoteDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(self.chunk).enumerate() {
            let at = addr + (i * self.chunk) as u64;
            let data = self.call(at, DmaOp::Read(chunk.len() as u64))?;
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        for (i, chunk) in data.chunks(self.chunk).enumerate() {
            self.call(addr + (i * self.chunk) as u64, DmaOp::Write(chunk.to_vec()))?;
        }
        Ok(())
    }
}
