#!/usr/bin/env python3
"""Generate the numerical parity fixtures for agfsync's Rust model code.

Rerun (from the repository root, CPU only, no network needed; ~1-2 minutes):

    python3 tools/parity/make_fixtures.py            # writes fixtures/parity/
    python3 tools/parity/make_fixtures.py --out DIR  # writes elsewhere

Made with (also recorded in fixtures/parity/VERSIONS.json, which the script
rewrites on every run; the ref tensors are only guaranteed for these):

    python 3.11.7, torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.24.0,
    tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6

Nothing is downloaded: the tokenizer (vocab.json/merges.txt), the tiny UNet,
VAE, CLIP text encoder and scheduler configs are all built here, with fixed
seeds (torch.manual_seed); two reruns on the same machine and versions produced
byte-identical files. Model widths are smaller than SD's (size budget ~4 MB);
see tools/parity/README.md.

The contract (file names, tensor names, shapes, meaning) is documented in
tools/parity/README.md. Keep the two in sync.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import regex
import torch

import diffusers
import safetensors
import tokenizers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def f32_list(x):
    """Tensor/array -> nested python lists of floats that round-trip exactly through f32.

    str(np.float32) is the shortest decimal that parses back to the same f32,
    which keeps the JSON small and lossless for f32 consumers.
    """
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)

    def rec(v):
        if v.ndim == 0:
            v = np.float32(v)
            return float(str(v)) if np.isfinite(v) else str(v)
        return [rec(e) for e in v]

    return rec(a)


def num_list(t):
    """Timesteps: ints stay ints, floats go through f32_list."""
    if isinstance(t, torch.Tensor) and not t.is_floating_point():
        return [int(v) for v in t.tolist()]
    return f32_list(t)


def save_st(path: Path, tensors: dict[str, torch.Tensor]):
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float32)
        out[k] = v.contiguous()
    # A single metadata key: safetensors writes the metadata map in hash order, so more than one key
    # would make reruns differ byte-wise even when every tensor is identical.
    save_file(out, str(path), metadata={"format": "pt"})


def shapes_of(tensors: dict[str, torch.Tensor]):
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


# --------------------------------------------------------------------------------------
# 1a. tiny CLIP BPE tokenizer
# --------------------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode mapping (same order as openai/CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

# Small English corpus the merges are learned from (prompt-like vocabulary).
CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, digital art
a red cube on a blue table next to a green sphere and a yellow cone
a painting of a cat sitting on a chair in the garden with flowers and trees
the quick brown fox jumps over the lazy dog near the river in the morning light
a portrait of a young woman with long hair wearing a hat, oil painting, trending
an old man reading a book by the window, soft light, photograph, sharp focus
three dogs playing with a ball in the park under a bright sunny sky
a city street at night with cars and people walking in the rain, neon lights
a bowl of fruit with apples, oranges and bananas on a wooden kitchen table
a small house in the mountains covered with snow during the winter evening
a beautiful landscape with a lake, forest and mountains at sunset, cinematic
two birds flying above the ocean waves, water and clouds, realistic photo
a close up of a flower with a bee collecting pollen, macro photography
an illustration of a robot holding a cup of coffee in a modern office
a black and white picture of a train crossing a bridge over the valley
the astronaut is standing next to the horse and looking at the stars
children are running through the field of grass while their parents watch
a delicious pizza with cheese and tomatoes, food photography, studio lighting
a knight in shining armor fighting a dragon in front of a castle, fantasy art
a watercolor painting of a boat on the sea with the sun behind the clouds
there are many people in the room and they are talking to each other
this is the best picture that i have ever seen in my entire life
she walked into the kitchen and started cooking dinner for her family
he is wearing a blue shirt and black pants with white shoes
an elephant and a giraffe standing together in the savanna at dawn
a glass of water on the table with ice and a slice of lemon
"""


def learn_merges(text: str, n_merges: int):
    """Plain greedy BPE on the CLIP pre-tokenisation, CLIP '</w>' word-end convention.

    Deterministic: ties broken by the pair itself. A pair whose concatenation is
    already a token is skipped so every merge yields a new, unique vocab entry
    (the openai/CLIP vocab is built as bytes + bytes</w> + one entry per merge).
    """
    be = bytes_to_unicode()
    words = collections.Counter()
    for tok in CLIP_PAT.findall(text.lower()):
        t = "".join(be[b] for b in tok.encode("utf-8"))
        words[tuple(t[:-1]) + (t[-1] + "</w>",)] += 1
    known = set(be.values()) | {v + "</w>" for v in be.values()}
    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        cands = sorted(((-c, p) for p, c in pairs.items() if p[0] + p[1] not in known))
        if not cands:
            break
        best = cands[0][1]
        merges.append(best)
        known.add(best[0] + best[1])
        new_words = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


N_MERGES = 400


def build_tokenizer_files(out_dir: Path, merges, pad_token: str):
    """Write the openai/CLIP (SD 1.5 `tokenizer/`) slow layout: vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json. No tokenizer.json (as in SD 1.5)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bu = list(bytes_to_unicode().values())
    vocab_list = bu + [v + "</w>" for v in bu] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab_list)) == len(vocab_list)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        # The first line is a header: the legacy (slow) CLIPTokenizer always skips line 0.
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    cfg = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    }
    with open(out_dir / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    stm = {
        "bos_token": {k: v for k, v in added("<|startoftext|>").items() if k != "__type"},
        "eos_token": {k: v for k, v in added("<|endoftext|>").items() if k != "__type"},
        "pad_token": pad_token,
        "unk_token": {k: v for k, v in added("<|endoftext|>").items() if k != "__type"},
    }
    with open(out_dir / "special_tokens_map.json", "w") as f:
        json.dump(stm, f, indent=2)
        f.write("\n")
    return vocab


# --------------------------------------------------------------------------------------
# 1b. tiny pipelines
# --------------------------------------------------------------------------------------

SD15_SCHEDULER_CONFIG = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def make_vae(seed):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def make_text_encoder(seed, vocab_size, bos, eos, pad, act):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return CLIPTextModel(cfg).eval()


def make_unet_sd15(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 24),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers legacy naming: this is the number of heads
        norm_num_groups=8,
    ).eval()


def make_unet_sd2(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=[2, 4, 8],  # number of heads per level (SD 2 legacy naming)
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=4,
    ).eval()


def prefix_text_encoder_weights(te_dir: Path):
    """transformers>=5 saves CLIPTextModel without the `text_model.` prefix; every real SD
    checkpoint (and transformers 4.x) uses `text_model.*`. Rewrite to the real layout
    (transformers 5 strips the prefix again on load)."""
    p = te_dir / "model.safetensors"
    sd = load_file(str(p))
    if all(k.startswith("text_model.") for k in sd):
        return
    sd = {("text_model." + k if not k.startswith("text_model.") else k): v.contiguous() for k, v in sd.items()}
    save_file(sd, str(p), metadata={"format": "pt"})


def build_pipeline(name, out_root: Path, merges, seed_base):
    sd2 = name == "tiny-sd2"
    pad_token = "!" if sd2 else "<|endoftext|>"
    tmp_tok = out_root / f".tok-{name}"
    vocab = build_tokenizer_files(tmp_tok, merges, pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_tok))
    assert tokenizer.model_max_length == 77
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (bos, eos) == (len(vocab) - 2, len(vocab) - 1)
    assert pad == (0 if sd2 else eos)

    text_encoder = make_text_encoder(seed_base + 1, len(vocab), bos, eos, pad, "gelu" if sd2 else "quick_gelu")
    unet = make_unet_sd2(seed_base + 2) if sd2 else make_unet_sd15(seed_base + 2)
    vae = make_vae(seed_base + 3)
    if sd2:
        scheduler = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG)
    else:
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pdir = out_root / name
    if pdir.exists():
        shutil.rmtree(pdir)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    # Replace whatever transformers 5 wrote for the tokenizer (tokenizer.json + a v5-style
    # tokenizer_config.json) with the SD 1.5 slow layout.
    shutil.rmtree(pdir / "tokenizer")
    shutil.copytree(tmp_tok, pdir / "tokenizer")
    shutil.rmtree(tmp_tok)
    prefix_text_encoder_weights(pdir / "text_encoder")
    return pdir, unet


# --------------------------------------------------------------------------------------
# 1c. reference outputs
# --------------------------------------------------------------------------------------

LONG_PROMPT = (
    "a highly detailed photograph of an old stone lighthouse standing on a rocky cliff above a stormy "
    "ocean at sunset, with dramatic orange and purple clouds filling the sky, waves crashing against "
    "the rocks below, seagulls flying around the tower, a small wooden boat struggling in the distance, "
    "warm light glowing from the windows of the keeper's house, wet grass and wild flowers in the "
    "foreground, long exposure, cinematic composition, sharp focus, intricate textures, volumetric "
    "lighting, award winning landscape photography, shot on a full frame camera with a wide angle lens, "
    "rich colors, high dynamic range, ultra realistic, masterpiece, trending on every art website "
    "in the whole world today"
)
TOKENIZER_PROMPTS = ["a photo of an astronaut riding a horse", "", LONG_PROMPT]

# Extra tokenizer edge cases (JSON only, unpadded ids incl. BOS/EOS).
TOKENIZER_EDGE_CASES = [
    "A Photo Of An ASTRONAUT",
    "  multiple   spaces\tand\nnewlines  ",
    "it's the cat's hat, isn't it? they're here; we'll see",
    "numbers 1234 and 3.14, x2",
    "punctuation!!! (brackets) [square] {curly} <angle> \"quotes\"",
    "hyphen-ated snake_case camelCase",
    "caf\u00e9 na\u00efve \u00fcber",
    "emoji \U0001F600 and \u4e2d\u6587",
    "<|startoftext|>special<|endoftext|> tokens",
    "thethethe the the",
]

SAMPLE_PROMPT = "a red cube on a blue table"
SAMPLE_NEG = "blurry"
SAMPLE_STEPS = 8
SAMPLE_CFG = 7.5


def tokenize(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt_like_diffusers(pipe, prompt, negative_prompt, clip_skip):
    """Exactly diffusers' StableDiffusionPipeline.encode_prompt (no attention mask; clip_skip only
    for the positive prompt: the negative prompt always uses last_hidden_state)."""
    te = pipe.text_encoder
    ids = tokenize(pipe.tokenizer, [prompt])
    if clip_skip is None:
        pos = te(ids)[0]
    else:
        hs = te(ids, output_hidden_states=True).hidden_states
        pos = te.final_layer_norm(hs[-(clip_skip + 1)])
    neg = te(tokenize(pipe.tokenizer, [negative_prompt if negative_prompt is not None else ""]))[0]
    return pos, neg


def run_sampling(pipe, base_sched_config, scheduler_cls, init_latents, guidance_scale, negative_prompt,
                 clip_skip=None, eta=None):
    pipe.scheduler = scheduler_cls.from_config(base_sched_config)
    step_latents = []

    def cb(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        return {}

    kwargs = dict(
        height=32,
        width=32,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=guidance_scale,
        latents=init_latents.clone(),
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if eta is not None:
        kwargs["eta"] = eta
    clip_skip_via = None
    if clip_skip is None:
        kwargs.update(prompt=SAMPLE_PROMPT, negative_prompt=negative_prompt)
    else:
        # diffusers 0.42.1's clip_skip path calls `text_encoder.text_model.final_layer_norm`, which
        # does not exist on transformers 5's CLIPTextModel (AttributeError). Try it; fall back to
        # passing embeddings computed with the identical formula.
        try:
            kw2 = dict(kwargs, prompt=SAMPLE_PROMPT, negative_prompt=negative_prompt, clip_skip=clip_skip,
                       latents=init_latents.clone(), output_type="latent")
            pipe(**kw2)
            kwargs.update(prompt=SAMPLE_PROMPT, negative_prompt=negative_prompt, clip_skip=clip_skip)
            clip_skip_via = "pipeline(clip_skip=...)"
        except AttributeError as e:
            pos, neg = encode_prompt_like_diffusers(pipe, SAMPLE_PROMPT, negative_prompt, clip_skip)
            kwargs.update(prompt_embeds=pos, negative_prompt_embeds=neg)
            clip_skip_via = f"prompt_embeds computed in make_fixtures.py ({type(e).__name__}: {e})"
        step_latents.clear()

    out_lat = pipe(**kwargs, output_type="latent").images
    steps_lat = torch.stack(step_latents)
    step_latents.clear()
    kwargs["latents"] = init_latents.clone()
    img = pipe(**kwargs, output_type="np").images
    img = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32)
    timesteps = pipe.scheduler.timesteps.clone()

    # prompt embeddings the pipeline fed the UNet ([neg; pos] with CFG, [pos] without).
    do_cfg = guidance_scale > 1.0
    pos, neg = encode_prompt_like_diffusers(pipe, SAMPLE_PROMPT, negative_prompt, clip_skip)
    embeds = torch.cat([neg, pos]) if do_cfg else pos

    tensors = {
        "init_latents": init_latents,
        "prompt_embeds": embeds,
        "step_latents": steps_lat,
        "final_latents": out_lat,
        "image": img,
    }
    meta = {
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "timesteps": num_list(timesteps),
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "prompt": SAMPLE_PROMPT,
        "negative_prompt": negative_prompt if do_cfg else None,
        "guidance_scale": guidance_scale,
        "num_inference_steps": SAMPLE_STEPS,
        "height": 32,
        "width": 32,
        "eta": eta,
        "clip_skip": clip_skip,
    }
    if clip_skip_via:
        meta["clip_skip_computed_via"] = clip_skip_via
    return tensors, meta


def make_refs(name, pdir: Path, out_root: Path, seed):
    pipe = StableDiffusionPipeline.from_pretrained(str(pdir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base_sched_config = pipe.scheduler.config
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    meta = {"pipeline": name, "pipeline_dir": name, "files": {}}

    # ---- tokenizer
    if name == "tiny-sd15":
        # Informative only (not part of any pipeline folder): the `tokenizers` pipeline that
        # transformers 5 builds from vocab.json + merges.txt, loadable with the Rust
        # `tokenizers::Tokenizer::from_file` for cross-checking a hand-built CLIP tokenizer.
        bt = copy.deepcopy(tok.backend_tokenizer)
        bt.no_padding()
        bt.no_truncation()
        (out_root / "clip-tokenizer-fast.json").write_text(bt.to_str(pretty=False) + "\n")
    ids = tokenize(tok, TOKENIZER_PROMPTS)
    untrunc = [len(tok(p).input_ids) for p in TOKENIZER_PROMPTS]
    t_tok = {"input_ids": ids.to(torch.int64)}
    save_st(out_root / f"ref-{name}-tokenizer.safetensors", t_tok)
    meta["tokenizer"] = {
        "prompts": TOKENIZER_PROMPTS,
        "padding": "max_length",
        "max_length": tok.model_max_length,
        "truncation": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "vocab_size": len(tok),
        "untruncated_lengths_with_bos_eos": untrunc,
        "tokens": [tok.convert_ids_to_tokens(r.tolist()) for r in ids],
        "edge_cases": [
            {"text": t, "ids": tok(t).input_ids, "tokens": tok.convert_ids_to_tokens(tok(t).input_ids)}
            for t in TOKENIZER_EDGE_CASES
        ],
    }
    meta["files"][f"ref-{name}-tokenizer.safetensors"] = shapes_of(t_tok)

    # ---- text encoder
    with torch.no_grad():
        o = te(ids, output_hidden_states=True)
        t_te = {
            "input_ids": ids.to(torch.int64),
            "last_hidden_state": o.last_hidden_state,
            "penultimate": te.final_layer_norm(o.hidden_states[-2]),
            "hidden_states_minus2": o.hidden_states[-2],
            "pooled": o.pooler_output,
        }
    save_st(out_root / f"ref-{name}-text-encoder.safetensors", t_te)
    meta["files"][f"ref-{name}-text-encoder.safetensors"] = shapes_of(t_te)
    meta["text_encoder"] = {"attention_mask": None, "num_hidden_layers": te.config.num_hidden_layers,
                            "hidden_act": te.config.hidden_act}

    # ---- unet
    g = torch.Generator().manual_seed(seed + 10)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    ts = torch.tensor([999, 37], dtype=torch.int64)
    tsf = torch.tensor([500.5, 1.25], dtype=torch.float32)
    with torch.no_grad():
        out = unet(sample, ts, encoder_hidden_states=ehs).sample
        out_f = unet(sample, tsf, encoder_hidden_states=ehs).sample
    t_unet = {"sample": sample, "timestep": ts, "encoder_hidden_states": ehs, "out": out,
              "timestep_float": tsf, "out_float": out_f}
    save_st(out_root / f"ref-{name}-unet.safetensors", t_unet)
    meta["files"][f"ref-{name}-unet.safetensors"] = shapes_of(t_unet)

    # ---- vae
    g = torch.Generator().manual_seed(seed + 20)
    lat = torch.randn(1, 4, 16, 16, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        dec = vae.decode(lat).sample
        dist = vae.encode(image).latent_dist
    t_vae = {"latents": lat, "decoded": dec, "image": image, "enc_mean": dist.mean, "enc_std": dist.std}
    save_st(out_root / f"ref-{name}-vae.safetensors", t_vae)
    meta["files"][f"ref-{name}-vae.safetensors"] = shapes_of(t_vae)
    meta["vae"] = {"scaling_factor": vae.config.scaling_factor}

    # ---- sampling
    g = torch.Generator().manual_seed(seed + 30)
    init_latents = torch.randn(1, 4, 16, 16, generator=g)
    runs = [("ddim", DDIMScheduler, SAMPLE_CFG, SAMPLE_NEG, None, 0.0),
            ("euler", EulerDiscreteScheduler, SAMPLE_CFG, SAMPLE_NEG, None, None)]
    if name == "tiny-sd15":
        runs += [("ddim-cfg1", DDIMScheduler, 1.0, None, None, 0.0),
                 ("euler-clipskip1", EulerDiscreteScheduler, SAMPLE_CFG, SAMPLE_NEG, 1, None)]
    meta["sampling"] = {}
    for tag, cls, cfg, neg, cs, eta in runs:
        with torch.no_grad():
            t_s, m_s = run_sampling(pipe, base_sched_config, cls, init_latents, cfg, neg, clip_skip=cs, eta=eta)
        fn = f"ref-{name}-sample-{tag}.safetensors"
        save_st(out_root / fn, t_s)
        meta["files"][fn] = shapes_of(t_s)
        meta["sampling"][tag] = dict(m_s, file=fn)
    meta["saved_scheduler"] = {"class": base_sched_config["_class_name"],
                               "config": {k: v for k, v in dict(base_sched_config).items() if not k.startswith("_")}}

    with open(out_root / f"ref-{name}.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return pipe, t_unet


def make_fp16_variant(unet_f32, out_root: Path, t_unet):
    d = out_root / "tiny-sd15-fp16"
    if d.exists():
        shutil.rmtree(d)
    u16 = copy.deepcopy(unet_f32).half()
    u16.save_pretrained(str(d / "unet"), variant="fp16", safe_serialization=True)
    cfg_path = d / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("_name_or_path", None)  # would leak the absolute path of the machine that made it
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Reference: fp16 weights loaded into an f32 model (exact f16->f32 upcast), f32 compute.
    u = UNet2DConditionModel.from_pretrained(str(d / "unet"), variant="fp16", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = u(t_unet["sample"], t_unet["timestep"], encoder_hidden_states=t_unet["encoder_hidden_states"]).sample
    t = {"sample": t_unet["sample"], "timestep": t_unet["timestep"],
         "encoder_hidden_states": t_unet["encoder_hidden_states"], "out": out}
    save_st(out_root / "ref-tiny-sd15-fp16-unet.safetensors", t)
    return shapes_of(t)


# Scheduler fixtures are made by tools/parity/make_scheduler_fixtures.py
# (fixtures/parity/schedulers/), not here.

def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "fixtures" / "parity"))
    args = ap.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    # Remove what a previous run generated (and only that), so renamed outputs don't linger.
    for pat in ["ref-tiny-sd15*.safetensors", "ref-tiny-sd15*.json", "ref-tiny-sd2*.safetensors",
                "ref-tiny-sd2*.json", "VERSIONS.json", "clip-tokenizer-fast.json"]:
        for f in out_root.glob(pat):
            f.unlink()
    for d in ["tiny-sd15", "tiny-sd2", "tiny-sd15-fp16"]:
        if (out_root / d).is_dir():
            shutil.rmtree(out_root / d)
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    merges = learn_merges(CORPUS, N_MERGES)
    print(f"learned {len(merges)} merges -> vocab size {512 + len(merges) + 2}")

    unets = {}
    for i, name in enumerate(["tiny-sd15", "tiny-sd2"]):
        pdir, unet = build_pipeline(name, out_root, merges, seed_base=1000 * (i + 1))
        unets[name] = unet
        print(f"saved {pdir}")
    for i, name in enumerate(["tiny-sd15", "tiny-sd2"]):
        pipe, t_unet = make_refs(name, out_root / name, out_root, seed=1000 * (i + 1))
        if name == "tiny-sd15":
            shp = make_fp16_variant(pipe.unet, out_root, t_unet)
            with open(out_root / "ref-tiny-sd15.json") as f:
                meta = json.load(f)
            meta["files"]["ref-tiny-sd15-fp16-unet.safetensors"] = shp
            with open(out_root / "ref-tiny-sd15.json", "w") as f:
                json.dump(meta, f, indent=1, ensure_ascii=False)
                f.write("\n")
        print(f"refs for {name} done")


    with open(out_root / "VERSIONS.json", "w") as f:
        json.dump(versions(), f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
