//! A small QMP client (QEMU Machine Protocol over a UNIX socket): commands with replies, and every event kept with
//! the host time it arrived. No Python needed on the machine that runs it.
//!
//! One reader thread per connection splits what QEMU sends into replies (matched by the `id` we put in each
//! command) and events (appended to a shared list, timestamped on arrival, so a caller that is busy elsewhere still
//! learns when `UNPLUG_PRIMARY` or `DEVICE_DELETED` happened).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// An event as QEMU sent it, with the host time it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub name: String,
    pub data: Value,
}

/// A QMP connection that has left capabilities negotiation (`qmp_capabilities` done).
pub struct Qmp {
    stream: UnixStream,
    replies: Receiver<Value>,
    pending: HashMap<u64, Value>,
    events: Arc<Mutex<Vec<Event>>>,
    next_id: u64,
    /// QEMU's version as the greeting gave it: "major.minor.micro" plus the package string.
    pub version: String,
}

/// How long a command may take before we give up on its reply.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects to `path`, retrying until `within` has passed (QEMU creates the socket a moment after it starts),
    /// reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, within: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e} (waited {within:?})", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let reader = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let (tx, replies) = mpsc::channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let (gtx, grx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                let mut greeting = Some(gtx);
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                    if v.get("QMP").is_some() {
                        if let Some(g) = greeting.take() {
                            let _ = g.send(v);
                        }
                    } else if let Some(name) = v.get("event").and_then(Value::as_str) {
                        let e = Event {
                            at: Instant::now(),
                            name: name.to_string(),
                            data: v.get("data").cloned().unwrap_or(Value::Null),
                        };
                        ev.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    } else if tx.send(v).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("spawning the QMP reader: {e}"))?;
        let greeting = grx.recv_timeout(COMMAND_TIMEOUT).map_err(|_| "no QMP greeting".to_string())?;
        let q = &greeting["QMP"]["version"];
        let version = format!(
            "{}.{}.{}{}",
            q["qemu"]["major"],
            q["qemu"]["minor"],
            q["qemu"]["micro"],
            q["package"].as_str().map(|p| format!(" ({})", p.trim())).unwrap_or_default()
        );
        let mut qmp = Qmp { stream, replies, pending: HashMap::new(), events, next_id: 1, version };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (an object, or null for none) and returns its `return` value; a QMP error
    /// becomes `Err("<class>: <desc>")`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.execute_timeout(command, arguments, COMMAND_TIMEOUT)
    }

    pub fn execute_timeout(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() && arguments.as_object().is_none_or(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).map_err(|e| format!("QMP {command}: {e}"))?;
        let deadline = Instant::now() + timeout;
        let reply = loop {
            if let Some(r) = self.pending.remove(&id) {
                break r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(r) => {
                    let rid = r.get("id").and_then(Value::as_u64).unwrap_or(0);
                    self.pending.insert(rid, r);
                }
                Err(RecvTimeoutError::Timeout) => return Err(format!("QMP {command}: no reply in {timeout:?}")),
                Err(RecvTimeoutError::Disconnected) => return Err(format!("QMP {command}: QEMU closed the monitor")),
            }
        };
        if let Some(e) = reply.get("error") {
            return Err(format!(
                "{}: {}",
                e["class"].as_str().unwrap_or("Error"),
                e["desc"].as_str().unwrap_or("(no description)")
            ));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Every event received so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first event named `name` (and, if `device` is given, whose data names that device in `device` or
    /// `device-id`) that arrived at or after `since`.
    pub fn find_event(&self, name: &str, device: Option<&str>, since: Instant) -> Option<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| {
                e.at >= since
                    && e.name == name
                    && device.is_none_or(|d| {
                        e.data.get("device").and_then(Value::as_str) == Some(d)
                            || e.data.get("device-id").and_then(Value::as_str) == Some(d)
                    })
            })
            .cloned()
    }

    /// Waits until [`Qmp::find_event`] finds the event, `timeout` passes (None), or `stop()` says to give up.
    pub fn wait_event(
        &self,
        name: &str,
        device: Option<&str>,
        since: Instant,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find_event(name, device, since) {
                return Some(e);
            }
            if Instant::now() > deadline || stop() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `query-migrate`'s answer.
    pub fn query_migrate(&mut self) -> Result<Value, String> {
        self.execute("query-migrate", Value::Null)
    }

    /// `query-status`'s `status` (running, paused, inmigrate, postmigrate, ...).
    pub fn run_state(&mut self) -> Result<String, String> {
        let r = self.execute("query-status", Value::Null)?;
        Ok(r["status"].as_str().unwrap_or("?").to_string())
    }
}

/// A migration's status changes as seen by polling `query-migrate`, with host times.
#[derive(Debug, Clone)]
pub struct StatusChange {
    pub at: Instant,
    pub status: String,
}

/// Polls the source's `query-migrate` every `every` until the status is final (completed, failed, cancelled) or
/// `until` returns Some (the caller's own reason to stop, e.g. a deadline or an interruption). Calls `on_change`
/// at each new status (e.g. to cancel once the unplug happened). Returns the last answer.
pub fn poll_migration(
    src: &mut Qmp,
    every: Duration,
    changes: &mut Vec<StatusChange>,
    on_change: &mut dyn FnMut(&mut Qmp, &str) -> Result<(), String>,
    until: &dyn Fn() -> Option<String>,
) -> Result<Value, String> {
    loop {
        let r = src.query_migrate()?;
        let status = r["status"].as_str().unwrap_or("none").to_string();
        if changes.last().is_none_or(|c| c.status != status) {
            changes.push(StatusChange { at: Instant::now(), status: status.clone() });
            on_change(src, &status)?;
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return Ok(r);
        }
        if let Some(why) = until() {
            return Err(why);
        }
        std::thread::sleep(every);
    }
}
