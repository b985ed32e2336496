#!/usr/bin/env python3
"""FLOPs of the benchmark workloads, counted by PyTorch's FlopCounterMode (matrix products and
convolutions, 2 FLOPs per multiply-add: the bulk of the work).

    python3 tools/bench/flops.py [--latent 32] > flops.json

Counts each workload as the benchmarks run it (random weights): the SD 1.5 and SDXL UNet step
(batch 2), the CLIP ViT-L/14 vision tower (batch 8, 224 px), the VAE decode of one image
(--vae-size), and one Diffusion-DPO step on SD 1.5 with one pair, LoRA and full (trained forward of winner and loser, backward, reference
forward). Prints one JSON object keyed as tools/bench/table.py looks rows up
("unet_step/sd15/b2/32", "clip_vision/b8", "dpo_step/sd15/p1/32/lora", ...), in GFLOP.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from torch_bench import SD15_UNET, SDXL_UNET, VAE, VIT_L14


def count(fn) -> float:
    with FlopCounterMode(display=False) as m:
        fn()
    return m.get_total_flops() / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--vae-size", type=int, default=256, help="image side of the VAE decode")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    n = args.latent
    out = {}
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    x = torch.randn(2, 4, n, n)
    t = torch.tensor([999, 1])
    ehs = torch.randn(2, 77, 768)
    with torch.no_grad():
        out[f"unet_step/sd15/b2/{n}"] = count(lambda: unet(x, t, ehs))

    # Full DPO step: trained forward and backward (input and weight gradients), frozen
    # reference forward.
    ref = copy.deepcopy(unet).requires_grad_(False)

    def dpo_full():
        unet(x, t, ehs).sample.float().pow(2).mean().backward()
        with torch.no_grad():
            ref(x, t, ehs)

    out[f"dpo_step/sd15/p1/{n}/full"] = count(dpo_full)
    del ref
    unet.zero_grad(set_to_none=True)

    # LoRA DPO step: frozen weights need no weight gradients; only the adapters' are counted.
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))

    def dpo_lora():
        unet(x, t, ehs).sample.float().pow(2).mean().backward()
        with torch.no_grad():
            unet.disable_adapters()
            unet(x, t, ehs)
            unet.enable_adapters()

    out[f"dpo_step/sd15/p1/{n}/lora"] = count(dpo_lora)
    del unet
    xl = UNet2DConditionModel(**SDXL_UNET).eval()
    px = float(8 * n)
    with torch.no_grad():
        out[f"unet_step/sdxl/b2/{n}"] = count(lambda: xl(
            x, t, torch.randn(2, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                               "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * 2)}))
    del xl
    vcfg = CLIPVisionConfig(**VIT_L14["vision_config"])
    clip = CLIPVisionModelWithProjection(vcfg).eval()
    with torch.no_grad():
        out["clip_vision/b8"] = count(lambda: clip(pixel_values=torch.randn(8, 3, 224, 224)))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE).eval()
    side = args.vae_size // 8
    with torch.no_grad():
        out[f"vae_decode/{side * 8}"] = count(lambda: vae.decode(torch.randn(1, 4, side, side)))
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
