//! `tap:IFNAME`: a Linux tap device (IFF_TAP | IFF_NO_PI: plain Ethernet frames, no packet-info or vnet header).
//!
//! TUNSETIFF attaches to an existing tap device of that name (one made persistent with `ip tuntap add dev IFNAME
//! mode tap`, which then outlives us) or creates one that disappears when we close it. Either way, bringing the
//! interface up and addressing or bridging it is the user's job. The ioctl is done by the `tun` crate, so this
//! file needs no `unsafe`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{is_timeout, suppressed, Ingress, RateLimited, Transport, POLL_INTERVAL, READ_BUF};

pub(crate) struct Tap {
    dev: tun::Device,
    ifname: String,
    tx_errors: RateLimited,
}

impl Tap {
    pub(crate) fn open(ifname: &str) -> io::Result<Tap> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "/dev/net/tun is missing (no tun/tap support here)"));
        }
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(ifname).layer(tun::Layer::L2);
        let dev = tun::create(&cfg).map_err(|e| {
            let e = io::Error::from(e);
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    " (needs CAP_NET_ADMIN, or a persistent tap owned by this user: ip tuntap add dev NAME mode tap user USER)"
                }
                Some(libc::EINVAL) => " (is an interface of that name a tun device, or a tap made with multi_queue?)",
                Some(libc::EBUSY) => " (another process has this tap device open)",
                _ => "",
            };
            io::Error::new(e.kind(), format!("opening tap {ifname}: {e}{hint}"))
        })?;
        let actual = tun::AbstractDevice::tun_name(&dev).unwrap_or_else(|_| ifname.to_owned());
        log::info!("tap {actual}: attached (bring it up with `ip link set {actual} up`)");
        Ok(Tap { dev, ifname: actual, tx_errors: RateLimited::new(Duration::from_secs(5)) })
    }
}

impl Transport for Tap {
    fn send(&self, frame: &[u8]) {
        // A tap write never waits: the kernel takes the frame or refuses it (e.g. EIO while the interface is down).
        if let Err(e) = self.dev.send(frame) {
            if let Some(n) = self.tx_errors.hit() {
                log::warn!("tap {}: transmit failed: {e}{}", self.ifname, suppressed(n));
            }
        }
    }

    fn spawn(self: Arc<Self>, ingress: Arc<Ingress>, stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
        Ok(vec![super::spawn_named("net-tap-rx", move || self.read_loop(&ingress, &stop))?])
    }
}

impl Tap {
    fn read_loop(&self, ingress: &Ingress, stop: &AtomicBool) {
        let errors = RateLimited::new(Duration::from_secs(5));
        let mut buf = vec![0u8; READ_BUF];
        while !stop.load(Ordering::SeqCst) {
            // A character device has no SO_RCVTIMEO: the crate polls, then reads.
            match self.dev.recv_timeout(&mut buf, POLL_INTERVAL) {
                Ok(n) => {
                    // A frame bigger than the buffer is truncated by the kernel; the length it reports can exceed
                    // the buffer, and either way it is over MAX_FRAME.
                    if n > buf.len() {
                        ingress.check_len(n);
                    } else if !ingress.receive(&buf[..n]) {
                        log::debug!("{}: the device is gone; reader stops", ingress.name());
                        return;
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    if let Some(n) = errors.hit() {
                        log::warn!("tap {}: read failed: {e}{}", self.ifname, suppressed(n));
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
        }
    }
}
