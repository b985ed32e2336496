#!/usr/bin/env python3
"""Sanity-check fixtures/parity/ with diffusers/transformers (the Python side of the contract).

    python3 tools/parity/verify_fixtures.py [--dir fixtures/parity]

Reloads both tiny pipelines and the fp16 UNet variant from their folders exactly as a user
would (`StableDiffusionPipeline.from_pretrained(dir)`), checks that every weight file loads
with no missing/unexpected keys, and recomputes the reference tensors from the reloaded
models, comparing them with the stored ref-*.safetensors (max abs diff printed). Exits
non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
import transformers
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
FAIL = []


def check(name, a, b, tol):
    a = a.detach().float()
    b = b.detach().float()
    if a.shape != b.shape:
        FAIL.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        print(f"  FAIL {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        return
    d = (a - b).abs().max().item() if a.numel() else 0.0
    ok = d <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name:45s} max|diff|={d:.3e} (tol {tol:.0e}, max|ref|={b.abs().max().item():.3e})")
    if not ok:
        FAIL.append(f"{name}: {d}")


def tokenize(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def verify_pipeline(root: Path, name: str):
    print(f"== {name}")
    pdir = root / name
    meta = json.loads((root / f"ref-{name}.json").read_text())
    # layout
    expected = {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    }
    have = {str(p.relative_to(pdir)) for p in pdir.rglob("*") if p.is_file()}
    if have != expected:
        FAIL.append(f"{name}: layout {sorted(have ^ expected)}")
        print(f"  FAIL layout: unexpected/missing {sorted(have ^ expected)}")
    with safe_open(str(pdir / "text_encoder/model.safetensors"), "pt") as f:
        if not all(k.startswith("text_model.") for k in f.keys()):
            FAIL.append(f"{name}: text encoder keys lack text_model. prefix")

    # component loads report no missing / unexpected keys
    _, info = CLIPTextModel.from_pretrained(str(pdir / "text_encoder"), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    print(f"  text_encoder loading info: {dict((k, len(v)) for k, v in info.items())}")
    if bad:
        FAIL.append(f"{name}: text encoder load {bad}")
    _, info = UNet2DConditionModel.from_pretrained(str(pdir / "unet"), output_loading_info=True)
    print(f"  unet loading info: {dict((k, len(v)) for k, v in info.items())}")
    if any(v for k, v in info.items() if k != "error_msgs"):
        FAIL.append(f"{name}: unet load {info}")

    pipe = StableDiffusionPipeline.from_pretrained(str(pdir))
    pipe.set_progress_bar_config(disable=True)
    print("  components:", {k: type(v).__name__ for k, v in pipe.components.items()})
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae

    r = load_file(str(root / f"ref-{name}-tokenizer.safetensors"))
    ids = tokenize(tok, meta["tokenizer"]["prompts"])
    if not torch.equal(ids, r["input_ids"]):
        FAIL.append(f"{name}: input_ids differ")
        print("  FAIL input_ids")
    else:
        print("  ok   input_ids identical")
    # The folder has no tokenizer.json: the fast tokenizer is built from vocab.json + merges.txt.
    tok2 = CLIPTokenizer(vocab=str(pdir / "tokenizer/vocab.json"), merges=str(pdir / "tokenizer/merges.txt"),
                         pad_token=tok.pad_token, model_max_length=77)
    if not torch.equal(tokenize(tok2, meta["tokenizer"]["prompts"]), r["input_ids"]):
        FAIL.append(f"{name}: CLIPTokenizer(vocab, merges) differs")
    if name == "tiny-sd15":
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(root / "clip-tokenizer-fast.json"))
        for row, prompt in zip(r["input_ids"].tolist(), meta["tokenizer"]["prompts"]):
            enc = fast.encode(prompt).ids
            n = min(len(enc), 76)
            want = row[:n] if len(enc) <= 77 else row[:76]
            if enc[:n] != want:
                FAIL.append(f"clip-tokenizer-fast.json differs on {prompt[:30]!r}")
        for case in meta["tokenizer"]["edge_cases"]:
            if fast.encode(case["text"]).ids != case["ids"]:
                FAIL.append(f"clip-tokenizer-fast.json differs on edge case {case['text']!r}")
    for case in meta["tokenizer"]["edge_cases"]:
        if tok(case["text"]).input_ids != case["ids"]:
            FAIL.append(f"{name}: edge case {case['text']!r}")
            print(f"  FAIL edge case {case['text']!r}")

    with torch.no_grad():
        r = load_file(str(root / f"ref-{name}-text-encoder.safetensors"))
        o = te(r["input_ids"], output_hidden_states=True)
        check("text.last_hidden_state", o.last_hidden_state, r["last_hidden_state"], 1e-5)
        check("text.penultimate", te.final_layer_norm(o.hidden_states[-2]), r["penultimate"], 1e-5)
        check("text.hidden_states_minus2", o.hidden_states[-2], r["hidden_states_minus2"], 1e-5)
        check("text.pooled", o.pooler_output, r["pooled"], 1e-5)

        r = load_file(str(root / f"ref-{name}-unet.safetensors"))
        check("unet.out", unet(r["sample"], r["timestep"], r["encoder_hidden_states"]).sample, r["out"], 1e-5)
        check("unet.out_float", unet(r["sample"], r["timestep_float"], r["encoder_hidden_states"]).sample,
              r["out_float"], 1e-5)

        r = load_file(str(root / f"ref-{name}-vae.safetensors"))
        check("vae.decoded", vae.decode(r["latents"]).sample, r["decoded"], 1e-5)
        d = vae.encode(r["image"]).latent_dist
        check("vae.enc_mean", d.mean, r["enc_mean"], 1e-5)
        check("vae.enc_std", d.std, r["enc_std"], 1e-5)

    base = pipe.scheduler.config
    for tag, s in meta["sampling"].items():
        r = load_file(str(root / s["file"]))
        cls = {"DDIMScheduler": DDIMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[s["scheduler_class"]]
        pipe.scheduler = cls.from_config(base)
        kw = dict(height=32, width=32, num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                  latents=r["init_latents"].clone(), output_type="latent")
        if s["eta"] is not None:
            kw["eta"] = s["eta"]
        if s["clip_skip"] is None:
            kw.update(prompt=s["prompt"], negative_prompt=s["negative_prompt"])
        else:
            n = r["prompt_embeds"].shape[0]
            kw.update(prompt_embeds=r["prompt_embeds"][n - 1:], negative_prompt_embeds=r["prompt_embeds"][:1])
        with torch.no_grad():
            lat = pipe(**kw).images
        if num_list(pipe.scheduler.timesteps) != s["timesteps"]:
            FAIL.append(f"{name}/{tag}: timesteps")
        check(f"sample[{tag}].final_latents", lat, r["final_latents"], 1e-4)
        with torch.no_grad():
            dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        img = torch.from_numpy(np.ascontiguousarray(pipe.image_processor.postprocess(dec, output_type="np")))
        check(f"sample[{tag}].image", img, r["image"], 1e-4)
    return pipe


def num_list(t):
    if not t.is_floating_point():
        return [int(v) for v in t.tolist()]
    return [float(str(np.float32(v))) for v in t.tolist()]


def verify_fp16(root: Path, unet_f32):
    print("== tiny-sd15-fp16")
    d = root / "tiny-sd15-fp16" / "unet"
    files = sorted(p.name for p in d.iterdir())
    print("  files:", files)
    with safe_open(str(d / "diffusion_pytorch_model.fp16.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        keys16 = set(f.keys())
    print("  stored dtypes:", dtypes)
    if dtypes != {"F16"}:
        FAIL.append(f"fp16 dtypes {dtypes}")
    if keys16 != set(unet_f32.state_dict().keys()):
        FAIL.append("fp16 key set differs from the f32 unet")
    u_default = UNet2DConditionModel.from_pretrained(str(d), variant="fp16")
    print("  from_pretrained(variant='fp16') without torch_dtype ->", u_default.dtype)
    try:
        UNet2DConditionModel.from_pretrained(str(d))
        print("  from_pretrained without variant: loaded (unexpected)")
    except Exception as e:  # noqa: BLE001
        print(f"  from_pretrained without variant: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    u = UNet2DConditionModel.from_pretrained(str(d), variant="fp16", torch_dtype=torch.float32).eval()
    sd32 = unet_f32.state_dict()
    worst = max((u.state_dict()[k] - sd32[k].half().float()).abs().max().item() for k in sd32)
    print(f"  fp16 weights == round_to_f16(f32 weights): max diff {worst}")
    if worst != 0:
        FAIL.append("fp16 weights are not the f16 rounding of the f32 weights")
    r = load_file(str(root / "ref-tiny-sd15-fp16-unet.safetensors"))
    with torch.no_grad():
        out = u(r["sample"], r["timestep"], r["encoder_hidden_states"]).sample
    check("fp16unet.out", out, r["out"], 1e-5)
    r32 = load_file(str(root / "ref-tiny-sd15-unet.safetensors"))
    print(f"  (info) |out_fp16weights - out_f32weights|max = {(r['out'] - r32['out']).abs().max().item():.3e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(REPO_ROOT / "fixtures" / "parity"))
    root = Path(ap.parse_args().dir)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    pipe15 = verify_pipeline(root, "tiny-sd15")
    verify_pipeline(root, "tiny-sd2")
    verify_fp16(root, pipe15.unet)
    mine = [p for p in root.rglob("*") if p.is_file()
            and p.relative_to(root).parts[0] not in ("schedulers", "tokenizer")]  # other generators' dirs
    total = sum(p.stat().st_size for p in mine)
    print(f"size of make_fixtures.py outputs: {total / 2**20:.2f} MiB ({len(mine)} files)")
    if FAIL:
        print("FAILED:", *FAIL, sep="\n  ")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
