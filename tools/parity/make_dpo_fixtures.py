"""Writes fixtures/parity/dpo/dpo_loss.safetensors: the Diffusion-DPO loss of
shared/AGFSYNC.md section 6 computed by PyTorch (float64, autograd) on fixed
inputs, for agfsync-dpo's tests/loss_parity.rs.

For each case `<c>` the file holds the model and reference predictions of the
winners and losers (`<c>.model_w`, `<c>.model_l`, `<c>.ref_w`, `<c>.ref_l`),
the clean latents, noise and alphas_cumprod used to build the targets
(`<c>.x0_w`, `<c>.x0_l`, `<c>.noise`, `<c>.abar`), `<c>.beta`, `<c>.v` (1 for a
v-prediction target), and torch's results: `<c>.x_t_w`, `<c>.target_w`,
`<c>.target_l`, `<c>.loss`, `<c>.acc`, `<c>.inside`, `<c>.sft`, and the
gradients `<c>.grad_w` / `<c>.grad_l` of the loss with respect to the model's
predictions (and `<c>.sft_grad_w` for the SFT loss).

`adamw.*` holds torch.optim.AdamW (lr 1e-2, weight decay 1e-2) over 4 steps
of given gradients clipped to norm 1 (`adamw.p0`, `adamw.grads`, `adamw.p4`,
`adamw.norms`), and `lr.<name>` diffusers' get_scheduler rates for 12 steps
with 3 warm-up steps and base rate 0.5.

Run: python tools/parity/make_dpo_fixtures.py  (torch, safetensors)
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "fixtures", "parity", "dpo", "dpo_loss.safetensors")


def case(name, gen, b, shape, beta, v, scale=0.1, tie=False):
    c, h, w = shape
    x0_w = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    x0_l = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    noise = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    abar = torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    sa = abar.sqrt().view(b, 1, 1, 1)
    s1a = (1 - abar).sqrt().view(b, 1, 1, 1)
    x_t_w = sa * x0_w + s1a * noise
    if v:
        target_w = sa * noise - s1a * x0_w
        target_l = sa * noise - s1a * x0_l
    else:
        target_w = noise.clone()
        target_l = noise.clone()
    ref_w = target_w + scale * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    ref_l = target_l + scale * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    if tie:
        # the start of a LoRA run: the model is the reference (inside = 0)
        model_w = ref_w.clone()
        model_l = ref_l.clone()
    else:
        model_w = ref_w + scale * 0.1 * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
        model_l = ref_l + scale * 0.1 * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    model_w.requires_grad_(True)
    model_l.requires_grad_(True)

    err = lambda p, t: ((p - t) ** 2).mean(dim=[1, 2, 3])
    mw, ml = err(model_w, target_w), err(model_l, target_l)
    rw, rl = err(ref_w, target_w), err(ref_l, target_l)
    inside = -0.5 * beta * ((mw - ml) - (rw - rl))
    loss = -F.logsigmoid(inside).mean()
    gw, gl = torch.autograd.grad(loss, [model_w, model_l])
    acc = ((inside > 0).double() + 0.5 * (inside == 0).double()).mean()

    mw2 = model_w.detach().clone().requires_grad_(True)
    sft = F.mse_loss(mw2, target_w)
    (sgw,) = torch.autograd.grad(sft, [mw2])

    out = {
        "model_w": model_w.detach(), "model_l": model_l.detach(),
        "ref_w": ref_w, "ref_l": ref_l,
        "x0_w": x0_w, "x0_l": x0_l, "noise": noise, "abar": abar,
        "beta": torch.tensor([beta], dtype=torch.float64),
        "v": torch.tensor([1.0 if v else 0.0], dtype=torch.float64),
        "x_t_w": x_t_w, "target_w": target_w, "target_l": target_l,
        "loss": loss.detach().view(1), "acc": acc.view(1), "inside": inside.detach(),
        "grad_w": gw, "grad_l": gl,
        "sft": sft.detach().view(1), "sft_grad_w": sgw,
    }
    return {f"{name}.{k}": t.contiguous() for k, t in out.items()}


def adamw_and_schedules(gen):
    """torch.optim.AdamW over 4 steps with clipping, and diffusers' LR
    schedules (constant, constant_with_warmup, cosine) over 12 steps."""
    from diffusers.optimization import get_scheduler

    p0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * 3.0
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-2)
    norms = []
    for k in range(4):
        opt.zero_grad()
        p.grad = grads[k].clone()
        norms.append(torch.nn.utils.clip_grad_norm_([p], 1.0).item())
        opt.step()
    out = {
        "adamw.p0": p0, "adamw.grads": grads, "adamw.p4": p.detach().clone(),
        "adamw.norms": torch.tensor(norms, dtype=torch.float64),
    }
    for name in ["constant", "constant_with_warmup", "cosine"]:
        q = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([q], lr=0.5)
        sch = get_scheduler(name, optimizer=o, num_warmup_steps=3, num_training_steps=12)
        lrs = []
        for _ in range(12):
            lrs.append(o.param_groups[0]["lr"])
            o.step()
            sch.step()
        out[f"lr.{name}"] = torch.tensor(lrs, dtype=torch.float64)
    return out


def main():
    gen = torch.Generator().manual_seed(20231120)
    tensors = {}
    tensors.update(case("eps", gen, 6, (4, 6, 6), 5000.0, False))
    tensors.update(case("vpred", gen, 5, (4, 6, 6), 2500.0, True))
    tensors.update(case("tie", gen, 3, (4, 4, 4), 5000.0, False, tie=True))
    # large |inside| (thousands): a naive log(sigmoid(x)) overflows
    tensors.update(case("large", gen, 4, (4, 6, 6), 5000.0, False, scale=5.0))
    tensors.update(adamw_and_schedules(gen))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__})
    print(OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
