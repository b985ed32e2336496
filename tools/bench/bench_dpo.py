#!/usr/bin/env python3
"""PyTorch CPU baseline for one Diffusion-DPO optimizer step on the SD 1.5 UNet.

    python3 tools/bench/bench_dpo.py [--full] [--gradient-checkpointing] [--iters 3] [--threads N]

The step that diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
takes, written out here on random weights (no data loading, no VAE): one pair (winner and
loser latents [1,4,32,32], shared noise and timestep), text conditioning [1,77,768], the
trained UNet on both, the reference without grad (LoRA: the same UNet with adapters
disabled; --full: a frozen deep copy), the DPO loss with beta 5000, backward, gradient
clipping at 1.0, AdamW (lr 1e-5, weight decay 0.01). LoRA: PEFT rank 4, alpha 4 on
to_q/to_k/to_v/to_out.0, as the diffusers script. f32.

Prints ONE JSON line: {"impl":"pytorch","mode":..,"median_s":..,"peak_rss_mib":..}.
Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

from bench_unet import SD15_UNET_CONFIG, rss_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="train the whole UNet against a frozen copy")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--beta", type=float, default=5000.0)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    if args.full:
        ref_unet = copy.deepcopy(unet).requires_grad_(False)
        params = list(unet.parameters())
    else:
        from peft import LoraConfig

        ref_unet = None
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    n_train = sum(p.numel() for p in params)

    g = torch.Generator().manual_seed(1)
    lat_w = torch.randn(1, 4, 32, 32, generator=g)
    lat_l = torch.randn(1, 4, 32, 32, generator=g)
    ehs = torch.randn(1, 77, 768, generator=g)

    def step():
        latents = torch.cat([lat_w, lat_l])
        noise = torch.randn(1, 4, 32, 32).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (1,)).repeat(2)
        noisy = sched.add_noise(latents, noise, t)
        cond = ehs.repeat(2, 1, 1)
        pred = unet(noisy, t, cond).sample
        model_losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        mw, ml = model_losses.chunk(2)
        with torch.no_grad():
            if ref_unet is None:
                unet.disable_adapters()
                ref = unet(noisy, t, cond).sample
                unet.enable_adapters()
            else:
                ref = ref_unet(noisy, t, cond).sample
            ref_losses = F.mse_loss(ref.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            rw, rl = ref_losses.chunk(2)
        inside = -0.5 * args.beta * ((mw - ml) - (rw - rl))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    for i in range(args.iters + 1):
        s = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - s
        print(f"{'warmup' if i == 0 else 'step'} {i}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr)
        if i >= 1:
            times.append(dt)
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "pytorch",
        "mode": "full" if args.full else "lora",
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "peak_rss_mib": round(ru / 2**20, 1),
        "rss_now_mib": round(rss_bytes() / 2**20, 1),
        "trainable_params": n_train,
    }))


if __name__ == "__main__":
    main()
