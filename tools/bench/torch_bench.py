#!/usr/bin/env python3
"""The PyTorch twin of `agfsync bench`: the same workloads with torch, diffusers, transformers
and PEFT, random weights, on CPU or CUDA. tools/bench/suite.sh (CPU) and
tools/cuda/gpu_bench.sh (GPU) run both and print one table (tools/bench/table.py).

    python3 tools/bench/torch_bench.py --device cpu --dtype f32 --workload unet --latent 32 --threads 2
    python3 tools/bench/torch_bench.py --workload unet --arch sd15 --dtype bf16 [--latent 64]
    python3 tools/bench/torch_bench.py --workload sample --arch sd15 --dtype f16 --size 512 --steps 20
    python3 tools/bench/torch_bench.py --workload vae --dtype f16 --size 512
    python3 tools/bench/torch_bench.py --workload clip --dtype f16 --clip-batch 8
    python3 tools/bench/torch_bench.py --workload dpo --arch sd15 --dtype bf16 --latent 64 --pairs 1 [--full]

  unet    one UNet2DConditionModel forward, batch 2 (a CFG step), per-sample timesteps
  sample  one image end to end: CLIP text encoding (prompt + empty negative), N steps of
          DDIM (SD 1.5) / Euler (SDXL) with guidance 7.5, VAE decode
  vae     AutoencoderKL.decode of one image's latents (SD's VAE, --size pixels)
  vqa     LLaVA-1.5 (7B shapes, --vqa-layers decoder layers): P(yes) of --questions questions about
          one image, one batched forward with the image per question, last-position logits
  clip    CLIP ViT-L/14: CLIPImageProcessor alone, the vision tower on a ready batch, and the
          score end to end (processor on 512x512 PIL images + vision tower + cosine)
  dpo     one Diffusion-DPO optimizer step as diffusers' train_diffusion_dpo.py takes it:
          winner and loser noised with one shared noise and timestep per pair, the trained
          UNet on both, the reference without gradients (LoRA: PEFT rank 4, alpha 4 on
          to_q/to_k/to_v/to_out.0, reference = adapters disabled; --full: the whole UNet
          against a frozen deep copy), beta 5000, backward, clipping at 1.0, AdamW (lr 1e-5,
          weight decay 0.01); --gradient-checkpointing as diffusers enables it. Below f32 the
          trained weights stay f32 under autocast, like agfsync's f32 masters.

Prints ONE JSON line per workload with the keys agfsync's bench uses
({"bench":..,"impl":"pytorch","median_s":..}) and the peak memory of the workload
(peak_rss_mib on CPU, peak_mem_mib on CUDA); a workload whose packages are missing prints
{"bench":..,"impl":"pytorch","skipped":"reason"}. Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SD15_UNET = dict(
    sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=32,
)
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=768)
BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       patch_size=14, image_size=224, projection_dim=768),
    projection_dim=768,
)


def clip_processor_class():
    """transformers' PIL-based CLIP image processor (the one agfsync reproduces)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as Proc
    return Proc


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def reset_peak_rss():
    """Resets the process's VmHWM (Linux), so the next peak is one workload's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class Bench:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.dev = torch.device(args.device)
        self.dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        # Weights are made on the device: initialising SDXL on the CPU takes longer than the bench.
        torch.set_default_device(self.dev)
        torch.manual_seed(args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, fn):
        for _ in range(self.args.warmup):
            fn()
            self.sync()
        times = []
        for _ in range(max(1, self.args.iters)):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "iters": len(times)}

    def base(self, bench):
        torch = self.torch
        out = {"bench": bench, "impl": "pytorch", "torch": torch.__version__, "device": str(self.dev),
               "dtype": self.args.dtype}
        if self.dev.type == "cuda":
            out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            out["threads"] = torch.get_num_threads()
        rss = peak_rss_mib()
        if rss is not None:
            out["peak_rss_mib"] = rss
        return out

    def reset_peak(self):
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()

    def unet(self, train=False, dtype=None):
        import diffusers
        from diffusers import UNet2DConditionModel

        # Casting random-weight modules with .to() is what we want; diffusers warns about it.
        diffusers.utils.logging.set_verbosity_error()
        cfg = SDXL_UNET if self.args.arch == "sdxl" else SD15_UNET
        t0 = time.perf_counter()
        unet = UNet2DConditionModel(**cfg).to(dtype or self.dtype)
        unet.train(train)
        self.sync()
        return unet, cfg, time.perf_counter() - t0

    def unet_inputs(self, cfg, b, latent):
        torch = self.torch
        x = torch.randn(b, 4, latent, latent, dtype=self.dtype)
        t = torch.linspace(999, 1, b).round()
        ctx = torch.randn(b, 77, cfg["cross_attention_dim"], dtype=self.dtype)
        added = None
        if self.args.arch == "sdxl":
            px = float(latent * 8)
            added = {"text_embeds": torch.randn(b, 1280, dtype=self.dtype),
                     "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * b, dtype=self.dtype)}
        return x, t, ctx, added

    def run_unet(self):
        torch = self.torch
        self.reset_peak()
        unet, cfg, build_s = self.unet()
        x, t, ctx, added = self.unet_inputs(cfg, self.args.batch, self.args.latent)
        with torch.inference_mode():
            res = self.timed(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample)
            finite = bool(torch.isfinite(unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample).all())
        out = self.base("unet_step")
        out.update(arch=self.args.arch, batch=self.args.batch, latent_hw=self.args.latent,
                   params_m=sum(p.numel() for p in unet.parameters()) / 1e6, build_s=build_s, finite=finite, **res)
        return out

    def run_sample(self):
        torch = self.torch
        from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        self.reset_peak()
        xl = self.args.arch == "sdxl"
        unet, cfg, build_s = self.unet()
        t0 = time.perf_counter()
        vae = AutoencoderKL(**VAE, scaling_factor=0.13025 if xl else 0.18215).to(self.dtype).eval()
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(self.dtype).eval()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT)).to(self.dtype).eval() if xl else None
        sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
        scheduler = (EulerDiscreteScheduler(**sched_cfg) if xl
                     else DDIMScheduler(**sched_cfg, clip_sample=False, set_alpha_to_one=False))
        self.sync()
        build_s += time.perf_counter() - t0
        size, steps, g = self.args.size, self.args.steps, 7.5
        # Token ids as a tokenizer would give them: BOS, a few words, EOS, padding.
        ids = torch.full((2, 77), 49407, dtype=torch.long)
        ids[:, 0] = 49406
        ids[1, 1:9] = torch.arange(320, 328)

        def encode():
            h = te(ids, output_hidden_states=xl)
            if not xl:
                return h.last_hidden_state, None
            o2 = te2(ids, output_hidden_states=True)
            ctx = torch.cat([h.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            px = float(size)
            tid = torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2, dtype=self.dtype)
            return ctx, {"text_embeds": o2.text_embeds, "time_ids": tid}

        def one_image():
            ctx, added = encode()
            scheduler.set_timesteps(steps)
            x = torch.randn(1, 4, size // 8, size // 8, dtype=torch.float32) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
                e = unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float()
                eu, ec = e.chunk(2)
                x = scheduler.step(eu + g * (ec - eu), t, x).prev_sample
            return vae.decode((x / vae.config.scaling_factor).to(self.dtype)).sample

        with torch.inference_mode():
            holder = {}
            res = self.timed(lambda: holder.__setitem__("img", one_image()))
            finite = bool(torch.isfinite(holder["img"]).all())
        out = self.base("sample")
        params = sum(p.numel() for m in (unet, vae, te, te2) if m is not None for p in m.parameters())
        out.update(arch=self.args.arch, size=size, steps=steps,
                   scheduler="euler" if xl else "ddim", guidance=g, params_m=params / 1e6, build_s=build_s,
                   finite=finite, step_s=res["median_s"] / max(1, steps), **res)
        return out

    def run_vae(self):
        torch = self.torch
        from diffusers import AutoencoderKL

        self.reset_peak()
        t0 = time.perf_counter()
        vae = AutoencoderKL(**VAE).to(self.dtype).eval()
        self.sync()
        build_s = time.perf_counter() - t0
        side = self.args.size // 8
        z = torch.randn(1, 4, side, side, dtype=self.dtype)
        with torch.inference_mode():
            holder = {}
            res = self.timed(lambda: holder.__setitem__("img", vae.decode(z).sample))
            finite = bool(torch.isfinite(holder["img"]).all())
        out = self.base("vae_decode")
        out.update(arch=self.args.arch, size=side * 8, params_m=sum(p.numel() for p in vae.parameters()) / 1e6,
                   build_s=build_s, finite=finite, **res)
        return out

    def run_vqa(self):
        """P(yes) for --questions yes/no questions about one image with LLaVA-1.5 (llava-1.5-7b's
        shapes, --vqa-layers of its 32 decoder layers): the image processor once, then one batched
        forward of every question with its image (the HF model encodes the image per sequence),
        logits of the last position only, softmax, P(yes)."""
        torch = self.torch
        import numpy as np
        import transformers
        from PIL import Image
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        Proc = clip_processor_class()
        transformers.utils.logging.set_verbosity_error()
        self.reset_peak()
        t0 = time.perf_counter()
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           hidden_act="quick_gelu", projection_dim=768),
            text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=self.args.vqa_layers, num_attention_heads=32,
                                    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
            image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg).to(self.dtype).eval()
        self.sync()
        build_s = time.perf_counter() - t0
        processor = Proc(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        j = np.arange(512 * 512 * 3)
        image = Image.fromarray((((j * 7 + (j // 1536) * 3) % 251).astype(np.uint8)).reshape(512, 512, 3))
        q, text = self.args.questions, self.args.vqa_text_tokens
        # BOS and `USER:`, the 576 image tokens, then the question's text tokens (agfsync's bench
        # reports its count as question_tokens, the image placeholder counted once).
        head = [1, 3148, 1001, 29901]
        tail = list(range(500, 500 + max(1, text - len(head) - 1)))
        ids = torch.tensor([head + [32000] * 576 + tail] * q)
        yes = [3869, 4874]

        def p_yes():
            pv = processor(images=image, return_tensors="pt")["pixel_values"].to(self.dev, self.dtype)
            logits = model(input_ids=ids, pixel_values=pv.expand(q, -1, -1, -1), logits_to_keep=1).logits
            return logits[:, -1].float().softmax(-1)[:, yes].sum(-1)

        with torch.inference_mode():
            holder = {}
            res = self.timed(lambda: holder.__setitem__("p", p_yes()))
            finite = bool(torch.isfinite(holder["p"]).all())
        out = self.base("vqa")
        out.update(arch="llava-1.5-7b", transformers=transformers.__version__, questions=q,
                   lm_layers=self.args.vqa_layers, image_tokens=576, question_tokens=len(head) + 1 + len(tail),
                   params_m=sum(p.numel() for p in model.parameters()) / 1e6, build_s=build_s, finite=finite,
                   question_s=res["median_s"] / max(1, q), **res)
        return out

    def run_clip(self):
        torch = self.torch
        import numpy as np
        import transformers
        from PIL import Image
        from transformers import CLIPConfig, CLIPModel

        Proc = clip_processor_class()
        transformers.utils.logging.set_verbosity_error()
        self.reset_peak()
        t0 = time.perf_counter()
        model = CLIPModel(CLIPConfig(**VIT_L14)).to(self.dtype).eval()
        self.sync()
        build_s = time.perf_counter() - t0
        processor = Proc()
        b = self.args.clip_batch
        j = np.arange(512 * 512 * 3)
        images = [Image.fromarray((((j * 7 + i * 131 + (j // 1536) * 3) % 251).astype(np.uint8)).reshape(512, 512, 3))
                  for i in range(b)]
        pv = torch.randn(b, 3, 224, 224, dtype=self.dtype)
        ids = torch.randint(0, 49000, (1, 77))
        ids[0, 10] = 49407

        def feats(out):
            return out if torch.is_tensor(out) else out.pooler_output

        with torch.inference_mode():
            text = feats(model.get_text_features(input_ids=ids))
            text = text / text.norm(p=2, dim=-1, keepdim=True)

            def score():
                p = processor(images=images, return_tensors="pt")["pixel_values"].to(self.dev, self.dtype)
                f = feats(model.get_image_features(pixel_values=p))
                f = f / f.norm(p=2, dim=-1, keepdim=True)
                return torch.clamp(100 * f @ text.T, min=0).float().cpu()

            pre = self.timed(lambda: processor(images=images, return_tensors="pt"))
            vis = self.timed(lambda: model.get_image_features(pixel_values=pv))
            sc = self.timed(score)
        out = self.base("clip_score")
        out.update(arch="clip-vit-large-patch14", transformers=transformers.__version__, batch=b, build_s=build_s,
                   preprocess_images_per_s=b / pre["median_s"],
                   vision_batch_s=vis["median_s"], vision_images_per_s=b / vis["median_s"],
                   score_batch_s=sc["median_s"], score_images_per_s=b / sc["median_s"], **sc)
        return out

    def run_dpo(self):
        torch = self.torch
        import copy

        import torch.nn.functional as F
        from diffusers import DDPMScheduler

        self.reset_peak()
        full, ckpt = self.args.full, self.args.gradient_checkpointing
        # Trained weights in f32 (autocast below f32), as agfsync keeps f32 masters.
        unet, cfg, build_s = self.unet(train=True, dtype=torch.float32)
        t0 = time.perf_counter()
        if full:
            ref_unet = copy.deepcopy(unet).requires_grad_(False).to(self.dtype).eval()
            params = list(unet.parameters())
        else:
            from peft import LoraConfig

            ref_unet = None
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
            params = [q for q in unet.parameters() if q.requires_grad]
        if ckpt:
            unet.enable_gradient_checkpointing()
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, foreach=True)
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
        self.sync()
        build_s += time.perf_counter() - t0
        p, lat = self.args.pairs, self.args.latent
        lat_w = torch.randn(p, 4, lat, lat)
        lat_l = torch.randn(p, 4, lat, lat)
        _, t_unused, ehs, added = self.unet_inputs(cfg, 2 * p, lat)
        del t_unused
        beta = 5000.0
        holder = {}
        autocast = torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

        def step():
            latents = torch.cat([lat_w, lat_l])
            noise = torch.randn(p, 4, lat, lat).repeat(2, 1, 1, 1)
            t = torch.randint(0, 1000, (p,)).repeat(2)
            noisy = sched.add_noise(latents, noise, t)
            with autocast:
                pred = unet(noisy, t, ehs, added_cond_kwargs=added).sample
            model_losses = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=[1, 2, 3])
            mw, ml = model_losses.chunk(2)
            with torch.no_grad(), autocast:
                if ref_unet is None:
                    unet.disable_adapters()
                    ref = unet(noisy, t, ehs, added_cond_kwargs=added).sample
                    unet.enable_adapters()
                else:
                    ref = ref_unet(noisy, t, ehs, added_cond_kwargs=added).sample
            ref_losses = F.mse_loss(ref.float(), noise, reduction="none").mean(dim=[1, 2, 3])
            rw, rl = ref_losses.chunk(2)
            inside = -0.5 * beta * ((mw - ml) - (rw - rl))
            loss = -F.logsigmoid(inside).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            holder["loss"] = loss.detach()

        res = self.timed(step)
        out = self.base("dpo_step")
        out.update(arch=self.args.arch, mode="full" if full else "lora", gradient_checkpointing=ckpt,
                   pairs=p, latent_hw=lat, params_m=sum(q.numel() for q in unet.parameters()) / 1e6,
                   trainable_params=sum(q.numel() for q in params), build_s=build_s,
                   finite=bool(torch.isfinite(holder["loss"]).item()), **res)
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="unet", help="comma-separated: unet,sample,vae,clip,vqa,dpo")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clip-batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=4, help="vqa: yes/no questions about the image")
    ap.add_argument("--vqa-layers", type=int, default=32, help="vqa: decoder layers of the 7B language model")
    ap.add_argument("--vqa-text-tokens", type=int, default=27,
                    help="vqa: tokens of the chat prompt around the image (agfsync's question_tokens)")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="dpo: the whole UNet instead of a LoRA")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="dpo: recompute activations")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    names = {"unet": "unet_step", "sample": "sample", "vae": "vae_decode", "clip": "clip_score", "vqa": "vqa",
             "dpo": "dpo_step"}
    try:
        bench = Bench(args)
    except ImportError as e:
        for w in args.workload.split(","):
            print(json.dumps({"bench": names.get(w, w), "impl": "pytorch", "skipped": f"torch: {e}"}), flush=True)
        return
    for w in args.workload.split(","):
        try:
            out = getattr(bench, f"run_{w}")()
        except ImportError as e:
            out = {"bench": names.get(w, w), "impl": "pytorch", "skipped": f"missing package: {e}"}
        log(f"{w}: {out.get('median_s', out.get('skipped'))}")
        out.setdefault("arch", {"clip": "clip-vit-large-patch14", "vqa": "llava-1.5-7b"}.get(w, args.arch))
        # A skipped row still says what it would have run, for the table.
        for k, v in dict(dtype=args.dtype, batch=args.clip_batch if w == "clip" else args.batch,
                         latent_hw=args.latent, size=args.size, steps=args.steps, pairs=args.pairs).items():
            out.setdefault(k, v)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
