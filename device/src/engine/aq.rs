//! The admin queue engine: the VF's transmit queue (ATQ) in guest memory, ARQ delivery and the VF reset
//! sequence, on the admin queue worker.
//!
//! The device state lock is held only to read or update registers, never across a guest-memory access, because
//! with fd-less guest RAM each access is a round trip to the client.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::core::{AqWork, Core};
use crate::engine::derive;
use crate::event::Event;
use crate::fault::AqVerdict;
use crate::nic::adminq::*;
use crate::nic::regs::*;
use crate::nic::virtchnl::{self, After, Pf};
use crate::state::ResetPhase;

/// How long each reset phase lasts before the next: the PF's warning period, then RSTAT's two steps.
fn phase_delay(p: ResetPhase) -> Duration {
    match p {
        ResetPhase::Impending => Duration::from_millis(50),
        _ => Duration::from_millis(1),
    }
}

/// How often a reset held by reset-stuck looks whether the fault was cleared (a clear through the control socket
/// pokes the worker at once).
const STUCK_RECHECK: Duration = Duration::from_millis(100);

/// How long the phase `p` lasts: [`phase_delay`], and for INPROGRESS (what the driver waits on) the reset-slow
/// fault's extra time.
fn step_delay(core: &Core, p: ResetPhase) -> Duration {
    let d = phase_delay(p);
    if p != ResetPhase::InProgress {
        return d;
    }
    match core.cfg.faults.reset_delay() {
        Some(extra) => {
            log::warn!("reset-slow fault: the VF reset takes {} ms longer", extra.as_millis());
            d + extra
        }
        None => d,
    }
}

pub(crate) fn worker(core: &Core, rx: Receiver<AqWork>) {
    let faults = core.cfg.faults.clone();
    // When the current reset phase ends; None when no reset is under way (or it must be timed afresh).
    let mut next_step: Option<Instant> = None;
    // The reset under way is held at INPROGRESS by reset-stuck (counted and logged once per reset).
    let mut stuck = false;
    // link-flap: when the link changes next.
    let mut next_flap: Option<Instant> = None;
    // A link fault (link-down, link-flap) took the link down: restored when none is set any more.
    let mut forced_down = faults.link_down();
    loop {
        let phase = core.lock().nic.reset;
        let reset_at = if phase == ResetPhase::Idle {
            next_step = None;
            stuck = false;
            None
        } else {
            Some(*next_step.get_or_insert_with(|| Instant::now() + step_delay(core, phase)))
        };
        match faults.link_flap() {
            Some(period) => {
                next_flap.get_or_insert_with(|| Instant::now() + period);
            }
            None if next_flap.is_some() => {
                next_flap = None;
                link_faults(core, &mut forced_down); // cleared without a poke
            }
            None => {}
        }
        let msg = match [reset_at, next_flap].into_iter().flatten().min() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_deadline(at),
        };
        match msg {
            Ok(AqWork::Atq) => process_atq(core),
            Ok(AqWork::Arq) => deliver_arq(core),
            Ok(AqWork::PfReset) => pf_initiated_reset(core),
            Ok(AqWork::SetLink { up, cause }) => {
                if up && faults.link_down() {
                    log::warn!("link up ({cause}) refused: the link-down fault holds it down");
                } else {
                    set_link(core, up, cause);
                }
            }
            Ok(AqWork::FaultsChanged) => {
                link_faults(core, &mut forced_down);
                if faults.link_flap().is_none() {
                    next_flap = None;
                }
                if stuck && !faults.is_set("reset-stuck") {
                    next_step = None; // the held reset goes on now
                }
            }
            Ok(AqWork::Pause) => {
                core.pause.park();
                next_step = None; // a phase restarts its time after a pause (or a restore)
            }
            Ok(AqWork::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if next_flap.is_some_and(|t| now >= t) {
                    next_flap = None;
                    flap(core, &mut forced_down);
                }
                if reset_at.is_some_and(|t| now >= t) {
                    next_step = None;
                    if phase == ResetPhase::InProgress && faults.is_set("reset-stuck") {
                        if !stuck {
                            stuck = true;
                            faults.reset_stuck(); // counts it
                            log::warn!("reset-stuck fault: the VF reset stays in progress (RSTAT never VFACTIVE)");
                        }
                        next_step = Some(now + STUCK_RECHECK);
                    } else {
                        stuck = false;
                        advance_reset(core);
                    }
                }
            }
        }
    }
}

/// link-down and link-flap after a change of the faults: link-down takes the link down (and keeps it down);
/// with neither set, a link a fault took down comes back up.
fn link_faults(core: &Core, forced_down: &mut bool) {
    let faults = &core.cfg.faults;
    let up = core.lock().nic.pf.link_up;
    if faults.link_down() {
        if up {
            faults.link_fired(false);
            set_link(core, false, "link-down fault");
        }
        *forced_down = true;
    } else if faults.link_flap().is_none() && *forced_down {
        *forced_down = false;
        if !up {
            set_link(core, true, "link fault cleared");
        }
    }
}

/// link-flap: the link changes (unless link-down holds it down).
fn flap(core: &Core, forced_down: &mut bool) {
    let faults = &core.cfg.faults;
    if faults.link_down() {
        return;
    }
    let up = !core.lock().nic.pf.link_up;
    faults.link_fired(true);
    set_link(core, up, "link-flap fault");
    *forced_down = !up;
}

struct Ring {
    generation: u64,
    base: u64,
    len: u32,
    head: u32,
    tail: u32,
}

/// Reads a queue's registers; None when the queue is disabled (or bus mastering is off: no DMA then).
fn ring(core: &Core, len_reg: u64, bal: u64, bah: u64, head: u64, tail: u64) -> Option<Ring> {
    let mut st = core.lock();
    let lenreg = st.reg(len_reg);
    // A stalled queue (AQ_CRIT, set by `stall`) stays stalled until a reset or until the driver clears the bit:
    // a later kick must not walk it again.
    if lenreg & AQ_ENABLE == 0 || lenreg & AQ_CRIT != 0 || !st.bus_master() {
        return None;
    }
    let r = Ring {
        generation: st.generation,
        base: u64::from(st.reg(bal)) | (u64::from(st.reg(bah)) << 32),
        len: lenreg & AQ_LEN_MASK,
        // Masked: through a mapped doorbell page the driver can store any value.
        head: st.reg(head) & AQ_LEN_MASK,
        tail: st.reg(tail) & AQ_LEN_MASK,
    };
    if core.mem.deriving() {
        let which = if len_reg == VF_ATQLEN1 { derive::Ring::Atq } else { derive::Ring::Arq };
        let span = st.observe(which, r.base, r.len, r.head, r.tail, 0);
        drop(st);
        derive::mark(core, span);
    }
    Some(r)
}

/// Marks a queue critically broken (LEN.CRIT), as hardware does on a head/tail outside the ring.
fn stall(core: &Core, len_reg: u64, why: std::fmt::Arguments<'_>) {
    log::error!("{why}; admin queue stalled until reset");
    {
        let mut st = core.lock();
        let v = st.reg(len_reg) | AQ_CRIT;
        st.set_reg(len_reg, v);
    }
    let ring = if len_reg == VF_ATQLEN1 { "ATQ" } else { "ARQ" };
    core.malicious_driver(None, format!("{ring}: {why}"));
}

/// Processes ATQH..ATQT: read each descriptor and its buffer, handle it, write it back with DD|CMP, then advance
/// ATQH (the driver takes "head == tail" as done, so the head moves only after the writeback).
pub(crate) fn process_atq(core: &Core) {
    while let Some(r) = ring(core, VF_ATQLEN1, VF_ATQBAL1, VF_ATQBAH1, VF_ATQH1, VF_ATQT1) {
        if r.head == r.tail {
            break;
        }
        if r.len == 0 || r.head >= r.len || r.tail >= r.len {
            return stall(
                core,
                VF_ATQLEN1,
                format_args!("ATQ head {} / tail {} outside ring of {}", r.head, r.tail, r.len),
            );
        }
        let Some(at) = r.base.checked_add(u64::from(r.head) * DESC_SIZE) else {
            return stall(core, VF_ATQLEN1, format_args!("ATQ base {:#x} wraps the address space", r.base));
        };
        let mut raw = [0u8; 32];
        if let Err(e) = core.dma_read(at, &mut raw) {
            return stall(core, VF_ATQLEN1, format_args!("ATQ descriptor {} at {at:#x}: {e}", r.head));
        }
        let mut d = Desc::from_bytes(&raw);
        let after = handle(core, &d, r.generation);
        d.flags |= FLAG_DD | FLAG_CMP;
        if after.is_err() {
            d.flags |= FLAG_ERR;
        }
        if core.lock().generation != r.generation {
            return; // reset while we worked: the ring is gone
        }
        if let Err(e) = core.dma_write(at, &d.to_bytes()) {
            return stall(core, VF_ATQLEN1, format_args!("ATQ writeback {} at {at:#x}: {e}", r.head));
        }
        {
            let mut st = core.lock();
            if st.generation != r.generation {
                return;
            }
            st.set_reg(VF_ATQH1, (r.head + 1) % r.len);
            if after == Ok(After::LinkUp) {
                let ev = st.nic.pf.link_event(st.nic.pf.link_up);
                st.post(virtchnl::OP_EVENT, 0, ev);
            }
        }
        if after == Ok(After::ResetVf) {
            log::info!("VF reset: in progress");
            let mut st = core.lock();
            st.reset_started("vf");
            st.vf_reset();
            return;
        }
        deliver_arq(core);
    }
    deliver_arq(core);
}

/// Handles one ATQ descriptor. Virtchnl replies are queued for the ARQ; Err completes the descriptor with ERR.
fn handle(core: &Core, d: &Desc, generation: u64) -> Result<After, ()> {
    match d.opcode {
        OP_QUEUE_SHUTDOWN => {
            log::debug!("ATQ: queue shutdown (param0 {})", d.param0);
            Ok(After::Nothing)
        }
        OP_SEND_TO_PF => {
            let op = d.cookie_high;
            let len = usize::from(d.datalen);
            let mut msg = vec![0u8; len];
            if len > 0 {
                if d.flags & FLAG_BUF == 0 || len > MAX_MSG {
                    log::warn!("virtchnl op {op}: {len} bytes without a buffer or over {MAX_MSG}");
                    return Err(());
                }
                let addr = (u64::from(d.addr_high) << 32) | u64::from(d.addr_low);
                if let Err(e) = core.dma_read(addr, &mut msg) {
                    log::warn!("virtchnl op {op}: message buffer: {e}");
                    if core.injected_dma.load(std::sync::atomic::Ordering::SeqCst) {
                        core.malicious_driver(None, format!("ATQ: virtchnl op {op}: message buffer: {e}"));
                    }
                    return Err(());
                }
            }
            let verdict = core.cfg.faults.aq_reply(op);
            let mut st = core.lock();
            if st.generation != generation {
                return Ok(After::Nothing);
            }
            log::debug!("virtchnl: <- op {op} ({len} bytes)");
            if verdict == AqVerdict::Error {
                // aq-error: the op is refused as the PF refuses a bad request: not applied, an error status.
                log::warn!("aq-error fault: virtchnl op {op} answered with VIRTCHNL_STATUS_ERR_PARAM");
                st.post(op, virtchnl::STATUS_ERR_PARAM, Vec::new());
                return Ok(After::Nothing);
            }
            let out = st.nic.pf.handle(op, &msg);
            let ok = matches!(out.reply, Some((0, _)));
            if op == virtchnl::OP_CONFIG_VSI_QUEUES && ok {
                for q in &mut st.nic.queues {
                    (q.tx_head, q.rx_head) = (0, 0); // fresh rings start at descriptor 0
                }
            }
            if matches!(op, virtchnl::OP_CONFIG_VSI_QUEUES | virtchnl::OP_ENABLE_QUEUES | virtchnl::OP_DISABLE_QUEUES) {
                st.observed.forget_queues();
            }
            let enabled = (st.nic.pf.rx_enabled, st.nic.pf.tx_enabled);
            match out.reply {
                Some(_) if verdict == AqVerdict::Drop => {
                    log::warn!("aq-drop fault: the reply to virtchnl op {op} is dropped");
                }
                Some((status, payload)) => st.post(op, status, payload),
                None => {}
            }
            drop(st);
            if op == virtchnl::OP_ENABLE_QUEUES && ok {
                // Tails are latched even before a queue is configured (a driver opened early, as by a failover
                // master while it registers, may post a frame then): as hardware does, an enabled queue starts
                // from its head up to whatever tail was written.
                for q in 0..16u16 {
                    if enabled.1 & (1 << q) != 0 {
                        super::tx::drop_stale_tail(core, q);
                        core.kick_tail(q, false);
                    }
                    if enabled.0 & (1 << q) != 0 {
                        core.kick_tail(q, true);
                    }
                }
            }
            Ok(out.after)
        }
        op => {
            log::debug!("ATQ: opcode {op:#06x} completed without action");
            Ok(After::Nothing)
        }
    }
}

/// Moves queued PF -> VF messages into the ARQ's posted buffers while there are free slots, then raises the
/// admin queue interrupt cause.
pub(crate) fn deliver_arq(core: &Core) {
    while let Some(r) = ring(core, VF_ARQLEN1, VF_ARQBAL1, VF_ARQBAH1, VF_ARQH1, VF_ARQT1) {
        if r.len == 0 || r.head >= r.len || r.tail >= r.len {
            return stall(
                core,
                VF_ARQLEN1,
                format_args!("ARQ head {} / tail {} outside ring of {}", r.head, r.tail, r.len),
            );
        }
        // Slots head..tail belong to the device; head == tail means none is free.
        if r.head == r.tail {
            // A driver with the ARQ tail mapped returns buffers without a message: watch for it.
            core.wake_poller();
            return;
        }
        let Some(m) = core.lock().nic.arq.pop_front() else { return };
        let Some(at) = r.base.checked_add(u64::from(r.head) * DESC_SIZE) else {
            return stall(core, VF_ARQLEN1, format_args!("ARQ base {:#x} wraps the address space", r.base));
        };
        let mut raw = [0u8; 32];
        if let Err(e) = core.dma_read(at, &mut raw) {
            return stall(core, VF_ARQLEN1, format_args!("ARQ descriptor {} at {at:#x}: {e}", r.head));
        }
        let mut d = Desc::from_bytes(&raw);
        let buf = (u64::from(d.addr_high) << 32) | u64::from(d.addr_low);
        if !m.payload.is_empty() && (d.flags & FLAG_BUF == 0 || usize::from(d.datalen) < m.payload.len()) {
            log::error!(
                "ARQ slot {} has no room ({} byte buffer, flags {:#x}) for op {} ({} bytes): message dropped",
                r.head,
                d.datalen,
                d.flags,
                m.op,
                m.payload.len()
            );
            continue;
        }
        if !m.payload.is_empty() {
            if let Err(e) = core.dma_write(buf, &m.payload) {
                return stall(core, VF_ARQLEN1, format_args!("ARQ buffer {buf:#x}: {e}"));
            }
        }
        d.flags = (d.flags & (FLAG_BUF | FLAG_LB)) | FLAG_DD | FLAG_CMP;
        d.opcode = OP_SEND_TO_VF;
        d.datalen = m.payload.len() as u16;
        d.retval = 0;
        d.cookie_high = m.op;
        d.cookie_low = m.status as u32;
        if core.lock().generation != r.generation {
            return;
        }
        if let Err(e) = core.dma_write(at, &d.to_bytes()) {
            return stall(core, VF_ARQLEN1, format_args!("ARQ writeback {} at {at:#x}: {e}", r.head));
        }
        let mut st = core.lock();
        if st.generation != r.generation {
            return;
        }
        st.set_reg(VF_ARQH1, (r.head + 1) % r.len);
        log::debug!("virtchnl: -> op {} status {} ({} bytes)", m.op, m.status, m.payload.len());
        st.raise_misc(ICR0_ADMINQ);
    }
}

/// Moves a reset on to its next phase: the PF's warning ends in the reset itself (state cleared, RSTAT
/// INPROGRESS), then RSTAT reads COMPLETED, then VFACTIVE.
fn advance_reset(core: &Core) {
    let mut st = core.lock();
    match st.nic.reset {
        ResetPhase::Idle => {}
        ResetPhase::Impending => {
            log::info!("VF reset: in progress");
            st.vf_reset();
        }
        ResetPhase::InProgress => {
            // Hardware holds the VF's registers in reset until the reset completes: a tail the driver wrote
            // meanwhile (a frame sent on the old ring) must not survive into the new rings, where ENABLE_QUEUES
            // would act on it as a latched kick.
            st.clear_registers();
            st.set_reg(VFGEN_RSTAT, RSTAT_COMPLETED);
            st.nic.reset = ResetPhase::Completed;
            log::info!("VF reset: completed");
        }
        ResetPhase::Completed => {
            st.set_reg(VFGEN_RSTAT, RSTAT_VFACTIVE);
            st.nic.reset = ResetPhase::Idle;
            log::info!("VF reset: VF active");
            st.reset_finished();
        }
    }
}

/// The PF changes the link state it reports: a LINK_CHANGE event to the driver and to the control clients, when
/// it changed.
pub(crate) fn set_link(core: &Core, up: bool, cause: &'static str) {
    let speed = {
        let mut st = core.lock();
        if st.nic.pf.link_up == up {
            return;
        }
        st.nic.pf.link_up = up;
        let ev = st.nic.pf.link_event(up);
        st.post(virtchnl::OP_EVENT, 0, ev);
        st.nic.pf.link_speed.0
    };
    log::info!("link {} ({cause})", if up { "up" } else { "down" });
    core.cfg.events.emit(Event::LinkChange { up, speed_mbps: speed, cause: cause.into() });
    deliver_arq(core);
}

/// A reset the PF starts: warn the driver with RESET_IMPENDING; the reset follows after the warning period.
fn pf_initiated_reset(core: &Core) {
    log::info!("PF-initiated VF reset: sending RESET_IMPENDING");
    {
        let mut st = core.lock();
        st.post(virtchnl::OP_EVENT, 0, Pf::reset_impending_event());
        if st.nic.reset == ResetPhase::Idle {
            st.reset_started("pf");
            st.nic.reset = ResetPhase::Impending;
        }
    }
    deliver_arq(core);
}
