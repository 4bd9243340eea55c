//! The instruction-count gate (`vfu-icount`) fails when a count regresses: a baseline recorded by this very binary
//! passes, and the same workloads with an injected 10% regression (a calibrated spin loop per operation) fail with
//! a non-zero exit and name each workload. The baseline is recorded here rather than taken from
//! `bench/icount-baseline.json` because `cargo test` builds the binary without optimisations, whose counts the
//! committed (release) baselines do not describe; the binary refuses that comparison. Needs valgrind; skipped
//! (with a message) without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vfu-icount");
const WORKLOADS: &str = "request-read,frame-rx";

fn have_valgrind() -> bool {
    Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn run(args: &[&str], baseline: &Path) -> Output {
    let out = Command::new(BIN).args(args).arg("--baseline").arg(baseline).output().expect("running vfu-icount");
    eprintln!(
        "$ vfu-icount {} --baseline {}\n{}{}",
        args.join(" "),
        baseline.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn injected_regression_fails_the_gate() {
    if !have_valgrind() {
        eprintln!("SKIPPED: valgrind is not installed, the instruction-count gate cannot be tested");
        return;
    }
    let baseline = TempFile(std::env::temp_dir().join(format!("vfu-icount-test-{}.json", std::process::id())));
    let b = &baseline.0;

    let rec = run(&["--quick", "--only", WORKLOADS, "--update"], b);
    assert!(rec.status.success(), "recording baselines failed");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(b).unwrap()).unwrap();
    for w in WORKLOADS.split(',') {
        assert!(file["workloads"][w]["per_op"].as_f64().is_some_and(|v| v > 0.0), "no baseline for {w}");
    }

    let same = run(&["--quick", "--only", WORKLOADS], b);
    assert!(same.status.success(), "the gate failed against a baseline just recorded");
    let text = stdout(&same);
    for w in WORKLOADS.split(',') {
        assert!(text.contains(&format!("icount name={w} ")), "no icount line for {w}");
    }
    assert!(!text.contains("REGRESSION"));

    let worse = run(&["--quick", "--only", WORKLOADS, "--inject-regression", "10"], b);
    assert_eq!(worse.status.code(), Some(1), "a 10% regression must fail the gate with exit status 1");
    let text = stdout(&worse);
    for w in WORKLOADS.split(',') {
        let line = text.lines().find(|l| l.starts_with(&format!("icount name={w} "))).expect("icount line");
        assert!(line.contains("status=REGRESSION"), "{w} not flagged: {line}");
        let ratio: f64 = line.split(" ratio=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!((1.08..1.12).contains(&ratio), "{w}: an injected 10% reads as ratio {ratio}");
    }
    assert!(String::from_utf8_lossy(&worse.stderr).contains("REGRESSION request-read"));
}

#[test]
fn missing_valgrind_skips_loudly() {
    let out = Command::new(BIN).args(["--quick", "--valgrind", "/nonexistent/valgrind"]).output().unwrap();
    assert!(out.status.success(), "a missing valgrind is a skip, not a failure");
    assert!(stdout(&out).contains("SKIPPED"), "the skip must be visible");
    assert!(stdout(&out).contains("skip name=icount reason=no_valgrind"));
}

#[test]
fn committed_baselines_cover_every_workload() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/icount-baseline.json");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(file["profile"], "release");
    for w in ["request-read", "request-write", "frame-tx", "frame-rx", "dirty-report"] {
        assert!(file["workloads"][w]["per_op"].as_f64().is_some_and(|v| v > 0.0), "no committed baseline for {w}");
    }
}
