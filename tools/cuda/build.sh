#!/usr/bin/env bash
# Builds the agfsync CLI with the CUDA backend on a machine that has no system
# CUDA toolkit and no GPU, from NVIDIA's PyPI wheels.
#
#   tools/cuda/build.sh                # release build of agfsync-cli --features cuda
#   tools/cuda/build.sh --check-only   # only prepare the toolkit and print the env
#   CUDA_COMPUTE_CAP=89 tools/cuda/build.sh
#   AGFSYNC_CARGO_FEATURES=cuda,cudnn tools/cuda/build.sh
#
# Environment it honours:
#   CUDA_COMPUTE_CAP        GPU architecture the kernels are built for (default
#                           90: H100/H200). The PTX of candle's kernels is
#                           JIT-compiled by the driver, the static MoE/GGUF
#                           kernels are built for exactly this architecture.
#   AGFSYNC_CUDA_TOOLKIT    where the wheels go (default ~/.cache/agfsync-cuda-toolkit)
#   CARGO_TARGET_DIR        default ~/.cache/agfsync-target-cuda
#   AGFSYNC_CARGO_FEATURES  cargo features of agfsync-cli (default "cuda")
#   AGFSYNC_BUNDLE_DIR      where the stripped, gzipped binary is staged for a GPU
#                           machine (default .cuda-bundle in the repository,
#                           git-ignored: carry it, see docs/cuda.md)
#
# Why CUDA 13.0: candle 0.11's cudarc (0.19) supports CUDA 11.4 to 13.4, and
# picks the version from `nvcc --version`. The PTX that nvcc writes can only
# be JIT-compiled by a driver at least as new as nvcc, so the toolkit must not
# be newer than the GPU machine's driver; the lent H100/H200 machines run
# driver 580 (CUDA 13.0). The runtime libraries (cudart, cublas, curand,
# nvrtc) keep their soname within a major version, so the 13.x ones found on
# the GPU machine satisfy a binary linked against 13.0.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

toolkit_dir="${AGFSYNC_CUDA_TOOLKIT:-$HOME/.cache/agfsync-cuda-toolkit}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/agfsync-target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
features="${AGFSYNC_CARGO_FEATURES:-cuda}"
bundle_dir="${AGFSYNC_BUNDLE_DIR:-$repo/.cuda-bundle}"

# One consistent CUDA 13.0 set. crt and nvvm are pinned too: left to pip they
# follow the newest release and nvcc 13.0 would run a newer cicc.
wheels=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-nvrtc==13.0.88"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cublas==13.0.2.14"
    "nvidia-curand==10.4.0.35"
)
if [[ ",$features," == *",cudnn,"* ]]; then
    wheels+=("nvidia-cudnn-cu13==9.13.*")
fi

cuda_root="$toolkit_dir/nvidia/cu13"
stamp="$toolkit_dir/.agfsync-wheels"

install_wheels() {
    local want
    want="$(printf '%s\n' "${wheels[@]}")"
    if [[ -x "$cuda_root/bin/nvcc" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo ">> installing CUDA wheels into $toolkit_dir" >&2
    rm -rf "$toolkit_dir"
    mkdir -p "$toolkit_dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$toolkit_dir" "${wheels[@]}"
    printf '%s\n' "$want" >"$stamp"
}

# The wheels ship only versioned sonames (libcublas.so.13) and no driver
# library. The linker wants `-lcublas` (libcublas.so) and `-lcuda`: add the
# unversioned links, and a stub libcuda.so (soname libcuda.so.1) exporting
# every driver entry point cudarc declares, as the toolkit's lib/stubs does.
# At run time the driver's real libcuda.so.1 is loaded instead.
prepare_link_dir() {
    local lib="$cuda_root/lib"
    local so base
    for so in "$lib"/lib*.so.*; do
        base="${so##*/}"
        base="${base%%.so.*}.so"
        [[ -e "$lib/$base" ]] || ln -s "${so##*/}" "$lib/$base"
    done
    if [[ "$features" == *cudnn* ]]; then
        for so in "$toolkit_dir"/nvidia/cudnn/lib/lib*.so.*; do
            base="${so##*/}"
            base="${base%%.so.*}.so"
            [[ -e "$lib/$base" ]] || ln -s "$so" "$lib/$base"
        done
    fi

    local stubs="$lib/stubs"
    mkdir -p "$stubs" "$toolkit_dir/smoke-libcuda"
    # The same stub under its run-time name, in a folder of its own that
    # only the smoke run below puts on LD_LIBRARY_PATH: it lets the binary
    # start on this GPU-less machine (every driver call fails, so CUDA reads
    # as unavailable) without ever shadowing a real driver.
    ln -sf "$stubs/libcuda.so" "$toolkit_dir/smoke-libcuda/libcuda.so.1"
    if [[ -f "$stubs/libcuda.so" ]]; then
        return
    fi
    local registry sys
    registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
    # The cudarc version candle resolves to in our Cargo.lock.
    local cudarc_version
    cudarc_version="$(awk '/^name = "cudarc"$/{getline; gsub(/"/,"",$3); print $3; exit}' "$repo/Cargo.lock")"
    if ! sys="$(ls -d "$registry"/*/"cudarc-$cudarc_version"/src/driver/sys/mod.rs 2>/dev/null | head -n1)" || [[ -z "$sys" ]]; then
        echo ">> fetching crates so the driver symbol list can be read" >&2
        (cd "$repo" && cargo fetch --locked)
        sys="$(ls -d "$registry"/*/"cudarc-$cudarc_version"/src/driver/sys/mod.rs | head -n1)"
    fi
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $4}' | sort -u |
        awk '{printf "int %s(void) { return 999; }\n", $1}' >"$stubs/libcuda_stub.c"
    cc -shared -fPIC -o "$stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$stubs/libcuda_stub.c"
}

install_wheels
prepare_link_dir

export PATH="$cuda_root/bin:$PATH"
# cudarc reads CUDA_ROOT/CUDA_PATH/CUDA_HOME for its link search (lib,
# lib/stubs); cudaforge (candle-kernels' build script) finds nvcc on PATH and
# takes the architecture from CUDA_COMPUTE_CAP, since there is no nvidia-smi.
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export CUDA_TOOLKIT_ROOT_DIR="$cuda_root"
export NVCC="$cuda_root/bin/nvcc"
export LIBRARY_PATH="$cuda_root/lib:$cuda_root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# Build scripts that run tests of the linked libraries (none today) would find them.
export LD_LIBRARY_PATH="$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ "${1:-}" == "--check-only" || "${1:-}" == "--env" ]]; then
    nvcc --version | tail -n2
    cat <<EOF
export PATH="$cuda_root/bin:\$PATH"
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root" CUDA_TOOLKIT_ROOT_DIR="$cuda_root"
export NVCC="$NVCC" CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP"
export LIBRARY_PATH="$LIBRARY_PATH"
export LD_LIBRARY_PATH="$LD_LIBRARY_PATH"
export CARGO_TARGET_DIR="$CARGO_TARGET_DIR"
EOF
    exit 0
fi

# Anything else on the command line is a cargo command to run in this
# environment instead of the release build, e.g.
#   tools/cuda/build.sh cargo clippy --workspace --all-targets --features agfsync-cli/cuda
if [[ $# -gt 0 ]]; then
    cd "$repo"
    exec "$@"
fi

cd "$repo"
echo ">> cargo build --release -p agfsync-cli --features $features (sm_$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)" >&2
cargo build --release --locked -p agfsync-cli --features "$features"

bin="$CARGO_TARGET_DIR/release/agfsync"
mkdir -p "$bundle_dir"
# The release profile keeps line tables; the copy that travels drops them
# and is gzipped: candle's embedded PTX makes the binary ~87 MB, more than a
# GPU machine's carried files may hold (64 MiB), and it compresses to ~25 MB.
# gpu_bench.sh unpacks it there.
stripped="$CARGO_TARGET_DIR/release/agfsync-stripped"
cp -f "$bin" "$stripped"
strip --strip-debug "$stripped"
rm -f "$bundle_dir/agfsync"
gzip -6 -c "$stripped" >"$bundle_dir/agfsync.gz"
echo ">> $bundle_dir/agfsync.gz ($(du -h "$bundle_dir/agfsync.gz" | cut -f1); unpacked $(du -h "$stripped" | cut -f1)); it needs at run time:" >&2
readelf -d "$stripped" | awk '/NEEDED/{print "   " $5}' | tr -d '[]' >&2

# Smoke run here, with the stub driver: the binary loads its libraries, runs
# the tiny UNet on CPU, and refuses `--device cuda` with a message (no GPU).
smoke_env=(env LD_LIBRARY_PATH="$cuda_root/lib:$toolkit_dir/smoke-libcuda")
"${smoke_env[@]}" "$stripped" -q bench --tiny --device cpu --iters 1 --warmup 0 --latent 8 --workload unet
if msg="$("${smoke_env[@]}" "$stripped" -q bench --tiny --device cuda --workload unet 2>&1)"; then
    echo ">> unexpected: --device cuda worked with the stub driver" >&2
else
    echo ">> --device cuda without a GPU, as expected: $msg" >&2
fi
