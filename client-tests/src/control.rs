//! A client of the server's control socket (`--control PATH`, JSON lines in the style of QMP): commands, their
//! answers, and the events pushed in between. Tests use it; it follows docs/faults.md, not the server's code.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ServerProcess;

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh path for a control socket (short: UNIX socket paths are limited to 108 bytes).
pub fn control_path() -> PathBuf {
    PathBuf::from(format!("/tmp/vfu-ctl-{}-{}.sock", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Starts a server with `--control` (and `extra`); returns it with its control socket's path.
pub fn start_with_control(extra: &[&str]) -> (ServerProcess, PathBuf) {
    let path = control_path();
    let p = path.to_str().expect("a UTF-8 path").to_string();
    let mut args = vec!["--control", p.as_str()];
    args.extend_from_slice(extra);
    let s = ServerProcess::start_with(&args);
    // The readiness probe was a client: wait until the server has served and dropped it, so its power-on of the
    // device (a new client gets a freshly reset VF, link up) cannot land after what the test does next.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !s.log().contains("client 1 disconnected") {
        assert!(std::time::Instant::now() < deadline, "the readiness probe's session never ended:\n{}", s.log());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (s, path)
}

pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The greeting the server sent on connect.
    pub greeting: Value,
    /// Events that arrived while waiting for an answer.
    pub events: VecDeque<Value>,
    next_id: u64,
}

impl ControlClient {
    /// Connects and reads the greeting (within 5 s).
    pub fn connect(path: &Path) -> io::Result<ControlClient> {
        let s = UnixStream::connect(path)?;
        let writer = s.try_clone()?;
        let mut c = ControlClient {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 1,
        };
        c.greeting = c
            .read_line(Duration::from_secs(5))?
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no greeting within 5 s"))?;
        Ok(c)
    }

    /// Sends raw bytes (a line is whatever ends with a newline).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// The next line as JSON; None on timeout. An error at EOF.
    pub fn read_line(&mut self, timeout: Duration) -> io::Result<Option<Value>> {
        self.reader.get_ref().set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the control socket closed")),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not JSON: {e}: {line:?}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next answer (a line with "return" or "error"), keeping the events that come before it.
    pub fn answer(&mut self, timeout: Duration) -> io::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            match self.read_line(left)? {
                Some(v) if v.get("event").is_some() => self.events.push_back(v),
                Some(v) => return Ok(v),
                None => {}
            }
        }
    }

    /// Runs `cmd` with `args` (Value::Null: none) and an id; returns the whole answer object.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"execute": cmd, "id": id});
        if !args.is_null() {
            req["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        self.send_raw(&line).unwrap_or_else(|e| panic!("{cmd}: sending: {e}"));
        let a = self.answer(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert_eq!(a["id"], json!(id), "{cmd}: the answer carries the request's id: {a}");
        a
    }

    /// `execute`, which must succeed: its "return" value.
    #[track_caller]
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let a = self.execute(cmd, args);
        assert!(a.get("error").is_none(), "{cmd}: {a}");
        a["return"].clone()
    }

    /// `execute`, which must fail: its error's (class, desc).
    #[track_caller]
    pub fn err(&mut self, cmd: &str, args: Value) -> (String, String) {
        let a = self.execute(cmd, args);
        assert!(a.get("return").is_none(), "{cmd} should fail: {a}");
        (
            a["error"]["class"].as_str().unwrap_or_default().into(),
            a["error"]["desc"].as_str().unwrap_or_default().into(),
        )
    }

    /// Waits (at most `timeout`) for an event named `name` whose data satisfies `pred`; events before it that do not
    /// match are dropped.
    pub fn wait_event(&mut self, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["event"] == name && pred(&e["data"]) {
                    return Some(e);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read_line(left) {
                Ok(Some(v)) if v.get("event").is_some() => self.events.push_back(v),
                Ok(Some(v)) => panic!("an answer nobody asked for: {v}"),
                Ok(None) => {}
                Err(e) => panic!("waiting for {name}: {e}"),
            }
        }
    }

    /// Every event that arrives within `dur`.
    pub fn events_within(&mut self, dur: Duration) -> Vec<Value> {
        let deadline = Instant::now() + dur;
        let mut out: Vec<Value> = self.events.drain(..).collect();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            match self.read_line(left) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => {}
                Err(_) => return out,
            }
        }
    }
}
