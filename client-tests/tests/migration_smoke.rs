//! The shortest complete device-state migration between two server processes over the real sockets: the source
//! goes RUNNING -> PRE_COPY -> STOP_COPY, the destination STOP -> RESUMING -> STOP -> RUNNING, and the destination
//! then shows the source's register state.

use client_tests::reg::*;
use client_tests::*;

const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const MIG_STATE: u32 = 2;

fn set_state(c: &mut Client, state: u32) -> Reply {
    let p = Payload::new().u32(16).u32(SET | MIG_STATE).u32(state).u32(u32::MAX).build();
    c.call(cmd::DEVICE_FEATURE, &p, &[])
}

fn get_state(c: &mut Client) -> u32 {
    let p = Payload::new().u32(16).u32(GET | MIG_STATE).build();
    let r = c.call(cmd::DEVICE_FEATURE, &p, &[]).ok("GET MIG_DEVICE_STATE");
    r.u32_at(8)
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let r = c.call(cmd::MIG_DATA_READ, &Payload::new().u32(8 + 4096).u32(4096).build(), &[]).ok("MIG_DATA_READ");
        let n = r.u32_at(4) as usize;
        assert_eq!(r.payload.len(), 8 + n);
        out.extend_from_slice(&r.payload[8..]);
        if n < 4096 {
            return out;
        }
    }
}

fn write_all(c: &mut Client, data: &[u8]) {
    for chunk in data.chunks(1000) {
        let p = Payload::new().u32(8 + chunk.len() as u32).u32(chunk.len() as u32).bytes(chunk).build();
        c.call(cmd::MIG_DATA_WRITE, &p, &[]).ok("MIG_DATA_WRITE");
    }
}

#[test]
fn device_state_moves_between_two_servers() {
    let mut src_s = ServerProcess::start();
    let mut dst_s = ServerProcess::start();
    let mut src = src_s.connect_negotiated();
    let mut dst = dst_s.connect_negotiated();
    // Some state to carry: admin queue registers and the PCI command register.
    src.write32(BAR0, VF_ATQBAL1, 0x1234_5000);
    src.write32(BAR0, VF_ATQLEN1, 32 | AQ_ENABLE);
    src.write32(CONFIG, 4, 6);
    assert_eq!(get_state(&mut src), 2, "RUNNING at start");

    set_state(&mut src, 6).ok("RUNNING -> PRE_COPY");
    let compat = read_all(&mut src);
    assert!(!compat.is_empty() && compat.len() < 4096, "a compat record first: {} bytes", compat.len());
    set_state(&mut dst, 4).ok("RUNNING -> RESUMING (through STOP)");
    write_all(&mut dst, &compat);
    set_state(&mut src, 3).ok("PRE_COPY -> STOP_COPY");
    let state = read_all(&mut src);
    assert!(state.len() < 16 * 1024, "state record of {} bytes", state.len());
    write_all(&mut dst, &state);
    set_state(&mut dst, 1).ok("RESUMING -> STOP loads the state");
    set_state(&mut dst, 2).ok("STOP -> RUNNING");
    assert_eq!(dst.read32(BAR0, VF_ATQBAL1), 0x1234_5000);
    assert_eq!(dst.read32(BAR0, VF_ATQLEN1), 32 | AQ_ENABLE);
    assert_eq!(dst.read32(CONFIG, 4) & 0xffff, 6);
    // The source can be told to run again (an abandoned migration).
    set_state(&mut src, 2).ok("STOP_COPY -> RUNNING");
    assert_eq!(get_state(&mut src), 2);
    src_s.assert_alive();
    dst_s.assert_alive();
}
