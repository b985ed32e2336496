"""Writes the tiny Pick-a-Pic-style Parquet fixtures of agfsync-dpo's
`pickapic` importer (fixtures/parity/pickapic/):

* pairs.parquet: 7 rows with the Pick-a-Pic columns `caption` (string),
  `jpg_0`, `jpg_1` (encoded image bytes) and `label_0` (1.0: jpg_0 preferred,
  0.0: jpg_1 preferred, 0.5: tie). Images are small PNGs and JPEGs of
  different sizes and aspect ratios; row 3 is a tie, row 5 has a corrupt
  jpg_1 (truncated bytes that start with a PNG signature). Expected import:
  7 rows, 1 tie dropped, 1 bad row skipped, 5 pairs.
* no_label.parquet: the same first two rows without `label_0`.
* expected_pixels.safetensors: `winners` and `losers`, uint8
  [5, 32, 32, 3], the usable pairs (file order, winner per label_0) after
  diffusers' train_diffusion_dpo.py preprocessing at resolution 32:
  `convert("RGB")`, torchvision `Resize(32, BILINEAR)` (Pillow's resize, done
  here directly with the size torchvision computes) and `CenterCrop(32)`
  (corner `int(round((size - 32) / 2))`).

Written with Snappy compression (what Pick-a-Pic's files use).

    python tools/parity/make_pickapic_fixture.py
"""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "parity", "pickapic")


def image(w, h, seed, fmt):
    rng = np.random.default_rng(seed)
    # A smooth gradient plus noise, so resampling has something to do.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), np.full_like(x, seed * 37 % 256)], -1)
    px = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def preprocess(data, res=32):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != res:
        new_long = int(res * long / short)
        size = (res, new_long) if w <= h else (new_long, res)
        img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - res) / 2.0)), int(round((w - res) / 2.0))
    return np.asarray(img.crop((left, top, left + res, top + res)))


def main():
    os.makedirs(OUT, exist_ok=True)
    rows = [
        # caption, (w0, h0, fmt0), (w1, h1, fmt1), label_0
        ("a red cube", (40, 32, "PNG"), (32, 32, "JPEG"), 1.0),
        ("a blue sphere", (32, 48, "JPEG"), (50, 40, "PNG"), 0.0),
        ("a green cone", (64, 64, "PNG"), (33, 45, "PNG"), 1.0),
        ("a tie", (32, 32, "PNG"), (32, 32, "PNG"), 0.5),
        ("a yellow torus", (45, 37, "JPEG"), (36, 36, "JPEG"), 0.0),
        ("a corrupt image", (32, 32, "PNG"), None, 1.0),
        ("a white cylinder", (24, 20, "PNG"), (70, 34, "JPEG"), 0.0),
    ]
    captions, jpg0, jpg1, labels = [], [], [], []
    for i, (cap, a, b, lab) in enumerate(rows):
        captions.append(cap)
        jpg0.append(image(a[0], a[1], 2 * i + 1, a[2]))
        if b is None:
            jpg1.append(image(32, 32, 99, "PNG")[:60])  # truncated: fails to decode
        else:
            jpg1.append(image(b[0], b[1], 2 * i + 2, b[2]))
        labels.append(lab)
    table = pa.table(
        {
            "caption": pa.array(captions, pa.string()),
            "jpg_0": pa.array(jpg0, pa.binary()),
            "jpg_1": pa.array(jpg1, pa.binary()),
            "label_0": pa.array(labels, pa.float64()),
        }
    )
    pq.write_table(table, os.path.join(OUT, "pairs.parquet"), compression="snappy")
    pq.write_table(table.drop(["label_0"]).slice(0, 2), os.path.join(OUT, "no_label.parquet"), compression="snappy")
    from safetensors.numpy import save_file

    winners, losers = [], []
    for a, b, lab in zip(jpg0, jpg1, labels):
        if lab == 0.5:
            continue
        try:
            pa_, pb_ = preprocess(a), preprocess(b)
        except Exception:
            continue
        winners.append(pa_ if lab > 0.5 else pb_)
        losers.append(pb_ if lab > 0.5 else pa_)
    save_file(
        {"winners": np.stack(winners), "losers": np.stack(losers)},
        os.path.join(OUT, "expected_pixels.safetensors"),
    )
    for f in ("pairs.parquet", "no_label.parquet", "expected_pixels.safetensors"):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


if __name__ == "__main__":
    main()
