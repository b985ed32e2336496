#!/usr/bin/env python3
"""The benchmark table: agfsync against PyTorch, from the JSON lines of `agfsync bench` and
tools/bench/torch_bench.py (tools/bench/suite.sh and tools/cuda/gpu_bench.sh call this).

    python3 tools/bench/table.py results.jsonl [--title T] [--machine M]
                                 [--flops flops.json] [--peak-gflops P]

One row per workload (bench, arch, dtype, mode, size): median time of each, the ratio
(agfsync / PyTorch: below 1 is faster), peak memory of each and its ratio, and, with
--flops (the output of tools/bench/flops.py) and --peak-gflops, the achieved GFLOP/s and
the share of the machine's peak.
"""

from __future__ import annotations

import argparse
import json


def flops_key(r: dict) -> str | None:
    """The tools/bench/flops.py key of a row's workload, when it counts it."""
    b = r.get("bench")
    if b == "unet_step":
        return f"unet_step/{r.get('arch')}/b{r.get('batch')}/{r.get('latent_hw')}"
    if b == "clip_score":
        return f"clip_vision/b{r.get('batch')}"
    if b == "vae_decode":
        return f"vae_decode/{r.get('size')}"
    if b == "dpo_step":
        return f"dpo_step/{r.get('arch')}/p{r.get('pairs')}/{r.get('latent_hw')}/{r.get('mode', 'full')}"
    return None


def what(r: dict) -> str:
    b = r.get("bench")
    if b == "unet_step":
        return f"UNet step, batch {r.get('batch')}, {r.get('latent_hw')}x{r.get('latent_hw')} latents"
    if b == "sample":
        return f"one image, {r.get('size')} px, {r.get('steps')} steps {r.get('scheduler', '')}, CFG"
    if b == "vae_decode":
        return f"VAE decode, one {r.get('size')}x{r.get('size')} image"
    if b == "clip_score":
        return f"CLIP vision tower, batch {r.get('batch')}"
    if b == "vqa":
        return (f"VQA P(yes), {r.get('questions')} questions about one image, "
                f"{r.get('lm_layers')} LM layers")
    if b == "dpo_step":
        ck = ", checkpointing" if r.get("gradient_checkpointing") else ""
        return (f"DPO step ({r.get('mode', 'full')}{ck}), {r.get('pairs')} pair(s), "
                f"{r.get('latent_hw')}x{r.get('latent_hw')} latents")
    return str(b)


def seconds(r: dict | None) -> float | None:
    """The row's time: the vision tower's batch time for CLIP (the ratio the issue asks for),
    else the median."""
    if r is None or "skipped" in r:
        return None
    if r.get("bench") == "clip_score":
        return r.get("vision_batch_s")
    return r.get("median_s")


def memory(r: dict | None) -> float | None:
    """Peak device memory on CUDA (agfsync does not report it yet), host RSS on CPU."""
    if r is None:
        return None
    if str(r.get("device", "")).startswith("cuda"):
        return r.get("peak_mem_mib")
    return r.get("peak_rss_mib")


def fmt_s(s: float | None, r: dict | None) -> str:
    if r is not None and "skipped" in r:
        return "skipped"
    if s is None:
        return "-"
    out = f"{s:.2f} s" if s >= 1 else f"{1000 * s:.1f} ms"
    if r is not None and r.get("finite") is False:
        out += " (non-finite)"
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--title", default="agfsync benchmark")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--flops", default=None, help="JSON from tools/bench/flops.py")
    ap.add_argument("--peak-gflops", type=float, default=None, help="the machine's peak GFLOP/s")
    args = ap.parse_args()

    rows = []
    for line in open(args.results):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    flops = json.load(open(args.flops)) if args.flops else {}

    fields = {
        "unet_step": ("arch", "batch", "latent_hw"),
        "sample": ("arch", "size", "steps"),
        "vae_decode": ("size",),
        "vqa": ("questions", "lm_layers"),
        "clip_score": ("batch",),
        "dpo_step": ("arch", "mode", "gradient_checkpointing", "pairs", "latent_hw"),
    }

    def key(r):
        b = r.get("bench")
        return (b, r.get("dtype"), bool(r.get("tiny"))) + tuple(r.get(f) for f in fields.get(b, ()))

    order, by = [], {}
    for r in rows:
        k = key(r)
        if k not in by:
            by[k] = {}
            order.append(k)
        by[k][r.get("impl")] = r

    print(f"# {args.title}\n")
    if args.machine:
        print(f"Machine: {args.machine}\n")
    print("Random weights, real architectures; median wall time after warm-up; peak memory of the")
    print("process during the workload (host RSS on CPU, allocated device memory on CUDA).\n")
    head = "| workload | arch | dtype | agfsync | PyTorch | time ratio | agfsync peak | PyTorch peak | memory ratio |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    show_flops = bool(flops)
    if show_flops:
        head += " agfsync GFLOP/s | PyTorch GFLOP/s |"
        rule += " --- | --- |"
        if args.peak_gflops:
            head += " agfsync % of peak | PyTorch % of peak |"
            rule += " --- | --- |"
    print(head)
    print(rule)
    for k in order:
        a, p = by[k].get("agfsync"), by[k].get("pytorch")
        ref = a or p
        sa, sp = seconds(a), seconds(p)
        ma, mp = memory(a), memory(p)
        cells = [what(ref), str(ref.get("arch", "-")), str(ref.get("dtype", "-")), fmt_s(sa, a), fmt_s(sp, p),
                 ratio(sa, sp), f"{ma:.0f} MiB" if ma else "-", f"{mp:.0f} MiB" if mp else "-", ratio(ma, mp)]
        if show_flops:
            g = flops.get(flops_key(ref) or "")
            rate = [g / s if g and s else None for s in (sa, sp)]
            cells += [f"{x:.0f}" if x else "-" for x in rate]
            if args.peak_gflops:
                cells += [f"{100 * x / args.peak_gflops:.0f}%" if x else "-" for x in rate]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
