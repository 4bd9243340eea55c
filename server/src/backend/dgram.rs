//! `dgram:LOCAL,REMOTE`: one Ethernet frame per UDP datagram, no header, as QEMU's `-netdev dgram` with inet
//! `local` and `remote` addresses.
//!
//! The socket is bound to LOCAL and connected to REMOTE: the kernel then accepts datagrams from REMOTE only.
//! Sends use MSG_DONTWAIT so a full socket buffer drops the frame instead of stalling the datapath. An ICMP
//! "port unreachable" (the peer is not up yet) surfaces as ECONNREFUSED on a later call and is ignored.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::net::{SendFlags, Shutdown};

use super::{is_timeout, suppressed, Ingress, RateLimited, Transport, POLL_INTERVAL, READ_BUF};

pub(crate) struct Dgram {
    sock: UdpSocket,
    remote: SocketAddr,
    tx_errors: RateLimited,
}

impl Dgram {
    pub(crate) fn open(local: SocketAddr, remote: SocketAddr) -> io::Result<Dgram> {
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local and remote addresses must both be IPv4 or both IPv6",
            ));
        }
        let sock = UdpSocket::bind(local).map_err(|e| io::Error::new(e.kind(), format!("binding {local}: {e}")))?;
        sock.connect(remote).map_err(|e| io::Error::new(e.kind(), format!("connecting to {remote}: {e}")))?;
        sock.set_read_timeout(Some(POLL_INTERVAL))?;
        log::info!("dgram: {} <-> {remote}", sock.local_addr()?);
        Ok(Dgram { sock, remote, tx_errors: RateLimited::new(Duration::from_secs(5)) })
    }
}

impl Transport for Dgram {
    fn send(&self, frame: &[u8]) {
        match rustix::net::send(&self.sock, frame, SendFlags::DONTWAIT) {
            Ok(_) => {}
            Err(rustix::io::Errno::CONNREFUSED) => {} // the peer is not listening (yet)
            Err(e) => {
                if let Some(n) = self.tx_errors.hit() {
                    log::warn!("dgram to {}: frame dropped: {e}{}", self.remote, suppressed(n));
                }
            }
        }
    }

    fn spawn(self: Arc<Self>, ingress: Arc<Ingress>, stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
        Ok(vec![super::spawn_named("net-dgram-rx", move || self.read_loop(&ingress, &stop))?])
    }

    fn wake(&self) {
        // Makes a blocked recv return at once (Linux wakes readers even on a connectionless socket).
        let _ = rustix::net::shutdown(&self.sock, Shutdown::Read);
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok()
    }
}

impl Dgram {
    fn read_loop(&self, ingress: &Ingress, stop: &AtomicBool) {
        let errors = RateLimited::new(Duration::from_secs(5));
        let mut buf = vec![0u8; READ_BUF];
        while !stop.load(Ordering::SeqCst) {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if !ingress.receive(&buf[..n]) {
                        log::debug!("{}: the device is gone; reader stops", ingress.name());
                        return;
                    }
                }
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    if let Some(n) = errors.hit() {
                        log::warn!("dgram from {}: receive failed: {e}{}", self.remote, suppressed(n));
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
        }
    }
}
