//! Packet backends: where the VF's transmitted frames go and where received frames come from, plus an optional
//! pcap capture of both directions.
//!
//! A [`BackendSpec`] is parsed from the `--netdev` string (see [`BackendSpec::HELP`]), [`Backend::open`] creates
//! the socket or tap device, [`Backend::sink`] is handed to the device (`I40eVf::set_sink`) and
//! [`Backend::start`] spawns the thread(s) that feed frames from the wire into the device's [`RxPort`].
//!
//! Threads per backend: `none`/`loopback` none; `tap` and `dgram` one reader; `stream-*` one connection thread
//! (accept or connect, then read) and one writer, so a slow peer never blocks the device's datapath worker (frames
//! are queued, up to [`TX_QUEUE_FRAMES`], then dropped). With `--pcap`, one more thread writes the capture file.
//! Dropping the [`Backend`] stops and joins every thread within about [`POLL_INTERVAL`]; the sink the device still
//! holds then drops every frame.

mod dgram;
mod loopback;
pub mod pcap;
mod stream;
mod tap;

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use device::{FrameSink, RxPort};

use self::pcap::PcapWriter;

/// Frames from the wire shorter than this (an Ethernet header) are dropped.
pub const MIN_FRAME: usize = 14;
/// Frames from the wire longer than this are dropped.
pub const MAX_FRAME: usize = 16 * 1024;
/// How often blocked reader threads look at the stop flag: the bound on [`Backend`]'s drop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Frames a stream backend queues for its writer thread before it drops new ones.
pub const TX_QUEUE_FRAMES: usize = 1024;
/// Read buffer for datagram-like sources (tap, UDP): large enough to see that a frame is oversized.
const READ_BUF: usize = 64 * 1024 + 1;

/// A stream endpoint: TCP (`HOST:PORT`) or a UNIX socket path (`unix:PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamAddr {
    Inet(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddr::Inet(a) => write!(f, "{a}"),
            StreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which packet backend to use; parsed from the `--netdev` value (see [`BackendSpec::HELP`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackendSpec {
    /// Drop every transmitted frame; nothing is received.
    #[default]
    None,
    /// Every transmitted frame is received back.
    Loopback,
    /// A Linux tap device, attached if it exists, created (non-persistent) otherwise.
    Tap { ifname: String },
    /// UDP, one frame per datagram, bound to `local`, sending to (and accepting only from) `remote`.
    Dgram { local: SocketAddr, remote: SocketAddr },
    /// Listen; one peer at a time, accepting again when it leaves. QEMU `-netdev stream` framing.
    StreamServer(StreamAddr),
    /// Connect, and reconnect when the peer goes away. QEMU `-netdev stream` framing.
    StreamClient(StreamAddr),
}

impl BackendSpec {
    /// Help text for the command-line option taking a [`BackendSpec`].
    pub const HELP: &'static str = "\
Packet backend: where the VF's frames go and come from.
  none                       drop transmitted frames, receive nothing (default)
  loopback                   every transmitted frame is received back
  tap:IFNAME                 Linux tap device IFNAME: attached if it exists (e.g. made by `ip tuntap add dev IFNAME \
mode tap`), else created and removed on exit; bringing it up (`ip link set IFNAME up`) is up to you
  dgram:LOCAL,REMOTE         UDP, one frame per datagram, bound to LOCAL, sent to REMOTE (only REMOTE's datagrams \
are accepted); HOST:PORT each, IPv6 as [::1]:PORT. Peer of QEMU -netdev dgram,local.type=inet,local.host=..,\
local.port=..,remote.type=inet,remote.host=..,remote.port=..
  stream-server:HOST:PORT    listen on TCP; one peer at a time, accepted again when it leaves
  stream-server:unix:PATH    the same on a UNIX socket at PATH (a stale socket there is replaced)
  stream-client:HOST:PORT    connect over TCP, reconnecting whenever the peer goes away
  stream-client:unix:PATH    the same to a UNIX socket
Streams use QEMU's -netdev stream framing (each frame preceded by its length, 4 bytes big-endian): pair \
stream-server with QEMU's server=off (add reconnect-ms=1000) and stream-client with server=on.
Frames from the wire shorter than 14 or longer than 16384 bytes are dropped.";
}

/// Why a `--netdev` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseBackendError(String);

impl fmt::Display for ParseBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseBackendError {}

fn err(msg: impl Into<String>) -> ParseBackendError {
    ParseBackendError(msg.into())
}

const KINDS: &str = "none, loopback, tap:IFNAME, dgram:LOCAL,REMOTE, stream-server:ADDR or stream-client:ADDR";

/// `HOST:PORT`: a literal socket address (`127.0.0.1:5555`, `[::1]:5555`) or a name resolved now (first address).
fn parse_inet(what: &str, s: &str) -> Result<SocketAddr, ParseBackendError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = || err(format!("{what} '{s}' is not HOST:PORT (e.g. 127.0.0.1:5555 or [::1]:5555)"));
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| err(format!("{what} '{s}': the name has no address"))),
        Err(e) => Err(err(format!("{what} '{s}': cannot resolve '{host}': {e}"))),
    }
}

fn parse_stream(kind: &str, rest: &str) -> Result<StreamAddr, ParseBackendError> {
    if let Some(path) = rest.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(err(format!("{kind}:unix: needs a socket path, e.g. {kind}:unix:/tmp/vf-net.sock")));
        }
        return Ok(StreamAddr::Unix(PathBuf::from(path)));
    }
    if rest.is_empty() {
        return Err(err(format!("{kind}: needs HOST:PORT or unix:PATH, e.g. {kind}:127.0.0.1:5555")));
    }
    Ok(StreamAddr::Inet(parse_inet("address", rest)?))
}

fn parse_ifname(name: &str) -> Result<String, ParseBackendError> {
    if name.is_empty() {
        return Err(err("tap: needs an interface name, e.g. tap:vfutap0"));
    }
    if name.len() > 15 {
        return Err(err(format!("tap interface name '{name}' is longer than 15 bytes")));
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(err(format!("'{name}' is not a valid interface name (no '/', ':' or spaces)")));
    }
    Ok(name.to_owned())
}

impl FromStr for BackendSpec {
    type Err = ParseBackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        match (kind, rest) {
            ("none", None) => Ok(BackendSpec::None),
            ("loopback", None) => Ok(BackendSpec::Loopback),
            ("none" | "loopback", Some(_)) => Err(err(format!("'{kind}' takes no argument"))),
            ("tap", Some(name)) => Ok(BackendSpec::Tap { ifname: parse_ifname(name)? }),
            ("dgram", Some(r)) => {
                let (local, remote) = r.split_once(',').ok_or_else(|| {
                    err(format!("dgram:{r}: expected LOCAL,REMOTE, e.g. dgram:127.0.0.1:5555,127.0.0.1:5556"))
                })?;
                Ok(BackendSpec::Dgram {
                    local: parse_inet("local address", local)?,
                    remote: parse_inet("remote address", remote)?,
                })
            }
            ("stream-server", Some(r)) => Ok(BackendSpec::StreamServer(parse_stream(kind, r)?)),
            ("stream-client", Some(r)) => {
                let a = parse_stream(kind, r)?;
                if let StreamAddr::Inet(sa) = &a {
                    if sa.port() == 0 || sa.ip().is_unspecified() {
                        return Err(err(format!("stream-client:{r}: cannot connect to {sa}")));
                    }
                }
                Ok(BackendSpec::StreamClient(a))
            }
            ("tap" | "dgram" | "stream-server" | "stream-client", None) => {
                Err(err(format!("'{kind}' needs an argument after '{kind}:'")))
            }
            _ => Err(err(format!("unknown backend '{s}': expected {KINDS}"))),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::None => f.write_str("none"),
            BackendSpec::Loopback => f.write_str("loopback"),
            BackendSpec::Tap { ifname } => write!(f, "tap:{ifname}"),
            BackendSpec::Dgram { local, remote } => write!(f, "dgram:{local},{remote}"),
            BackendSpec::StreamServer(a) => write!(f, "stream-server:{a}"),
            BackendSpec::StreamClient(a) => write!(f, "stream-client:{a}"),
        }
    }
}

/// Logs at most once per interval, counting what it held back.
pub(crate) struct RateLimited {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub(crate) fn new(interval: Duration) -> Self {
        RateLimited { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were suppressed since the last one.
    pub(crate) fn hit(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                st.1 += 1;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }
}

/// " (N more suppressed)" or nothing.
pub(crate) fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last report)")
    }
}

const LOG_EVERY: Duration = Duration::from_secs(5);

/// Where [`Ingress`] hands a frame: false once nobody wants frames any more.
type Deliver = dyn Fn(&[u8]) -> bool + Send + Sync;

/// The receive path shared by a backend's reader threads: size checks, capture, delivery to the device.
pub(crate) struct Ingress {
    name: String,
    deliver: Box<Deliver>,
    pcap: Option<Arc<PcapWriter>>,
    bad_size: RateLimited,
}

impl Ingress {
    /// Takes a frame from the wire; false once the device is gone (readers then stop).
    pub(crate) fn receive(&self, frame: &[u8]) -> bool {
        if !self.check_len(frame.len()) {
            return true;
        }
        if let Some(p) = &self.pcap {
            p.record(frame);
        }
        (self.deliver)(frame)
    }

    /// Whether a frame of `len` bytes may enter; logs (rate-limited) when not.
    pub(crate) fn check_len(&self, len: usize) -> bool {
        if (MIN_FRAME..=MAX_FRAME).contains(&len) {
            return true;
        }
        if let Some(n) = self.bad_size.hit() {
            let why = if len < MIN_FRAME { "shorter than 14" } else { "longer than 16384" };
            log::warn!("{}: dropped a {len}-byte frame from the wire ({why} bytes){}", self.name, suppressed(n));
        }
        false
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// What each backend kind implements.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Sends one frame the guest transmitted. Must not block for long: drop rather than wait.
    fn send(&self, frame: &[u8]);
    /// Spawns the reader thread(s); they return once `stop` is set (and [`Transport::wake`] was called).
    fn spawn(self: Arc<Self>, ingress: Arc<Ingress>, stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>>;
    /// Unblocks readers after `stop` was set (shuts sockets down). Readers also poll `stop` every
    /// [`POLL_INTERVAL`].
    fn wake(&self) {}
    /// The bound address, for backends that bind one.
    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }
}

/// Nothing to send to, nothing to receive.
struct Null;

impl Transport for Null {
    fn send(&self, _frame: &[u8]) {}
    fn spawn(self: Arc<Self>, _: Arc<Ingress>, _: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
        Ok(Vec::new())
    }
}

/// The [`FrameSink`] handed to the device: captures, then sends; drops everything once the backend is gone.
struct TxSink {
    transport: Weak<dyn Transport>,
    pcap: Option<Arc<PcapWriter>>,
    stop: Arc<AtomicBool>,
}

impl FrameSink for TxSink {
    fn transmit(&self, frame: &[u8]) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some(p) = &self.pcap {
            p.record(frame);
        }
        if let Some(t) = self.transport.upgrade() {
            t.send(frame);
        }
    }
}

/// An open packet backend. Dropping it stops its threads and closes its socket or tap device.
pub struct Backend {
    name: String,
    transport: Arc<dyn Transport>,
    pcap: Option<Arc<PcapWriter>>,
    stop: Arc<AtomicBool>,
    sink: Arc<TxSink>,
    threads: Vec<JoinHandle<()>>,
    started: bool,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).field("started", &self.started).finish_non_exhaustive()
    }
}

impl Backend {
    /// Opens the backend: creates or attaches the tap device, binds the sockets, creates the pcap file (its
    /// global header is written at once). A stream client connects only once [`Backend::start`] runs.
    pub fn open(spec: &BackendSpec, pcap: Option<&Path>) -> io::Result<Backend> {
        let name = spec.to_string();
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("--netdev {name}: {e}"));
        let transport: Arc<dyn Transport> = match spec {
            BackendSpec::None => Arc::new(Null),
            BackendSpec::Loopback => Arc::new(loopback::Loopback::default()),
            BackendSpec::Tap { ifname } => Arc::new(tap::Tap::open(ifname).map_err(ctx)?),
            BackendSpec::Dgram { local, remote } => Arc::new(dgram::Dgram::open(*local, *remote).map_err(ctx)?),
            BackendSpec::StreamServer(a) => Arc::new(stream::Stream::server(a, &name).map_err(ctx)?),
            BackendSpec::StreamClient(a) => Arc::new(stream::Stream::client(a, &name)),
        };
        let pcap = match pcap {
            Some(p) => Some(Arc::new(
                PcapWriter::create(p).map_err(|e| io::Error::new(e.kind(), format!("--pcap {}: {e}", p.display())))?,
            )),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sink = Arc::new(TxSink { transport: Arc::downgrade(&transport), pcap: pcap.clone(), stop: stop.clone() });
        log::info!("packet backend {name}{}", pcap.as_ref().map(|p| format!(", capturing to {p}")).unwrap_or_default());
        Ok(Backend { name, transport, pcap, stop, sink, threads: Vec::new(), started: false })
    }

    /// Where the device sends transmitted frames (`I40eVf::set_sink`).
    pub fn sink(&self) -> Arc<dyn FrameSink> {
        self.sink.clone()
    }

    /// Starts receiving: frames from the wire go to `rx`. Once only.
    pub fn start(&mut self, rx: RxPort) -> io::Result<()> {
        self.start_with(move |frame| rx.receive(frame))
    }

    /// Like [`Backend::start`], with any receiver of frames (tests, tools): `deliver` returns false when nobody
    /// wants frames any more, which stops the readers.
    pub fn start_with<F>(&mut self, deliver: F) -> io::Result<()>
    where
        F: Fn(&[u8]) -> bool + Send + Sync + 'static,
    {
        if self.started {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: already started", self.name)));
        }
        let ingress = Arc::new(Ingress {
            name: self.name.clone(),
            deliver: Box::new(deliver),
            pcap: self.pcap.clone(),
            bad_size: RateLimited::new(LOG_EVERY),
        });
        self.threads = self.transport.clone().spawn(ingress, self.stop.clone())?;
        self.started = true;
        Ok(())
    }

    /// The bound local address of a `dgram` or TCP `stream-server` backend (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.transport.local_addr()
    }

    /// The spec this backend was opened from, as text.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.transport.wake();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("{}: a backend thread panicked", self.name);
            }
        }
        if let Some(p) = &self.pcap {
            p.close();
        }
        log::debug!("packet backend {} closed", self.name);
    }
}

/// Sleeps up to `d`, waking early when `stop` is set; true if it was.
pub(crate) fn sleep_unless_stopped(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Whether an I/O error just means "nothing yet" (a read timeout or an interrupted call).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

pub(crate) fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<BackendSpec, String> {
        s.parse::<BackendSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(p("none"), Ok(BackendSpec::None));
        assert_eq!(p("loopback"), Ok(BackendSpec::Loopback));
        assert_eq!(p("tap:vfutap0"), Ok(BackendSpec::Tap { ifname: "vfutap0".into() }));
        assert_eq!(
            p("dgram:127.0.0.1:5555,[::1]:5556"),
            Ok(BackendSpec::Dgram { local: "127.0.0.1:5555".parse().unwrap(), remote: "[::1]:5556".parse().unwrap() })
        );
        assert_eq!(
            p("stream-server:0.0.0.0:5555"),
            Ok(BackendSpec::StreamServer(StreamAddr::Inet("0.0.0.0:5555".parse().unwrap())))
        );
        assert_eq!(
            p("stream-client:unix:/tmp/a:b"),
            Ok(BackendSpec::StreamClient(StreamAddr::Unix("/tmp/a:b".into())))
        );
        assert!(
            matches!(p("stream-client:localhost:80"), Ok(BackendSpec::StreamClient(StreamAddr::Inet(a))) if a.port() == 80)
        );
        assert_eq!(BackendSpec::default(), BackendSpec::None);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "none",
            "loopback",
            "tap:t0",
            "dgram:127.0.0.1:1,[::1]:2",
            "stream-server:unix:/x/y",
            "stream-client:127.0.0.1:9",
        ] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_with_clear_messages() {
        let e = p("bogus").unwrap_err();
        assert!(e.contains("unknown backend 'bogus'") && e.contains("tap:IFNAME"), "{e}");
        assert!(p("tap").unwrap_err().contains("needs an argument"));
        assert!(p("tap:").unwrap_err().contains("needs an interface name"));
        assert!(p("tap:a-very-long-interface").unwrap_err().contains("longer than 15"));
        assert!(p("tap:a/b").unwrap_err().contains("not a valid interface name"));
        assert!(p("loopback:x").unwrap_err().contains("takes no argument"));
        assert!(p("dgram:127.0.0.1:5555").unwrap_err().contains("expected LOCAL,REMOTE"));
        assert!(p("dgram:127.0.0.1:5555,127.0.0.1")
            .unwrap_err()
            .contains("remote address '127.0.0.1' is not HOST:PORT"));
        assert!(p("dgram:127.0.0.1:99999,127.0.0.1:1").unwrap_err().contains("local address"));
        assert!(p("stream-server:").unwrap_err().contains("needs HOST:PORT or unix:PATH"));
        assert!(p("stream-server:unix:").unwrap_err().contains("needs a socket path"));
        assert!(p("stream-client:127.0.0.1:0").unwrap_err().contains("cannot connect"));
    }

    #[test]
    fn rate_limit_counts_what_it_holds_back() {
        let r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.hit(), Some(0));
        assert_eq!(r.hit(), None);
        assert_eq!(r.hit(), None);
        let r2 = RateLimited { interval: Duration::ZERO, state: Mutex::new((None, 0)) };
        assert_eq!(r2.hit(), Some(0));
        assert_eq!(suppressed(2), " (2 more since the last report)");
    }
}
