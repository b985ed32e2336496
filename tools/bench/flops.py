#!/usr/bin/env python3
"""FLOPs of the benchmark workloads, counted by PyTorch's FlopCounterMode.

    python3 tools/bench/flops.py

Counts one forward of each workload as the benchmarks run it (random weights): the SD 1.5
and SDXL UNet step (batch 2, 32x32 latents), the CLIP ViT-L/14 vision tower (batch 8,
224 px), and one Diffusion-DPO LoRA step on SD 1.5 (trained forward of winner and loser,
reference forward, backward; FlopCounterMode counts matmuls and convolutions, the bulk of
the work). Prints one JSON line; docs/benchmarks.md divides these by measured times for
achieved GFLOP/s.
"""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_unet import SD15_UNET_CONFIG, SDXL_UNET_CONFIG


def count(fn) -> float:
    with FlopCounterMode(display=False) as m:
        fn()
    return m.get_total_flops() / 1e9


def main():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    out = {}
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([999, 1])
    ehs = torch.randn(2, 77, 768)
    with torch.no_grad():
        out["sd15_unet_step_gflop"] = count(lambda: unet(x, t, ehs))
    # DPO LoRA step: trained forward + backward (about 2x the forward for
    # the input gradients; frozen weights need no weight gradients, which
    # the count below includes only for the adapters) and the reference.
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))

    def dpo():
        pred = unet(x, t, ehs).sample
        pred.float().pow(2).mean().backward()
        with torch.no_grad():
            unet.disable_adapters()
            unet(x, t, ehs)
            unet.enable_adapters()

    out["sd15_dpo_lora_step_gflop"] = count(dpo)
    del unet
    xl = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    with torch.no_grad():
        out["sdxl_unet_step_gflop"] = count(lambda: xl(
            x, t, torch.randn(2, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                               "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}))
    del xl
    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768)
    clip = CLIPVisionModelWithProjection(vcfg).eval()
    with torch.no_grad():
        out["clip_vit_l14_batch8_gflop"] = count(lambda: clip(pixel_values=torch.randn(8, 3, 224, 224)))
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
