//! The protocol thread: a mio loop over the listening socket, the one client connection, the wake-up channel
//! from device workers (outgoing DMA requests) and the signal pipe.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use device::event::Events as DeviceEvents;
use device::fault::Faults;
use device::mem::GuestMem;
use device::{Errno, VfioDevice};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::conn::{Conn, Event, Incoming, ReadStatus};
use crate::control::{self, Call, Controlled, CtlResult, Op};
use crate::dma::{DmaOp, DmaRequest, RemoteDma};
use crate::handlers::{mig_state_reply, Ctx, Negotiated, Step};
use crate::limits::Limits;
use crate::migration::Migration;
use crate::wire::*;

const LISTENER: Token = Token(0);
const CLIENT: Token = Token(1);
const WAKER: Token = Token(2);
const SIGNAL: Token = Token(3);
/// A client that stops reading our replies may not make us buffer without limit: past this much queued output we
/// stop reading its requests until the socket drains to half of it.
const MAX_QUEUED_OUTPUT: usize = 8 << 20;
/// Commands a client may pipeline behind a migration transition that waits for the device, in bytes.
const MAX_HELD_INPUT: usize = 8 << 20;
/// --poll-us: the longest stretch spent reading the client socket directly before the loop polls everything else
/// (waker, signals, listener) again.
const SPIN_SLICE: Duration = Duration::from_micros(10);

/// Where clients come from.
pub enum Endpoint {
    /// Accept clients one after the other.
    Listener(UnixListener),
    /// Serve this one connection, then stop.
    Connected(UnixStream),
}

struct PendingDma {
    cmd: u16,
    addr: u64,
    len: u64,
    reply: Sender<io::Result<Vec<u8>>>,
}

struct Session {
    id: u64,
    conn: Conn,
    interest: Interest,
    /// Reading is paused because too much output is queued.
    paused: bool,
    /// The client has sent its last byte (a half-close) while replies were queued: nothing more is read, and the
    /// session ends when they are written.
    closing: bool,
    negotiated: Option<Negotiated>,
    pending: HashMap<u16, PendingDma>,
    next_id: u16,
    /// When bytes last arrived: with `--idle-timeout`, a half message older than that closes the connection.
    last_input: Instant,
    /// A MIG_DEVICE_STATE SET waiting for the device to stop: its header and flags, for the reply.
    deferred: Option<(Header, u32)>,
    /// Commands that arrived meanwhile, handled in order once it completes (replies to our DMA requests are not
    /// held: the device may be waiting for one).
    held: std::collections::VecDeque<Incoming>,
    held_bytes: usize,
    /// REGION_WRITE messages to BAR0: posted (no_reply), and with a reply. A client that posts writes only while
    /// nothing is mmap-able (QEMU) shows here which way it went.
    bar0_writes: [u64; 2],
    /// slow-mmio: a BAR access waiting until its time; everything the client sends behind it waits in `held`.
    slow: Option<(Instant, Incoming)>,
    /// slow-mmio: `held` is full; no more is taken from the socket until it drains.
    stalled: bool,
    /// Messages handled (commands and replies to our DMA requests), for disconnect-after.
    messages: u64,
    /// disconnect-after fired: the session ends before anything else is handled.
    kill: Option<u64>,
}

type ControlFn<D> = fn(&mut Server<D>, &Op) -> CtlResult;

pub struct Server<D: VfioDevice> {
    mem: GuestMem,
    poll: Poll,
    waker: Arc<Waker>,
    dma_tx: Sender<DmaRequest>,
    dma_rx: Receiver<DmaRequest>,
    listener: Option<UnixListener>,
    session: Option<Session>,
    sessions: u64,
    signals: Option<UnixStream>,
    waiting_logged: bool,
    limits: Limits,
    mig: Migration,
    faults: Arc<Faults>,
    /// The control socket's requests (`--control`) and the device-specific part of answering them.
    ctl_rx: Option<Receiver<Call>>,
    ctl_fn: Option<ControlFn<D>>,
    /// `--poll-us`: after client input, how long to keep polling before sleeping in epoll.
    poll_window: Option<Duration>,
    /// The current polling window ends here (set by client input, cleared once it passes idle).
    poll_until: Option<Instant>,
    /// Last, so it is dropped after the session and the DMA channel: its workers may be waiting on them.
    device: D,
}

impl<D: VfioDevice> Server<D> {
    /// `mem` is the same `GuestMem` the device was built with.
    pub fn new(
        device: D,
        mem: GuestMem,
        endpoint: Endpoint,
        limits: Limits,
        migration_audit: bool,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        if let Some(m) = device.migration() {
            let w = waker.clone();
            m.set_pause_notifier(Arc::new(move || {
                let _ = w.wake();
            }));
        }
        let (dma_tx, dma_rx) = unbounded();
        let mut s = Server {
            mem,
            poll,
            waker,
            dma_tx,
            dma_rx,
            listener: None,
            session: None,
            sessions: 0,
            signals: None,
            waiting_logged: false,
            limits,
            mig: Migration::new(migration_audit),
            faults: Arc::default(),
            ctl_rx: None,
            ctl_fn: None,
            poll_window: None,
            poll_until: None,
            device,
        };
        match endpoint {
            Endpoint::Listener(mut l) => {
                s.poll.registry().register(&mut l, LISTENER, Interest::READABLE)?;
                s.listener = Some(l);
            }
            Endpoint::Connected(c) => s.start_session(c)?,
        }
        Ok(s)
    }

    /// Stops the loop when a byte arrives on `pipe` (the signal handler's self-pipe).
    pub fn stop_on(&mut self, mut pipe: UnixStream) -> io::Result<()> {
        self.poll.registry().register(&mut pipe, SIGNAL, Interest::READABLE)?;
        self.signals = Some(pipe);
        Ok(())
    }

    /// Adaptive busy polling (`--poll-us`): after the client sent something, the loop does not sleep for up to
    /// `window`: it alternates non-blocking reads of the client socket (yielding the CPU between them) with an
    /// epoll at a zero timeout at least every [`SPIN_SLICE`], so the waker (DMA requests, device transitions, the
    /// control socket), signals, the listener and slow-mmio deadlines are served as usual. Each message from the
    /// client starts the window again. Once a window passes without client input the loop sleeps in epoll as
    /// without polling, so an idle server uses no CPU. `ZERO`: off (the default).
    pub fn set_poll(&mut self, window: Duration) {
        self.poll_window = (!window.is_zero()).then_some(window);
        self.poll_until = None;
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The faults the server applies (slow-mmio, disconnect-after, mig-fail, mig-corrupt) and where it reports
    /// migration state changes: the same the device was built with.
    pub fn set_faults(&mut self, faults: Arc<Faults>, events: Arc<DeviceEvents>) {
        self.mig.set_hooks(faults.clone(), events);
        self.faults = faults;
    }

    /// A snapshot for the control socket: the client, the migration, the limits. Device parts are added by
    /// [`Controlled`].
    pub(crate) fn status_json(&self) -> serde_json::Value {
        let client = self.session.as_ref().map(|s| {
            serde_json::json!({
                "id": s.id,
                "negotiated": s.negotiated.is_some(),
                "messages": s.messages,
                "dma_regions": self.mem.len(),
                "pending_dma": s.pending.len(),
            })
        });
        serde_json::json!({
            "client_connected": self.session.is_some(),
            "client": client,
            "clients_served": self.sessions,
            "migration_state": self.mig.state().to_string(),
            "paused": self.device.migration().is_some_and(|m| m.is_paused()),
        })
    }

    pub(crate) fn migration_json(&self) -> serde_json::Value {
        let m = &self.mig;
        let st = m.stats;
        serde_json::json!({
            "state": m.state().to_string(),
            "transition_pending": m.waiting(),
            "audit_enabled": m.audit_enabled(),
            "logging_page_size": self.mem.logging(),
            "bytes_read": st.bytes_read,
            "bytes_written": st.bytes_written,
            "bytes_transferred": st.bytes_read + st.bytes_written,
            "dirty_reports": st.reports,
            "dirty_pages_reported": st.dirty_pages_reported,
            "corrupted_reads": st.corrupted_reads,
            "audit": m.last_audit.map(|a| serde_json::json!({
                "checked": a.checked,
                "mismatches": a.mismatches,
                "skipped": a.skipped,
                "mismatched_pages": m.last_audit_pages,
            })),
        })
    }

    /// Answers the control socket's requests (called on the protocol thread).
    fn serve_control(&mut self) {
        let Some(rx) = self.ctl_rx.clone() else { return };
        let Some(f) = self.ctl_fn else { return };
        while let Ok(call) = rx.try_recv() {
            let r = f(self, &call.op);
            let _ = call.reply.send(r);
        }
    }

    /// Runs until a signal arrives, or, for a connected endpoint, until the client leaves.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(16);
        loop {
            if self.listener.is_none() && self.session.is_none() {
                log::info!("the inherited connection closed: exiting");
                return Ok(());
            }
            let timeout = if self.polling() { Some(Duration::ZERO) } else { self.poll_timeout() };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.check_idle();
            if events.is_empty() && self.poll_until.is_some() {
                // --poll-us and nothing happened: try the socket itself for a few microseconds (a request that
                // arrives now is read at once, without another epoll_wait on its path), then go round again.
                self.spin_on_client();
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER if self.session.is_some() => self.note_waiting_client(),
                    LISTENER => {} // accepted below
                    // A hang-up that came with the last bytes raises no later edge: read until the end then.
                    CLIENT => {
                        self.service_client(ev.is_read_closed() || ev.is_error());
                        // --poll-us: the client is active, so its next message is likely close behind.
                        if let (Some(w), true) = (self.poll_window, self.session.is_some()) {
                            self.poll_until = Some(Instant::now() + w);
                        }
                    }
                    WAKER => {
                        self.send_dma_requests();
                        self.finish_transition();
                        self.serve_control();
                    }
                    SIGNAL => {
                        log::info!("signal received: shutting down");
                        self.close_session("server shutting down");
                        return Ok(());
                    }
                    _ => {}
                }
            }
            self.drain_held();
            self.flush();
            self.accept_waiting();
        }
    }

    /// Within a `--poll-us` window: poll without sleeping. A window that has passed is forgotten, so the loop
    /// sleeps until the client (or anything else) wakes it.
    fn polling(&mut self) -> bool {
        let Some(until) = self.poll_until else { return false };
        if self.session.is_some() && Instant::now() < until {
            return true;
        }
        self.poll_until = None;
        false
    }

    /// Non-blocking reads of the client socket for up to [`SPIN_SLICE`] (or to the end of the polling window),
    /// yielding the CPU between them to anything else runnable on it (the client itself, when it shares the CPU).
    /// Returns as soon as input arrives (handled, replies flushed) so the loop's other duties come next.
    fn spin_on_client(&mut self) {
        let Some(until) = self.poll_until else { return };
        let stop = until.min(Instant::now() + SPIN_SLICE);
        loop {
            let Some(s) = &self.session else { return };
            if s.paused || s.closing || s.stalled {
                return;
            }
            let before = s.last_input;
            self.service_client(false);
            match &self.session {
                Some(s) if s.last_input != before => {
                    if let Some(w) = self.poll_window {
                        self.poll_until = Some(Instant::now() + w);
                    }
                    return;
                }
                Some(_) => {}
                None => return,
            }
            if Instant::now() >= stop {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// How long the poll may sleep: until a slow-mmio access is due, or the current half message times out.
    fn poll_timeout(&self) -> Option<Duration> {
        let slow = self
            .session
            .as_ref()
            .and_then(|s| s.slow.as_ref())
            .map(|(t, _)| t.saturating_duration_since(Instant::now()));
        match (slow, self.idle_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How long until the current half message times out, if `--idle-timeout` is set.
    fn idle_deadline(&self) -> Option<Duration> {
        let limit = self.limits.idle_timeout?;
        let s = self.session.as_ref().filter(|s| s.conn.framer.has_partial() && !s.paused)?;
        Some(limit.saturating_sub(s.last_input.elapsed()))
    }

    fn check_idle(&mut self) {
        if self.idle_deadline() == Some(Duration::ZERO) {
            let limit = self.limits.idle_timeout.unwrap_or_default();
            log::warn!("client sent part of a message and then nothing for {limit:?} (--idle-timeout-ms): closing");
            self.end_session("idle with a half message");
        }
    }

    fn note_waiting_client(&mut self) {
        if !self.waiting_logged {
            log::info!("another client is connecting; it waits until the current one disconnects");
            self.waiting_logged = true;
        }
    }

    /// Serves the next waiting client while no session is open. A client that has already left ends its session
    /// as soon as it starts, so this takes the next one, in a loop: never by recursion from `end_session`, which
    /// would use stack for every departed client waiting in the listen backlog (thousands fit there).
    fn accept_waiting(&mut self) {
        while self.session.is_none() && self.accept() {}
    }

    /// Takes one waiting connection and starts its session; false when none was waiting.
    fn accept(&mut self) -> bool {
        let Some(l) = &self.listener else { return false };
        match l.accept() {
            Ok((stream, _)) => {
                if let Err(e) = self.start_session(stream) {
                    log::error!("cannot serve the new client: {e}");
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                log::warn!("accept failed: {e}");
                false
            }
        }
    }

    fn start_session(&mut self, mut stream: UnixStream) -> io::Result<()> {
        // Readable only: writable interest would wake us each time the client drains a reply. It is added only
        // while output is stuck (see `flush`).
        self.poll.registry().register(&mut stream, CLIENT, Interest::READABLE)?;
        self.sessions += 1;
        self.waiting_logged = false;
        let who = rustix::net::sockopt::socket_peercred(stream.as_fd())
            .map(|c| format!("pid {} uid {}", c.pid.as_raw_nonzero(), c.uid.as_raw()))
            .unwrap_or_else(|_| "unknown peer".into());
        log::info!("client {} connected ({who})", self.sessions);
        // A new client gets a freshly reset device: to a guest, a re-plugged VF is a new device, and nothing of
        // the previous client's (mappings, eventfds, a migration) applies to it. State lives as long as the
        // connection does.
        self.device.reset();
        if let Some(m) = self.device.migration() {
            self.mig.reset(m);
        }
        self.session = Some(Session {
            id: self.sessions,
            conn: Conn::new(stream, self.limits.max_msg()),
            interest: Interest::READABLE,
            paused: false,
            closing: false,
            negotiated: None,
            pending: HashMap::new(),
            next_id: 0,
            last_input: Instant::now(),
            deferred: None,
            held: Default::default(),
            held_bytes: 0,
            bar0_writes: [0; 2],
            slow: None,
            stalled: false,
            messages: 0,
            kill: None,
        });
        self.mig.stats = Default::default();
        // The client may already have sent data (and hung up) before we registered; edge-triggered polling would
        // not say so.
        self.service_client(true);
        Ok(())
    }

    /// Closes the session. The run loop then serves the next client waiting, if any (`accept_waiting`).
    fn end_session(&mut self, why: &str) {
        if let Some(n) = self.session.as_mut().and_then(|s| s.kill.take()) {
            log::warn!("fault disconnect-after={n}: dropping the client after {n} messages");
            self.faults.disconnect_fired();
            if let Some(s) = &mut self.session {
                let _ = s.conn.flush(); // best effort: the last reply goes out before the close
            }
            return self.close_session(&format!("fault disconnect-after={n}"));
        }
        self.close_session(why);
    }

    /// Forgets everything the client gave us and keeps the device state for the next client. DMA requests still
    /// outstanding or queued fail, so no device worker waits on a client that is gone.
    fn close_session(&mut self, why: &str) {
        let Some(mut s) = self.session.take() else { return };
        let _ = self.poll.registry().deregister(&mut s.conn.stream);
        let maps = self.mem.len();
        if self.mem.stop_logging() {
            log::info!("DMA logging stopped: its client is gone");
        }
        self.mem.set_transport(None);
        self.mem.unmap_all();
        if let Some(m) = self.device.migration() {
            self.mig.client_gone(m);
        }
        self.device.client_gone();
        log::info!(
            "client {} disconnected ({why}): dropped {maps} DMA mappings, its eventfds and {} outstanding DMA requests",
            s.id,
            s.pending.len()
        );
        let [posted, replied] = s.bar0_writes;
        log::info!("client {}: BAR0 writes: {posted} posted, {replied} with a reply", s.id);
        drop(s); // pending DMA waiters wake with "client disconnected"
        while let Ok(req) = self.dma_rx.try_recv() {
            let _ = req.reply.send(Err(io::Error::new(io::ErrorKind::NotConnected, "client disconnected")));
        }
    }

    /// Reads and handles what the client sent. A short read normally means the socket is drained; `to_end` reads
    /// on until it would block or the client is gone.
    fn service_client(&mut self, to_end: bool) {
        loop {
            let Some(s) = &mut self.session else { return };
            if s.paused || s.closing || s.stalled {
                // resumed by `flush` once the client has read enough, or by `drain_held` once held commands are
                // handled; or nothing more will come
                break;
            }
            match s.conn.fill() {
                Ok(ReadStatus::Data { more }) => {
                    s.last_input = Instant::now();
                    if let Err(why) = self.process_input() {
                        self.end_session(&why);
                        return;
                    }
                    if !more && !to_end {
                        break;
                    }
                    // Replies go out before the next read: after a message with fds that read usually finds
                    // nothing, and the client is waiting for the reply, not for it.
                    let Some(s) = &mut self.session else { return };
                    if s.conn.has_output() {
                        if let Err(e) = s.conn.flush() {
                            return self.end_session(&format!("write error: {e}"));
                        }
                    }
                }
                Ok(ReadStatus::WouldBlock) => break,
                Ok(ReadStatus::Closed) if s.conn.has_output() => {
                    // End of input with replies still queued: a client that only shut down its writing side still
                    // reads them, so the session ends once they are written. One that closed completely fails
                    // the next write, which ends the session at once.
                    s.closing = true;
                    break;
                }
                Ok(ReadStatus::Closed) => return self.end_session("connection closed"),
                Err(e) => return self.end_session(&format!("read error: {e}")),
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        let Some(s) = &mut self.session else { return };
        if let Err(e) = s.conn.flush() {
            return self.end_session(&format!("write error: {e}"));
        }
        if s.closing && !s.conn.has_output() {
            return self.end_session("connection closed after its last replies");
        }
        let want = if s.conn.has_output() { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        if want != s.interest {
            s.interest = want;
            if let Err(e) = self.poll.registry().reregister(&mut s.conn.stream, CLIENT, want) {
                return self.end_session(&format!("poll registration: {e}"));
            }
        }
        if s.paused && s.conn.queued_bytes() <= MAX_QUEUED_OUTPUT / 2 {
            // Requests may be waiting in our buffer and in the socket with no new edge to report them.
            s.paused = false;
            if let Err(why) = self.process_input() {
                return self.end_session(&why);
            }
            self.service_client(true);
        }
    }

    /// Handles every complete message in the input buffer. Err means the stream is unusable.
    fn process_input(&mut self) -> Result<(), String> {
        loop {
            let Some(s) = &mut self.session else { return Ok(()) };
            if let Some(n) = s.kill {
                return Err(format!("fault disconnect-after={n}"));
            }
            if s.stalled {
                return Ok(());
            }
            // Checked per message: one read can carry hundreds of requests, each asking for a large reply.
            if s.conn.queued_bytes() > MAX_QUEUED_OUTPUT {
                if !s.paused {
                    log::warn!("client {} is not reading its replies: pausing its requests", s.id);
                }
                s.paused = true;
                return Ok(());
            }
            let Some(ev) = s.conn.next_event() else { return Ok(()) };
            let max = self.limits.max_msg();
            match ev {
                Event::Corrupt(h) => return Err(format!("message header size {} < 16: stream corrupt", h.size)),
                Event::Oversized(h) => {
                    log::warn!("{} of {} bytes exceeds the {max}-byte limit: drained", command_name(h.cmd), h.size);
                    reply_error(s, &h, libc::E2BIG);
                }
                Event::Impossible(h) => {
                    reply_error(s, &h, libc::E2BIG);
                    let _ = s.conn.flush(); // best effort: the reply says why before the close does
                    return Err(format!(
                        "{} declares {} bytes, more than any client may send",
                        command_name(h.cmd),
                        h.size
                    ));
                }
                Event::Message(m) if m.header.msg_type() == TYPE_REPLY => {
                    count_message(s, &self.faults);
                    if let Some(m) = complete_dma(s, m) {
                        // Nothing of ours is waiting for it (always so before VERSION): the client gets an answer
                        // rather than wait forever for one.
                        log::warn!(
                            "a reply (id {}, {}) that matches no request of ours: EINVAL",
                            m.header.id,
                            command_name(m.header.cmd)
                        );
                        reply_error(s, &m.header, libc::EINVAL);
                    }
                }
                Event::Message(m) if s.deferred.is_some() || s.slow.is_some() || !s.held.is_empty() => {
                    s.held_bytes += m.payload.len();
                    s.held.push_back(m);
                    if s.held_bytes > MAX_HELD_INPUT {
                        if s.deferred.is_some() {
                            return Err(format!(
                                "more than {MAX_HELD_INPUT} bytes of commands pipelined behind a pending state \
                                 transition"
                            ));
                        }
                        // slow-mmio: the rest stays in the socket until the held commands are handled.
                        s.stalled = true;
                    }
                }
                Event::Message(m) => self.dispatch(m),
            }
        }
    }

    /// Handles a command now, or, with slow-mmio and a BAR access, once its delay has passed.
    fn dispatch(&mut self, m: Incoming) {
        let Some(s) = &mut self.session else { return };
        if is_bar_access(&m) {
            if let Some(d) = self.faults.mmio_delay() {
                s.slow = Some((Instant::now() + d, m));
                return;
            }
        }
        self.handle_command(m);
    }

    /// Handles what waits in `held`, in order: a due slow-mmio access first, then the commands behind it, until
    /// one waits again (a transition, another slow access).
    fn drain_held(&mut self) {
        let mut handled = false;
        loop {
            let Some(s) = &mut self.session else { return };
            if s.kill.is_some() {
                return self.end_session("fault disconnect-after");
            }
            if s.deferred.is_some() {
                break;
            }
            if let Some((when, _)) = &s.slow {
                if Instant::now() < *when {
                    break;
                }
                let (_, m) = s.slow.take().expect("checked");
                self.handle_command(m);
                handled = true;
                continue;
            }
            let Some(m) = s.held.pop_front() else { break };
            s.held_bytes -= m.payload.len();
            self.dispatch(m);
            handled = true;
        }
        let Some(s) = &mut self.session else { return };
        if s.stalled && s.held_bytes <= MAX_HELD_INPUT / 2 {
            s.stalled = false;
            if let Err(why) = self.process_input() {
                return self.end_session(&why);
            }
            self.service_client(true);
        } else if handled {
            self.flush();
        }
    }

    fn handle_command(&mut self, mut m: Incoming) {
        let Some(s) = &mut self.session else { return };
        count_message(s, &self.faults);
        let h = m.header;
        log::trace!("<- {} id {} ({} bytes, {} fds)", command_name(h.cmd), h.id, h.size, m.fds.len());
        if h.cmd == CMD_REGION_WRITE && Reader::new(m.payload.get(8..).unwrap_or_default()).u32() == Some(0) {
            s.bar0_writes[usize::from(!h.no_reply())] += 1;
        }
        let result = if h.msg_type() != TYPE_COMMAND {
            log::warn!("message type {} is neither command nor reply", h.msg_type());
            Err(Errno::EINVAL)
        } else {
            let was_negotiated = s.negotiated.is_some();
            let mut ctx = Ctx {
                device: &mut self.device,
                mem: &self.mem,
                negotiated: &mut s.negotiated,
                limits: &self.limits,
                mig: &mut self.mig,
            };
            let r = match ctx.handle(&mut m) {
                Step::Reply(r) => r,
                Step::Wait => {
                    let flags = Reader::new(m.payload.get(4..).unwrap_or_default()).u32().unwrap_or(0);
                    log::debug!("{} id {}: waiting for the device to stop", command_name(h.cmd), h.id);
                    s.deferred = Some((h, flags));
                    return;
                }
            };
            if !was_negotiated {
                if let Some(n) = &s.negotiated {
                    let dma = RemoteDma {
                        session: s.id,
                        tx: self.dma_tx.clone(),
                        waker: self.waker.clone(),
                        chunk: n.client_max_xfer,
                    };
                    self.mem.set_transport(Some(Arc::new(dma)));
                }
            }
            r
        };
        if h.no_reply() {
            return; // posted: errors were logged by the handler
        }
        let (flags, errno, reply) = match result {
            Ok(r) => (TYPE_REPLY, 0, r),
            Err(e) => (TYPE_REPLY | FLAG_ERROR, e.0 as u32, Default::default()),
        };
        s.conn.queue(message(h.id, h.cmd, flags, errno, &reply.payload), reply.fds);
    }

    /// Finishes a state transition that waited for the device to stop, replies, and handles the commands that
    /// arrived meanwhile (until one waits again).
    fn finish_transition(&mut self) {
        let Some(dev) = self.device.migration() else { return };
        let Some(result) = self.mig.poll(dev, &self.mem) else { return };
        let Some(s) = &mut self.session else { return };
        let Some((h, flags)) = s.deferred.take() else { return };
        if !h.no_reply() {
            match result {
                Ok(()) => {
                    let r = mig_state_reply(flags, self.mig.state());
                    s.conn.queue(message(h.id, h.cmd, TYPE_REPLY, 0, &r.payload), vec![]);
                }
                Err(e) => reply_error(s, &h, e.0),
            }
        }
        self.drain_held();
        self.flush();
    }

    /// Sends the DMA requests device workers queued; a request for a session that has ended fails at once.
    fn send_dma_requests(&mut self) {
        while let Ok(req) = self.dma_rx.try_recv() {
            // A half-closed client can no longer answer.
            let Some(s) = self.session.as_mut().filter(|s| s.id == req.session && !s.closing) else {
                let _ = req.reply.send(Err(io::Error::new(io::ErrorKind::NotConnected, "client disconnected")));
                continue;
            };
            if s.pending.len() >= self.limits.max_pending_dma {
                log::warn!("{} DMA requests unanswered by the client: failing another", s.pending.len());
                let _ = req.reply.send(Err(io::Error::other("too many unanswered DMA requests")));
                continue;
            }
            let mut id = s.next_id;
            while s.pending.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            s.next_id = id.wrapping_add(1);
            let (cmd, len, payload) = match req.op {
                DmaOp::Read(len) => (CMD_DMA_READ, len, Writer::default().u64(req.addr).u64(len).0),
                DmaOp::Write(data) => {
                    let len = data.len() as u64;
                    (CMD_DMA_WRITE, len, Writer::default().u64(req.addr).u64(len).bytes(&data).0)
                }
            };
            log::trace!("-> {} id {id} {:#x}+{len}", command_name(cmd), req.addr);
            s.conn.queue(message(id, cmd, TYPE_COMMAND, 0, &payload), vec![]);
            s.pending.insert(id, PendingDma { cmd, addr: req.addr, len, reply: req.reply });
        }
    }
}

impl<D: Controlled> Server<D> {
    /// Turns on the control socket's requests (`--control`): the returned link is the control thread's way here.
    pub fn enable_control(&mut self) -> control::ControlLink {
        let (tx, rx) = unbounded();
        self.ctl_rx = Some(rx);
        self.ctl_fn = Some(answer_control::<D>);
        control::ControlLink { tx, waker: self.waker.clone() }
    }
}

/// Answers one control request on the protocol thread: short calls, nothing that waits for the client.
fn answer_control<D: Controlled>(srv: &mut Server<D>, op: &Op) -> CtlResult {
    Ok(match *op {
        Op::Status => {
            let mut v = srv.status_json();
            v["link_up"] = serde_json::json!(srv.device.link_up());
            v["vf"] = srv.device.vf_json();
            v
        }
        Op::Stats => srv.device.stats_json(),
        Op::SetLink(up) => {
            srv.device.set_link(up);
            serde_json::json!({})
        }
        Op::PfReset => {
            srv.device.pf_reset();
            serde_json::json!({})
        }
        Op::Migration => srv.migration_json(),
        Op::FaultsChanged => {
            srv.device.faults_changed();
            serde_json::json!({})
        }
    })
}

/// Counts a message for disconnect-after; marks the session for closing when the count is reached.
fn count_message(s: &mut Session, faults: &Faults) {
    s.messages += 1;
    if let Some(n) = faults.disconnect_after() {
        if s.messages >= n && s.kill.is_none() {
            s.kill = Some(n);
        }
    }
}

/// REGION_READ, REGION_WRITE or REGION_WRITE_MULTI whose (first) region is a BAR (indexes 0-5): slow-mmio delays
/// it.
fn is_bar_access(m: &Incoming) -> bool {
    let region = match m.header.cmd {
        CMD_REGION_READ | CMD_REGION_WRITE => Reader::new(m.payload.get(8..).unwrap_or_default()).u32(),
        CMD_REGION_WRITE_MULTI => Reader::new(m.payload.get(16..).unwrap_or_default()).u32(),
        _ => None,
    };
    region.is_some_and(|r| r <= 5)
}

/// An error reply carrying only the header, unless the message asked for no reply.
fn reply_error(s: &mut Session, h: &Header, errno: i32) {
    if !h.no_reply() {
        s.conn.queue(message(h.id, h.cmd, TYPE_REPLY | FLAG_ERROR, errno as u32, &[]), vec![]);
    }
}

/// Matches a client's reply to our DMA request and hands the result to the waiting worker. Gives the message back
/// when no request of ours has its id.
fn complete_dma(s: &mut Session, m: Incoming) -> Option<Incoming> {
    let h = m.header;
    let Some(p) = s.pending.remove(&h.id) else {
        return Some(m);
    };
    let result = if h.cmd != p.cmd {
        Err(format!("reply to {} carries command {}", command_name(p.cmd), h.cmd))
    } else if h.flags & FLAG_ERROR != 0 {
        Err(format!("client failed {} at {:#x}: errno {}", command_name(p.cmd), p.addr, h.errno))
    } else {
        let mut r = Reader::new(&m.payload);
        match (r.u64(), r.u64(), r.rest()) {
            (Some(a), Some(c), data) if a == p.addr && c == p.len => match p.cmd {
                CMD_DMA_READ if data.len() as u64 == p.len => Ok(data.to_vec()),
                CMD_DMA_WRITE => Ok(Vec::new()),
                _ => Err(format!("DMA_READ reply has {} data bytes, asked {}", data.len(), p.len)),
            },
            _ => Err(format!("malformed {} reply", command_name(p.cmd))),
        }
    };
    let _ = p.reply.send(result.map_err(|e| {
        log::warn!("{e}");
        io::Error::other(e)
    }));
    None
}
