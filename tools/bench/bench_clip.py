#!/usr/bin/env python3
"""transformers CPU baseline for CLIP score with the CLIP ViT-L/14 architecture.

    python3 tools/bench/bench_clip.py [--threads N] [--iters 3] [--warmup 1] [--batch 8]

Builds transformers' CLIPModel with openai/clip-vit-large-patch14's shapes (random
weights, f32, eval, torch.inference_mode) and times, for a batch of 512x512 RGB images:

  preprocess   CLIPImageProcessor(Pil) on PIL images -> pixel_values [B, 3, 224, 224]
               (the PIL backend: what agfsync reproduces by default)
  vision       model.get_image_features(pixel_values)
  score        preprocess + get_image_features + 100 * cos with a cached text embedding
               (torchmetrics' CLIP score, clamped at 0)

and prints ONE JSON line (images per second), matching
`cargo bench -p agfsync-feedback --bench clip_score`:

    {"impl":"transformers","torch":..,"threads":..,"vision_images_per_s":..,...}

Diagnostics go to stderr; stdout is only the JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       patch_size=14, image_size=224, projection_dim=768),
    projection_dim=768,
)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**VIT_L14)).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    processor = CLIPImageProcessorPil()  # 224 px, bicubic, OpenAI mean/std

    b = args.batch
    j = np.arange(512 * 512 * 3)
    images = [Image.fromarray((((j * 7 + i * 131 + (j // 1536) * 3) % 251).astype(np.uint8)).reshape(512, 512, 3))
              for i in range(b)]
    pv = torch.randn(b, 3, 224, 224)
    ids = torch.randint(0, 49000, (1, 77))
    ids[0, 10] = 49407

    with torch.inference_mode():
        text = model.get_text_features(input_ids=ids)
        text = text if torch.is_tensor(text) else text.pooler_output
        text = text / text.norm(p=2, dim=-1, keepdim=True)

        def preprocess():
            return processor(images=images, return_tensors="pt")["pixel_values"]

        def vision():
            return model.get_image_features(pixel_values=pv)

        def score():
            f = model.get_image_features(pixel_values=preprocess())
            f = f if torch.is_tensor(f) else f.pooler_output
            f = f / f.norm(p=2, dim=-1, keepdim=True)
            return torch.clamp(100 * f @ text.T, min=0)

        pre = timed(preprocess, args.warmup, args.iters)
        vis = timed(vision, args.warmup, args.iters)
        sc = timed(score, args.warmup, args.iters)

    print(json.dumps({
        "impl": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "arch": "clip-vit-large-patch14",
        "params_m": round(params / 1e6, 1),
        "batch": b,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "preprocess_images_per_s": b / pre,
        "vision_images_per_s": b / vis,
        "score_images_per_s": b / sc,
        "vision_batch_s": vis,
        "score_batch_s": sc,
    }))


if __name__ == "__main__":
    main()
