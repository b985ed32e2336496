#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a fixed time, one after the
# other, one job each, and prints a table: target, seconds, executions,
# crashes (inputs libFuzzer saved as crash-*, oom-* or timeout-*).
#
#   tools/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600. Without TARGETs, all of them run.
#
# cargo fuzz needs nightly-only rustc flags (-Z...). Only the stable
# toolchain is installed here, so RUSTC_BOOTSTRAP=1 lets stable rustc accept
# them; with a nightly toolchain, `cargo +nightly fuzz` works as well.
# Targets are built with optimisations and debug assertions (so integer
# overflow panics) and without a sanitizer (`--sanitizer none`): the
# workspace denies unsafe code, and AddressSanitizer builds of candle and
# parquet on a 2-core machine took too long. Set FUZZ_SANITIZER=address to
# build with ASan instead.
#
# The seeds in fuzz/corpus/<target>/ are read, never written: new inputs go
# to $FUZZ_WORK/corpus/<target>/ and crashes to $FUZZ_WORK/artifacts/<target>/
# (FUZZ_WORK defaults to target/fuzz-work under the build directory).
# Reproduce a crash with `tools/fuzz/run.sh repro TARGET FILE`.
#
# FUZZ_KEEP_GOING=1 runs libFuzzer's fork mode (still one job) and goes on
# after a crash or out-of-memory, e.g. past a known crash in a dependency;
# the crashes are counted and saved all the same.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/agfsync-target-fuzz}
work=${FUZZ_WORK:-$CARGO_TARGET_DIR/fuzz-work}
sanitizer=${FUZZ_SANITIZER:-none}
flags=(-O -a --sanitizer "$sanitizer")
cd "$repo/fuzz"

if [[ ${1:-} == repro ]]; then
    exec cargo fuzz run "${flags[@]}" "$2" "$3"
fi

seconds=${1:-600}
shift || true
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build "${flags[@]}"

summary="$work/summary.tsv"
mkdir -p "$work"
printf 'target\tseconds\texecutions\tcrashes\n' >"$summary"
status=0
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t" "corpus/$t"
    log="$work/$t.log"
    echo "== $t: ${seconds}s" >&2
    start=$(date +%s)
    # libFuzzer exits non-zero on the first crash; the table still gets a row.
    keep=()
    if [[ ${FUZZ_KEEP_GOING:-0} == 1 ]]; then
        keep=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
    fi
    cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/" "${keep[@]}" \
        >"$log" 2>&1 || status=1
    took=$(($(date +%s) - start))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    if [[ -z $execs ]]; then
        # Fork mode reports `#<executions>: cov: ...` lines instead.
        execs=$(grep -o '^#[0-9]*: cov' "$log" | tr -dc '0-9\n' | tail -1 || true)
    fi
    crashes=$(find "$work/artifacts/$t" -type f \( -name "crash-*" -o -name "oom-*" -o -name "timeout-*" \) | wc -l)
    printf '%s\t%s\t%s\t%s\n' "$t" "$took" "${execs:-?}" "$crashes" | tee -a "$summary" >&2
done
echo "summary: $summary" >&2
column -t "$summary"
exit $status
