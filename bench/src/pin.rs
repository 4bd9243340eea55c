//! Explicit CPU placement. On a small VM a round trip costs about 4x more when the two partners run on different
//! CPUs (every message is a cross-CPU wake-up) than when they share one (a direct context switch), and left alone
//! the scheduler picks differently for different pairs. So the bench pins its own (only) thread and the thread of
//! the answering process that serves the socket, and measures each placement separately.

use std::fs;

use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// Where the answering process (ping-pong peer or server) runs relative to the client.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Placement {
    /// Client and answering thread pinned to the same CPU: every message is a context switch on that CPU.
    #[value(name = "same")]
    Same,
    /// Client and answering thread pinned to two different CPUs: every message wakes the other CPU.
    #[value(name = "cross")]
    Cross,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Cross => "cross",
        }
    }
}

/// The CPUs used: the client's, and the other one for `cross` (none on a single-CPU machine).
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub client: usize,
    pub other: Option<usize>,
}

impl Cpus {
    /// The first two CPUs this process may run on (normally 0 and 1).
    pub fn allowed() -> Result<Cpus, String> {
        let set = sched_getaffinity(None).map_err(|e| format!("sched_getaffinity: {e}"))?;
        let mut it = (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c));
        let client = it.next().ok_or("sched_getaffinity: empty CPU set")?;
        Ok(Cpus { client, other: it.next() })
    }

    /// The answering thread's CPU under `p`, if the machine has it.
    pub fn peer(self, p: Placement) -> Option<usize> {
        match p {
            Placement::Same => Some(self.client),
            Placement::Cross => self.other,
        }
    }
}

/// Pins thread `tid` (`None`: the calling thread) to `cpu` alone, and checks that it took.
pub fn pin(tid: Option<Pid>, cpu: usize) -> Result<(), String> {
    let who = tid.map_or("this thread".to_string(), |p| format!("thread {}", p.as_raw_nonzero()));
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(tid, &set).map_err(|e| format!("pinning {who} to CPU {cpu}: {e}"))?;
    let got = sched_getaffinity(tid).map_err(|e| format!("reading back the affinity of {who}: {e}"))?;
    if got != set {
        return Err(format!("{who} should be pinned to CPU {cpu} but may run on {}", cpu_list(&got)));
    }
    Ok(())
}

/// "0" or "0,1" or "none".
fn cpu_list(set: &CpuSet) -> String {
    let v: Vec<String> = (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).map(|c| c.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// One thread of a process: id, name, the CPUs it may run on, its on-CPU time so far (ns).
pub struct ThreadInfo {
    pub tid: i32,
    pub comm: String,
    pub cpus: String,
    pub cpu_ns: u64,
}

/// The threads of process `pid`, main thread first.
pub fn threads(pid: u32) -> Result<Vec<ThreadInfo>, String> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let entry = entry.map_err(|e| format!("{dir}: {e}"))?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let read = |f: &str| fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        let cpus = Pid::from_raw(tid)
            .and_then(|p| sched_getaffinity(Some(p)).ok())
            .map_or_else(|| "?".to_string(), |s| cpu_list(&s));
        let cpu_ns = read("schedstat").split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push(ThreadInfo { tid, comm: read("comm").trim().to_string(), cpus, cpu_ns });
    }
    out.sort_by_key(|t| (t.tid != pid as i32, t.tid));
    Ok(out)
}
