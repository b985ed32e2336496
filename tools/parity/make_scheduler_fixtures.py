#!/usr/bin/env python3
"""Writes the scheduler parity fixtures of agfsync (fixtures/parity/schedulers/*.json).

Runs diffusers' schedulers over a grid of configs and records, per case:

* the config (the constructor kwargs, plus ``_class_name``; or ``config_file``, a
  ``scheduler_config.json`` written by diffusers' ``save_config`` in this directory),
* ``num_inference_steps``, ``timesteps``, ``sigmas`` (sigma schedulers), ``init_noise_sigma``,
* for most cases a whole sampling trajectory (``final_sample``), run with a toy model::

      x = sample * init_noise_sigma
      for i, t in enumerate(scheduler.timesteps):
          inp = scheduler.scale_model_input(x, t)
          model_output = 0.3 * inp + 0.1 * sin(float(t) / 100)
          x = scheduler.step(model_output, t, x, **kwargs).prev_sample

  where ``sample`` is the fixed [1, 2, 3, 3] tensor stored in ``common.json``.
  Stochastic schedulers (DDIM eta=1, Euler ancestral, DDPM, SDE-DPM-Solver++) also store the
  per-step noise they drew (``noise``, one [1, 2, 3, 3] tensor per step), so the Rust side can
  replay it through ``step_with_noise``.

``lcm.json`` holds LCMScheduler cases (timesteps for 1..8 steps and several
``original_inference_steps``, refused step counts as ``error``, replayed-noise trajectories; the
last step of an LCM trajectory draws no noise, so each ``noise`` list has one unused entry).

``ddpm.json`` additionally holds ``add_noise`` / ``get_velocity`` results for fixed x0, noise
and timesteps [0, 500, 999]; ``common.json`` holds ``alphas_cumprod`` for a few schedules.

Deterministic (fixed seeds, CPU, float32). Float values are written with 9 significant
digits (exact for float32). Usage: ``python tools/parity/make_scheduler_fixtures.py``.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm

OUT = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "schedulers"
SHAPE = (1, 2, 3, 3)

torch.manual_seed(0)
np.random.seed(0)

BETAS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = [1, 7, 25]
PREDICTIONS = ["epsilon", "v_prediction"]


def fl(x):
    """A float rounded to 9 significant digits (exact for float32)."""
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"non-finite value {x}")
    return float(f"{x:.9g}")


def flist(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float64).flatten().tolist()
    elif isinstance(t, np.ndarray):
        t = t.astype(np.float64).flatten().tolist()
    return [fl(v) for v in t]


def grid():
    """(beta name, spacing, steps, steps_offset, prediction): every option with every other."""
    for bi, beta in enumerate(BETAS):
        for si, spacing in enumerate(SPACINGS):
            for k, steps in enumerate(STEPS):
                offset = (k + bi) % 2
                pred = PREDICTIONS[(k + si + bi) % 2]
                yield beta, spacing, steps, offset, pred


def base_config(beta, spacing, offset, pred):
    c = dict(BETAS[beta])
    c.update(timestep_spacing=spacing, steps_offset=offset, prediction_type=pred)
    return c


class NoiseQueue:
    """Replaces a diffusers module's randn_tensor with pre-drawn noise, recording it."""

    def __init__(self, module, steps, seed):
        self.module = module
        g = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(SHAPE, generator=g, dtype=torch.float32) for _ in range(steps)]
        self.used = 0

    def __enter__(self):
        self.orig = self.module.randn_tensor

        def fake(shape, **kwargs):
            assert tuple(shape) == SHAPE, shape
            n = self.noise[self.used]
            self.used += 1
            return n.clone()

        self.module.randn_tensor = fake
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.orig


def trajectory(sched, sample, steps, step_kwargs=None):
    step_kwargs = step_kwargs or (lambda i: {})
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        # step by index, as agfsync does (diffusers' timestep lookup misbehaves on duplicates)
        sched.set_begin_index(0)
    x = sample * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        out = 0.3 * inp + 0.1 * math.sin(float(t) / 100.0)
        x = sched.step(out, t, x, **step_kwargs(i)).prev_sample
    return x


def record(cls, config, steps, sample, *, traj=True, class_name=None, config_file=None,
           noise_mode=None, seed=0, build_kwargs=None):
    """One fixture case. noise_mode: None, 'ddim' (variance_noise), 'dpm' (variance_noise) or
    a module whose randn_tensor is replaced."""
    if config_file is not None:
        sched = cls.from_config(json.loads((OUT / config_file).read_text()))
    else:
        sched = cls(**config)
    sched.set_timesteps(steps)
    case = {
        "num_inference_steps": steps,
        "timesteps": flist(sched.timesteps.to(torch.float64)),
        "init_noise_sigma": fl(sched.init_noise_sigma),
    }
    if config_file is not None:
        case["config_file"] = config_file
        case["kind"] = build_kwargs["kind"]
    else:
        case["config"] = {"_class_name": class_name or cls.__name__, **config}
    if hasattr(sched, "sigmas") and cls not in (DDIMScheduler, DDPMScheduler):
        case["sigmas"] = flist(sched.sigmas)
    if traj:
        n = len(sched.timesteps)
        if noise_mode is None:
            final = trajectory(cls(**config) if config_file is None else sched, sample, steps)
        elif noise_mode in ("ddim", "dpm"):
            g = torch.Generator().manual_seed(seed)
            noise = [torch.randn(SHAPE, generator=g, dtype=torch.float32) for _ in range(n)]
            if noise_mode == "ddim":
                kw = lambda i: {"eta": 1.0, "variance_noise": noise[i]}  # noqa: E731
            else:
                kw = lambda i: {"variance_noise": noise[i]}  # noqa: E731
            final = trajectory(cls(**config), sample, steps, kw)
            case["noise"] = [flist(z) for z in noise]
        else:
            fresh = cls(**config) if config_file is None else \
                cls.from_config(json.loads((OUT / config_file).read_text()))
            with NoiseQueue(noise_mode, n, seed) as q:
                final = trajectory(fresh, sample, steps)
            case["noise"] = [flist(z) for z in q.noise]
            case["noise_used"] = q.used
        if noise_mode == "ddim":
            case["eta"] = 1.0
        case["final_sample"] = flist(final)
    return case


def ddim_cases(sample):
    cases = []
    for beta, spacing, steps, offset, pred in grid():
        cases.append(record(DDIMScheduler, base_config(beta, spacing, offset, pred), steps, sample))
    sl = BETAS["scaled_linear"]
    extras = [
        ({**sl, "set_alpha_to_one": False, "clip_sample": False, "steps_offset": 1}, 25),
        ({**sl, "prediction_type": "sample", "clip_sample_range": 0.5}, 7),
        ({**sl, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
          "prediction_type": "v_prediction"}, 7),
        ({"num_train_timesteps": 100, "trained_betas": np.linspace(1e-3, 0.05, 100).tolist(),
          "timestep_spacing": "trailing"}, 7),
        ({**sl, "num_train_timesteps": 1000}, 1000),
    ]
    for cfg, steps in extras:
        cases.append(record(DDIMScheduler, cfg, steps, sample, traj=steps <= 25))
    # eta = 1, with the noise
    for i, (cfg, steps) in enumerate([({**sl, "steps_offset": 1}, 7),
                                       ({**sl, "prediction_type": "v_prediction",
                                         "timestep_spacing": "trailing"}, 7)]):
        cases.append(record(DDIMScheduler, cfg, steps, sample, noise_mode="ddim", seed=100 + i))
    return cases


def euler_cases(sample):
    cases = []
    for beta, spacing, steps, offset, pred in grid():
        cases.append(record(EulerDiscreteScheduler, base_config(beta, spacing, offset, pred), steps, sample))
    sl = BETAS["scaled_linear"]
    extras = [
        ({**sl, "use_karras_sigmas": True}, 25),
        ({**sl, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}, 7),
        ({**sl, "use_karras_sigmas": True, "prediction_type": "v_prediction",
          "timestep_spacing": "trailing"}, 1),
        ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True,
          "final_sigmas_type": "sigma_min"}, 7),
        ({**sl, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}, 7),
        ({**sl, "final_sigmas_type": "sigma_min"}, 7),
        ({**sl, "prediction_type": "v_prediction", "timestep_type": "continuous"}, 7),
        ({**sl, "prediction_type": "sample"}, 7),
        ({**sl, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
          "prediction_type": "v_prediction"}, 7),
    ]
    for cfg, steps in extras:
        cases.append(record(EulerDiscreteScheduler, cfg, steps, sample))
    return cases


def euler_ancestral_cases(sample):
    cases = []
    for j, (beta, spacing, steps, offset, pred) in enumerate(grid()):
        cases.append(record(EulerAncestralDiscreteScheduler, base_config(beta, spacing, offset, pred),
                            steps, sample, traj=steps <= 7,
                            noise_mode=scheduling_euler_ancestral_discrete, seed=200 + j))
    sl = BETAS["scaled_linear"]
    cases.append(record(EulerAncestralDiscreteScheduler,
                        {**sl, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                         "prediction_type": "v_prediction"}, 7, sample,
                        noise_mode=scheduling_euler_ancestral_discrete, seed=299))
    return cases


def dpm_cases(sample):
    cases = []
    for karras in (False, True):
        for beta, spacing, steps, offset, pred in grid():
            cfg = base_config(beta, spacing, offset, pred)
            if karras:
                cfg["use_karras_sigmas"] = True
            cases.append(record(DPMSolverMultistepScheduler, cfg, steps, sample))
    sl = BETAS["scaled_linear"]
    extras = [
        ({**sl, "final_sigmas_type": "sigma_min"}, 7),
        ({**sl, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 7),
        ({**sl, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 25),
        ({**sl, "lower_order_final": False}, 7),
        ({**sl, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 25),
        ({**sl, "solver_order": 1}, 7),
        ({**sl, "solver_order": 3}, 7),
        ({**sl, "solver_order": 3, "use_karras_sigmas": True}, 25),
        ({**sl, "solver_type": "heun"}, 7),
        ({**sl, "solver_type": "heun", "use_karras_sigmas": True}, 25),
        ({**sl, "prediction_type": "sample"}, 7),
        ({**sl, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
          "prediction_type": "v_prediction"}, 7),
        ({**sl, "lambda_min_clipped": -5.1}, 7),
        ({**sl, "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}, 7),
    ]
    for cfg, steps in extras:
        cases.append(record(DPMSolverMultistepScheduler, cfg, steps, sample))
    for i, (cfg, steps) in enumerate([
        ({**sl, "algorithm_type": "sde-dpmsolver++"}, 7),
        ({**sl, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
          "solver_type": "heun"}, 7),
        ({**sl, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 7),
    ]):
        cases.append(record(DPMSolverMultistepScheduler, cfg, steps, sample, noise_mode="dpm",
                            seed=300 + i))
    return cases


def ddpm_cases(sample):
    cases = []
    for j, (beta, spacing, steps, offset, pred) in enumerate(grid()):
        cases.append(record(DDPMScheduler, base_config(beta, spacing, offset, pred), steps, sample,
                            traj=steps <= 7, noise_mode=scheduling_ddpm, seed=400 + j))
    sl = BETAS["scaled_linear"]
    for j, (cfg, steps) in enumerate([
        ({**sl, "variance_type": "fixed_small_log", "clip_sample": False}, 7),
        ({**sl, "variance_type": "fixed_large", "prediction_type": "v_prediction"}, 7),
        ({**sl, "prediction_type": "sample", "timestep_spacing": "linspace"}, 7),
    ]):
        cases.append(record(DDPMScheduler, cfg, steps, sample, noise_mode=scheduling_ddpm,
                            seed=450 + j))
    return cases


def ddpm_training(seed=7):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((3, 2, 2, 2), generator=g)
    noise = torch.randn((3, 2, 2, 2), generator=g)
    timesteps = torch.tensor([0, 500, 999], dtype=torch.int64)
    out = {"x0": flist(x0), "noise": flist(noise), "shape": [3, 2, 2, 2],
           "timesteps": [0, 500, 999], "cases": []}
    for beta in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        cfg = dict(BETAS[beta])
        s = DDPMScheduler(**cfg)
        out["cases"].append({
            "config": {"_class_name": "DDPMScheduler", **cfg},
            "add_noise": flist(s.add_noise(x0, noise, timesteps)),
            "get_velocity": flist(s.get_velocity(x0, noise, timesteps)),
        })
    return out


def from_pndm_cases(sample):
    """Configs written by PNDMScheduler (Stable Diffusion 1.x), loaded into other classes."""
    # Stable Diffusion 1.5's scheduler/scheduler_config.json, verbatim (written by diffusers 0.6)
    sd15 = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    PNDMScheduler.from_config(sd15)  # still accepted by this diffusers
    (OUT / "scheduler_config_pndm.json").write_text(json.dumps(sd15, indent=2) + "\n")
    dpm = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", use_karras_sigmas=True)
    dpm.save_config(OUT / "tmp_dpm")
    (OUT / "tmp_dpm" / "scheduler_config.json").rename(OUT / "scheduler_config_dpm.json")
    (OUT / "tmp_dpm").rmdir()
    cases = []
    for cls, kind in ((DDIMScheduler, "ddim"), (EulerDiscreteScheduler, "euler"),
                      (DPMSolverMultistepScheduler, "dpm++2m")):
        cases.append(record(cls, None, 25, sample, config_file="scheduler_config_pndm.json",
                            build_kwargs={"kind": kind}))
    cases.append(record(DPMSolverMultistepScheduler, None, 20, sample,
                        config_file="scheduler_config_dpm.json",
                        build_kwargs={"kind": "dpm++2m-karras"}))
    return cases


# stabilityai SDXL base 1.0 scheduler_config.json (EulerDiscreteScheduler); LCM-LoRA users load
# it with LCMScheduler.from_config, which keeps steps_offset/set_alpha_to_one/timestep_spacing
# (all without effect in LCMScheduler) and takes the LCM defaults for the rest.
SDXL_EULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def lcm_cases(sample):
    """LCMScheduler: timesteps for 1..8 steps x several original_inference_steps, and
    replayed-noise trajectories (noise[i] is what step i drew; the last step draws none, so the
    last entry of each noise list is unused: noise_used = steps - 1)."""
    cases = []
    sl = BETAS["scaled_linear"]
    seed = 500

    def add(cfg, steps, traj=True, config_file=None):
        nonlocal seed
        seed += 1
        cls_cfg = None if config_file else cfg
        cases.append(record(LCMScheduler, cls_cfg, steps, sample, traj=traj, config_file=config_file,
                            noise_mode=scheduling_lcm if traj else None, seed=seed,
                            build_kwargs={"kind": "lcm"}))

    # schedules: every step count 1..8 for several original_inference_steps (None = default 50)
    for orig in (None, 4, 8, 30, 100, 1000):
        for steps in range(1, 9):
            cfg = dict(sl)
            if orig is not None:
                cfg["original_inference_steps"] = orig
            if orig is not None and steps > orig:
                # diffusers refuses: recorded so that the Rust side checks it refuses too
                try:
                    s = LCMScheduler(**cfg)
                    s.set_timesteps(steps)
                except ValueError as e:
                    cases.append({"config": {"_class_name": "LCMScheduler", **cfg}, "num_inference_steps": steps,
                                  "error": str(e).splitlines()[0][:200]})
                    continue
                raise AssertionError("expected a ValueError")
            add(cfg, steps, traj=steps in (1, 2, 4, 8))
    # prediction types, clipping, other beta schedules, options without effect
    extras = [
        ({**sl, "prediction_type": "v_prediction"}, 4),
        ({**sl, "prediction_type": "sample"}, 4),
        ({**sl, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}, 6),
        ({**sl, "clip_sample": True}, 4),
        ({**sl, "timestep_scaling": 5.0}, 4),
        ({**sl, "timestep_scaling": 100.0, "original_inference_steps": 20}, 3),
        # explicit beta_start/beta_end: LCMScheduler's defaults (0.00085/0.012) differ from the
        # other classes' (0.0001/0.02), and agfsync's SchedulerConfig fills in the latter
        ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 5),
        ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 5),
        ({**sl, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 4),
        ({"num_train_timesteps": 100, "trained_betas": np.linspace(1e-3, 0.05, 100).tolist(),
          "original_inference_steps": 10}, 3),
        # timestep_spacing, steps_offset and set_alpha_to_one do not change LCMScheduler
        ({**sl, "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False}, 4),
        ({**sl, "timestep_spacing": "linspace"}, 7),
    ]
    for cfg, steps in extras:
        add(cfg, steps)
    # LCMScheduler.from_config(SDXL's Euler config file), as LCM-LoRA pipelines do
    (OUT / "scheduler_config_sdxl.json").write_text(json.dumps(SDXL_EULER_CONFIG, indent=2) + "\n")
    for steps in (1, 4, 8):
        add(None, steps, config_file="scheduler_config_sdxl.json")
    # a config file written by LCMScheduler.save_config (has original_inference_steps / timestep_scaling)
    LCMScheduler(**sl, original_inference_steps=40, timestep_scaling=5.0, prediction_type="v_prediction",
                 clip_sample=False).save_config(OUT / "tmp_lcm")
    (OUT / "tmp_lcm" / "scheduler_config.json").rename(OUT / "scheduler_config_lcm.json")
    (OUT / "tmp_lcm").rmdir()
    add(None, 6, config_file="scheduler_config_lcm.json")
    return cases


def write(name, obj):
    path = OUT / name
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"{path.relative_to(OUT.parents[2])}: {path.stat().st_size} bytes")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    sample = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    # round the sample to what is stored so that both sides start from identical values
    sample = torch.tensor(flist(sample), dtype=torch.float32).reshape(SHAPE)

    alphas = {}
    for name, cfg in [("linear", BETAS["linear"]), ("scaled_linear", BETAS["scaled_linear"]),
                      ("squaredcos_cap_v2", BETAS["squaredcos_cap_v2"]),
                      ("scaled_linear_zero_snr", {**BETAS["scaled_linear"], "rescale_betas_zero_snr": True})]:
        alphas[name] = {"config": cfg, "alphas_cumprod": flist(DDIMScheduler(**cfg).alphas_cumprod)}

    write("common.json", {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "model": "model_output = 0.3 * scale_model_input(x, t) + 0.1 * sin(t / 100); "
                 "x starts at sample * init_noise_sigma",
        "sample_shape": list(SHAPE),
        "sample": flist(sample),
        "alphas_cumprod": alphas,
    })
    write("ddim.json", {"cases": ddim_cases(sample)})
    write("euler.json", {"cases": euler_cases(sample)})
    write("euler_ancestral.json", {"cases": euler_ancestral_cases(sample)})
    write("dpm_solver_multistep.json", {"cases": dpm_cases(sample)})
    write("ddpm.json", {"cases": ddpm_cases(sample), "training": ddpm_training()})
    write("from_config_files.json", {"cases": from_pndm_cases(sample)})
    write("lcm.json", {"cases": lcm_cases(sample)})
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"total: {total} bytes")
    assert total < 1_000_000, "fixtures must stay under 1 MB"


if __name__ == "__main__":
    main()
