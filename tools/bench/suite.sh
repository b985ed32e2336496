#!/usr/bin/env bash
# The CPU benchmark suite: every workload of `agfsync bench` and of its PyTorch twin
# (tools/bench/torch_bench.py) on this machine, one after the other, then one table
# (tools/bench/table.py): times, ratios, peak memory, achieved GFLOP/s.
#
#   tools/bench/suite.sh [quick]
#
# Results go to $OUT (default ./bench-out): results.jsonl, flops.json, table.md, log.txt.
# Run it on an otherwise idle machine: both sides use $THREADS threads (default: the
# physical cores), and contention skews the ratios. `quick` skips SDXL and the full-UNet
# DPO steps (about 17 GB each side). PEAK_GFLOPS (default: cores x 32 f32 FLOPs per cycle
# x 3.0 GHz, an AVX2 machine with two FMA pipes) sets the peak the table compares with.
# The GPU suite is tools/cuda/gpu_bench.sh.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${OUT:-$repo/bench-out}"
mkdir -p "$out"
results="$out/results.jsonl"
logf="$out/log.txt"
: >"$results"
: >"$logf"
say() { echo "$*" | tee -a "$logf" >&2; }

cores=$(lscpu -p=CORE 2>/dev/null | grep -v '^#' | sort -u | wc -l)
[[ "$cores" -gt 0 ]] || cores=$(nproc)
threads="${THREADS:-$cores}"
peak="${PEAK_GFLOPS:-$((cores * 32 * 3))}"
export RAYON_NUM_THREADS="$threads"

say "building the release binary"
(cd "$repo" && cargo build --release -q -p agfsync-cli) 2>>"$logf" || {
    say "build failed: see $logf"
    exit 1
}
bin="${CARGO_TARGET_DIR:-$repo/target}/release/agfsync"

both() { # arch workload args...
    local arch="$1" work="$2"
    shift 2
    say "[$(date +%T)] agfsync $arch $work $*"
    "$bin" -q bench --device cpu --dtype f32 --arch "$arch" --workload "$work" "$@" >>"$results" 2>>"$logf" ||
        say "   agfsync $arch $work failed (rc $?), see $logf"
    say "[$(date +%T)] pytorch $arch $work $*"
    python3 "$here/torch_bench.py" --device cpu --dtype f32 --threads "$threads" --arch "$arch" \
        --workload "$work" "$@" >>"$results" 2>>"$logf" ||
        say "   pytorch $arch $work failed (rc $?), see $logf"
}

both sd15 unet --latent 32 --iters 5 --warmup 2
both sd15 vae --size 256 --iters 3 --warmup 1
both sd15 sample --size 256 --steps 4 --iters 1 --warmup 1
both sd15 clip --clip-batch 8 --iters 3 --warmup 1
# LLaVA-1.5 at 7B widths with 4 of its 32 decoder layers (28 GB in f32 whole); PyTorch's
# prompt is given agfsync's token count.
say "[$(date +%T)] agfsync vqa"
"$bin" -q bench --device cpu --dtype f32 --workload vqa --questions 4 --vqa-layers 4 --iters 1 --warmup 1 \
    >>"$results" 2>>"$logf" || say "   agfsync vqa failed (rc $?), see $logf"
text_tokens=$(python3 -c 'import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(next((r["question_tokens"] for r in reversed(rows) if r.get("bench")=="vqa"), 27))' "$results")
say "[$(date +%T)] pytorch vqa ($text_tokens prompt tokens)"
python3 "$here/torch_bench.py" --device cpu --dtype f32 --threads "$threads" --workload vqa --questions 4 \
    --vqa-layers 4 --vqa-text-tokens "$text_tokens" --iters 1 --warmup 1 >>"$results" 2>>"$logf" ||
    say "   pytorch vqa failed (rc $?), see $logf"
both sd15 dpo --latent 32 --pairs 1 --iters 2 --warmup 1
both sd15 dpo --latent 32 --pairs 1 --iters 2 --warmup 1 --gradient-checkpointing
if [[ "${1:-}" != quick ]]; then
    both sdxl unet --latent 32 --iters 5 --warmup 2
    both sd15 dpo --latent 32 --pairs 1 --iters 1 --warmup 1 --full --gradient-checkpointing
fi

say "[$(date +%T)] counting FLOPs"
(cd "$here" && python3 flops.py --latent 32 --vae-size 256 >"$out/flops.json") 2>>"$logf" || say "flops.py failed, see $logf"
machine="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1), $cores cores, $threads threads, $(date +%F)"
python3 "$here/table.py" "$results" --title "agfsync CPU benchmark" --machine "$machine" \
    --flops "$out/flops.json" --peak-gflops "$peak" >"$out/table.md"
cat "$out/table.md"
say "done: $out/table.md"
