#!/usr/bin/env python3
"""Single-file (original Stability / LDM / sgm layout) checkpoint fixtures for agfsync.

Rerun from the repository root (CPU only, no network, about a minute):

    python3 tools/parity/make_single_file_fixtures.py            # writes fixtures/parity/single-file/
    python3 tools/parity/make_single_file_fixtures.py --out DIR  # writes elsewhere
    python3 tools/parity/make_single_file_fixtures.py --keep-files DIR  # also keep the .safetensors

What it does, per family (SD 1.x from fixtures/parity/tiny-sd15, SD 2.x from fixtures/parity/tiny-sd2,
SDXL from fixtures/parity/tiny-sdxl when that folder exists, else from a tiny SDXL pipeline this script
builds and stores in fixtures/parity/single-file/tiny-sdxl/):

1. Reads the diffusers pipeline folder's weights and rewrites them into the original single-file layout
   with this script's own reverse mapping (diffusers name -> original name): UNet under
   `model.diffusion_model.` (input_blocks / middle_block / output_blocks, time_embed, label_emb for
   SDXL), VAE under `first_stage_model.` (encoder/decoder down/up/mid, `attn_1` q/k/v/proj_out as 1x1
   convolutions), text encoders: SD 1.x `cond_stage_model.transformer.text_model.*` (transformers
   layout), SD 2.x `cond_stage_model.model.*` (OpenCLIP: fused `attn.in_proj_*`, `ln_1`, `mlp.c_fc`,
   `positional_embedding`, `ln_final`, an extra unused last resblock and `text_projection`, as SD 2.x
   releases have), SDXL `conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and
   `conditioner.embedders.1.model.*` (OpenCLIP bigG layout, fused q/k/v, `text_projection` stored
   `[width, proj]`, i.e. transposed relative to transformers' Linear). Also the buffers real files carry
   that loaders must ignore (`alphas_cumprod`, `model_ema.decay`, `position_ids`, `logit_scale`, ...).
2. VERIFIES the file with diffusers itself: `StableDiffusionPipeline.from_single_file(path,
   config=<folder>)` (`StableDiffusionXLPipeline` for SDXL) must load every UNet / VAE / text-encoder
   tensor bit-identical to `from_pretrained(<folder>)`, and give identical outputs. So the layout is the
   one diffusers accepts, not merely what our own mapping expects.
3. Stores, in fixtures/parity/single-file/ (budget 1.5 MB, so the f32 single files themselves, 1-1.3 MB
   each, are NOT stored):
   * `<name>.recipe.json`: how to rebuild the verified single file, tensor by tensor, from the folder's
     weights (ops: copy, cat along dim 0, transpose, reshape, zeros, arange). The Rust tests rebuild
     the file from it into a temporary folder. The script itself rebuilds the file from the recipe with
     an independent implementation and checks it equals the verified file tensor for tensor.
   * `ref-<name>.safetensors`: inputs and outputs of the single-file-loaded diffusers pipeline (UNet,
     VAE decode/encode, text encoder(s)); identical to the folder pipeline's (asserted here).

Recipe format (`<name>.recipe.json`):
    {"family": "v1" | "v2" | "xl", "source": "<pipeline folder, relative to the recipe's folder>",
     "file_name": "<name>.safetensors",
     "components": {"unet": "unet/diffusion_pytorch_model.safetensors", ...},
     "tensors": [{"key": <single-file key>, "op": "copy" | "cat0" | "transpose" | "zeros" | "arange",
                  "src": ["<component>/<diffusers key>", ...], "shape": [...], "dtype": "F32" | "I64"}]}
  copy: the one source reshaped to `shape` (1x1 conv <-> linear); cat0: sources concatenated along dim 0
  (fused q/k/v); transpose: the 2-d source transposed; zeros / arange: a buffer with no source.

Reference tensors (`ref-<name>.safetensors`, F32 unless stated; shapes are in the file):
    unet_sample [1,4,8,8], unet_timestep [1] (I64), unet_context [1,77,ctx], unet_out [1,4,8,8];
    SDXL also unet_text_embeds [1,proj] and unet_time_ids [1,6] (added_cond_kwargs).
    vae_latents [1,4,4,4] -> vae_decoded (decode); vae_image -> vae_enc_mean (latent_dist.mean).
    te_input_ids [1,77] (I64, the pipeline's tokenizer on PROMPT), te_last_hidden_state, te_pooled,
    te_hidden_states_minus2 (hidden_states[-2], no final layer norm); SDXL also te2_input_ids,
    te2_last_hidden_state, te2_text_embeds (projected pooled output), te2_hidden_states_minus2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import diffusers
import safetensors
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
PARITY = REPO_ROOT / "fixtures" / "parity"
PROMPT = "a photo of an astronaut riding a horse"

COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}

# --------------------------------------------------------------------------------------
# reverse mapping: diffusers name -> original (LDM / sgm) name
# --------------------------------------------------------------------------------------


def per_block(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


class UnetLayout:
    """Where diffusers' UNet blocks live in the LDM `input_blocks` / `output_blocks` lists."""

    def __init__(self, cfg):
        n = len(cfg["block_out_channels"])
        self.layers = per_block(cfg["layers_per_block"], n)
        self.down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
        self.up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
        self.rev_layers = self.layers[::-1]

    def input_index(self, block, layer):
        # input_blocks.0 is conv_in; each down block then holds `layers` resnet(+attention) entries
        # and, except the last, one downsampler entry.
        return 1 + sum(self.layers[k] + 1 for k in range(block)) + layer

    def output_index(self, block, layer):
        return sum(self.rev_layers[k] + 1 for k in range(block)) + layer


RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_resnet(rest):
    part, _, tail = rest.partition(".")
    return f"{RESNET_TO_LDM[part]}.{tail}"


def unet_key_to_ldm(key, lay: UnetLayout):
    p = key.split(".")
    for d, o in UNET_TOP.items():
        if key.startswith(d + "."):
            return o + key[len(d):]
    if p[0] == "down_blocks":
        b = int(p[1])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"input_blocks.{lay.input_index(b, int(p[3]))}.0.{unet_resnet(rest)}"
        if p[2] == "attentions":
            return f"input_blocks.{lay.input_index(b, int(p[3]))}.1.{rest}"
        if p[2] == "downsamplers":  # downsamplers.0.conv.{weight,bias}
            return f"input_blocks.{lay.input_index(b, lay.layers[b])}.0.op.{p[-1]}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{unet_resnet(rest)}"
        if p[1] == "attentions":
            return f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        b = int(p[1])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"output_blocks.{lay.output_index(b, int(p[3]))}.0.{unet_resnet(rest)}"
        if p[2] == "attentions":
            return f"output_blocks.{lay.output_index(b, int(p[3]))}.1.{rest}"
        if p[2] == "upsamplers":
            slot = 2 if lay.up_attn[b] else 1
            return f"output_blocks.{lay.output_index(b, lay.rev_layers[b])}.{slot}.conv.{p[-1]}"
    raise KeyError(f"no LDM name for UNet tensor {key}")


VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_resnet(rest):
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key_to_ldm(key, n_blocks):
    for d, o in VAE_TOP.items():
        if key.startswith(d + "."):
            return o + key[len(d):]
    p = key.split(".")
    if len(p) == 3 or p[0] in ("quant_conv", "post_quant_conv"):  # conv_in / conv_out / quant convs
        return key
    side = p[0]
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{side}.mid.block_{int(p[3]) + 1}.{vae_resnet('.'.join(p[4:]))}"
        rest = ".".join(p[4:])
        for d, o in VAE_ATTN.items():
            if rest.startswith(d + "."):
                return f"{side}.mid.attn_1.{o}{rest[len(d):]}"
    if p[1] == "down_blocks":
        b = int(p[2])
        if p[3] == "resnets":
            return f"encoder.down.{b}.block.{p[4]}.{vae_resnet('.'.join(p[5:]))}"
        return f"encoder.down.{b}.downsample.conv.{p[-1]}"
    if p[1] == "up_blocks":
        b = n_blocks - 1 - int(p[2])  # the LDM decoder numbers its levels from the bottom
        if p[3] == "resnets":
            return f"decoder.up.{b}.block.{p[4]}.{vae_resnet('.'.join(p[5:]))}"
        return f"decoder.up.{b}.upsample.conv.{p[-1]}"
    raise KeyError(f"no LDM name for VAE tensor {key}")


OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


# --------------------------------------------------------------------------------------
# building the recipe (one entry per single-file tensor) and the file from it
# --------------------------------------------------------------------------------------


def entry(key, op, src, shape, dtype="F32"):
    return {"key": key, "op": op, "src": src, "shape": list(shape), "dtype": dtype}


def unet_entries(sd, cfg, prefix="model.diffusion_model."):
    lay = UnetLayout(cfg)
    out = []
    for k, t in sd.items():
        out.append(entry(prefix + unet_key_to_ldm(k, lay), "copy", [f"unet/{k}"], t.shape))
    return out


def vae_entries(sd, cfg, prefix="first_stage_model."):
    n = len(cfg["block_out_channels"])
    out = []
    for k, t in sd.items():
        ldm = vae_key_to_ldm(k, n)
        shape = list(t.shape)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and len(shape) == 2:
            shape = shape + [1, 1]  # the LDM VAE attention uses 1x1 convolutions
        out.append(entry(prefix + ldm, "copy", [f"vae/{k}"], shape))
    return out


def hf_clip_entries(sd, comp, prefix):
    out = []
    for k, t in sd.items():
        name = k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k
        out.append(entry(prefix + name, "copy", [f"{comp}/{k}"], t.shape))
    n_pos = next(t.shape[0] for k, t in sd.items() if k.endswith("position_embedding.weight"))
    out.append(entry(prefix + "text_model.embeddings.position_ids", "arange", [], [1, n_pos], "I64"))
    return out


def open_clip_entries(sd, comp, prefix, n_layers, extra_layer):
    """OpenCLIP layout. `extra_layer`: add one more resblock than the config uses (SD 2.x files carry
    24 resblocks; diffusers' SD 2.x text encoder uses 23)."""
    def name(k):
        return k[len("text_model."):] if k.startswith("text_model.") else k

    w = {name(k): (k, t) for k, t in sd.items()}
    out = []

    def copy(dst, src_name, shape=None):
        k, t = w[src_name]
        out.append(entry(prefix + dst, "copy", [f"{comp}/{k}"], t.shape if shape is None else shape))

    copy("token_embedding.weight", "embeddings.token_embedding.weight")
    copy("positional_embedding", "embeddings.position_embedding.weight")
    width = w["embeddings.token_embedding.weight"][1].shape[1]
    for i in range(n_layers):
        lp = f"encoder.layers.{i}."
        rp = f"transformer.resblocks.{i}."
        for d, o in OPENCLIP_LAYER.items():
            for s in ("weight", "bias"):
                copy(rp + f"{o}.{s}", lp + f"{d}.{s}")
        for s in ("weight", "bias"):
            srcs = [w[lp + f"self_attn.{x}_proj.{s}"] for x in "qkv"]
            shape = [3 * width] + list(srcs[0][1].shape[1:])
            out.append(entry(prefix + rp + f"attn.in_proj_{s}", "cat0", [f"{comp}/{k}" for k, _ in srcs], shape))
    copy("ln_final.weight", "final_layer_norm.weight")
    copy("ln_final.bias", "final_layer_norm.bias")
    if "text_projection.weight" in w:
        k, t = w["text_projection.weight"]
        out.append(entry(prefix + "text_projection", "transpose", [f"{comp}/{k}"], [t.shape[1], t.shape[0]]))
    else:
        out.append(entry(prefix + "text_projection", "zeros", [], [width, width]))
    out.append(entry(prefix + "logit_scale", "zeros", [], []))
    if extra_layer:
        # An extra last resblock with made-up (zero) weights, that loaders must ignore.
        i = n_layers
        ffn = w["encoder.layers.0.mlp.fc1.weight"][1].shape[0]
        rp = f"transformer.resblocks.{i}."
        for nm, shape in [
            ("ln_1.weight", [width]), ("ln_1.bias", [width]), ("ln_2.weight", [width]), ("ln_2.bias", [width]),
            ("attn.in_proj_weight", [3 * width, width]), ("attn.in_proj_bias", [3 * width]),
            ("attn.out_proj.weight", [width, width]), ("attn.out_proj.bias", [width]),
            ("mlp.c_fc.weight", [ffn, width]), ("mlp.c_fc.bias", [ffn]),
            ("mlp.c_proj.weight", [width, ffn]), ("mlp.c_proj.bias", [width]),
        ]:
            out.append(entry(prefix + rp + nm, "zeros", [], shape))
    return out


def ldm_buffers():
    """Non-network tensors found in real LDM checkpoints (loaders ignore them)."""
    return [
        entry("betas", "zeros", [], [1000]),
        entry("alphas_cumprod", "zeros", [], [1000]),
        entry("alphas_cumprod_prev", "zeros", [], [1000]),
        entry("model_ema.decay", "zeros", [], []),
        entry("model_ema.num_updates", "zeros", [], [], "I64"),
    ]


def materialise(recipe, source_dir: Path):
    """Builds the single file's tensors from the recipe (the same ops the Rust tests implement)."""
    comps = {c: load_file(str(source_dir / f)) for c, f in recipe["components"].items()}
    out = {}
    for e in recipe["tensors"]:
        srcs = [comps[s.split("/", 1)[0]][s.split("/", 1)[1]] for s in e["src"]]
        dtype = {"F32": torch.float32, "I64": torch.int64}[e["dtype"]]
        shape = e["shape"]
        if e["op"] == "copy":
            t = srcs[0].reshape(shape)
        elif e["op"] == "cat0":
            t = torch.cat(srcs, 0).reshape(shape)
        elif e["op"] == "transpose":
            t = srcs[0].t().reshape(shape)
        elif e["op"] == "zeros":
            t = torch.zeros(shape, dtype=dtype)
        elif e["op"] == "arange":
            t = torch.arange(int(torch.tensor(shape).prod()), dtype=dtype).reshape(shape)
        else:
            raise ValueError(e["op"])
        out[e["key"]] = t.to(dtype).contiguous()
    return out


def make_recipe(name, family, source_dir: Path, recipe_dir: Path):
    def cfg(sub):
        return json.loads((source_dir / sub / "config.json").read_text())

    comps = {c: f for c, f in COMPONENT_FILES.items() if (source_dir / f).exists()}
    w = {c: load_file(str(source_dir / f)) for c, f in comps.items()}
    tensors = ldm_buffers()
    tensors += unet_entries(w["unet"], cfg("unet"))
    tensors += vae_entries(w["vae"], cfg("vae"))
    te_cfg = cfg("text_encoder")
    if family == "v1":
        tensors += hf_clip_entries(w["text_encoder"], "text_encoder", "cond_stage_model.transformer.")
    elif family == "v2":
        tensors += open_clip_entries(
            w["text_encoder"], "text_encoder", "cond_stage_model.model.", te_cfg["num_hidden_layers"], True
        )
    else:
        tensors += hf_clip_entries(w["text_encoder"], "text_encoder", "conditioner.embedders.0.transformer.")
        te2 = cfg("text_encoder_2")
        tensors += open_clip_entries(
            w["text_encoder_2"], "text_encoder_2", "conditioner.embedders.1.model.", te2["num_hidden_layers"], False
        )
    keys = [e["key"] for e in tensors]
    assert len(keys) == len(set(keys)), "duplicate single-file keys"
    tensors.sort(key=lambda e: e["key"])
    return {
        "name": name,
        "family": family,
        "source": rel(source_dir, recipe_dir),
        "file_name": f"{name}.safetensors",
        "components": comps,
        "tensors": tensors,
    }


def recipe_json(recipe) -> str:
    """JSON with one line per tensor entry (small and diff-friendly)."""
    head = {k: v for k, v in recipe.items() if k != "tensors"}
    lines = [json.dumps(e, separators=(",", ":")) for e in recipe["tensors"]]
    text = json.dumps(head, indent=1)[:-2] + ',\n "tensors": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    assert json.loads(text) == recipe
    return text


def rel(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


# --------------------------------------------------------------------------------------
# tiny SDXL pipeline (only when fixtures/parity/tiny-sdxl does not exist)
# --------------------------------------------------------------------------------------


def build_tiny_sdxl(out: Path):
    tok1 = CLIPTokenizer.from_pretrained(str(PARITY / "tiny-sd15" / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(PARITY / "tiny-sd2" / "tokenizer"))
    vocab = len(tok1)
    torch.manual_seed(1001)
    te1 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
            bos_token_id=912, eos_token_id=913, pad_token_id=913,
        )
    ).eval()
    torch.manual_seed(1002)
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=16,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    ).eval()
    torch.manual_seed(1003)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, cross_attention_dim=16 + 24, norm_num_groups=4,
    ).eval()
    torch.manual_seed(1004)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    ).eval()
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    # The slow-tokenizer files of the SD fixtures are smaller than tokenizer.json: use them.
    for sub, src in (("tokenizer", "tiny-sd15"), ("tokenizer_2", "tiny-sd2")):
        shutil.rmtree(out / sub)
        shutil.copytree(PARITY / src / "tokenizer", out / sub)
    # Same convention as the other tiny fixtures: text encoder weights keep the `text_model.` prefix
    # that every released SD checkpoint has (transformers 5 saves CLIPTextModel without it).
    for sub in ("text_encoder", "text_encoder_2"):
        f = out / sub / "model.safetensors"
        sd = load_file(str(f))
        sd = {
            (k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v
            for k, v in sd.items()
        }
        save_file(sd, str(f))


# --------------------------------------------------------------------------------------
# verification with diffusers and reference outputs
# --------------------------------------------------------------------------------------


def state_dicts(pipe):
    out = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2.state_dict()
    return out


def assert_same_weights(a, b, what):
    for comp in a:
        ka, kb = set(a[comp]), set(b[comp])
        ka = {k for k in ka if not k.endswith("position_ids")}
        kb = {k for k in kb if not k.endswith("position_ids")}
        assert ka == kb, f"{what} {comp}: key sets differ: {sorted(ka ^ kb)[:10]}"
        for k in ka:
            assert torch.equal(a[comp][k], b[comp][k]), f"{what} {comp}.{k} differs"


@torch.no_grad()
def outputs(pipe, xl: bool):
    g = torch.Generator().manual_seed(7)
    ctx_dim = pipe.unet.config.cross_attention_dim
    r = {
        "unet_sample": torch.randn(1, 4, 8, 8, generator=g),
        "unet_timestep": torch.tensor([500], dtype=torch.int64),
        "unet_context": torch.randn(1, 77, ctx_dim, generator=g),
    }
    kw = {}
    if xl:
        proj = pipe.text_encoder_2.config.projection_dim
        r["unet_text_embeds"] = torch.randn(1, proj, generator=g)
        r["unet_time_ids"] = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        kw["added_cond_kwargs"] = {"text_embeds": r["unet_text_embeds"], "time_ids": r["unet_time_ids"]}
    r["unet_out"] = pipe.unet(r["unet_sample"], r["unet_timestep"], r["unet_context"], **kw).sample
    r["vae_latents"] = torch.randn(1, 4, 4, 4, generator=g)
    r["vae_decoded"] = pipe.vae.decode(r["vae_latents"]).sample
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    r["vae_image"] = torch.rand(1, 3, 8 * f, 8 * f, generator=g) * 2 - 1
    r["vae_enc_mean"] = pipe.vae.encode(r["vae_image"]).latent_dist.mean
    encs = [("te", pipe.tokenizer, pipe.text_encoder)]
    if xl:
        encs.append(("te2", pipe.tokenizer_2, pipe.text_encoder_2))
    for tag, tok, te in encs:
        ids = tok([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o = te(ids, output_hidden_states=True)
        r[f"{tag}_input_ids"] = ids.to(torch.int64)
        r[f"{tag}_last_hidden_state"] = o.last_hidden_state
        r[f"{tag}_hidden_states_minus2"] = o.hidden_states[-2]
        if tag == "te2":
            r["te2_text_embeds"] = o.text_embeds
        else:
            r["te_pooled"] = o.pooler_output
    return {k: v.contiguous() for k, v in r.items()}


def verify_and_refs(name, family, source_dir: Path, file: Path):
    xl = family == "xl"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    kw = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    folder = cls.from_pretrained(str(source_dir), torch_dtype=torch.float32, **kw)
    single = cls.from_single_file(
        str(file), config=str(source_dir), torch_dtype=torch.float32, local_files_only=True, **kw
    )
    assert_same_weights(state_dicts(folder), state_dicts(single), f"{name}: from_single_file vs from_pretrained")
    a, b = outputs(folder, xl), outputs(single, xl)
    # Weights are bit-identical (checked above); outputs may still differ in the last bits, as
    # BLAS kernels can take other code paths for differently aligned buffers.
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"{name}: outputs differ by {worst} between folder and single-file pipelines"
    print(f"  {name}: diffusers from_single_file == from_pretrained (all weights identical; "
          f"{len(a)} outputs, max abs diff {worst:.1e})")
    return b


def sdxl_usable(folder: Path):
    """True when the shared tiny SDXL fixture can be verified through diffusers' from_single_file,
    else why not. diffusers tells SDXL's two text encoders apart in a single file by their width
    (768 vs 1280 in the real model), so a tiny pipeline whose encoders have equal widths would load
    the CLIP-L weights into both encoders."""
    if not (folder / "model_index.json").exists():
        return "it does not exist"
    w = [json.loads((folder / s / "config.json").read_text())["hidden_size"] for s in ("text_encoder", "text_encoder_2")]
    if w[0] == w[1]:
        return f"its two text encoders are both {w[0]} wide, which diffusers' from_single_file cannot tell apart"
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=PARITY / "single-file")
    ap.add_argument("--keep-files", type=Path, default=None, help="also write the single files here")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    sdxl_dir = PARITY / "tiny-sdxl"
    own_sdxl = out / "tiny-sdxl"
    usable = sdxl_usable(sdxl_dir)
    if usable is not True:
        print(f"not using fixtures/parity/tiny-sdxl ({usable}): building a tiny SDXL pipeline in {own_sdxl}")
        if own_sdxl.exists():
            shutil.rmtree(own_sdxl)
        build_tiny_sdxl(own_sdxl)
        sdxl_dir = own_sdxl
    elif own_sdxl.exists():
        shutil.rmtree(own_sdxl)

    jobs = [("tiny-sd15", "v1", PARITY / "tiny-sd15"), ("tiny-sd2", "v2", PARITY / "tiny-sd2"),
            ("tiny-sdxl", "xl", sdxl_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        files_dir = args.keep_files or Path(tmp)
        files_dir.mkdir(parents=True, exist_ok=True)
        for name, family, src in jobs:
            recipe = make_recipe(name, family, src, out)
            tensors = materialise(recipe, src)
            file = files_dir / recipe["file_name"]
            save_file(tensors, str(file), metadata={"format": "pt"})
            refs = verify_and_refs(name, family, src, file)
            # Independent check that the stored recipe rebuilds exactly the verified file.
            (out / f"{name}.recipe.json").write_text(recipe_json(recipe))
            again = materialise(json.loads((out / f"{name}.recipe.json").read_text()), out / recipe["source"])
            with safe_open(str(file), "pt") as f:
                assert set(f.keys()) == set(again), name
                for k in f.keys():
                    assert torch.equal(f.get_tensor(k), again[k]), f"{name}: recipe rebuilds {k} differently"
            save_file(refs, str(out / f"ref-{name}.safetensors"))
            print(f"  {name}: {len(tensors)} tensors, recipe and refs written")
    (out / "VERSIONS.json").write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
                "sdxl_source": rel(sdxl_dir, out),
            },
            indent=1,
        )
        + "\n"
    )
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixtures/parity/single-file: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
