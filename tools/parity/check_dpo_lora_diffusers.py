"""Checks that a LoRA exported by agfsync-dpo loads in diffusers and gives
the same UNet outputs as agfsync's trained policy.

  AGFSYNC_DPO_EXPORT_DIR=/tmp/dpo-export cargo test -p agfsync-dpo \
      --test trainer -- --ignored export_for_diffusers
  python tools/parity/check_dpo_lora_diffusers.py /tmp/dpo-export

Loads <dir>/pipeline with StableDiffusionPipeline, applies
<dir>/run/pytorch_lora_weights.safetensors with `load_lora_weights`, runs
the UNet on <dir>/io.safetensors' inputs and compares with agfsync's
outputs with (out_lora) and without (out_base) the adapter.
"""
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file


def main(d):
    io = load_file(f"{d}/io.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(f"{d}/pipeline", safety_checker=None)
    unet = pipe.unet.eval()
    args = (io["sample"], io["timesteps"], io["encoder_hidden_states"])
    with torch.no_grad():
        base = unet(*args).sample
    pipe.load_lora_weights(f"{d}/run/pytorch_lora_weights.safetensors", adapter_name="dpo")
    with torch.no_grad():
        lora = unet(*args).sample
    db = (base - io["out_base"]).abs().max().item()
    dl = (lora - io["out_lora"]).abs().max().item()
    moved = (io["out_lora"] - io["out_base"]).abs().max().item()
    print(f"base max|diff| {db:.3e}; with LoRA max|diff| {dl:.3e}; LoRA effect {moved:.3e}")
    ok = db < 1e-4 and dl < 1e-4 and moved > 1e-3
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])
