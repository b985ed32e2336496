#!/usr/bin/env bash
# GPU benchmark of the CUDA build of agfsync against PyTorch/diffusers on the
# same card. Made to run on a lent GPU machine that has no Rust toolchain and
# no network: the binary is built elsewhere by tools/cuda/build.sh and carried
# over (see docs/cuda.md).
#
#   tools/cuda/gpu_bench.sh [path/to/agfsync]
#
# Binary: the argument, else $AGFSYNC_BIN, else .cuda-bundle/agfsync(.gz) in
# the repository (where build.sh puts it).
# Results go to $OUT (default ./gpu-bench-out): gpu_bench.md (the table),
# results.jsonl (one JSON line per workload and implementation), log.txt.
#
# Knobs: AGFSYNC_BENCH_BUDGET_S (default 330): no new group of workloads
# starts after that many seconds; AGFSYNC_BENCH_STEP_TIMEOUT_S (default 120):
# each command's limit; AGFSYNC_BENCH_QUICK=1: only the SD 1.5 groups;
# AGFSYNC_BENCH_TORCH=0: skip PyTorch; AGFSYNC_CUDA_LIBS: a folder with
# libcudart.so.13, libcublas(Lt).so.13 and libcurand.so.10 when
# they are not found on their own; AGFSYNC_WHEELS (default .whl): wheels to
# install (pip --no-index) when diffusers is missing.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
start=$(date +%s)
budget="${AGFSYNC_BENCH_BUDGET_S:-330}"
step_timeout="${AGFSYNC_BENCH_STEP_TIMEOUT_S:-120}"
out="${OUT:-$repo/gpu-bench-out}"
mkdir -p "$out"
results="$out/results.jsonl"
logf="$out/log.txt"
: >"$results"
: >"$logf"

say() { echo "$*" | tee -a "$logf" >&2; }
elapsed() { echo $(($(date +%s) - start)); }

bin="${1:-${AGFSYNC_BIN:-}}"
if [[ -z "$bin" ]]; then
    bin="$repo/.cuda-bundle/agfsync"
    # build.sh stages it gzipped (the plain binary is too big to carry).
    if [[ ! -x "$bin" && -f "$bin.gz" ]]; then
        mkdir -p /tmp/agfsync-bin
        gzip -dc "$bin.gz" >/tmp/agfsync-bin/agfsync && chmod +x /tmp/agfsync-bin/agfsync
        bin=/tmp/agfsync-bin/agfsync
    fi
fi
if [[ -z "$bin" || ! -x "$bin" ]]; then
    say "no agfsync binary: pass its path, set AGFSYNC_BIN, or carry .cuda-bundle/agfsync (tools/cuda/build.sh)"
    exit 2
fi
say "binary: $bin"

# --- the card -----------------------------------------------------------
card="unknown GPU"
if command -v nvidia-smi >/dev/null; then
    card="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
    nvidia-smi >>"$logf" 2>&1
fi
say "card: $card"

# --- runtime libraries --------------------------------------------------
# The binary links libcuda.so.1 (the driver's), and cudart, cublas (with
# cublasLt) and curand of CUDA 13 by soname. Look for them where a CUDA machine
# usually has them: an explicit folder, the toolkit, PyTorch's nvidia wheels.
lib_dirs=()
[[ -n "${AGFSYNC_CUDA_LIBS:-}" ]] && lib_dirs+=("$AGFSYNC_CUDA_LIBS")
[[ -d "$repo/.cuda-bundle/lib" ]] && lib_dirs+=("$repo/.cuda-bundle/lib")
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
    [[ -d "$d" ]] && lib_dirs+=("$d")
done
if command -v python3 >/dev/null; then
    while IFS= read -r d; do
        [[ -n "$d" && -d "$d" ]] && lib_dirs+=("$d")
    done < <(python3 - <<'EOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)
EOF
)
fi
for d in "${lib_dirs[@]}"; do
    LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
missing="$(ldd "$bin" 2>/dev/null | awk '/not found/{print $1}')"
ldd "$bin" >>"$logf" 2>&1
if [[ -n "$missing" ]]; then
    say "missing libraries: $(echo $missing) (searched: ${lib_dirs[*]:-none}); set AGFSYNC_CUDA_LIBS"
    exit 3
fi

# --- PyTorch (optional) -------------------------------------------------
torch_ok=0
if [[ "${AGFSYNC_BENCH_TORCH:-1}" != 0 ]] && command -v python3 >/dev/null; then
    if ! python3 -c "import diffusers" 2>/dev/null; then
        wheels="${AGFSYNC_WHEELS:-$repo/.whl}"
        if compgen -G "$wheels/*.whl" >/dev/null; then
            say "installing carried wheels from $wheels"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/agfsync-site "$wheels"/*.whl >>"$logf" 2>&1 &&
                export PYTHONPATH="/tmp/agfsync-site${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
    if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$logf"; then
        torch_ok=1
        python3 -c "import diffusers" 2>/dev/null ||
            say "diffusers is not importable: the PyTorch UNet/sample/DPO rows are skipped (carry its wheels, docs/cuda.md)"
    else
        say "PyTorch with CUDA is not importable here: only agfsync is timed"
    fi
fi

# --- the runs -----------------------------------------------------------
run_group() { # arch dtype workloads extra-args...
    local arch="$1" dtype="$2" work="$3"
    shift 3
    if (($(elapsed) > budget)); then
        say "[$(elapsed)s] budget spent: skipping $arch/$dtype/$work"
        return
    fi
    say "[$(elapsed)s] agfsync $arch $dtype $work"
    timeout "$step_timeout" "$bin" -q bench --device cuda --arch "$arch" --dtype "$dtype" \
        --workload "$work" "$@" >>"$results" 2>>"$logf" ||
        say "   agfsync $arch $dtype $work failed or timed out (rc $?), see log.txt"
    if ((torch_ok)); then
        say "[$(elapsed)s] pytorch $arch $dtype $work"
        PYTHONUNBUFFERED=1 timeout "$step_timeout" python3 "$repo/tools/bench/torch_bench.py" \
            --device cuda --arch "$arch" --dtype "$dtype" --workload "$work" "$@" >>"$results" 2>>"$logf" ||
            say "   pytorch $arch $dtype $work failed or timed out (rc $?), see log.txt"
    fi
}

# A first tiny run: a missing library or a kernel that fails to load shows
# here in seconds, not after the first big model is built.
say "[$(elapsed)s] smoke: tiny UNet on cuda"
if ! timeout 60 "$bin" -q bench --device cuda --tiny --dtype f16 --iters 1 --warmup 1 --latent 8 \
    --workload unet >>"$logf" 2>&1; then
    say "the tiny CUDA smoke run failed: see log.txt"
    tail -n 20 "$logf" >&2
    exit 4
fi

run_group sd15 f16 unet,sample,clip --iters 5 --warmup 2 --latent 64 --size 512 --steps 20 --clip-batch 8
run_group sd15 bf16 unet,dpo --iters 3 --warmup 1 --latent 64 --pairs 1
# The VAE at 512 px and LLaVA-1.5-7B whole (its 32 decoder layers, 14 GB in f16).
run_group sd15 f16 vae,vqa --iters 3 --warmup 1 --size 512 --questions 4 --vqa-layers 32
if [[ "${AGFSYNC_BENCH_QUICK:-0}" != 1 ]]; then
    run_group sdxl f16 unet --iters 5 --warmup 2 --latent 64
    run_group sdxl bf16 unet --iters 5 --warmup 2 --latent 64
    run_group sd15 bf16 dpo --iters 3 --warmup 1 --latent 64 --pairs 1 --full
fi

# --- the table ----------------------------------------------------------
table="$out/gpu_bench.md"
if command -v python3 >/dev/null; then
    python3 "$repo/tools/bench/table.py" "$results" --title "agfsync CUDA benchmark" \
        --machine "$card; binary $bin" >"$table"
else
    cp "$results" "$table"
fi
cat "$table"
say "[$(elapsed)s] done: $table"
