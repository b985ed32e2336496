#!/usr/bin/env python3
"""Generate the LoRA parity fixtures (fixtures/parity/lora/) for agfsync-models' LoRA loader.

Rerun from the repository root (CPU only, no network, about 1.5 minutes on 2 cores):

    python3 tools/parity/make_lora_fixtures.py            # writes fixtures/parity/lora/
    python3 tools/parity/make_lora_fixtures.py --out DIR  # writes elsewhere

Needs `peft` (0.21.2 was used; `pip install peft`). transformers 5.24 asks for peft >= 0.22 before it
lets a text encoder take an adapter, a release that did not exist when these fixtures were made; the
script lowers that version gate (only the gate: the adapter code that runs is peft 0.21.2's) and then
checks every diffusers output against an independent computation (the LoRA deltas added into a copy of
the base weights by hand), so a silently mis-loaded adapter cannot end up in a reference.

Inputs are the tiny SD 1.5 pipeline in fixtures/parity/tiny-sd15 and the inputs of the existing
references (ref-tiny-sd15-unet, ref-tiny-sd15-text-encoder, ref-tiny-sd15-sample-ddim), so the base
(no adapter) outputs are the ones in those files. Every file written is documented in
fixtures/parity/lora/README.md; keep the two in sync.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import transformers.integrations.peft as transformers_peft

# See the module docstring: transformers 5.24 gates its PEFT integration on an unreleased peft.
transformers_peft.MIN_PEFT_VERSION = "0.21.0"

import diffusers  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PARITY = REPO_ROOT / "fixtures" / "parity"
PIPELINE = PARITY / "tiny-sd15"

WEIGHT = 0.7  # adapter weight of every single-adapter reference
TWO_WEIGHTS = (0.7, 0.5)  # weights of the two-adapter reference (sd15-peft, sd15-kohya-conv-ff)
SAMPLE_PROMPT = "a red cube on a blue table"
SAMPLE_NEG = "blurry"
SAMPLE_CFG = 7.5
SAMPLE_STEPS = 8

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def save_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # One metadata key at most keeps reruns byte-identical (safetensors writes the map in hash order).
    save_file(out, str(path), metadata=metadata or {"format": "pt"})


def shapes_of(tensors):
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


def load_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def fill_lora(model, adapter, gen, up_std):
    """Overwrites every lora_A/lora_B of `adapter` with seeded random values (B nonzero)."""
    with torch.no_grad():
        for name, mod in sorted(model.named_modules(), key=lambda x: x[0]):
            if hasattr(mod, "lora_A") and adapter in mod.lora_A:
                a = mod.lora_A[adapter].weight
                b = mod.lora_B[adapter].weight
                fan_in = a[0].numel()
                a.copy_(torch.randn(a.shape, generator=gen) / fan_in ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * up_std)


# --------------------------------------------------------------------------------------
# the adapters
# --------------------------------------------------------------------------------------


def make_adapter_a(pipe):
    """Adapter A: r=4, lora_alpha=8 on the attention projections of the UNet and the text encoder,
    with a rank_pattern and an alpha_pattern so that per-module rank/alpha are exercised.
    Returns (unet_sd, te_sd, unet_cfg, te_cfg) with PEFT keys relative to each model."""
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_ATTN,
                          rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_v": 2})
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TE_ATTN)
    pipe.unet.add_adapter(unet_cfg, adapter_name="a")
    pipe.text_encoder.add_adapter(te_cfg, adapter_name="a")
    gen = torch.Generator().manual_seed(1234)
    fill_lora(pipe.unet, "a", gen, 0.15)
    fill_lora(pipe.text_encoder, "a", gen, 0.04)
    unet_sd = get_peft_model_state_dict(pipe.unet, adapter_name="a")
    te_sd = get_peft_model_state_dict(pipe.text_encoder, adapter_name="a")
    return unet_sd, te_sd, unet_cfg, te_cfg


def make_adapter_b(pipe):
    """Adapter B: r=2 on attention, feed-forward and the 1x1-conv proj_in/proj_out of the UNet, and on
    attention + MLP of the text encoder (kohya-only file, alpha=3 for every module)."""
    unet_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian",
                          target_modules=UNET_ATTN + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"])
    te_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian", target_modules=TE_ATTN + ["fc1", "fc2"])
    pipe.unet.add_adapter(unet_cfg, adapter_name="b")
    pipe.text_encoder.add_adapter(te_cfg, adapter_name="b")
    gen = torch.Generator().manual_seed(5678)
    fill_lora(pipe.unet, "b", gen, 0.2)
    fill_lora(pipe.text_encoder, "b", gen, 0.05)
    unet_sd = get_peft_model_state_dict(pipe.unet, adapter_name="b")
    te_sd = get_peft_model_state_dict(pipe.text_encoder, adapter_name="b")
    return unet_sd, te_sd, unet_cfg, te_cfg


def modules_of(sd):
    """PEFT state dict -> {module: (A, B)}."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            m = k[: -len(".lora_A.weight")]
            out[m] = (v, sd[m + ".lora_B.weight"])
    return out


def pattern_value(cfg_patterns, default, module):
    """peft's get_pattern_key rule: first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    import re

    for p, v in cfg_patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return default


def alphas_of(mods, cfg):
    return {m: float(pattern_value(cfg.alpha_pattern, cfg.lora_alpha, m)) for m in mods}


def clean_meta(d):
    """LoraConfig.to_dict() made reproducible: sets sorted, no machine-specific base model path."""
    d = dict(d)
    d["base_model_name_or_path"] = None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------
# writing the files
# --------------------------------------------------------------------------------------


def kohya_name(prefix, module):
    return prefix + module.replace(".", "_")


def write_kohya(path, unet_mods, unet_alphas, te_mods, te_alphas):
    """sd-scripts layout: lora_unet_<module with underscores>.{lora_down,lora_up}.weight + .alpha;
    text encoder modules under lora_te_ with transformers' `text_model.` path (as sd-scripts writes)."""
    sd = {}
    for m, (a, b) in unet_mods.items():
        n = kohya_name("lora_unet_", m)
        sd[n + ".lora_down.weight"] = a
        sd[n + ".lora_up.weight"] = b
        sd[n + ".alpha"] = torch.tensor(unet_alphas[m], dtype=torch.float32)
    for m, (a, b) in te_mods.items():
        n = kohya_name("lora_te_", "text_model." + m)
        sd[n + ".lora_down.weight"] = a
        sd[n + ".lora_up.weight"] = b
        sd[n + ".alpha"] = torch.tensor(te_alphas[m], dtype=torch.float32)
    save_st(path, sd, {"ss_network_module": "networks.lora"})


def legacy_unet_key(m):
    if m.startswith("up_blocks."):
        # the LoRACompatibleLinear spelling `<module>.lora.{down,up}.weight`, for the up blocks
        return m + ".lora"
    for proj, tag in [("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                      ("to_out.0", "to_out_lora")]:
        if m.endswith("." + proj):
            return m[: -len(proj)] + "processor." + tag
    return m + ".lora"


def legacy_te_key(m):
    for proj, tag in [("q_proj", "to_q_lora"), ("k_proj", "to_k_lora"), ("v_proj", "to_v_lora"),
                      ("out_proj", "to_out_lora")]:
        if m.endswith("." + proj):
            return "text_model." + m[: -len(proj)] + tag
    return "text_model." + m + ".lora_linear_layer"


def write_legacy(path, unet_mods, te_mods):
    """diffusers' pre-PEFT layout, no alphas (alpha = rank): attention-processor keys
    (`<attn>.processor.to_q_lora.down.weight`) for the down and mid blocks, `<module>.lora.down.weight`
    for the up blocks; text encoder `text_model.<layer>.self_attn.to_q_lora.down.weight`."""
    sd = {}
    for m, (a, b) in unet_mods.items():
        k = "unet." + legacy_unet_key(m)
        sd[k + ".down.weight"] = a
        sd[k + ".up.weight"] = b
    for m, (a, b) in te_mods.items():
        k = "text_encoder." + legacy_te_key(m)
        sd[k + ".down.weight"] = a
        sd[k + ".up.weight"] = b
    save_st(path, sd)


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def outputs(pipe, inputs, sample=True):
    with torch.no_grad():
        unet_out = pipe.unet(inputs["sample"], inputs["timestep"],
                             encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        te_out = pipe.text_encoder(inputs["input_ids"])[0]
        if not sample:
            return {"unet_out": unet_out, "te_last_hidden_state": te_out}
        lat = pipe(prompt=SAMPLE_PROMPT, negative_prompt=SAMPLE_NEG, height=32, width=32,
                   num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_CFG, eta=0.0,
                   latents=inputs["init_latents"].clone(), output_type="latent").images
        img = pipe(prompt=SAMPLE_PROMPT, negative_prompt=SAMPLE_NEG, height=32, width=32,
                   num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_CFG, eta=0.0,
                   latents=inputs["init_latents"].clone(), output_type="np").images
        ids = pipe.tokenizer([SAMPLE_NEG, SAMPLE_PROMPT], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
    return {
        "unet_out": unet_out,
        "te_last_hidden_state": te_out,
        "prompt_embeds": embeds,
        "final_latents": lat,
        "image": torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32),
    }


def manual_outputs(base, adapters, inputs):
    """The adapters added into a copy of the base weights by hand: W += weight * alpha / rank * B @ A.
    `adapters` is a list of (unet_mods, unet_alphas, te_mods, te_alphas, weight)."""
    unet = copy.deepcopy(base.unet)
    te = copy.deepcopy(base.text_encoder)
    with torch.no_grad():
        for unet_mods, unet_alphas, te_mods, te_alphas, w in adapters:
            for model, mods, alphas in [(unet, unet_mods, unet_alphas), (te, te_mods, te_alphas)]:
                named = dict(model.named_modules())
                for m, (a, b) in mods.items():
                    r = a.shape[0]
                    delta = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)) * (w * alphas[m] / r)
                    weight = named[m].weight
                    weight += delta.reshape(weight.shape)
        u = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        t = te(inputs["input_ids"])[0]
    return u, t


def check_close(what, ours, theirs, tol=2e-5):
    d = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if d > tol * max(scale, 1.0):
        raise SystemExit(f"{what}: diffusers and the hand-merged reference differ by {d} (scale {scale})")
    return d


def check_changed(what, lora_out, base_out, min_rel=0.02):
    d = (lora_out - base_out).abs().max().item() / base_out.abs().max().item()
    if d < min_rel:
        raise SystemExit(f"{what}: the adapter barely changes the output (relative {d})")
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=PARITY / "lora")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    unet_ref = load_file(str(PARITY / "ref-tiny-sd15-unet.safetensors"))
    te_ref = load_file(str(PARITY / "ref-tiny-sd15-text-encoder.safetensors"))
    ddim_ref = load_file(str(PARITY / "ref-tiny-sd15-sample-ddim.safetensors"))
    inputs = {
        "sample": unet_ref["sample"],
        "timestep": unet_ref["timestep"],
        "encoder_hidden_states": unet_ref["encoder_hidden_states"],
        "input_ids": te_ref["input_ids"],
        "init_latents": ddim_ref["init_latents"],
    }

    # ---- build the adapters on a scratch pipeline, write the files
    scratch = load_pipe()
    a_unet, a_te, a_ucfg, a_tcfg = make_adapter_a(scratch)
    b_unet, b_te, b_ucfg, b_tcfg = make_adapter_b(scratch)
    a_umods, a_tmods = modules_of(a_unet), modules_of(a_te)
    b_umods, b_tmods = modules_of(b_unet), modules_of(b_te)
    a_ualpha, a_talpha = alphas_of(a_umods, a_ucfg), alphas_of(a_tmods, a_tcfg)
    b_ualpha, b_talpha = alphas_of(b_umods, b_ucfg), alphas_of(b_tmods, b_tcfg)
    del scratch

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        # What diffusers' training scripts pass: the LoraConfig as a dict (sets become lists in the JSON).
        meta_u = clean_meta(a_ucfg.to_dict())
        meta_t = clean_meta(a_tcfg.to_dict())
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=a_unet, text_encoder_lora_layers=a_te,
            unet_lora_adapter_metadata=meta_u, text_encoder_lora_adapter_metadata=meta_t,
            weight_name="sd15-peft.safetensors")
        shutil.copy(Path(tmp) / "sd15-peft.safetensors", out / "sd15-peft.safetensors")
    files["sd15-peft.safetensors"] = "peft"
    write_kohya(out / "sd15-kohya.safetensors", a_umods, a_ualpha, a_tmods, a_talpha)
    files["sd15-kohya.safetensors"] = "kohya"
    write_kohya(out / "sd15-kohya-conv-ff.safetensors", b_umods, b_ualpha, b_tmods, b_talpha)
    files["sd15-kohya-conv-ff.safetensors"] = "kohya"
    write_legacy(out / "sd15-legacy.safetensors", a_umods, a_tmods)
    files["sd15-legacy.safetensors"] = "diffusers-legacy"

    # ---- references
    base = load_pipe()
    base_out = outputs(base, inputs)
    check_close("base unet vs ref-tiny-sd15-unet", base_out["unet_out"], unet_ref["out"], 1e-6)
    check_close("base image vs ref-tiny-sd15-sample-ddim", base_out["image"], ddim_ref["image"], 1e-6)

    a_all = (a_umods, a_ualpha, a_tmods, a_talpha)
    b_all = (b_umods, b_ualpha, b_tmods, b_talpha)
    # legacy files carry no alpha: alpha = rank for every module
    a_legacy = (a_umods, {m: a.shape[0] for m, (a, _) in a_umods.items()},
                a_tmods, {m: a.shape[0] for m, (a, _) in a_tmods.items()})
    cases = [
        # reference name, [(file, weight)], the same adapters for the hand-merged check
        ("sd15-peft", [("sd15-peft.safetensors", WEIGHT)], [(*a_all, WEIGHT)]),
        ("sd15-kohya-conv-ff", [("sd15-kohya-conv-ff.safetensors", WEIGHT)], [(*b_all, WEIGHT)]),
        ("sd15-legacy", [("sd15-legacy.safetensors", WEIGHT)], [(*a_legacy, WEIGHT)]),
        ("two-adapters", [("sd15-peft.safetensors", TWO_WEIGHTS[0]),
                          ("sd15-kohya-conv-ff.safetensors", TWO_WEIGHTS[1])],
         [(*a_all, TWO_WEIGHTS[0]), (*b_all, TWO_WEIGHTS[1])]),
    ]
    record = {"weight": WEIGHT, "refs": {}, "files": {}}

    def load_with_diffusers(loads):
        pipe = load_pipe()
        names = []
        for i, (fn, _) in enumerate(loads):
            pipe.load_lora_weights(str(out / fn), adapter_name=f"adapter{i}")
            names.append(f"adapter{i}")
        pipe.set_adapters(names, adapter_weights=[w for _, w in loads])
        return pipe

    for name, loads, manual in cases:
        pipe = load_with_diffusers(loads)
        res = outputs(pipe, inputs)
        mu, mt = manual_outputs(base, manual, inputs)
        du = check_close(f"{name} unet", res["unet_out"], mu)
        dt = check_close(f"{name} text encoder", res["te_last_hidden_state"], mt)
        cu = check_changed(f"{name} unet", res["unet_out"], base_out["unet_out"])
        ct = check_changed(f"{name} text encoder", res["te_last_hidden_state"], base_out["te_last_hidden_state"])
        fn = f"ref-{name}.safetensors"
        save_st(out / fn, res)
        record["refs"][fn] = {
            "lora_files": [{"file": f, "weight": w} for f, w in loads],
            "diffusers_vs_hand_merged_max_abs": {"unet_out": du, "te_last_hidden_state": dt},
            "relative_change_vs_base": {"unet_out": cu, "te_last_hidden_state": ct},
            "tensors": shapes_of(res),
        }
        print(f"{name}: unet vs hand-merged {du:.2e}, te {dt:.2e}; changes base by {cu:.3f} / {ct:.3f}")

    # sd15-kohya.safetensors is adapter A (the sd15-peft adapter) in sd-scripts' layout, with per-module
    # `.alpha` (2 on attn2.to_v, 8 elsewhere). sd-scripts applies alpha / rank per module, which is what
    # the PEFT file's alpha_pattern says too, so its expected outputs are ref-sd15-peft's. diffusers
    # 0.42.1 mis-applies non-uniform kohya alphas (its alpha_pattern keys keep the
    # `.processor.to_v_lora.down.weight` suffix and are ignored with a warning); record by how much.
    pipe = load_with_diffusers([("sd15-kohya.safetensors", WEIGHT)])
    res = outputs(pipe, inputs, sample=False)
    mu, mt = manual_outputs(base, [(*a_all, WEIGHT)], inputs)
    peft_ref = load_file(str(out / "ref-sd15-peft.safetensors"))
    check_close("sd15-kohya hand-merged vs ref-sd15-peft unet", mu, peft_ref["unet_out"])
    check_close("sd15-kohya hand-merged vs ref-sd15-peft te", mt, peft_ref["te_last_hidden_state"])
    record["kohya_nonuniform_alpha"] = {
        "file": "sd15-kohya.safetensors",
        "expected_outputs": "ref-sd15-peft.safetensors",
        "diffusers_0_42_1_unet_out_max_abs_error": (res["unet_out"] - mu).abs().max().item(),
        "diffusers_0_42_1_te_max_abs_error": (res["te_last_hidden_state"] - mt).abs().max().item(),
    }

    for fn, fmt in files.items():
        with safetensors.safe_open(str(out / fn), "pt") as f:
            keys = sorted(f.keys())
            meta = f.metadata()
        record["files"][fn] = {"format": fmt, "tensors": len(keys), "metadata_keys": sorted(meta or {})}
    record["inputs"] = {
        "unet": "ref-tiny-sd15-unet.safetensors: sample, timestep, encoder_hidden_states",
        "text_encoder": "ref-tiny-sd15-text-encoder.safetensors: input_ids",
        "sampling": "ref-tiny-sd15-sample-ddim.safetensors: init_latents",
    }
    record["sampling"] = {"scheduler": "DDIMScheduler.from_config(tiny-sd15 scheduler)", "steps": SAMPLE_STEPS,
                          "guidance_scale": SAMPLE_CFG, "eta": 0.0, "prompt": SAMPLE_PROMPT,
                          "negative_prompt": SAMPLE_NEG, "height": 32, "width": 32}
    record["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "safetensors": safetensors.__version__}
    with open(out / "lora.json", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
