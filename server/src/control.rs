//! `--control PATH`: a UNIX socket speaking JSON lines in the style of QMP (docs/faults.md). A greeting on connect,
//! then one command per line (`{"execute": NAME, "arguments": {...}, "id": ANY}`), each answered by one line
//! (`{"return": {...}}` or `{"error": {"class", "desc"}}`, with the request's id), and asynchronous events pushed to
//! every client (`{"event", "data", "timestamp"}`).
//!
//! The socket runs on its own thread with its own poll loop, so a control client can never stall the protocol
//! thread: commands that touch the device or the session are sent to the protocol thread as [`Call`]s (it answers
//! them between client messages, never waiting), faults are changed directly in the shared [`Faults`]. Writes to
//! control clients are non-blocking with a per-client cap: a client that does not read is dropped, never waited for.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use device::event::{Event, Events};
use device::fault::{Fault, Faults, FAULTS};
use device::nic::regs::{AQ_ENABLE, VFGEN_RSTAT, VF_ARQLEN1, VF_ATQLEN1};
use device::{I40eVf, VfioDevice};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Poll, Token, Waker};
use serde_json::{json, Map, Value};

/// Control clients served at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 16;
/// The longest command line, newline excluded. A longer one is answered with an error and discarded up to the
/// next newline; the connection stays.
pub const MAX_LINE: usize = 64 * 1024;
/// Output queued for one client (replies and events it has not read) before it is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;
/// How long a command waits for the protocol thread.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands, for the greeting and query-commands.
pub const COMMANDS: &[&str] = &[
    "query-commands",
    "query-status",
    "query-stats",
    "query-faults",
    "set-fault",
    "clear-fault",
    "set-link",
    "pf-reset",
    "query-migration",
];

/// What the protocol thread is asked to do or report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Status,
    Stats,
    SetLink(bool),
    PfReset,
    Migration,
    /// Faults were set or cleared: the device applies those that act at once (link-down, link-flap, reset-stuck).
    FaultsChanged,
}

/// An error answer: a QMP-style class and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError {
    pub class: &'static str,
    pub desc: String,
}

impl CtlError {
    pub fn new(class: &'static str, desc: impl Into<String>) -> Self {
        CtlError { class, desc: desc.into() }
    }
    fn generic(desc: impl Into<String>) -> Self {
        CtlError::new("GenericError", desc)
    }
}

pub type CtlResult = Result<Value, CtlError>;

/// One request to the protocol thread and where its answer goes.
pub struct Call {
    pub op: Op,
    pub reply: Sender<CtlResult>,
}

/// The control thread's way to the protocol thread.
#[derive(Clone)]
pub struct ControlLink {
    pub(crate) tx: Sender<Call>,
    pub(crate) waker: Arc<Waker>,
}

impl ControlLink {
    /// Asks the protocol thread and waits (at most [`CALL_TIMEOUT`]) for its answer.
    pub fn call(&self, op: Op) -> CtlResult {
        let (tx, rx) = bounded(1);
        self.tx.send(Call { op, reply: tx }).map_err(|_| CtlError::generic("the server is shutting down"))?;
        let _ = self.waker.wake();
        rx.recv_timeout(CALL_TIMEOUT).map_err(|_| {
            CtlError::new("Timeout", format!("the protocol thread did not answer within {CALL_TIMEOUT:?}"))
        })?
    }
}

/// What the control socket needs from the device beyond [`VfioDevice`].
pub trait Controlled: VfioDevice {
    fn link_up(&self) -> bool;
    fn set_link(&self, up: bool);
    fn pf_reset(&self);
    /// Statistics as JSON: per queue and device-wide.
    fn stats_json(&self) -> Value;
    /// The VF as its driver sees it: reset state, admin queue.
    fn vf_json(&mut self) -> Value;
    fn faults_changed(&self);
}

impl Controlled for I40eVf {
    fn link_up(&self) -> bool {
        I40eVf::link_up(self)
    }

    fn set_link(&self, up: bool) {
        I40eVf::set_link(self, up)
    }

    fn pf_reset(&self) {
        I40eVf::pf_reset(self)
    }

    fn stats_json(&self) -> Value {
        let s = self.stats();
        let e = s.eth;
        let queues: Vec<Value> = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| json!({"queue": i, "rx_packets": q.rx_frames, "tx_packets": q.tx_frames}))
            .collect();
        json!({
            "queues": queues,
            "rx_bytes": e.rx_bytes,
            "rx_unicast": e.rx_unicast,
            "rx_multicast": e.rx_multicast,
            "rx_broadcast": e.rx_broadcast,
            "rx_discards": e.rx_discards,
            "rx_unknown_protocol": e.rx_unknown_protocol,
            "tx_bytes": e.tx_bytes,
            "tx_unicast": e.tx_unicast,
            "tx_multicast": e.tx_multicast,
            "tx_broadcast": e.tx_broadcast,
            "tx_discards": e.tx_discards,
            "tx_errors": e.tx_errors,
            "counters": {
                "rx_dropped_paused": s.counters.rx_dropped_paused,
                "mdd_events": s.counters.mdd_events,
                "arq_dropped": s.counters.arq_dropped,
                "held_writes_dropped": s.counters.held_writes_dropped,
            },
            "trapped_doorbells": s.trapped_doorbells,
        })
    }

    fn vf_json(&mut self) -> Value {
        // BAR0 registers read as the driver would (none of these has a read side effect).
        let mut reg = |off: u64| {
            let mut b = [0u8; 4];
            self.region_read(0, off, &mut b).map(|()| u32::from_le_bytes(b)).unwrap_or(0)
        };
        let rstat = reg(VFGEN_RSTAT) & 3;
        let (atq, arq) = (reg(VF_ATQLEN1), reg(VF_ARQLEN1));
        json!({
            "reset": match rstat {
                0 => "INPROGRESS",
                1 => "COMPLETED",
                2 => "VFACTIVE",
                _ => "UNKNOWN",
            },
            "active": rstat == 2,
            "admin_queue": atq & AQ_ENABLE != 0 && arq & AQ_ENABLE != 0,
        })
    }

    fn faults_changed(&self) {
        I40eVf::faults_changed(self)
    }
}

/// What the control thread works with.
pub struct ControlCtx {
    pub faults: Arc<Faults>,
    pub events: Arc<Events>,
    pub link: ControlLink,
}

const LISTENER: Token = Token(0);
const EVENTS: Token = Token(1);
const FIRST_CLIENT: usize = 2;

struct Client {
    stream: UnixStream,
    /// Bytes of the line being received (at most [`MAX_LINE`] + one read).
    inbuf: Vec<u8>,
    /// An oversized line is being skipped up to its newline.
    discarding: bool,
    out: Vec<u8>,
    writable: bool,
    id: u64,
}

impl Client {
    fn queue(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).expect("a JSON value serializes");
        line.push(b'\n');
        self.out.extend_from_slice(&line);
    }

    /// Writes what the socket takes. Err: the client is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Starts the control socket's thread.
pub fn spawn(listener: UnixListener, ctx: ControlCtx) -> io::Result<JoinHandle<()>> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), EVENTS)?);
    let (ev_tx, ev_rx) = unbounded();
    let sub = ctx.events.subscribe();
    let w = waker.clone();
    std::thread::Builder::new().name("control-events".into()).spawn(move || {
        // Ends when the control thread is gone (or the device's event bus is dropped at exit).
        while let Ok(e) = sub.recv() {
            if ev_tx.send((SystemTime::now(), e)).is_err() {
                break;
            }
            let _ = w.wake();
        }
    })?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        let mut ctl =
            Control { poll, listener, clients: Vec::new(), ctx, events: ev_rx, accepted: 0, more: Vec::new() };
        if let Err(e) = ctl.run() {
            log::error!("control socket: {e}; it is closed, the server goes on");
        }
    })
}

struct Control {
    poll: Poll,
    listener: UnixListener,
    clients: Vec<Option<Client>>,
    ctx: ControlCtx,
    events: Receiver<(SystemTime, Event)>,
    accepted: u64,
    /// Clients whose socket may hold more input: read in turns, so one that floods cannot starve the others.
    more: Vec<usize>,
}

/// Reads of one client per turn.
const READS_PER_TURN: usize = 4;

impl Control {
    fn run(&mut self) -> io::Result<()> {
        self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE)?;
        let mut events = mio::Events::with_capacity(64);
        loop {
            let timeout = if self.more.is_empty() { None } else { Some(Duration::ZERO) };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    EVENTS => self.broadcast(),
                    Token(t) => {
                        let i = t - FIRST_CLIENT;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(i);
                        }
                        if ev.is_writable() {
                            self.flush(i);
                        }
                    }
                }
            }
            for i in std::mem::take(&mut self.more) {
                self.read(i);
            }
        }
    }

    fn count(&self) -> usize {
        self.clients.iter().filter(|c| c.is_some()).count()
    }

    fn accept(&mut self) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            self.accepted += 1;
            if self.count() >= MAX_CLIENTS {
                log::warn!("control socket: a client refused: {MAX_CLIENTS} are connected already");
                let e = error_obj(
                    &CtlError::new("TooManyClients", format!("at most {MAX_CLIENTS} control clients at once")),
                    None,
                );
                let mut line = serde_json::to_vec(&e).expect("serializes");
                line.push(b'\n');
                let _ = stream.write(&line); // best effort, never waits
                continue;
            }
            let i = match self.clients.iter().position(|c| c.is_none()) {
                Some(i) => i,
                None => {
                    self.clients.push(None);
                    self.clients.len() - 1
                }
            };
            if let Err(e) = self.poll.registry().register(&mut stream, Token(FIRST_CLIENT + i), Interest::READABLE) {
                log::warn!("control socket: cannot poll a new client: {e}");
                continue;
            }
            let mut c = Client {
                stream,
                inbuf: Vec::new(),
                discarding: false,
                out: Vec::new(),
                writable: false,
                id: self.accepted,
            };
            log::info!("control client {} connected", c.id);
            c.queue(&self.greeting());
            self.clients[i] = Some(c);
            // It may have sent commands with its connect: edge-triggered polling would not say so again.
            self.read(i);
        }
    }

    fn greeting(&self) -> Value {
        json!({"greeting": {
            "version": {"package": "vfu-i40evf", "version": env!("CARGO_PKG_VERSION")},
            "capabilities": ["events", "faults", "migration"],
            "commands": COMMANDS,
            "faults": FAULTS.iter().map(|(n, _, _)| *n).collect::<Vec<_>>(),
        }})
    }

    fn drop_client(&mut self, i: usize, why: &str) {
        if let Some(mut c) = self.clients.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            log::info!("control client {} disconnected ({why})", c.id);
        }
    }

    fn read(&mut self, i: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        for turn in 0.. {
            if turn == READS_PER_TURN {
                if !self.more.contains(&i) {
                    self.more.push(i);
                }
                break;
            }
            let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else { return };
            let n = match c.stream.read(&mut buf) {
                Ok(0) => return self.drop_client(i, "connection closed"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_client(i, &format!("read error: {e}")),
            };
            let lines = split_lines(c, &buf[..n]);
            for l in lines {
                let answer = match l {
                    Line::Oversize => error_obj(
                        &CtlError::generic(format!("line longer than {MAX_LINE} bytes: discarded up to its newline")),
                        None,
                    ),
                    Line::Text(t) => match self.execute(&t) {
                        Some(v) => v,
                        None => continue,
                    },
                };
                if let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) {
                    c.queue(&answer);
                }
            }
            if !self.flush(i) {
                return;
            }
        }
        self.flush(i);
    }

    /// Writes what client `i` has queued; drops it if it is gone or has too much unread. False when dropped.
    fn flush(&mut self, i: usize) -> bool {
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else { return false };
        if let Err(e) = c.flush() {
            self.drop_client(i, &format!("write error: {e}"));
            return false;
        }
        if c.out.len() > MAX_OUTPUT {
            log::warn!("control client {} does not read: {} bytes unread, dropped", c.id, c.out.len());
            self.drop_client(i, "not reading");
            return false;
        }
        let want = !c.out.is_empty();
        if want != c.writable {
            c.writable = want;
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.poll.registry().reregister(&mut c.stream, Token(FIRST_CLIENT + i), interest) {
                self.drop_client(i, &format!("poll registration: {e}"));
                return false;
            }
        }
        true
    }

    fn broadcast(&mut self) {
        while let Ok((t, e)) = self.events.try_recv() {
            let mut v = serde_json::to_value(&e).expect("events serialize");
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            v["timestamp"] = json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()});
            for c in self.clients.iter_mut().flatten() {
                c.queue(&v);
            }
        }
        for i in 0..self.clients.len() {
            self.flush(i);
        }
    }

    /// One command line; None for a blank line.
    fn execute(&self, line: &[u8]) -> Option<Value> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return Some(error_obj(&CtlError::generic(format!("JSON parse error: {e}")), None)),
        };
        let Value::Object(req) = req else {
            return Some(error_obj(&CtlError::generic("expected a JSON object"), None));
        };
        let id = req.get("id").cloned();
        Some(match self.command(&req) {
            Ok(v) => {
                let mut o = json!({"return": v});
                if let Some(id) = id {
                    o["id"] = id;
                }
                o
            }
            Err(e) => error_obj(&e, id),
        })
    }

    fn command(&self, req: &Map<String, Value>) -> CtlResult {
        for k in req.keys() {
            if !matches!(k.as_str(), "execute" | "arguments" | "id") {
                return Err(CtlError::generic(format!("request member '{k}' is unexpected")));
            }
        }
        let Some(name) = req.get("execute") else {
            return Err(CtlError::generic("'execute' is missing"));
        };
        let Some(name) = name.as_str() else {
            return Err(CtlError::generic("'execute' must be a string"));
        };
        let empty = Map::new();
        let args = match req.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return Err(CtlError::generic("'arguments' must be an object")),
        };
        let allow = |keys: &[&str]| -> Result<(), CtlError> {
            match args.keys().find(|k| !keys.contains(&k.as_str())) {
                Some(k) => Err(CtlError::generic(format!("{name}: parameter '{k}' is unexpected"))),
                None => Ok(()),
            }
        };
        let link = &self.ctx.link;
        match name {
            "query-commands" => {
                allow(&[])?;
                Ok(json!(COMMANDS.iter().map(|c| json!({"name": c})).collect::<Vec<_>>()))
            }
            "query-status" => {
                allow(&[])?;
                link.call(Op::Status)
            }
            "query-stats" => {
                allow(&[])?;
                link.call(Op::Stats)
            }
            "query-migration" => {
                allow(&[])?;
                link.call(Op::Migration)
            }
            "query-faults" => {
                allow(&[])?;
                Ok(self.faults_json())
            }
            "set-fault" => {
                allow(&["fault"])?;
                let spec = match args.get("fault") {
                    Some(Value::String(s)) => s,
                    Some(_) => return Err(CtlError::generic("set-fault: 'fault' must be a string")),
                    None => return Err(CtlError::generic("set-fault: parameter 'fault' is missing")),
                };
                let f = Fault::parse(spec).map_err(|e| CtlError::new("InvalidParameter", e))?;
                self.ctx.faults.set(f);
                link.call(Op::FaultsChanged)?;
                Ok(json!({"fault": f.to_string()}))
            }
            "clear-fault" => {
                allow(&["name", "all"])?;
                let cleared: Vec<String> = match (args.get("name"), args.get("all")) {
                    (Some(_), Some(_)) => return Err(CtlError::generic("clear-fault: give 'name' or 'all', not both")),
                    (None, Some(Value::Bool(true))) => {
                        let set: Vec<String> = self.ctx.faults.list().iter().map(|f| f.name().to_string()).collect();
                        self.ctx.faults.clear_all();
                        set
                    }
                    (None, Some(_)) => return Err(CtlError::generic("clear-fault: 'all' must be true")),
                    (Some(Value::String(n)), None) => {
                        let n = n.split('=').next().unwrap_or_default().trim();
                        if !FAULTS.iter().any(|(f, _, _)| *f == n) {
                            let valid: Vec<&str> = FAULTS.iter().map(|(f, _, _)| *f).collect();
                            return Err(CtlError::new(
                                "InvalidParameter",
                                format!("unknown fault '{n}'; valid: {}", valid.join(", ")),
                            ));
                        }
                        if self.ctx.faults.clear(n) {
                            vec![n.to_string()]
                        } else {
                            vec![]
                        }
                    }
                    (Some(_), None) => return Err(CtlError::generic("clear-fault: 'name' must be a string")),
                    (None, None) => return Err(CtlError::generic("clear-fault: parameter 'name' or 'all' is missing")),
                };
                link.call(Op::FaultsChanged)?;
                Ok(json!({"cleared": cleared}))
            }
            "set-link" => {
                allow(&["up"])?;
                match args.get("up") {
                    Some(Value::Bool(true)) if self.ctx.faults.is_set("link-down") => Err(CtlError::new(
                        "FaultActive",
                        "set-link: the link-down fault holds the link down; clear-fault link-down first",
                    )),
                    Some(Value::Bool(up)) => link.call(Op::SetLink(*up)),
                    Some(_) => Err(CtlError::generic("set-link: 'up' must be a boolean")),
                    None => Err(CtlError::generic("set-link: parameter 'up' is missing")),
                }
            }
            "pf-reset" => {
                allow(&[])?;
                link.call(Op::PfReset)
            }
            _ => Err(CtlError::new("CommandNotFound", format!("the command {name} has not been found"))),
        }
    }

    fn faults_json(&self) -> Value {
        let f = &self.ctx.faults;
        let fired: Map<String, Value> = f.fired().into_iter().map(|(n, c)| (n.to_string(), json!(c))).collect();
        let set: Vec<Value> = f
            .list()
            .iter()
            .map(|x| {
                json!({
                    "name": x.name(),
                    "arg": x.arg(),
                    "spec": x.to_string(),
                    "fired": fired.get(x.name()).cloned().unwrap_or(json!(0)),
                })
            })
            .collect();
        json!({"seed": f.seed(), "faults": set, "fired": fired})
    }
}

/// `{"error": {...}, "id": ...}`.
pub fn error_obj(e: &CtlError, id: Option<Value>) -> Value {
    let mut o = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        o["id"] = id;
    }
    o
}

enum Line {
    Text(Vec<u8>),
    Oversize,
}

/// Splits what arrived into complete lines, enforcing [`MAX_LINE`]: an oversized line is reported once and skipped
/// up to its newline.
fn split_lines(c: &mut Client, mut data: &[u8]) -> Vec<Line> {
    let mut out = Vec::new();
    loop {
        if c.discarding {
            match data.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    c.discarding = false;
                    data = &data[p + 1..];
                }
                None => return out,
            }
        }
        match data.iter().position(|&b| b == b'\n') {
            Some(p) => {
                if c.inbuf.len() + p > MAX_LINE {
                    out.push(Line::Oversize);
                    c.inbuf.clear();
                } else {
                    c.inbuf.extend_from_slice(&data[..p]);
                    let mut line = std::mem::take(&mut c.inbuf);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(Line::Text(line));
                }
                data = &data[p + 1..];
            }
            None => {
                if c.inbuf.len() + data.len() > MAX_LINE {
                    out.push(Line::Oversize);
                    c.inbuf.clear();
                    c.discarding = true;
                } else {
                    c.inbuf.extend_from_slice(data);
                }
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let (a, _b) = UnixStream::pair().unwrap();
        Client { stream: a, inbuf: Vec::new(), discarding: false, out: Vec::new(), writable: false, id: 1 }
    }

    fn texts(v: Vec<Line>) -> Vec<Option<String>> {
        v.into_iter()
            .map(|l| match l {
                Line::Text(t) => Some(String::from_utf8(t).unwrap()),
                Line::Oversize => None,
            })
            .collect()
    }

    #[test]
    fn lines_split_across_reads_and_oversize_lines_resync_at_the_newline() {
        let mut c = client();
        assert_eq!(texts(split_lines(&mut c, b"{\"a\":1}\r\n{\"b\"")), vec![Some("{\"a\":1}".into())]);
        assert_eq!(texts(split_lines(&mut c, b":2}\n")), vec![Some("{\"b\":2}".into())]);
        let big = vec![b'x'; MAX_LINE + 10];
        assert_eq!(texts(split_lines(&mut c, &big)), vec![None], "reported once, as soon as it is too long");
        assert!(texts(split_lines(&mut c, &big)).is_empty(), "the rest of that line is skipped silently");
        assert_eq!(texts(split_lines(&mut c, b"yyy\nok\n")), vec![Some("ok".into())]);
        // A long line that arrives with its newline in one read.
        let mut long = vec![b'z'; MAX_LINE + 1];
        long.extend_from_slice(b"\nnext\n");
        assert_eq!(texts(split_lines(&mut c, &long)), vec![None, Some("next".into())]);
        // Exactly the limit is fine.
        let mut max = vec![b' '; MAX_LINE];
        max.push(b'\n');
        assert_eq!(texts(split_lines(&mut c, &max)).len(), 1);
        assert!(matches!(split_lines(&mut c, &max).pop(), Some(Line::Text(_))));
    }
}
