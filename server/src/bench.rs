//! The request path in-process, for the instruction-count benchmark (`bench/src/bin/vfu-icount.rs`): the bytes of
//! a message go through the same [`Framer`] the socket path fills from `recvmsg`, the same [`Ctx::handle`] the event
//! loop calls, and a reply is built with the same [`message`] it queues; only the socket is missing. Not part of the
//! server's API.

use device::mem::GuestMem;
use device::{I40eVf, VfConfig, CONFIG_REGION};

use crate::conn::{Event, Framer};
use crate::handlers::{Ctx, Negotiated, Step};
use crate::limits::Limits;
use crate::migration::Migration;
use crate::wire::*;

/// VF_ATQBAL1, the BAR0 register the posted write goes to (as in vfu-bench's `posted_write`).
const ATQBAL: u64 = 0x7c00;
/// What config space offset 0 reads: device 0x154c, vendor 0x8086.
pub const CONFIG_ID: u32 = 0x154c_8086;

/// A device and the server state a connection has after VERSION, with one framer standing in for the socket.
pub struct RequestPath {
    dev: I40eVf,
    mem: GuestMem,
    negotiated: Option<Negotiated>,
    limits: Limits,
    mig: Migration,
    framer: Framer,
    read: Vec<u8>,
    write: Vec<u8>,
    /// Bytes of replies built, so the optimiser cannot drop them.
    pub reply_bytes: u64,
}

impl Default for RequestPath {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestPath {
    /// A fresh device (its workers are started and stay idle: nothing here kicks them) and a negotiated session.
    pub fn new() -> Self {
        let mem = GuestMem::new();
        let dev = I40eVf::new(VfConfig::default(), mem.clone());
        // Let the workers start and block in `recv` before anything is measured: their start-up allocations,
        // interleaved with ours, would otherwise leave a heap layout (and so malloc costs) that differs per run.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let limits = Limits::default();
        let framer = Framer::new(limits.max_msg());
        let negotiated = Some(Negotiated { client_max_xfer: 1 << 20, client_max_fds: 16, write_multiple: true });
        let read = Writer::default().u64(0).u32(CONFIG_REGION).u32(4).0;
        let read = message(1, CMD_REGION_READ, TYPE_COMMAND, 0, &read);
        let write = Writer::default().u64(ATQBAL).u32(0).u32(4).u32(0x1234_5000).0;
        let write = message(2, CMD_REGION_WRITE, TYPE_COMMAND | FLAG_NO_REPLY, 0, &write);
        RequestPath { dev, mem, negotiated, limits, mig: Migration::new(false), framer, read, write, reply_bytes: 0 }
    }

    /// Feeds the prepared write (or read) message as one read from the socket and handles it; the reply (None if
    /// posted).
    fn one(&mut self, write: bool) -> Option<Vec<u8>> {
        let bytes = if write { &self.write } else { &self.read };
        self.framer.space()[..bytes.len()].copy_from_slice(bytes);
        self.framer.commit(bytes.len(), Vec::new(), false);
        let Some(Event::Message(mut m)) = self.framer.next_event() else { panic!("no message framed") };
        let mut ctx = Ctx {
            device: &mut self.dev,
            mem: &self.mem,
            negotiated: &mut self.negotiated,
            limits: &self.limits,
            mig: &mut self.mig,
        };
        let Step::Reply(r) = ctx.handle(&mut m) else { panic!("a region access waited") };
        let h = m.header;
        let r = r.unwrap_or_else(|e| panic!("{} failed: errno {}", command_name(h.cmd), e.0));
        if h.no_reply() {
            return None;
        }
        let reply = message(h.id, h.cmd, TYPE_REPLY, 0, &r.payload);
        self.reply_bytes += reply.len() as u64;
        Some(reply)
    }

    /// One 4-byte REGION_READ of config space offset 0, framed, handled and replied to; the value read.
    pub fn region_read_config(&mut self) -> u32 {
        let reply = self.one(false).expect("REGION_READ has a reply");
        assert_eq!(reply.len(), HEADER_SIZE + 20, "REGION_READ reply size");
        u32::from_le_bytes(reply[HEADER_SIZE + 16..].try_into().expect("4 bytes"))
    }

    /// One posted (no reply) 4-byte REGION_WRITE to ATQBAL in BAR0, framed and handled.
    pub fn posted_write_bar0(&mut self) {
        assert!(self.one(true).is_none(), "a posted write was answered");
    }

    /// ATQBAL as the device has it, to check that the posted writes landed.
    pub fn atqbal(&mut self) -> u32 {
        let mut b = [0u8; 4];
        device::VfioDevice::region_read(&mut self.dev, 0, ATQBAL, &mut b).expect("BAR0 read");
        u32::from_le_bytes(b)
    }
}
