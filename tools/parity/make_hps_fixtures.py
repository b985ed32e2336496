#!/usr/bin/env python3
"""Generate the HPSv2 parity fixtures of agfsync-feedback (fixtures/parity/hps/).

HPSv2 (Wu et al., "Human Preference Score v2", 2023) scores an image against
its prompt with an OpenCLIP ViT-H/14 fine-tuned on human preferences; the
score code is `hpsv2/img_score.py` and the benchmark code `hpsv2/evaluation.py`
of the `hpsv2` package. This script runs *HPSv2's own code* (its vendored
open_clip fork: model, `image_transform(..., resize_longest_max=True)` as
`create_model_and_transforms(light_augmentation=True)` builds `preprocess_val`,
and its `SimpleTokenizer`/`tokenize`) on a tiny random model, so the Rust side
is checked against exactly what HPSv2 computes.

Rerun from the repository root (CPU only, no network, a few seconds):

    pip install open_clip_torch            # only for its bpe_simple_vocab file
    pip download hpsv2 --no-deps -d /tmp/hpsv2whl
    unzip -q /tmp/hpsv2whl/hpsv2-*.whl -d /tmp/hpsv2src
    python3 tools/parity/make_hps_fixtures.py --hpsv2 /tmp/hpsv2src

(The hpsv2 wheel lacks the bpe file its tokenizer module loads at import, and
its package imports `clint`; the script copies the file from open_clip and
stubs `clint`, neither of which changes any computation used here.)

Everything is seeded: a tiny open_clip `CLIP` (HPSv2's fork) built from the
model config below with every parameter re-drawn at random, a tiny BPE
tokenizer (the one of tiny-sd15: 256 byte tokens, 256 `</w>` byte tokens,
400 merges, then start/end of text = ids 912/913, so end-of-text is the
highest id as in the real vocabulary and open_clip's argmax pooling finds
it), and PNG images of several sizes and aspect ratios.

Files written (the contract of crates/agfsync-feedback/tests/hps_parity.rs):

  open_clip_config.json     open_clip model config (embed_dim, vision_cfg,
                            text_cfg, quick_gelu), as open_clip's
                            model_configs/*.json
  tiny-hps.safetensors      the model's state_dict, open_clip key names
                            (visual.conv1.weight, ..., logit_scale), f32
  tiny-hps.pt               the same state dict as HPSv2 ships its
                            checkpoints: torch.save({'state_dict': sd}) (zip)
  bad-object.pt             {'state_dict': sd, 'note': <a set object>}: a
                            non-tensor object a safe loader must refuse
  tokenizer/                vocab.json, merges.txt, tokenizer_config.json,
                            special_tokens_map.json (CLIPTokenizer layout)
  images/*.png              the test images (RGB and grey, up- and
                            downscaled, wide and tall, odd paddings)
  ref.safetensors           pixels_aa.<img>  (3, 56, 56) f32: preprocess_val
                                   output with torchvision >= 0.17 (resize
                                   antialias=True, the default since 0.17)
                            pixels_noaa.<img> (3, 56, 56) f32: the same with
                                   antialias=False (torchvision < 0.17, when
                                   HPSv2 was released)
                            input_ids (n_prompt, 77) i64: HPSv2's tokenize
                            image_features (n_img, 32) f32, unnormalised,
                                   from pixels_aa
                            text_features (n_prompt, 32) f32, unnormalised
                            hps (n_img, n_prompt) f32: 100 * cos, as
                                   evaluation.py (img_score.score returns
                                   the bare cos)
                            hps_noaa (n_img, n_prompt) f32: from pixels_noaa
  ref.json                  image order and sizes, prompts, versions
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np

SEED = 20240604
IMAGE_SIZE = 56
MODEL_CFG = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 2,
        "width": 32,
        "head_width": 8,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 914,
        "width": 32,
        "heads": 4,
        "layers": 2,
    },
}

# (name, (width, height), mode): sizes chosen to cover upscaling, downscaling,
# odd paddings on either axis and no resize at all (square, longest side ==
# image_size; HPSv2 neither resizes nor pads then).
IMAGES = [
    ("rgb_square_exact.png", (56, 56), "RGB"),
    ("rgb_small_wide.png", (40, 23), "RGB"),
    ("rgb_large_wide.png", (151, 97), "RGB"),
    ("rgb_tall.png", (37, 90), "RGB"),
    ("rgb_very_wide.png", (211, 30), "RGB"),
    ("grey_large_tall.png", (64, 133), "L"),
]

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "  An Astronaut   riding a HORSE on the moon, digital art &amp; concept art ",
    "a painting of a red house",
    # > 77 tokens: truncated to 76 then end-of-text.
    " ".join(["a beautiful landscape with a river, a forest and snowy mountains at sunset"] * 8),
]


def stub_clint() -> None:
    m = types.ModuleType("clint")
    t = types.ModuleType("clint.textui")
    t.progress = None
    m.textui = t
    sys.modules["clint"] = m
    sys.modules["clint.textui"] = t


def make_image(size, mode, seed):
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            (xx * 255 / max(w - 1, 1)),
            (yy * 255 / max(h - 1, 1)),
            ((xx + yy) * 127 / max(w + h - 2, 1)),
        ],
        axis=-1,
    )
    noise = rng.integers(-40, 41, size=base.shape)
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    return img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hpsv2", required=True, help="the unzipped hpsv2 wheel (holds hpsv2/)")
    ap.add_argument("--out", default="fixtures/parity/hps")
    args = ap.parse_args()

    src = Path(args.hpsv2)
    bpe = src / "hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz"
    if not bpe.exists():
        import open_clip

        shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", bpe)
    sys.path.insert(0, str(src))
    stub_clint()

    import torch
    import torchvision
    import PIL
    import torchvision.transforms.functional as TF
    from safetensors.torch import save_file
    import hpsv2.src.open_clip as oc
    import hpsv2.src.open_clip.tokenizer as octok
    import hpsv2.src.open_clip.transform as octr

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)

    # --- tokenizer: tiny-sd15's vocab/merges, fed to HPSv2's SimpleTokenizer.
    repo = Path(__file__).resolve().parents[2]
    tok_src = repo / "fixtures/parity/tiny-sd15/tokenizer"
    shutil.copytree(tok_src, out / "tokenizer")
    merges_text = (tok_src / "merges.txt").read_text(encoding="utf-8").rstrip("\n")
    gz = out / "merges.txt.gz.tmp"
    with gzip.open(gz, "wb") as f:
        # No trailing newline: SimpleTokenizer would read it as an empty merge.
        f.write(merges_text.encode("utf-8"))
    tok = octok.SimpleTokenizer(str(gz))
    gz.unlink()
    assert tok.encoder["<start_of_text>"] == 912 and tok.encoder["<end_of_text>"] == 913
    octok._tokenizer = tok  # what octok.tokenize() uses
    input_ids = octok.tokenize(PROMPTS)

    # --- model
    torch.manual_seed(SEED)
    model = oc.CLIP(
        embed_dim=MODEL_CFG["embed_dim"],
        vision_cfg=oc.CLIPVisionCfg(**MODEL_CFG["vision_cfg"]),
        text_cfg=oc.CLIPTextCfg(**MODEL_CFG["text_cfg"]),
        quick_gelu=MODEL_CFG["quick_gelu"],
        output_dict=True,
    )
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if p.ndim == 1 and ("ln" in name):
                # layer norms: weights near 1, biases near 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                scale = 1.0 / np.sqrt(fan_in) if p.ndim > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "tiny-hps.safetensors"))
    torch.save({"state_dict": sd}, out / "tiny-hps.pt")
    small = {k: v for k, v in list(sd.items())[:2]}
    torch.save({"state_dict": small, "note": {1, 2}}, out / "bad-object.pt")
    (out / "open_clip_config.json").write_text(json.dumps(MODEL_CFG, indent=2) + "\n")

    # --- preprocessing: HPSv2's preprocess_val, with torchvision's resize
    # antialias on (today's default) and off (torchvision < 0.17).
    mean, std = oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD
    preprocess_aa = octr.image_transform(IMAGE_SIZE, is_train=False, mean=mean, std=std, resize_longest_max=True)
    real_resize = TF.resize

    def resize_noaa(img, size, interpolation=TF.InterpolationMode.BILINEAR, max_size=None, antialias=None):
        return real_resize(img, size, interpolation, max_size, antialias=False)

    from PIL import Image

    pixels = {}
    meta_images = []
    imgs = []
    for i, (name, size, mode) in enumerate(IMAGES):
        img = make_image(size, mode, SEED + i)
        img.save(out / "images" / name)
        img = Image.open(out / "images" / name)
        img.load()
        key = name.replace(".", "_")
        pa = preprocess_aa(img)
        octr.F.resize = resize_noaa
        try:
            pn = preprocess_aa(img)
        finally:
            octr.F.resize = real_resize
        assert pa.shape == (3, IMAGE_SIZE, IMAGE_SIZE), (name, pa.shape)
        pixels[f"pixels_aa.{key}"] = pa.contiguous()
        pixels[f"pixels_noaa.{key}"] = pn.contiguous()
        imgs.append((pa, pn))
        meta_images.append({"file": f"images/{name}", "size": list(size), "mode": mode})

    with torch.no_grad():
        pa = torch.stack([p[0] for p in imgs])
        pn = torch.stack([p[1] for p in imgs])
        out_aa = model(pa, input_ids)
        out_noaa = model(pn, input_ids)
        image_features = model.encode_image(pa)
        text_features = model.encode_text(input_ids)
        hps = out_aa["image_features"] @ out_aa["text_features"].T * 100
        hps_noaa = out_noaa["image_features"] @ out_noaa["text_features"].T * 100

    refs = dict(pixels)
    refs["input_ids"] = input_ids.to(torch.int64).contiguous()
    refs["image_features"] = image_features.contiguous()
    refs["text_features"] = text_features.contiguous()
    refs["hps"] = hps.contiguous()
    refs["hps_noaa"] = hps_noaa.contiguous()
    save_file(refs, str(out / "ref.safetensors"))

    meta = {
        "images": meta_images,
        "prompts": PROMPTS,
        "image_size": IMAGE_SIZE,
        "seed": SEED,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "hpsv2": "1.2.0 (open_clip fork vendored in the wheel)",
        },
    }
    (out / "ref.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")
    print("hps:\n", hps.numpy())


if __name__ == "__main__":
    main()
