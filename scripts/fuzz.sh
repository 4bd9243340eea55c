#!/bin/bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a bounded time: FUZZ_SECONDS each (default 30). Working
# corpora accumulate under build/fuzz/corpus/<target> across runs; the committed seeds in fuzz/corpus/<target> are
# read, never written. A crash leaves its input in build/fuzz/artifacts/ and fails the run: copy it into
# fuzz/regressions/<target>/ so that `cargo test` replays it from then on (server/tests/fuzz_corpus.rs).
# Without the nightly toolchain this says so and exits 0: `cargo test` replays the committed corpora on stable.
# Usage: scripts/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
BUILD=${BUILD:-$PWD/build}
SECONDS_EACH=${FUZZ_SECONDS:-30}
CARGO_FUZZ_VERSION=0.13.2

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain on this machine (rustup toolchain install nightly): fuzzing skipped."
  echo "fuzz.sh: the committed corpora and regressions were replayed on stable by server/tests/fuzz_corpus.rs."
  exit 0
fi

tools="$BUILD/tools"
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$tools" --quiet
fi
export PATH="$tools/bin:$PATH"

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

cd fuzz
cargo +nightly fuzz build -O --target-dir "$BUILD/fuzz/target"
failed=()
for t in "${targets[@]}"; do
  work="$BUILD/fuzz/corpus/$t"
  arts="$BUILD/fuzz/artifacts"
  mkdir -p "$work" "$arts"
  log="$BUILD/fuzz/$t.log"
  if cargo +nightly fuzz run -O --target-dir "$BUILD/fuzz/target" "$t" "$work" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$arts/$t-" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    echo "fuzz $t: ${SECONDS_EACH}s, $runs runs, coverage $cov, no crash"
  else
    echo "fuzz $t: FAILED; input(s) in $arts/$t-*; last lines of $log:"
    tail -30 "$log"
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz.sh: crashes in: ${failed[*]}. Copy each input into fuzz/regressions/<target>/ and fix the bug."
  exit 1
fi
