//! The three ways a client could lock every later client out (issue 7's facts), each over the real socket. Each
//! test fails on a server that has the fault: the later client never gets its reply.

use std::time::Duration;

use client_tests::*;

/// A fresh client is served: VERSION and a config read within `REPLY_TIMEOUT`.
#[track_caller]
fn fresh_client_served(s: &ServerProcess, what: &str) {
    let mut c = s.connect();
    c.timeout = Duration::from_secs(5);
    let r = c.version(QEMU_LIKE_CAPS);
    assert_eq!(r.errno, None, "{what}: the next client's VERSION failed");
    let v = c.read32(CONFIG, 0);
    assert_eq!(v, 0x154c_8086, "{what}: the next client's config read");
}

#[test]
fn half_header_then_close_does_not_wedge_the_server() {
    let mut s = ServerProcess::start();
    for cut in [1usize, 10, 15] {
        let mut c = s.connect_negotiated();
        let h = Header { id: c.fresh_id(), cmd: cmd::REGION_READ, size: 32, flags: 0, errno: 0 };
        // Bytes and FIN in one go, before the server reads: the read that returns them is short.
        c.send_bytes(&h.to_bytes()[..cut], &[]).unwrap();
        drop(c);
        fresh_client_served(&s, &format!("after {cut} header bytes and a close"));
    }
    // The same after a complete message and a close with nothing pending: the classic case.
    let mut c = s.connect_negotiated();
    let id = c.send(cmd::REGION_READ, &Payload::new().u64(0).u32(CONFIG).u32(4).build(), &[], false).unwrap();
    let _ = id;
    drop(c);
    fresh_client_served(&s, "after a request and a close");
    s.assert_alive();
}

#[test]
fn a_first_message_typed_reply_gets_an_error_reply() {
    let mut s = ServerProcess::start();
    let mut c = s.connect();
    let id = c.send_with_header(cmd::VERSION, TYPE_REPLY, 0, None, &Payload::new().u16(0).u16(0).build(), &[]).unwrap();
    let r = c.recv_reply(id).expect("a reply to a reply-typed first message");
    r.assert_errno(libc::EINVAL, "reply-typed first message");
    // The connection still works: VERSION is accepted after it.
    assert_eq!(c.version(QEMU_LIKE_CAPS).errno, None);
    assert_eq!(c.read32(CONFIG, 0), 0x154c_8086);
    drop(c);
    fresh_client_served(&s, "after a reply-typed first message");
    s.assert_alive();
}

#[test]
fn an_impossible_size_is_answered_and_the_connection_closed() {
    let mut s = ServerProcess::start();
    for size in [u32::MAX, 0x8000_0000, 16 + (64 << 20) + 4096 + 1] {
        let mut c = s.connect_negotiated();
        let id = c.send_with_header(cmd::REGION_WRITE, 0, 0, Some(size), &[], &[]).unwrap();
        c.recv_reply(id).expect("E2BIG").assert_errno(libc::E2BIG, &format!("size {size:#x}"));
        assert!(c.closed_within(Duration::from_secs(5)), "size {size:#x}: connection left open");
        fresh_client_served(&s, &format!("after a message of size {size:#x}"));
    }
    s.assert_alive();
}
