//! Test helper for `tests/hostile.rs`: a client that dies in the middle of a request.
//!
//! `half-writer SOCKET MODE` connects, negotiates VERSION, then, by MODE:
//! - `header:N`: writes the first N (1..15) bytes of a REGION_READ header;
//! - `payload:N`: writes a DMA_MAP header and the first N (0..31) bytes of its payload, with a memfd attached;
//! - `pipeline:N`: writes N REGION_READ requests and never reads a reply;
//!
//! prints `ready` on stdout and sleeps until it is killed (the test sends SIGKILL to its PID).

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use client_tests::util::memfd;
use client_tests::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, mode] = &args[..] else {
        eprintln!("usage: half-writer SOCKET header:N|payload:N|pipeline:N");
        std::process::exit(2);
    };
    let (kind, n) = mode.split_once(':').unwrap_or_else(|| panic!("bad mode {mode}"));
    let n: usize = n.parse().unwrap_or_else(|_| panic!("bad count in {mode}"));
    let mut c = Client::connect(Path::new(socket)).expect("connect");
    c.negotiate();
    let id = c.fresh_id();
    // Kept open until the process dies: the server holds its own copy of the fd.
    let mem = memfd(0x1000);
    match kind {
        "header" => {
            assert!((1..16).contains(&n), "header:N needs 1 <= N < 16");
            let h = Header { id, cmd: cmd::REGION_READ, size: 32, flags: TYPE_COMMAND, errno: 0 };
            c.send_bytes(&h.to_bytes()[..n], &[]).expect("send");
        }
        "payload" => {
            assert!(n < 32, "payload:N needs N < 32");
            let p = Payload::new().u32(32).u32(DMA_RW).u64(0).u64(0x10_0000).u64(0x1000).build();
            let m = message(id, cmd::DMA_MAP, TYPE_COMMAND, &p);
            c.send_bytes(&m[..HDR_SIZE + n], &[mem.as_fd()]).expect("send");
        }
        "pipeline" => {
            let mut all = Vec::new();
            for _ in 0..n {
                let p = Payload::new().u64(0).u32(CONFIG).u32(4).build();
                all.extend(message(c.fresh_id(), cmd::REGION_READ, TYPE_COMMAND, &p));
            }
            c.send_bytes(&all, &[]).expect("send");
        }
        _ => panic!("unknown mode {kind}"),
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready").and_then(|()| out.flush()).expect("stdout");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
