#!/usr/bin/env python3
"""PyTorch CPU baseline for one SD 1.5 UNet forward (the hot loop of sampling with CFG).

    python3 tools/bench/bench_unet.py [--threads N] [--iters 5] [--warmup 2] [--latent 32]

Builds diffusers' UNet2DConditionModel with the real SD 1.5 config (random weights, f32,
eval, torch.inference_mode), runs batch 2 (CFG: uncond + cond) latents [2,4,L,L] with
per-sample timesteps and encoder_hidden_states [2,77,768], and prints ONE JSON line:

    {"impl":"pytorch","torch":..,"threads":..,"median_s":..,"peak_rss_mib":..,...}

median_s       median wall time of --iters forwards after --warmup forwards
peak_rss_mib   peak RSS of the whole process (getrusage ru_maxrss), includes the ~3.3 GiB
               of f32 weights and anything the model construction touched
forward_peak_above_baseline_mib
               peak RSS during the timed/warmup forwards minus RSS just before them
               (Linux: VmHWM reset through /proc/self/clear_refs; elsewhere a 1 ms
               sampling thread), i.e. activation/workspace memory of the forward
Diagnostics go to stderr; stdout is only the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time

SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: echo 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Fallback when VmHWM can't be reset: sample RSS every ~1 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--iters", type=int, default=5, help="timed forwards (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32, help="latent H=W (32 -> 256x256 images)")
    ap.add_argument("--batch", type=int, default=2, help="2 = one CFG step for one image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="UNet architecture")
    args = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    config = SDXL_UNET_CONFIG if args.arch == "sdxl" else SD15_UNET_CONFIG
    unet = UNet2DConditionModel(**config).eval()  # f32 by default
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"built UNet ({n_params / 1e6:.1f} M params) in {build_s:.1f}s", file=sys.stderr)

    b, L = args.batch, args.latent
    g = torch.Generator().manual_seed(args.seed + 1)
    sample = torch.randn(b, 4, L, L, generator=g)
    ehs = torch.randn(b, 77, config["cross_attention_dim"], generator=g)
    added = None
    if args.arch == "sdxl":
        added = {"text_embeds": torch.randn(b, 1280, generator=g),
                 "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b)}
    timesteps = torch.linspace(999, 1, b).round().to(torch.int64)  # per-sample, e.g. [999, 1]

    times = []
    with torch.inference_mode():
        base_rss = rss_bytes()
        hwm_ok = reset_hwm() and hwm_bytes() is not None
        sampler = None if hwm_ok else PeakSampler().__enter__()
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            out = unet(sample, timesteps, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
            dt = time.perf_counter() - t
            print(f"{'warmup' if i < args.warmup else 'iter'} {i}: {dt:.3f}s", file=sys.stderr)
            if i >= args.warmup:
                times.append(dt)
        if hwm_ok:
            peak_fwd = hwm_bytes()
            method = "VmHWM reset via /proc/self/clear_refs"
        else:
            sampler.__exit__()
            peak_fwd = sampler.peak
            method = "1ms RSS sampling thread"
    assert out.shape == (b, 4, L, L) and torch.isfinite(out).all()

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_bytes = ru if sys.platform == "darwin" else ru * 1024  # Linux reports KiB, macOS bytes
    res = {
        "impl": "pytorch",
        "arch": args.arch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "median_s": round(statistics.median(times), 4),
        "peak_rss_mib": round(ru_bytes / 2**20, 1),
        "forward_peak_above_baseline_mib": round((peak_fwd - base_rss) / 2**20, 1),
        "baseline_rss_mib": round(base_rss / 2**20, 1),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "iters": args.iters,
        "warmup": args.warmup,
        "batch": b,
        "latent_hw": L,
        "dtype": "f32",
        "params_m": round(n_params / 1e6, 2),
        "build_s": round(build_s, 2),
        "peak_method": method,
        "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
