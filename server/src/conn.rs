//! One client connection: non-blocking reads split into messages with their fds, and a write queue.
//!
//! Fd attribution: the sender attaches a message's fds to its first byte, and the kernel ends a read right after
//! the skb that carried fds. So fds from one read belong to the message that contains that read's last byte; each
//! batch is tagged with that byte's stream offset and handed to the message whose range covers it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use mio::net::UnixStream;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::wire::{Header, HEADER_SIZE};

/// Fds accepted in one read; more than the negotiated 16 marks the message as carrying too many.
const RECV_FDS: usize = 32;
pub const READ_CHUNK: usize = 64 * 1024;

/// A complete message as received.
pub struct Incoming {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped fds (control buffer too small): the message cannot be honoured.
    pub fds_truncated: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// Bytes arrived; `more` when the read filled its buffer, so the socket may hold more. A short read means it
    /// was drained at that moment; the caller still reads on when the poll event said the peer hung up, because a
    /// hang-up that arrived with the data raises no later edge.
    Data {
        more: bool,
    },
    WouldBlock,
    Closed,
}

/// What the framer produced.
pub enum Event {
    Message(Incoming),
    /// A message over the size limit whose payload is being drained; reply with E2BIG.
    Oversized(Header),
    /// A size no client may ever send (over [`DRAIN_LIMIT`]): reply with E2BIG and close, rather than tie the
    /// connection up draining gigabytes that will never come.
    Impossible(Header),
    /// The stream is unusable (header size < 16): the connection must be closed.
    Corrupt(Header),
}

/// The largest message any client could believe valid: 64 MiB of data (QEMU's ceiling for max_data_xfer_size, and
/// ours) plus headers and fixed parts. Oversized messages up to this are drained; larger ones close the connection.
pub const DRAIN_LIMIT: u64 = HEADER_SIZE as u64 + (64 << 20) + 4096;

struct FdBatch {
    last_byte: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// Splits a byte stream (and the fds that came with it) into messages. It knows nothing of sockets, so the fuzzer
/// drives it directly. Memory stays bounded by one message plus one read chunk.
pub struct Framer {
    /// Received bytes live in `inbuf[start..end]`; the buffer is zero-filled only when it grows, never per read.
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `inbuf[start]`.
    in_pos: u64,
    fds: VecDeque<FdBatch>,
    /// Payload bytes of an oversized message still to drop.
    discard: u64,
    max_msg: usize,
}

impl Framer {
    pub fn new(max_msg: usize) -> Self {
        Framer { inbuf: vec![0; READ_CHUNK], start: 0, end: 0, in_pos: 0, fds: VecDeque::new(), discard: 0, max_msg }
    }

    /// Room for the next read: at least [`READ_CHUNK`] bytes.
    pub fn space(&mut self) -> &mut [u8] {
        if self.inbuf.len() - self.end < READ_CHUNK {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.inbuf.len() - self.end < READ_CHUNK {
                self.inbuf.resize(self.end + READ_CHUNK, 0);
            }
        }
        &mut self.inbuf[self.end..self.end + READ_CHUNK]
    }

    /// `n` bytes were read into [`Framer::space`], with `fds` (attached to the read's last byte; see the module
    /// comment) and `truncated` when the kernel dropped some.
    pub fn commit(&mut self, n: usize, fds: Vec<OwnedFd>, truncated: bool) {
        let n = n.min(self.inbuf.len() - self.end);
        self.end += n;
        if n > 0 && (!fds.is_empty() || truncated) {
            let last_byte = self.in_pos + (self.end - self.start) as u64 - 1;
            self.fds.push_back(FdBatch { last_byte, fds, truncated });
        }
    }

    /// Part of a message has arrived and the rest has not (or an oversized one is still being drained).
    pub fn has_partial(&self) -> bool {
        self.start != self.end || self.discard > 0
    }

    /// Bytes held, for the fuzzer's bound check.
    pub fn capacity(&self) -> usize {
        self.inbuf.len()
    }

    /// Fds that arrived with bytes before stream offset `end`.
    fn take_fds(&mut self, end: u64) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut truncated = false;
        while let Some(b) = self.fds.pop_front() {
            if b.last_byte >= end {
                self.fds.push_front(b);
                break;
            }
            fds.extend(b.fds);
            truncated |= b.truncated;
        }
        (fds, truncated)
    }

    fn buffered(&self) -> &[u8] {
        &self.inbuf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.in_pos += n as u64;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// The next complete message (or event) in the input buffer, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.discard > 0 {
            let n = self.discard.min(self.buffered().len() as u64) as usize;
            self.consume(n);
            self.discard -= n as u64;
            let end = self.in_pos;
            drop(self.take_fds(end)); // fds of a dropped message are closed here
            if self.discard > 0 {
                return None;
            }
        }
        if self.buffered().len() < HEADER_SIZE {
            return None;
        }
        let header = Header::parse(&self.buffered()[..HEADER_SIZE]);
        let size = header.size as usize;
        if size < HEADER_SIZE {
            return Some(Event::Corrupt(header));
        }
        if u64::from(header.size) > DRAIN_LIMIT {
            return Some(Event::Impossible(header));
        }
        if size > self.max_msg {
            self.consume(HEADER_SIZE);
            self.discard = (size - HEADER_SIZE) as u64;
            let end = self.in_pos;
            drop(self.take_fds(end));
            return Some(Event::Oversized(header));
        }
        if self.buffered().len() < size {
            return None;
        }
        let payload = self.buffered()[HEADER_SIZE..size].to_vec();
        let end = self.in_pos + size as u64;
        self.consume(size);
        let (fds, fds_truncated) = self.take_fds(end);
        Some(Event::Message(Incoming { header, payload, fds, fds_truncated }))
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    sent: usize,
}

pub struct Conn {
    pub stream: UnixStream,
    pub framer: Framer,
    out: VecDeque<Outgoing>,
    /// Bytes in `out` not yet written, kept as a count: it is checked before every message.
    queued: usize,
}

impl Conn {
    pub fn new(stream: UnixStream, max_msg: usize) -> Self {
        Conn { stream, framer: Framer::new(max_msg), out: VecDeque::new(), queued: 0 }
    }

    /// One read from the socket. The caller processes the messages it completed before reading again, so the
    /// input buffer stays bounded by one message plus one chunk.
    pub fn fill(&mut self) -> io::Result<ReadStatus> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(RECV_FDS))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let res = recvmsg(
            self.stream.as_fd(),
            &mut [IoSliceMut::new(self.framer.space())],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        );
        let got = match res {
            Ok(m) => m,
            Err(e) => {
                return match e {
                    rustix::io::Errno::AGAIN | rustix::io::Errno::INTR => Ok(ReadStatus::WouldBlock),
                    e => Err(e.into()),
                };
            }
        };
        let mut fds = Vec::new();
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(it) = m {
                fds.extend(it);
            }
        }
        if got.bytes == 0 {
            return Ok(ReadStatus::Closed);
        }
        let truncated = got.flags.contains(ReturnFlags::CTRUNC);
        let with_fds = !fds.is_empty() || truncated;
        self.framer.commit(got.bytes, fds, truncated);
        // The kernel ends a read after the skb that carried fds even when more data is queued.
        Ok(ReadStatus::Data { more: got.bytes == READ_CHUNK || with_fds })
    }

    pub fn next_event(&mut self) -> Option<Event> {
        self.framer.next_event()
    }

    pub fn queue(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        self.queued += bytes.len();
        self.out.push_back(Outgoing { bytes, fds, sent: 0 });
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes queued for the client and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Writes as much queued output as the socket takes. Fds go with the first byte of their message.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(o) = self.out.front_mut() {
            let res = if o.sent == 0 && !o.fds.is_empty() {
                let borrowed: Vec<_> = o.fds.iter().map(|f| f.as_fd()).collect();
                let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
                let mut cmsg = SendAncillaryBuffer::new(&mut space);
                cmsg.push(SendAncillaryMessage::ScmRights(&borrowed));
                sendmsg(
                    self.stream.as_fd(),
                    &[IoSlice::new(&o.bytes)],
                    &mut cmsg,
                    SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
                )
            } else {
                rustix::net::send(self.stream.as_fd(), &o.bytes[o.sent..], SendFlags::DONTWAIT | SendFlags::NOSIGNAL)
            };
            match res {
                Ok(n) => {
                    o.sent += n;
                    self.queued -= n;
                    o.fds.clear();
                    if o.sent == o.bytes.len() {
                        self.out.pop_front();
                    }
                }
                Err(e) if e == rustix::io::Errno::AGAIN => return Ok(()),
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
