#!/usr/bin/env bash
# Images per second of the generate and score stages on the tiny preset
# (random-weight tiny SD 1.5, CLIP, aesthetic head and LLaVA): the 36
# built-in prompts x N candidates (default 8: 288 images), 64x64, 4 DDIM
# steps, batches of 8. What it measures is the pipeline around the models
# (batching, decoding, PNG and latents files, store commits), since the
# tiny networks themselves cost little.
#
#   tools/bench/throughput.sh [N]        (AGFSYNC_BIN overrides the binary)
#
# Prints one JSON line.
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-8}"
BIN="${AGFSYNC_BIN:-${CARGO_TARGET_DIR:-target}/release/agfsync}"
if [ ! -x "$BIN" ]; then
    cargo build --release -p agfsync-cli >&2
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
dir="$tmp/run"
"$BIN" init "$dir" --preset tiny >/dev/null 2>&1
sed -i -e 's/^limit = 4$/limit = 0/' -e "s/^candidates = 4$/candidates = $N/" \
    -e 's/^batch_size = 4$/batch_size = 8/' "$dir/agfsync.toml"
"$BIN" --quiet prompts "$dir" >/dev/null 2>&1
"$BIN" --quiet questions "$dir" >/dev/null 2>&1
t0=$(date +%s.%N)
"$BIN" --quiet generate "$dir" >/dev/null 2>&1
t1=$(date +%s.%N)
"$BIN" --quiet score "$dir" >/dev/null 2>&1
t2=$(date +%s.%N)
images=$(find "$dir/images" -name '*.png' | wc -l)
python3 - "$images" "$t0" "$t1" "$t2" <<'PY'
import json, sys
n, t0, t1, t2 = int(sys.argv[1]), *map(float, sys.argv[2:])
print(json.dumps({"images": n, "generate_s": round(t1 - t0, 2), "generate_images_per_s": round(n / (t1 - t0), 2),
                  "score_s": round(t2 - t1, 2), "score_images_per_s": round(n / (t2 - t1), 2)}))
PY
