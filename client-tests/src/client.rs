//! A raw vfio-user client. It sends any bytes and fds, reads replies with a timeout, and services the server's
//! DMA_READ/DMA_WRITE requests from a local model of fd-less guest memory while it waits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::{IoSlice, IoSliceMut};
use rustix::net::{
    recvmsg, send, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::wire::*;

/// Default wait for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Up to SCM_MAX_FD fds per received message.
const RECV_MAX_FDS: usize = 253;

/// A message as received.
#[derive(Debug)]
pub struct Msg {
    pub hdr: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A reply to one of our commands.
#[derive(Debug)]
pub struct Reply {
    pub hdr: Header,
    /// `Some(errno)` when the error flag is set.
    pub errno: Option<i32>,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn from_msg(m: Msg) -> Self {
        let errno = (m.hdr.flags & FLAG_ERROR != 0).then_some(m.hdr.errno as i32);
        Reply { hdr: m.hdr, errno, payload: m.payload, fds: m.fds }
    }

    /// Panics (with `what`) unless this is a success reply.
    #[track_caller]
    pub fn ok(self, what: &str) -> Self {
        if let Some(e) = self.errno {
            panic!("{what}: server replied with errno {e} ({})", io::Error::from_raw_os_error(e));
        }
        self
    }

    /// Panics unless this is an error reply with `errno`, carrying only the header and no fds.
    #[track_caller]
    pub fn assert_errno(&self, errno: i32, what: &str) {
        assert_eq!(
            self.errno,
            Some(errno),
            "{what}: expected errno {errno} ({}), got {:?} (header {:?}, payload {} bytes)",
            io::Error::from_raw_os_error(errno),
            self.errno.map(io::Error::from_raw_os_error),
            self.hdr,
            self.payload.len()
        );
        assert!(self.payload.is_empty(), "{what}: error reply carries a {}-byte payload", self.payload.len());
        assert!(self.fds.is_empty(), "{what}: error reply carries fds");
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        le_u16(&self.payload, off)
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        le_u32(&self.payload, off)
    }
    pub fn u64_at(&self, off: usize) -> u64 {
        le_u64(&self.payload, off)
    }
}

/// What the client did for the server's DMA requests.
#[derive(Debug, Default, Clone)]
pub struct DmaStats {
    pub reads: usize,
    pub writes: usize,
    /// Requests for memory we do not have (answered with EFAULT).
    pub faults: usize,
    /// Largest `count` of any request.
    pub max_chunk: u64,
    /// Requests whose header or layout was malformed.
    pub malformed: usize,
}

pub struct Client {
    sock: UnixStream,
    next_id: u16,
    /// Commands awaiting a reply: id -> command.
    outstanding: HashMap<u16, u16>,
    /// Replies received while waiting for another one.
    stash: VecDeque<Msg>,
    /// Fd-less guest memory: iova -> bytes.
    guest: BTreeMap<u64, Vec<u8>>,
    pub dma: DmaStats,
    /// Server commands other than DMA_READ/DMA_WRITE.
    pub unexpected_requests: Vec<Header>,
    /// Replies whose id matched no outstanding command.
    pub stray_replies: Vec<Header>,
    /// Largest DMA chunk we accept (our advertised max_data_xfer_size).
    pub max_xfer: u64,
    /// When set, DMA requests are kept in `held` unanswered (to show the server keeps serving commands).
    pub hold_dma: bool,
    pub held: Vec<Msg>,
    pub timeout: Duration,
}

fn cvt(e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::AGAIN {
        io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the server")
    } else {
        io::Error::from(e)
    }
}

impl Client {
    pub fn connect(path: &Path) -> io::Result<Client> {
        let sock = UnixStream::connect(path)?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Client {
            sock,
            next_id: 0x100,
            outstanding: HashMap::new(),
            stash: VecDeque::new(),
            guest: BTreeMap::new(),
            dma: DmaStats::default(),
            unexpected_requests: Vec::new(),
            stray_replies: Vec::new(),
            max_xfer: MAX_DATA_XFER,
            hold_dma: false,
            held: Vec::new(),
            timeout: REPLY_TIMEOUT,
        })
    }

    /// A message id not used before on this connection (wraps after 65536).
    pub fn fresh_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    // ---- raw transport -------------------------------------------------------------------------------------

    /// Sends raw bytes; fds go with the first byte.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(cmsg.push(SendAncillaryMessage::ScmRights(fds)), "cmsg buffer too small");
        }
        let mut sent = sendmsg(&self.sock, &[IoSlice::new(bytes)], &mut cmsg, SendFlags::NOSIGNAL).map_err(cvt)?;
        while sent < bytes.len() {
            sent += send(&self.sock, &bytes[sent..], SendFlags::NOSIGNAL).map_err(cvt)?;
        }
        Ok(())
    }

    /// Sends a command; returns its id. Without `no_reply` the reply is expected by [`Client::recv_reply`].
    pub fn send(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>], no_reply: bool) -> io::Result<u16> {
        let id = self.fresh_id();
        let flags = TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 };
        self.send_bytes(&message(id, cmd, flags, payload), fds)?;
        if !no_reply {
            self.outstanding.insert(id, cmd);
        }
        Ok(id)
    }

    /// Sends a message with an arbitrary header (`size` is computed unless given); registers `id` as awaiting
    /// a reply unless the no_reply flag is set.
    pub fn send_with_header(
        &mut self,
        cmd: u16,
        flags: u32,
        errno: u32,
        size: Option<u32>,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<u16> {
        let id = self.fresh_id();
        let h = Header { id, cmd, size: size.unwrap_or((HDR_SIZE + payload.len()) as u32), flags, errno };
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        self.send_bytes(&b, fds)?;
        if flags & FLAG_NO_REPLY == 0 {
            self.outstanding.insert(id, cmd);
        }
        Ok(id)
    }

    /// Fills `buf` completely, collecting fds. `first` bounds the wait for the first byte; the rest of a message
    /// that has started gets the normal timeout.
    fn recv_exact(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, first: Duration) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let wait = if got == 0 { first } else { self.timeout };
            self.sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(RECV_MAX_FDS))];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let r = recvmsg(&self.sock, &mut [IoSliceMut::new(&mut buf[got..])], &mut cmsg, RecvFlags::CMSG_CLOEXEC)
                .map_err(cvt)?;
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(it) = m {
                    fds.extend(it);
                }
            }
            if r.bytes == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
            }
            got += r.bytes;
        }
        Ok(())
    }

    /// Reads one message, waiting at most `first` for it to start.
    fn read_msg(&mut self, first: Duration) -> io::Result<Msg> {
        let mut fds = Vec::new();
        let mut h = [0u8; HDR_SIZE];
        self.recv_exact(&mut h, &mut fds, first)?;
        let hdr = Header::parse(&h);
        if (hdr.size as usize) < HDR_SIZE || hdr.size as u64 > 16 + MAX_DATA_XFER + 4096 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad message size in {hdr:?}")));
        }
        let mut payload = vec![0u8; hdr.size as usize - HDR_SIZE];
        let t = self.timeout;
        self.recv_exact(&mut payload, &mut fds, t)?;
        Ok(Msg { hdr, payload, fds })
    }

    /// Reads messages until `pred` accepts a reply (returned) or `deadline` passes; serves server requests and
    /// stashes other replies.
    fn pump_until(&mut self, deadline: Instant, pred: &dyn Fn(&Header) -> bool) -> io::Result<Msg> {
        if let Some(i) = self.stash.iter().position(|m| pred(&m.hdr)) {
            return Ok(self.stash.remove(i).unwrap());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for a reply"));
            }
            let m = self.read_msg(left)?;
            if m.hdr.msg_type() == TYPE_COMMAND {
                self.serve(m)?;
                continue;
            }
            if pred(&m.hdr) {
                return Ok(m);
            }
            self.stash.push_back(m);
        }
    }

    /// Waits (<= timeout) for the reply to `id`, serving DMA requests meanwhile. Checks that the reply is a
    /// reply to the same command.
    pub fn recv_reply(&mut self, id: u16) -> io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let m = self.pump_until(deadline, &|h| h.id == id)?;
        self.finish_reply(m)
    }

    /// The next reply in arrival order, whatever its id.
    pub fn recv_next_reply(&mut self) -> io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let m = self.pump_until(deadline, &|_| true)?;
        self.finish_reply(m)
    }

    fn finish_reply(&mut self, m: Msg) -> io::Result<Reply> {
        if m.hdr.msg_type() != TYPE_REPLY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not a reply: {:?}", m.hdr)));
        }
        match self.outstanding.remove(&m.hdr.id) {
            Some(c) if c != m.hdr.cmd => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply to id {} has command {} but the request was {c}", m.hdr.id, m.hdr.cmd),
                ))
            }
            Some(_) => {}
            None => self.stray_replies.push(m.hdr),
        }
        if m.hdr.size as usize != HDR_SIZE + m.payload.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "size mismatch"));
        }
        Ok(Reply::from_msg(m))
    }

    /// Serves DMA requests and collects messages for `dur`; returns every reply that arrived (stashed ones
    /// included). An empty result means the server stayed silent.
    pub fn replies_within(&mut self, dur: Duration) -> io::Result<Vec<Msg>> {
        let mut out: Vec<Msg> = self.stash.drain(..).collect();
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            match self.read_msg(left) {
                Ok(m) if m.hdr.msg_type() == TYPE_COMMAND => self.serve(m)?,
                Ok(m) => out.push(m),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    /// True when the server closes the connection within `dur` (messages that arrive first are discarded).
    pub fn closed_within(&mut self, dur: Duration) -> bool {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.read_msg(left) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }

    /// send + recv_reply.
    pub fn request(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<Reply> {
        let id = self.send(cmd, payload, fds, false)?;
        self.recv_reply(id)
    }

    /// [`Client::request`] that panics on a transport error (timeout, EOF, malformed reply).
    #[track_caller]
    pub fn call(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
        match self.request(cmd, payload, fds) {
            Ok(r) => r,
            Err(e) => panic!("command {cmd}: no reply: {e}"),
        }
    }

    /// Half-closes the connection: the server reads end-of-stream after what was sent, and can still answer.
    pub fn shutdown_write(&self) {
        self.sock.shutdown(std::net::Shutdown::Write).expect("shutdown(SHUT_WR)");
    }

    /// Reads until the server closes the connection. Returns the headers of the messages that arrived before the
    /// close (DMA requests included, unanswered), or None when the connection is still open after `dur`. A reset
    /// counts as a close: the server closed its end with our bytes unread.
    pub fn until_close(&mut self, dur: Duration) -> Option<Vec<Header>> {
        let deadline = Instant::now() + dur;
        let mut got: Vec<Header> = self.stash.drain(..).map(|m| m.hdr).collect();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read_msg(left) {
                Ok(m) => got.push(m.hdr),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return None,
                Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                    return Some(got)
                }
                Err(e) => panic!("reading until the server closes: {e}"),
            }
        }
    }

    // ---- server -> client DMA --------------------------------------------------------------------------------

    fn reply_to(&mut self, req: &Header, payload: &[u8], errno: Option<i32>) -> io::Result<()> {
        let flags = TYPE_REPLY | if errno.is_some() { FLAG_ERROR } else { 0 };
        let h = Header {
            id: req.id,
            cmd: req.cmd,
            size: (HDR_SIZE + payload.len()) as u32,
            flags,
            errno: errno.unwrap_or(0) as u32,
        };
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        self.send_bytes(&b, &[])
    }

    fn guest_slice(&mut self, addr: u64, count: u64) -> Option<&mut [u8]> {
        let (base, buf) = self.guest.range_mut(..=addr).next_back()?;
        let off = addr - *base;
        let end = off.checked_add(count)?;
        if end > buf.len() as u64 {
            return None;
        }
        Some(&mut buf[off as usize..end as usize])
    }

    /// Answers the DMA requests held while `hold_dma` was set, and stops holding.
    pub fn release_held(&mut self) -> io::Result<()> {
        self.hold_dma = false;
        for m in std::mem::take(&mut self.held) {
            self.serve(m)?;
        }
        Ok(())
    }

    fn serve(&mut self, m: Msg) -> io::Result<()> {
        if self.hold_dma && matches!(m.hdr.cmd, cmd::DMA_READ | cmd::DMA_WRITE) {
            self.held.push(m);
            return Ok(());
        }
        let h = m.hdr;
        let no_reply = h.flags & FLAG_NO_REPLY != 0;
        match h.cmd {
            cmd::DMA_READ | cmd::DMA_WRITE if m.payload.len() >= 16 => {
                let addr = le_u64(&m.payload, 0);
                let count = le_u64(&m.payload, 8);
                self.dma.max_chunk = self.dma.max_chunk.max(count);
                if !m.fds.is_empty() || h.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY) != 0 {
                    self.dma.malformed += 1;
                }
                if h.cmd == cmd::DMA_READ {
                    self.dma.reads += 1;
                    if m.payload.len() != 16 || count > self.max_xfer {
                        self.dma.malformed += 1;
                        return self.reply_to(&h, &[], Some(libc::EINVAL));
                    }
                    let data = self.guest_slice(addr, count).map(|s| s.to_vec());
                    match data {
                        Some(d) if !no_reply => {
                            let p = Payload::new().u64(addr).u64(count).bytes(&d).build();
                            self.reply_to(&h, &p, None)
                        }
                        Some(_) => Ok(()),
                        None => {
                            self.dma.faults += 1;
                            self.reply_to(&h, &[], Some(libc::EFAULT))
                        }
                    }
                } else {
                    self.dma.writes += 1;
                    if m.payload.len() as u64 != 16 + count || count > self.max_xfer {
                        self.dma.malformed += 1;
                        return self.reply_to(&h, &[], Some(libc::EINVAL));
                    }
                    let data = m.payload[16..].to_vec();
                    match self.guest_slice(addr, count) {
                        Some(s) => {
                            s.copy_from_slice(&data);
                            if no_reply {
                                return Ok(());
                            }
                            let p = Payload::new().u64(addr).u64(count).build();
                            self.reply_to(&h, &p, None)
                        }
                        None => {
                            self.dma.faults += 1;
                            self.reply_to(&h, &[], Some(libc::EFAULT))
                        }
                    }
                }
            }
            cmd::DMA_READ | cmd::DMA_WRITE => {
                self.dma.malformed += 1;
                self.reply_to(&h, &[], Some(libc::EINVAL))
            }
            _ => {
                self.unexpected_requests.push(h);
                self.reply_to(&h, &[], Some(libc::ENOSYS))
            }
        }
    }

    /// Reads fd-less guest memory (the local model).
    pub fn guest_read(&mut self, addr: u64, len: usize) -> Vec<u8> {
        self.guest_slice(addr, len as u64).unwrap_or_else(|| panic!("guest {addr:#x}+{len} not mapped")).to_vec()
    }

    /// Writes fd-less guest memory (the local model).
    pub fn guest_write(&mut self, addr: u64, data: &[u8]) {
        self.guest_slice(addr, data.len() as u64)
            .unwrap_or_else(|| panic!("guest {addr:#x}+{} not mapped", data.len()))
            .copy_from_slice(data);
    }

    /// Serves DMA requests for `dur` (e.g. while the device works) and returns replies that arrived.
    pub fn pump(&mut self, dur: Duration) -> io::Result<()> {
        let replies = self.replies_within(dur)?;
        self.stash.extend(replies);
        Ok(())
    }

    // ---- typed helpers -----------------------------------------------------------------------------------------

    /// VERSION with major/minor and `tail` (JSON, NUL-terminated by the caller if wanted) as payload.
    pub fn version_raw(&mut self, major: u16, minor: u16, tail: &[u8]) -> Reply {
        let p = Payload::new().u16(major).u16(minor).bytes(tail).build();
        self.call(cmd::VERSION, &p, &[])
    }

    /// VERSION 0.0 with `json` (a NUL is appended).
    pub fn version(&mut self, json: &str) -> Reply {
        let mut t = json.as_bytes().to_vec();
        t.push(0);
        self.version_raw(0, 0, &t)
    }

    /// VERSION with [`QEMU_LIKE_CAPS`]; panics on error. Returns the server's `capabilities` object.
    pub fn negotiate(&mut self) -> serde_json::Value {
        let r = self.version(QEMU_LIKE_CAPS).ok("VERSION");
        parse_version_reply(&r).1
    }

    pub fn device_info(&mut self) -> Reply {
        self.call(cmd::DEVICE_GET_INFO, &Payload::new().u32(16).u32(0).u32(0).u32(0).build(), &[])
    }

    pub fn region_info(&mut self, index: u32, argsz: u32) -> Reply {
        let p = Payload::new().u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0).build();
        self.call(cmd::DEVICE_GET_REGION_INFO, &p, &[])
    }

    pub fn region_io_fds(&mut self, index: u32, argsz: u32) -> Reply {
        let p = Payload::new().u32(argsz).u32(0).u32(index).u32(0).build();
        self.call(cmd::DEVICE_GET_REGION_IO_FDS, &p, &[])
    }

    pub fn irq_info(&mut self, index: u32) -> Reply {
        let p = Payload::new().u32(16).u32(0).u32(index).u32(0).build();
        self.call(cmd::DEVICE_GET_IRQ_INFO, &p, &[])
    }

    /// SET_IRQS with argsz = 20 + data.len().
    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Reply {
        let p = set_irqs_payload(20 + data.len() as u32, flags, index, start, count, data);
        self.call(cmd::DEVICE_SET_IRQS, &p, fds)
    }

    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        let p = Payload::new().u64(offset).u32(region).u32(count).build();
        self.call(cmd::REGION_READ, &p, &[])
    }

    /// Reads `count` bytes; panics on error or a malformed reply.
    #[track_caller]
    pub fn read_bytes(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let r = self.region_read(region, offset, count).ok("REGION_READ");
        assert_eq!(r.payload.len(), 16 + count as usize, "REGION_READ reply length");
        assert_eq!((r.u64_at(0), r.u32_at(8), r.u32_at(12)), (offset, region, count), "REGION_READ reply echo");
        r.payload[16..].to_vec()
    }

    #[track_caller]
    pub fn read32(&mut self, region: u32, offset: u64) -> u32 {
        le_u32(&self.read_bytes(region, offset, 4), 0)
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        let p = Payload::new().u64(offset).u32(region).u32(data.len() as u32).bytes(data).build();
        self.call(cmd::REGION_WRITE, &p, &[])
    }

    #[track_caller]
    pub fn write32(&mut self, region: u32, offset: u64, v: u32) {
        let r = self.region_write(region, offset, &v.to_le_bytes()).ok("REGION_WRITE");
        assert_eq!(r.payload.len(), 16, "REGION_WRITE reply echoes offset, region, count");
        assert_eq!((r.u64_at(0), r.u32_at(8), r.u32_at(12)), (offset, region, 4), "REGION_WRITE reply echo");
    }

    /// A posted (no_reply) REGION_WRITE; returns its id.
    pub fn posted_write(&mut self, region: u32, offset: u64, data: &[u8]) -> u16 {
        let p = Payload::new().u64(offset).u32(region).u32(data.len() as u32).bytes(data).build();
        self.send(cmd::REGION_WRITE, &p, &[], true).expect("posted write")
    }

    /// REGION_WRITE_MULTI; entries are (region, offset, data <= 8 bytes).
    pub fn write_multi(&mut self, entries: &[(u32, u64, &[u8])]) -> Reply {
        self.call(cmd::REGION_WRITE_MULTI, &write_multi_payload(entries.len() as u64, entries), &[])
    }

    /// DMA_MAP; with `fd` the memory is the fd's (at the given file offset), without it the client registers
    /// `size` zeroed bytes of local guest memory (on success) and serves DMA_READ/DMA_WRITE for it.
    pub fn dma_map(&mut self, iova: u64, size: u64, flags: u32, fd: Option<(BorrowedFd<'_>, u64)>) -> Reply {
        let offset = fd.map(|(_, o)| o).unwrap_or(0);
        let p = Payload::new().u32(32).u32(flags).u64(offset).u64(iova).u64(size).build();
        let fds: Vec<BorrowedFd<'_>> = fd.map(|(f, _)| f).into_iter().collect();
        let r = self.call(cmd::DMA_MAP, &p, &fds);
        if r.errno.is_none() && fd.is_none() {
            self.guest.insert(iova, vec![0; size as usize]);
        }
        r
    }

    pub fn dma_unmap(&mut self, iova: u64, size: u64, flags: u32) -> Reply {
        let p = Payload::new().u32(24).u32(flags).u64(iova).u64(size).build();
        let r = self.call(cmd::DMA_UNMAP, &p, &[]);
        if r.errno.is_none() {
            if flags & UNMAP_ALL != 0 {
                self.guest.clear();
            } else if self.guest.get(&iova).is_some_and(|b| b.len() as u64 == size) {
                self.guest.remove(&iova);
            }
        }
        r
    }

    /// PCI command: memory decoding and bus mastering on, as a driver's probe does; without bus mastering the
    /// device does no DMA.
    pub fn enable_bus_master(&mut self) {
        self.region_write(CONFIG, 4, &0x0006u16.to_le_bytes()).ok("PCI command write");
    }

    pub fn reset(&mut self) -> Reply {
        self.call(cmd::DEVICE_RESET, &[], &[])
    }

    pub fn stash_len(&self) -> usize {
        self.stash.len()
    }
}

impl AsFd for Client {
    /// The connection's socket (to send it as an fd, or to poll it).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// SET_IRQS payload with an explicit argsz.
pub fn set_irqs_payload(argsz: u32, flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    Payload::new().u32(argsz).u32(flags).u32(index).u32(start).u32(count).bytes(data).build()
}

/// REGION_WRITE_MULTI payload with an explicit wr_cnt; each entry's data is zero-padded to 8 bytes.
pub fn write_multi_payload(wr_cnt: u64, entries: &[(u32, u64, &[u8])]) -> Vec<u8> {
    let mut p = Payload::new().u64(wr_cnt);
    for (region, offset, data) in entries {
        let mut d = [0u8; 8];
        let n = data.len().min(8);
        d[..n].copy_from_slice(&data[..n]);
        p = p.u64(*offset).u32(*region).u32(data.len() as u32).bytes(&d);
    }
    p.build()
}

/// Splits a VERSION reply into (major, minor) and the `capabilities` object; panics if the JSON is not
/// NUL-terminated or not an object with `capabilities`.
#[track_caller]
pub fn parse_version_reply(r: &Reply) -> ((u16, u16), serde_json::Value) {
    assert!(r.payload.len() > 4, "VERSION reply without JSON");
    let ver = (r.u16_at(0), r.u16_at(2));
    let json = &r.payload[4..];
    assert_eq!(json.last(), Some(&0), "VERSION reply JSON is not NUL-terminated");
    assert!(!json[..json.len() - 1].contains(&0), "VERSION reply JSON has an embedded NUL");
    let v: serde_json::Value = serde_json::from_slice(&json[..json.len() - 1]).expect("VERSION reply JSON");
    let caps = v.get("capabilities").cloned().expect("VERSION reply without capabilities");
    assert!(caps.is_object(), "capabilities is not an object");
    (ver, caps)
}
