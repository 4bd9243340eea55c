//! `stream-server:ADDR` / `stream-client:ADDR`: QEMU's `-netdev stream` framing over TCP or a UNIX socket. Each
//! frame goes on the wire preceded by its length as 4 bytes big-endian (QEMU `net_stream_data_receive` sends
//! `htonl(size)`, `net_fill_rstate` reads it back with `ntohl`), with no vnet header.
//!
//! One peer at a time. The connection thread accepts (server) or connects (client), reads frames until the peer
//! goes away, then accepts again or reconnects (backing off up to [`MAX_BACKOFF`]). Transmitted frames go through
//! a bounded queue to a writer thread, so the datapath never waits for the peer; with no peer connected they are
//! dropped (no link partner), and a peer that stops reading for [`WRITE_TIMEOUT`] is disconnected.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use super::{
    is_timeout, sleep_unless_stopped, suppressed, Ingress, RateLimited, StreamAddr, Transport, POLL_INTERVAL,
    TX_QUEUE_FRAMES,
};
use crate::sys::SocketPath;

/// A length above QEMU's receive buffer (NET_BUFSIZE, 4096 + 65536) means the peer does not speak this framing:
/// the connection is dropped. Lengths up to it that fail the frame size checks are skipped.
pub const MAX_WIRE_LEN: usize = 4096 + 65536;
/// A peer that accepts no bytes for this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two connection attempts of a client.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TX_BATCH: usize = 64 * 1024;

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => (&*s).write_all(buf),
            Conn::Unix(s) => (&*s).write_all(buf),
        }
    }

    /// Wakes this connection's reader and writer: both see EOF or an error at once.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn setup(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a TCP peer".into()),
            Conn::Unix(_) => "a UNIX socket peer".into(),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    /// The guard removes the socket file when the backend closes.
    Unix(UnixListener, #[allow(dead_code)] SocketPath),
}

impl Listener {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    /// Non-blocking accept.
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        }
    }
}

enum Role {
    Server(Listener),
    Client(StreamAddr),
}

pub(crate) struct Stream {
    name: String,
    role: Role,
    current: Mutex<Option<Arc<Conn>>>,
    connected: AtomicBool,
    txq: Sender<Vec<u8>>,
    txq_rx: Receiver<Vec<u8>>,
    tx_drops: RateLimited,
}

impl Stream {
    fn new(name: &str, role: Role) -> Stream {
        let (txq, txq_rx) = bounded(TX_QUEUE_FRAMES);
        Stream {
            name: name.to_owned(),
            role,
            current: Mutex::new(None),
            connected: AtomicBool::new(false),
            txq,
            txq_rx,
            tx_drops: RateLimited::new(Duration::from_secs(5)),
        }
    }

    /// Binds and listens now, so an address in use is reported at startup.
    pub(crate) fn server(addr: &StreamAddr, name: &str) -> io::Result<Stream> {
        let listener = match addr {
            StreamAddr::Inet(a) => {
                let l = TcpListener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("binding {a}: {e}")))?;
                Listener::Tcp(l)
            }
            StreamAddr::Unix(p) => {
                let (l, guard) = crate::sys::listen(p)?;
                Listener::Unix(UnixListener::from(l), guard)
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(Stream::new(name, Role::Server(listener)))
    }

    /// Connects only once started.
    pub(crate) fn client(addr: &StreamAddr, name: &str) -> Stream {
        Stream::new(name, Role::Client(addr.clone()))
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Conn>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a peer; None once `stop` is set.
    fn accept(&self, l: &Listener, stop: &AtomicBool) -> Option<Conn> {
        let errors = RateLimited::new(Duration::from_secs(5));
        let timeout = Timespec { tv_sec: 0, tv_nsec: POLL_INTERVAL.as_nanos() as _ };
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok(c) => return Some(c),
                Err(e) if is_timeout(&e) => {
                    let _ = rustix::event::poll(&mut [PollFd::from_borrowed_fd(l.fd(), PollFlags::IN)], Some(&timeout));
                }
                Err(e) => {
                    if let Some(n) = errors.hit() {
                        log::warn!("{}: accept failed: {e}{}", self.name, suppressed(n));
                    }
                    sleep_unless_stopped(stop, POLL_INTERVAL);
                }
            }
        }
        None
    }

    /// The connection thread: accept or connect, read frames until the peer goes away, again, until `stop` or
    /// until the device is gone.
    fn run(&self, ingress: &Ingress, stop: &AtomicBool) {
        let failures = RateLimited::new(Duration::from_secs(30));
        let mut backoff = MIN_BACKOFF;
        while !stop.load(Ordering::SeqCst) {
            let conn = match &self.role {
                Role::Server(l) => match self.accept(l, stop) {
                    Some(c) => c,
                    None => break,
                },
                Role::Client(addr) => match connect(addr, stop) {
                    Ok(Some(c)) => {
                        backoff = MIN_BACKOFF;
                        c
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(n) = failures.hit() {
                            log::info!("{}: connecting: {e}; retrying{}", self.name, suppressed(n));
                        }
                        if sleep_unless_stopped(stop, backoff) {
                            break;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            if let Err(e) = conn.setup() {
                log::warn!("{}: setting up the connection: {e}", self.name);
                continue;
            }
            let conn = Arc::new(conn);
            let peer = conn.peer();
            // Frames queued for a previous peer are stale.
            while self.txq_rx.try_recv().is_ok() {}
            *self.current() = Some(conn.clone());
            self.connected.store(true, Ordering::SeqCst);
            log::info!("{}: connected to {peer}", self.name);
            let device_alive = self.read_frames(&conn, ingress, stop);
            self.connected.store(false, Ordering::SeqCst);
            self.current().take();
            conn.shutdown();
            if !device_alive {
                log::debug!("{}: the device is gone; connection thread stops", self.name);
                return;
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match self.role {
                Role::Server(_) => log::info!("{}: {peer} went away; accepting again", self.name),
                Role::Client(_) => {
                    log::info!("{}: {peer} went away; reconnecting", self.name);
                    sleep_unless_stopped(stop, MIN_BACKOFF);
                }
            }
        }
    }

    /// Reads length-prefixed frames until EOF, an error, a framing error or `stop`. False if the device is gone.
    fn read_frames(&self, conn: &Conn, ingress: &Ingress, stop: &AtomicBool) -> bool {
        let mut buf: Vec<u8> = Vec::with_capacity(2 * (4 + MAX_WIRE_LEN));
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if stop.load(Ordering::SeqCst) {
                return true;
            }
            let n = match conn.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => {
                    log::info!("{}: read failed: {e}", self.name);
                    return true;
                }
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut off = 0;
            while buf.len() - off >= 4 {
                let len = u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
                if len > MAX_WIRE_LEN {
                    log::warn!(
                        "{}: the peer announced a {len}-byte frame (QEMU's limit is {MAX_WIRE_LEN}): not QEMU stream \
                         framing? dropping the connection",
                        self.name
                    );
                    return true;
                }
                if buf.len() - off - 4 < len {
                    break;
                }
                if !ingress.receive(&buf[off + 4..off + 4 + len]) {
                    return false;
                }
                off += 4 + len;
            }
            buf.drain(..off);
        }
    }

    fn write_loop(&self, stop: &AtomicBool) {
        let errors = RateLimited::new(Duration::from_secs(5));
        let mut batch = Vec::with_capacity(2 * TX_BATCH);
        loop {
            let first = match self.txq_rx.recv_timeout(POLL_INTERVAL) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => continue,
                Err(_) => return,
            };
            if stop.load(Ordering::SeqCst) {
                return;
            }
            batch.clear();
            batch.extend_from_slice(&first);
            while batch.len() < TX_BATCH {
                match self.txq_rx.try_recv() {
                    Ok(f) => batch.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            let conn = self.current().clone();
            let Some(conn) = conn else { continue };
            if let Err(e) = conn.write_all(&batch) {
                if let Some(n) = errors.hit() {
                    log::warn!("{}: write failed: {e}; dropping the connection{}", self.name, suppressed(n));
                }
                // Part of a frame may be on the wire: the stream is out of step. The reader sees the shutdown.
                conn.shutdown();
            }
        }
    }
}

impl Transport for Stream {
    fn send(&self, frame: &[u8]) {
        if !self.connected.load(Ordering::Relaxed) {
            return; // no link partner
        }
        let mut v = Vec::with_capacity(4 + frame.len());
        v.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        v.extend_from_slice(frame);
        if let Err(TrySendError::Full(_)) = self.txq.try_send(v) {
            if let Some(n) = self.tx_drops.hit() {
                log::warn!("{}: the peer is not keeping up; transmitted frame dropped{}", self.name, suppressed(n));
            }
        }
    }

    fn spawn(self: Arc<Self>, ingress: Arc<Ingress>, stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
        let (s, st) = (self.clone(), stop.clone());
        let writer = super::spawn_named("net-stream-tx", move || s.write_loop(&st))?;
        let conn = super::spawn_named("net-stream", move || self.run(&ingress, &stop))?;
        Ok(vec![conn, writer])
    }

    fn wake(&self) {
        if let Some(c) = self.current().as_ref() {
            c.shutdown();
        }
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match &self.role {
            Role::Server(Listener::Tcp(l)) => l.local_addr().ok(),
            _ => None,
        }
    }
}

/// One connection attempt. Ok(None) if `stop` was set meanwhile.
fn connect(addr: &StreamAddr, stop: &AtomicBool) -> io::Result<Option<Conn>> {
    match addr {
        StreamAddr::Unix(p) => UnixStream::connect(p)
            .map(|s| Some(Conn::Unix(s)))
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", p.display()))),
        StreamAddr::Inet(a) => {
            // Non-blocking connect, polled, so a silent address cannot hold up shutdown.
            let family = if a.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
            let fd = rustix::net::socket_with(
                family,
                SocketType::STREAM,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                None,
            )?;
            match rustix::net::connect(&fd, a) {
                Ok(()) => {}
                Err(rustix::io::Errno::INPROGRESS) => {
                    let deadline = Instant::now() + CONNECT_TIMEOUT;
                    let timeout = Timespec { tv_sec: 0, tv_nsec: POLL_INTERVAL.as_nanos() as _ };
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(None);
                        }
                        let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
                        if rustix::event::poll(&mut pfd, Some(&timeout))? > 0 {
                            break;
                        }
                        if Instant::now() >= deadline {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("connecting to {a}: timed out"),
                            ));
                        }
                    }
                    rustix::net::sockopt::socket_error(&fd)?
                        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("connecting to {a}: {e}")))?;
                }
                Err(e) => return Err(io::Error::new(io::Error::from(e).kind(), format!("connecting to {a}: {e}"))),
            }
            Ok(Some(Conn::Tcp(TcpStream::from(fd))))
        }
    }
}
