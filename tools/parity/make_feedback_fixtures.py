#!/usr/bin/env python3
"""Generate the parity fixtures of agfsync-feedback (CLIP score, aesthetic score).

Rerun from the repository root (CPU only, no network, a few seconds):

    pip install torchvision   # optional but recommended, see below
    pip install --target /tmp/pillow12 'pillow<13'   # optional: Pillow <= 12 references
    python3 tools/parity/make_feedback_fixtures.py --pillow12 /tmp/pillow12   # writes fixtures/parity/feedback/
    python3 tools/parity/make_feedback_fixtures.py --out DIR      # writes elsewhere

Everything is built here with fixed seeds: a tiny random `CLIPModel` saved by
transformers' `save_pretrained` (safetensors) with its tokenizer (tokenizer.json)
and `preprocessor_config.json`, a tiny random LAION-style aesthetic head saved both
as safetensors and with `torch.save(state_dict)` (.pth), two deliberately bad .pth
files, and test images of several sizes, aspect ratios and modes written with
Pillow (plus one 16-bit RGB PNG written by hand, which Pillow cannot write).

Transformers 5 has two CLIPImageProcessor backends that give different pixels:
`CLIPImageProcessor` is the torchvision backend when torchvision is importable
and otherwise falls back to `CLIPImageProcessorPil` (the transformers 4 "slow"
processor: Pillow resize). The references hold both (`pixel_values_pil.*`,
`pixel_values_tv.*`) when torchvision is importable; without it only the PIL
ones are written and `ref.json` says so. Every embedding and score is computed
from the PIL-backend pixels (what transformers 4, open_clip and the LAION
aesthetic code use). The PIL pixels depend on the Pillow version: Pillow 13
resamples some tall images vertically first where Pillow <= 12 always goes
horizontally first (rgb_very_tall.png shows it); these refs need Pillow 13.

Files written (the contract of crates/agfsync-feedback/tests/parity.rs):

  tiny-clip/                  CLIPModel folder: config.json, model.safetensors,
                              tokenizer.json, tokenizer_config.json,
                              preprocessor_config.json
  aesthetic-head.safetensors  layers.{0,2,4,6,7}.{weight,bias}, input width 32
  aesthetic-head.pth          the same state dict, torch.save (zip + pickle)
  bad-global.pth              a state dict with an entry that pickles a global
                              call (builtins.print), which a loader must refuse
  bad-object.pth              a state dict with a non-tensor entry (a string)
  images/*.{png,jpg,webp}     the test images
  ref.safetensors             rgb.<img> (<img> is the file name with '.' -> '_'; H, W, 3 u8: the RGB pixels transformers
                              sees), pixel_values_pil.<img> / pixel_values_tv.<img>
                              (3, 32, 32 f32), pixel_values_pil12.<img> (with
                              --pillow12, only where Pillow <= 12 differs), image_embeds (n_img, 32: projected,
                              not normalised), text_embeds (n_prompt, 32),
                              input_ids (n_prompt, 77 i64), cos (n_img, n_prompt),
                              clip_score (n_img, n_prompt) = max(100 cos, 0),
                              aesthetic (n_img,)
  ref.json                    image order and modes, prompts, versions
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

try:  # the torchvision backend (transformers 5's default when torchvision is installed)
    import torchvision  # noqa: F401
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor as CLIPImageProcessorTv

    HAVE_TV = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TV = False

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_SRC = REPO_ROOT / "fixtures" / "parity" / "tiny-sd15" / "tokenizer"

PROJ = 32
IMAGE_SIZE = 32

PROMPTS = [
    "a red cube on a wooden table",
    "A photo of a cat, sitting in the sun!",
    "",
    # More than 77 tokens: must be truncated by tokens (keeping the end-of-text token).
    " ".join(["a very long prompt about mountains rivers forests and a small village at dusk"] * 8),
]


# --------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------

def smooth_noise(rng, h, w, c, amount=60):
    """Gradients plus noise: both smooth regions and edges, so resampling errors show."""
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    phase = rng.uniform(0, 6.28, size=(1, 1, c))
    base = 127 + 100 * np.sin(6 * x + 4 * y + phase) * np.cos(3 * y - 2 * x)
    noise = rng.normal(0, amount, size=(h, w, c))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_png16(path: Path, arr: np.ndarray):
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA), which Pillow cannot write for RGB."""
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def make_images(out: Path):
    """Returns [(file name, what it tests)]; files are written into out/."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    made = []

    def save(name, im, what, **kw):
        im.save(out / name, **kw)
        made.append((name, what))

    save("rgb_wide.png", Image.fromarray(smooth_noise(rng, 37, 61, 3)), "RGB, wider than tall, downscale")
    save("rgb_tall.png", Image.fromarray(smooth_noise(rng, 50, 23, 3)), "RGB, taller than wide, upscale")
    save("rgb_very_tall.png", Image.fromarray(smooth_noise(rng, 95, 40, 3)),
         "RGB more than twice as tall as wide, downscale: Pillow 13 resamples vertically first")
    save("rgb_square32.png", Image.fromarray(smooth_noise(rng, 32, 32, 3)), "RGB at the model size: no resize")
    save("rgb_big.png", Image.fromarray(smooth_noise(rng, 170, 250, 3, amount=25)),
         "RGB 250x170: a 5x downscale (antialiasing support)")
    rgba = smooth_noise(rng, 45, 45, 4)
    rgba[..., 3] = np.linspace(0, 255, 45 * 45).reshape(45, 45).astype(np.uint8)
    rgba[:5, :, 3] = 0
    rgba[-5:, :, 3] = 255
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"), "RGBA: composited on white")
    save("grey.png", Image.fromarray(smooth_noise(rng, 29, 40, 1)[..., 0], mode="L"), "L (8-bit grey)")
    la = smooth_noise(rng, 47, 33, 2)
    save("grey_alpha.png", Image.fromarray(la, mode="LA"), "LA (grey + alpha)")
    bits = (smooth_noise(rng, 40, 20, 1)[..., 0] > 127)
    save("bilevel.png", Image.fromarray(bits).convert("1"), "1-bit")
    pal = Image.fromarray(smooth_noise(rng, 38, 38, 3)).quantize(colors=16)
    save("palette_trns.png", pal, "P with a transparent palette entry", transparency=3)
    g16 = np.clip(np.linspace(0, 70000, 48 * 35), 0, 65535).astype(np.uint16).reshape(48, 35)
    g16[::3, ::4] = 200
    save("grey16.png", Image.fromarray(g16), "16-bit grey (I;16): PIL clips values above 255")
    rgb16 = (smooth_noise(rng, 40, 50, 3).astype(np.uint16) * 257 + rng.integers(0, 257, (40, 50, 3))).astype(np.uint16)
    write_png16(out / "rgb16.png", rgb16)
    made.append(("rgb16.png", "16-bit RGB: PIL keeps the high byte"))
    save("photo.jpg", Image.fromarray(smooth_noise(rng, 52, 70, 3, amount=20)), "JPEG 4:2:0", quality=90)
    save("photo444.jpg", Image.fromarray(smooth_noise(rng, 41, 29, 3, amount=20)), "JPEG 4:4:4",
         quality=95, subsampling=0)
    save("grey.jpg", Image.fromarray(smooth_noise(rng, 36, 36, 1, amount=20)[..., 0], mode="L"), "grey JPEG",
         quality=90)
    cmyk = Image.fromarray(smooth_noise(rng, 33, 44, 4, amount=20), mode="CMYK")
    save("cmyk.jpg", cmyk, "CMYK JPEG (Adobe, inverted)", quality=95)
    save("photo_progressive.jpg", Image.fromarray(smooth_noise(rng, 77, 101, 3, amount=25)),
         "progressive JPEG 4:2:0, odd size", quality=85, progressive=True)
    save("photo422_restart.jpg", Image.fromarray(smooth_noise(rng, 45, 90, 3, amount=25)),
         "JPEG 4:2:2 with restart markers", quality=80, subsampling=1, restart_marker_blocks=3)
    save("grey_progressive.jpg", Image.fromarray(smooth_noise(rng, 21, 33, 1, amount=25)[..., 0], mode="L"),
         "progressive grey JPEG", quality=70, progressive=True)
    save("tiny.jpg", Image.fromarray(smooth_noise(rng, 2, 3, 3)), "3x2 JPEG 4:2:0 (chroma 2 wide: no fancy upsampling)",
         quality=90)
    save("lossless.webp", Image.fromarray(smooth_noise(rng, 30, 40, 3)), "lossless WebP", lossless=True)
    save("lossy.webp", Image.fromarray(smooth_noise(rng, 30, 40, 3, amount=20)), "lossy WebP", quality=80)
    return made


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

def build_clip(out: Path):
    tok_src = out.parent / ".tok-src"
    if tok_src.exists():
        shutil.rmtree(tok_src)
    shutil.copytree(TOKENIZER_SRC, tok_src)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_src))
    shutil.rmtree(tok_src)
    vocab = len(tokenizer)
    text_config = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=PROJ,
    )
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=8, hidden_act="quick_gelu", projection_dim=PROJ,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=PROJ)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    # transformers' init is tiny for the projections and layer norms: make every tensor O(1) so
    # the parity tests see real signal (scores far from 0 and from each other).
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                if p.dim() == 4:
                    fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor.save_pretrained(str(out))
    return model, tokenizer


class AestheticHead(torch.nn.Module):
    """The LAION improved aesthetic predictor's layout (keys layers.0/2/4/6/7), tiny widths."""

    def __init__(self, widths):
        super().__init__()
        w = widths
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(w[0], w[1]), torch.nn.Dropout(0.2),
            torch.nn.Linear(w[1], w[2]), torch.nn.Dropout(0.2),
            torch.nn.Linear(w[2], w[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(w[3], w[4]),
            torch.nn.Linear(w[4], 1),
        )

    def forward(self, x):
        return self.layers(x)


def build_aesthetic(out_root: Path):
    torch.manual_seed(7)
    head = AestheticHead([PROJ, 48, 24, 16, 8]).eval()
    with torch.no_grad():  # outputs around 1..10 like the real head
        head.layers[7].bias.fill_(5.0)
        for m in head.layers:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(3.0)
    sd = {k: v.contiguous() for k, v in head.state_dict().items()}
    save_file(sd, str(out_root / "aesthetic-head.safetensors"), metadata={"format": "pt"})
    # As LAION saved theirs: torch.save(model.state_dict()) (an OrderedDict with _metadata).
    torch.save(head.state_dict(), str(out_root / "aesthetic-head.pth"))

    class RunsCode:
        def __reduce__(self):
            return (print, ("this pickle calls a global function",))

    bad = dict(head.state_dict())
    bad["layers.7.bias"] = RunsCode()
    torch.save(bad, str(out_root / "bad-global.pth"))
    bad = dict(head.state_dict())
    bad["note"] = "not a tensor"
    torch.save(bad, str(out_root / "bad-object.pth"))
    return head


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------

def l2_normalise_np(a):
    """LAION's `normalized()` (numpy, float32)."""
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "fixtures" / "parity" / "feedback"))
    ap.add_argument("--pillow12", metavar="DIR",
                    help="a folder holding Pillow <= 12 (e.g. `pip install --target DIR 'pillow<13'`): "
                         "adds pixel_values_pil12.<img> for the images where Pillow 12 differs")
    ap.add_argument("--allow-no-torchvision", action="store_true",
                    help="write only the PIL-backend pixel references when torchvision is missing")
    args = ap.parse_args()
    if not HAVE_TV and not args.allow_no_torchvision:
        raise SystemExit("torchvision is not importable: install it (pip install torchvision) for the "
                         "torchvision-backend references, or pass --allow-no-torchvision")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)

    images = make_images(out / "images")
    model, tokenizer = build_clip(out / "tiny-clip")
    head = build_aesthetic(out)

    # Load everything back the way a user would.
    model = CLIPModel.from_pretrained(str(out / "tiny-clip")).eval()
    pil_proc = CLIPImageProcessorPil.from_pretrained(str(out / "tiny-clip"))
    tv_proc = CLIPImageProcessorTv.from_pretrained(str(out / "tiny-clip")) if HAVE_TV else None
    if tv_proc is not None:
        assert tv_proc.backend == "torchvision", tv_proc.backend
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tiny-clip"))

    t = {}
    meta_images = []
    pixel_pil = []
    for name, what in images:
        im = Image.open(out / "images" / name)
        meta_images.append({"file": f"images/{name}", "pil_mode": im.mode, "width": im.width, "height": im.height,
                            "what": what})
        key = name.replace(".", "_")
        t[f"rgb.{key}"] = torch.from_numpy(convert_to_rgb(im, return_numpy=True).copy())
        pv = pil_proc(images=Image.open(out / "images" / name), return_tensors="pt")["pixel_values"][0]
        t[f"pixel_values_pil.{key}"] = pv.contiguous()
        pixel_pil.append(pv)
        if tv_proc is not None:
            pv = tv_proc(images=Image.open(out / "images" / name), return_tensors="pt")["pixel_values"][0]
            t[f"pixel_values_tv.{key}"] = pv.to(torch.float32).contiguous()

    pil12_differs = []
    if args.pillow12:
        # Run the PIL backend under the old Pillow in a child process.
        code = (
            "import sys, numpy as np, PIL; from PIL import Image;"
            "from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as P;"
            "p = P.from_pretrained(sys.argv[1]); out = {};"
            "[out.__setitem__(f, p(images=Image.open(sys.argv[2] + '/' + f), return_tensors='np')['pixel_values'][0]) "
            "for f in sys.argv[4:]];"
            "np.savez(sys.argv[3], version=PIL.__version__, **{k.replace('.', '_'): v for k, v in out.items()})"
        )
        tmp = out / ".pil12.npz"
        env = dict(os.environ, PYTHONPATH=args.pillow12)
        subprocess.run([sys.executable, "-c", code, str(out / "tiny-clip"), str(out / "images"), str(tmp)]
                       + [n for n, _ in images], check=True, env=env)
        old = np.load(tmp)
        assert str(old["version"]).split(".")[0] in ("10", "11", "12"), str(old["version"])
        for name, _ in images:
            key = name.replace(".", "_")
            pv = torch.from_numpy(old[key])
            if not torch.equal(pv, t[f"pixel_values_pil.{key}"]):
                t[f"pixel_values_pil12.{key}"] = pv.contiguous()
                pil12_differs.append(name)
        pillow12_version = str(old["version"])
        tmp.unlink()

    text = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=torch.stack(pixel_pil))
        text_embeds = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        if not torch.is_tensor(image_embeds):  # transformers 5 returns the output object
            image_embeds = image_embeds.pooler_output
        if not torch.is_tensor(text_embeds):
            text_embeds = text_embeds.pooler_output
        img_n = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        txt_n = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        cos = img_n @ txt_n.T
        clip_score = torch.clamp(100 * cos, min=0)
        # Cross-check with CLIPModel's own forward (normalised embeddings, logit_scale * cos).
        full = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                     pixel_values=torch.stack(pixel_pil))
        assert torch.allclose(full.logits_per_image, model.logit_scale.exp() * cos, atol=1e-4)
        aes_in = torch.from_numpy(l2_normalise_np(image_embeds.numpy().astype(np.float32)))
        aesthetic = head(aes_in)[:, 0]

    t["image_embeds"] = image_embeds.contiguous()
    t["text_embeds"] = text_embeds.contiguous()
    t["input_ids"] = text["input_ids"].to(torch.int64).contiguous()
    t["cos"] = cos.contiguous()
    t["clip_score"] = clip_score.contiguous()
    t["aesthetic"] = aesthetic.contiguous()
    save_file(t, str(out / "ref.safetensors"))

    n_tokens = [len(tokenizer(p, truncation=False)["input_ids"]) for p in PROMPTS]
    meta = {
        "images": meta_images,
        "prompts": PROMPTS,
        "prompt_tokens_untruncated": n_tokens,
        "torchvision_refs": HAVE_TV,
        "pillow12": ({"version": pillow12_version, "differs_from_pillow13": pil12_differs}
                     if args.pillow12 else None),
        "logit_scale": float(model.logit_scale.item()),
        "image_processor": json.loads((out / "tiny-clip" / "preprocessor_config.json").read_text()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "torchvision": (__import__("torchvision").__version__ if HAVE_TV else None),
        },
    }
    (out / "ref.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB); torchvision refs: {HAVE_TV}")
    print("clip_score:\n", clip_score.numpy().round(3))
    print("aesthetic:", aesthetic.numpy().round(4))


if __name__ == "__main__":
    main()
