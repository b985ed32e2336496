#!/usr/bin/env python3
"""Generate the tiny SDXL parity fixtures for agfsync's Rust model code.

Rerun (from the repository root, CPU only, no network needed; well under a minute):

    python3 tools/parity/make_sdxl_fixtures.py            # writes fixtures/parity/
    python3 tools/parity/make_sdxl_fixtures.py --out DIR  # writes elsewhere

Writes, and only touches:

    fixtures/parity/tiny-sdxl/                 a tiny StableDiffusionXLPipeline (save_pretrained)
    fixtures/parity/ref-tiny-sdxl-*.safetensors
    fixtures/parity/ref-tiny-sdxl.json         sidecar: prompts, configs, timesteps, time ids, shapes

The contract (file names, tensor names, shapes, meaning) is the "tiny SDXL" section of
tools/parity/README.md. Keep the two in sync.

The tokenizer (vocab.json + merges.txt, 914 ids) is the one tools/parity/make_fixtures.py builds
for tiny-sd15/tiny-sd2: its helpers are imported from there, so the SD and SDXL fixtures share
one vocabulary. Models are built with fixed seeds; two reruns on the same machine and versions
give byte-identical files. Versions used are recorded in ref-tiny-sdxl.json ("versions").
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_lcm
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (tokenizer builder and small helpers shared with the SD fixtures)

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-sdxl"

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (minus _diffusers_version).
# The keys EulerDiscreteScheduler does not use (clip_sample, set_alpha_to_one, skip_prk_steps,
# sample_max_value) are kept by diffusers and carried into other classes by from_config.
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TE_HIDDEN = 32
TE2_PROJ = 32
ADD_TIME_DIM = 8  # addition_time_embed_dim; 6 time ids -> 48

PROMPTS = ["a photo of an astronaut riding a horse", "", mf.LONG_PROMPT]
SAMPLE_PROMPT = "a red cube on a blue table"
SAMPLE_NEG = "blurry"
SAMPLE_STEPS = 8
SAMPLE_CFG = 5.0
HEIGHT = WIDTH = 32
LCM_STEPS = 4
LCM_CFG = 1.0
LCM_GENERATOR_SEED = 4242


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def make_te1(seed, vocab_size, bos, eos, pad):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TE_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=TE2_PROJ,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return CLIPTextModel(cfg).eval()


def make_te2(seed, vocab_size):
    torch.manual_seed(seed)
    # bos/eos/pad 0/2/1: the legacy ids found in the real SDXL text_encoder_2 config. With
    # eos_token_id == 2 transformers pools at argmax(input_ids), i.e. the first <|endoftext|>
    # (the highest id, 913), not at "first id == 2".
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TE_HIDDEN,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=TE2_PROJ,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def make_unet(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 12),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=[1, 2],
        attention_head_dim=[2, 4],  # legacy naming: number of heads per level
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=TE2_PROJ + 6 * ADD_TIME_DIM,
        cross_attention_dim=2 * TE_HIDDEN,
        norm_num_groups=4,
    ).eval()


def make_vae(seed):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()


def prefix_text_encoder_weights(te_dir: Path):
    """transformers 5 saves CLIPTextModel / CLIPTextModelWithProjection without the `text_model.`
    prefix on the transformer weights; real checkpoints (and transformers 4) have it. Add it to
    every key except `text_projection.weight`, which stays top-level as in real SDXL."""
    p = te_dir / "model.safetensors"
    sd = load_file(str(p))
    out = {}
    for k, v in sd.items():
        if not k.startswith("text_model.") and not k.startswith("text_projection."):
            k = "text_model." + k
        out[k] = v.contiguous()
    save_file(out, str(p), metadata={"format": "pt"})


def strip_name_or_path(cfg_path: Path):
    cfg = json.loads(cfg_path.read_text())
    if "_name_or_path" in cfg:
        cfg.pop("_name_or_path")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_pipeline(out_root: Path, merges, seed_base):
    toks = {}
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tmp = out_root / f".tok-{NAME}-{folder}"
        vocab = mf.build_tokenizer_files(tmp, merges, pad)
        toks[folder] = (tmp, CLIPTokenizer.from_pretrained(str(tmp)))
    tok1, tok2 = toks["tokenizer"][1], toks["tokenizer_2"][1]
    assert (tok1.pad_token_id, tok2.pad_token_id) == (913, 0)
    assert tok1.model_max_length == tok2.model_max_length == 77

    te1 = make_te1(seed_base + 1, len(vocab), tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id)
    te2 = make_te2(seed_base + 2, len(vocab))
    unet = make_unet(seed_base + 3)
    vae = make_vae(seed_base + 4)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pdir = out_root / NAME
    if pdir.exists():
        shutil.rmtree(pdir)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    for folder, (tmp, _) in toks.items():
        shutil.rmtree(pdir / folder)
        shutil.copytree(tmp, pdir / folder)
        shutil.rmtree(tmp)
    for te in ("text_encoder", "text_encoder_2"):
        prefix_text_encoder_weights(pdir / te)
        strip_name_or_path(pdir / te / "config.json")
    return pdir


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def tokenize(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def text_encoder_refs(pipe, meta):
    tok1, tok2, te1, te2 = pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2
    ids1, ids2 = tokenize(tok1, PROMPTS), tokenize(tok2, PROMPTS)
    with torch.no_grad():
        o1 = te1(ids1, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
        assert len(o1.hidden_states) == te1.config.num_hidden_layers + 1
        # encode_prompt: positive prompts, CFG with negative "blurry"
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=SAMPLE_NEG)
        # negative_prompt=None + force_zeros_for_empty_prompt -> zeros
        pe0, npe0, ppe0, nppe0 = pipe.encode_prompt(PROMPTS[:1], device=torch.device("cpu"),
                                                    do_classifier_free_guidance=True, negative_prompt=None)
        # negative_prompt="" is NOT zeroed (only None is): it is the encoded empty prompt
        _, npe_empty, _, nppe_empty = pipe.encode_prompt(PROMPTS[:1], device=torch.device("cpu"),
                                                         do_classifier_free_guidance=True, negative_prompt="")
    cat = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    assert torch.equal(pe, cat), "encode_prompt != cat(te1 hs[-2], te2 hs[-2])"
    assert torch.equal(ppe, o2.text_embeds)
    assert all(torch.equal(npe[i], npe[0]) for i in range(len(PROMPTS)))
    assert all(torch.equal(nppe[i], nppe[0]) for i in range(len(PROMPTS)))
    # (batch 1 vs batch 3: equal up to matmul rounding)
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)  # noqa: E731
    assert close(pe0, pe[:1]) and close(ppe0, ppe[:1])
    assert not npe0.any() and not nppe0.any()
    assert close(npe_empty, pe[1:2]) and close(nppe_empty, ppe[1:2])
    # pooled position: the first <|endoftext|> (913) in the tokenizer_2 ids
    eos_pos = (ids2 == 913).int().argmax(-1)
    assert torch.equal(o2.text_embeds, te2.text_projection(o2.last_hidden_state[torch.arange(len(PROMPTS)), eos_pos]))

    t = {
        "input_ids_1": ids1.to(torch.int64),
        "input_ids_2": ids2.to(torch.int64),
        # per encoder, raw (no final LN); prompt_embeds is exactly their concatenation (asserted)
        "te1_hidden_states_minus2": o1.hidden_states[-2],
        "te2_hidden_states_minus2": o2.hidden_states[-2],
        "te2_pooler_output": o2.last_hidden_state[torch.arange(len(PROMPTS)), eos_pos],
        "te2_text_embeds": o2.text_embeds,
        "prompt_embeds": pe,
        "pooled_prompt_embeds": ppe,
        "negative_prompt_embeds": npe[:1],
        "negative_pooled_prompt_embeds": nppe[:1],
        "negative_prompt_embeds_none": npe0,
        "negative_pooled_prompt_embeds_none": nppe0,
    }
    fn = f"ref-{NAME}-text-encoders.safetensors"
    mf.save_st(REF_ROOT / fn, t)
    meta["files"][fn] = mf.shapes_of(t)
    meta["text_encoders"] = {
        "prompts": PROMPTS,
        "negative_prompt": SAMPLE_NEG,
        "untruncated_lengths_with_bos_eos": [len(tok1(p).input_ids) for p in PROMPTS],
        "pad_token_id_1": tok1.pad_token_id,
        "pad_token_id_2": tok2.pad_token_id,
        "pooled_eos_positions": [int(v) for v in eos_pos],
        "te1": {"num_hidden_layers": te1.config.num_hidden_layers, "num_attention_heads": te1.config.num_attention_heads,
                "hidden_act": te1.config.hidden_act, "eos_token_id": te1.config.eos_token_id},
        "te2": {"num_hidden_layers": te2.config.num_hidden_layers, "num_attention_heads": te2.config.num_attention_heads,
                "hidden_act": te2.config.hidden_act, "eos_token_id": te2.config.eos_token_id,
                "projection_dim": te2.config.projection_dim},
    }


def unet_refs(pipe, meta, seed):
    unet = pipe.unet
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 2 * TE_HIDDEN, generator=g)
    text_embeds = torch.randn(2, TE2_PROJ, generator=g)
    ts = torch.tensor([999, 37], dtype=torch.int64)
    # row 0: the default ids of a 32x32 generation; row 1: all six values distinct (order bugs show)
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32], [64, 48, 4, 2, 32, 40]], dtype=torch.float32)
    with torch.no_grad():
        out = unet(sample, ts, encoder_hidden_states=ehs,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(2, -1)
        aug_emb = unet.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1))
    t = {"sample": sample, "timestep": ts, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
         "time_ids": time_ids, "out": out, "time_embeds": time_embeds, "aug_emb": aug_emb}
    fn = f"ref-{NAME}-unet.safetensors"
    mf.save_st(REF_ROOT / fn, t)
    meta["files"][fn] = mf.shapes_of(t)


class RecordingRandn:
    """Wraps scheduling_lcm.randn_tensor: returns exactly what diffusers would, and records it."""

    def __init__(self):
        self.drawn = []

    def __enter__(self):
        self.orig = scheduling_lcm.randn_tensor

        def rec(*args, **kwargs):
            n = self.orig(*args, **kwargs)
            self.drawn.append(n.detach().clone())
            return n

        scheduling_lcm.randn_tensor = rec
        return self

    def __exit__(self, *exc):
        scheduling_lcm.randn_tensor = self.orig


class ReplayRandn:
    """Replaces scheduling_lcm.randn_tensor with given noise (checks the replay recipe)."""

    def __init__(self, noise):
        self.noise, self.used = noise, 0

    def __enter__(self):
        self.orig = scheduling_lcm.randn_tensor

        def rep(shape, **kwargs):
            n = self.noise[self.used]
            assert tuple(n.shape) == tuple(shape)
            self.used += 1
            return n.clone()

        scheduling_lcm.randn_tensor = rep
        return self

    def __exit__(self, *exc):
        scheduling_lcm.randn_tensor = self.orig


def run_sampling(pipe, base_cfg, cls, init_latents, *, steps, guidance_scale, negative_prompt,
                 micro=None, lcm_seed=None):
    pipe.scheduler = cls.from_config(base_cfg)
    step_latents, captured, denoised = [], {}, []

    def cb(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        if i == 0:
            captured.update({k: kw[k].detach().clone() for k in ("prompt_embeds", "add_text_embeds", "add_time_ids")})
        return {}

    orig_step = pipe.scheduler.step

    # functools.wraps keeps step's signature visible: the pipeline only passes `generator` to
    # schedulers whose step() signature has it (prepare_extra_step_kwargs inspects it).
    @functools.wraps(orig_step)
    def step_rec(*a, **k):
        o = orig_step(*a, **k)
        if isinstance(pipe.scheduler, LCMScheduler):
            denoised.append((o[1] if isinstance(o, tuple) else o.denoised).detach().clone())
        return o

    pipe.scheduler.step = step_rec

    def kwargs():
        kw = dict(prompt=SAMPLE_PROMPT, negative_prompt=negative_prompt, height=HEIGHT, width=WIDTH,
                  num_inference_steps=steps, guidance_scale=guidance_scale, latents=init_latents.clone(),
                  callback_on_step_end=cb,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"])
        if micro:
            kw.update(micro)
        if lcm_seed is not None:
            kw["generator"] = torch.Generator().manual_seed(lcm_seed)
        return kw

    with RecordingRandn() as rr:
        out_lat = pipe(**kwargs(), output_type="latent").images
    steps_lat = torch.stack(step_latents)
    step_latents.clear()
    with RecordingRandn() as rr2:
        img = pipe(**kwargs(), output_type="np").images
    img = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32)
    assert torch.equal(steps_lat[-1], out_lat)

    tensors = {
        "init_latents": init_latents,
        "prompt_embeds": captured["prompt_embeds"],
        "add_text_embeds": captured["add_text_embeds"],
        "add_time_ids": captured["add_time_ids"],
        "step_latents": steps_lat,
        "final_latents": out_lat,
        "image": img,
    }
    m = {
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "timesteps": mf.num_list(pipe.scheduler.timesteps.clone()),
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "prompt": SAMPLE_PROMPT,
        "negative_prompt": negative_prompt if guidance_scale > 1.0 else None,
        "guidance_scale": guidance_scale,
        "num_inference_steps": steps,
        "height": HEIGHT,
        "width": WIDTH,
        "original_size": list((micro or {}).get("original_size", (HEIGHT, WIDTH))),
        "crops_coords_top_left": list((micro or {}).get("crops_coords_top_left", (0, 0))),
        "target_size": list((micro or {}).get("target_size", (HEIGHT, WIDTH))),
        "add_time_ids": captured["add_time_ids"][-1].tolist(),
    }
    if isinstance(pipe.scheduler, LCMScheduler):
        assert len(rr.drawn) == steps - 1
        assert all(torch.equal(a, b) for a, b in zip(rr.drawn, rr2.drawn))
        noise = torch.stack(rr.drawn)
        # the recipe documented in the README: torch.Generator().manual_seed(seed), then one
        # randn([1, 4, 16, 16]) per non-final step
        g = torch.Generator().manual_seed(lcm_seed)
        assert torch.equal(noise, torch.stack([torch.randn(1, 4, 16, 16, generator=g) for _ in range(steps - 1)]))
        tensors["noise"] = noise
        tensors["step_denoised"] = torch.stack(denoised[:steps])
        # replay without any generator: identical result
        step_latents.clear()
        with ReplayRandn(list(noise)) as rp:
            kw = kwargs()
            kw.pop("generator")
            again = pipe(**kw, output_type="latent").images
        assert rp.used == steps - 1 and torch.equal(again, out_lat)
        m["generator_seed"] = lcm_seed
        m["original_inference_steps"] = pipe.scheduler.config.original_inference_steps
    else:
        assert not rr.drawn
    pipe.scheduler.step = orig_step
    return tensors, m


def sampling_refs(pipe, base_cfg, meta, seed):
    g = torch.Generator().manual_seed(seed)
    init_latents = torch.randn(1, 4, 16, 16, generator=g)
    runs = [
        ("ddim", DDIMScheduler, dict(steps=SAMPLE_STEPS, guidance_scale=SAMPLE_CFG, negative_prompt=SAMPLE_NEG)),
        ("euler", EulerDiscreteScheduler, dict(steps=SAMPLE_STEPS, guidance_scale=SAMPLE_CFG,
                                               negative_prompt=SAMPLE_NEG)),
        ("euler-microcond", EulerDiscreteScheduler,
         dict(steps=SAMPLE_STEPS, guidance_scale=SAMPLE_CFG, negative_prompt=SAMPLE_NEG,
              micro=dict(original_size=(64, 64), crops_coords_top_left=(4, 4), target_size=(32, 32)))),
        ("lcm", LCMScheduler, dict(steps=LCM_STEPS, guidance_scale=LCM_CFG, negative_prompt=None,
                                   lcm_seed=LCM_GENERATOR_SEED)),
    ]
    meta["sampling"] = {}
    for tag, cls, kw in runs:
        with torch.no_grad():
            t, m = run_sampling(pipe, base_cfg, cls, init_latents, **kw)
        fn = f"ref-{NAME}-sample-{tag}.safetensors"
        mf.save_st(REF_ROOT / fn, t)
        meta["files"][fn] = mf.shapes_of(t)
        meta["sampling"][tag] = dict(m, file=fn)


REF_ROOT = REPO_ROOT / "fixtures" / "parity"


def verify(root: Path):
    """Reloads tiny-sdxl with diffusers (fresh process state) and recomputes the refs."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root / NAME), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (913, 0)
    for te in ("text_encoder", "text_encoder_2"):
        keys = load_file(str(root / NAME / te / "model.safetensors")).keys()
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys), te
    ref = load_file(str(root / f"ref-{NAME}-text-encoders.safetensors"))
    assert torch.equal(tokenize(pipe.tokenizer, PROMPTS), ref["input_ids_1"])
    assert torch.equal(tokenize(pipe.tokenizer_2, PROMPTS), ref["input_ids_2"])
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                do_classifier_free_guidance=True, negative_prompt=SAMPLE_NEG)
    assert torch.equal(pe, ref["prompt_embeds"]) and torch.equal(ppe, ref["pooled_prompt_embeds"])
    assert torch.equal(npe[:1], ref["negative_prompt_embeds"])
    u = load_file(str(root / f"ref-{NAME}-unet.safetensors"))
    with torch.no_grad():
        out = pipe.unet(u["sample"], u["timestep"], encoder_hidden_states=u["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": u["text_embeds"], "time_ids": u["time_ids"]}).sample
    assert torch.equal(out, u["out"])
    meta = json.loads((root / f"ref-{NAME}.json").read_text())
    for tag, m in meta["sampling"].items():
        r = load_file(str(root / m["file"]))
        cls = getattr(diffusers, m["scheduler_class"])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        kw = dict(prompt=m["prompt"], negative_prompt=m["negative_prompt"], height=m["height"], width=m["width"],
                  num_inference_steps=m["num_inference_steps"], guidance_scale=m["guidance_scale"],
                  original_size=tuple(m["original_size"]), crops_coords_top_left=tuple(m["crops_coords_top_left"]),
                  target_size=tuple(m["target_size"]), latents=r["init_latents"].clone(), output_type="latent")
        if "noise" in r:
            with ReplayRandn(list(r["noise"])):
                with torch.no_grad():
                    lat = pipe(**kw).images
        else:
            with torch.no_grad():
                lat = pipe(**kw).images
        d = (lat - r["final_latents"]).abs().max().item()
        assert d == 0.0, (tag, d)
        print(f"verify {tag}: final_latents identical")
    print("all checks passed")


def main():
    global REF_ROOT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "fixtures" / "parity"))
    ap.add_argument("--verify", action="store_true", help="only reload and recompute the refs in --out")
    args = ap.parse_args()
    REF_ROOT = Path(args.out)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.verify:
        verify(REF_ROOT)
        return
    REF_ROOT.mkdir(parents=True, exist_ok=True)
    for f in REF_ROOT.glob(f"ref-{NAME}-*.safetensors"):
        f.unlink()
    if (REF_ROOT / f"ref-{NAME}.json").exists():
        (REF_ROOT / f"ref-{NAME}.json").unlink()
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    merges = mf.learn_merges(mf.CORPUS, mf.N_MERGES)
    pdir = build_pipeline(REF_ROOT, merges, seed_base=3000)
    print(f"saved {pdir}")

    pipe = StableDiffusionXLPipeline.from_pretrained(str(pdir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt is True
    base_cfg = pipe.scheduler.config
    meta = {"pipeline": NAME, "pipeline_dir": NAME, "versions": mf.versions(), "files": {},
            "saved_scheduler": {"class": base_cfg["_class_name"],
                                "config": {k: v for k, v in dict(base_cfg).items() if not k.startswith("_")}},
            "unet_params": sum(p.numel() for p in pipe.unet.parameters())}
    text_encoder_refs(pipe, meta)
    unet_refs(pipe, meta, seed=3010)
    sampling_refs(pipe, base_cfg, meta, seed=3030)
    with open(REF_ROOT / f"ref-{NAME}.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")

    total = sum(p.stat().st_size for p in pdir.rglob("*") if p.is_file())
    total += sum(p.stat().st_size for p in REF_ROOT.glob(f"ref-{NAME}*"))
    print(f"tiny SDXL fixtures: {total} bytes")
    verify(REF_ROOT)


if __name__ == "__main__":
    main()
