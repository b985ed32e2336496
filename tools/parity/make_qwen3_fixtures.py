#!/usr/bin/env python3
"""Generate the Qwen3 decoder parity fixtures (fixtures/parity/qwen3/).

    python3 tools/parity/make_qwen3_fixtures.py

A tiny random `Qwen3ForCausalLM` (transformers): per-head RMSNorm on queries and
keys (q_norm / k_norm), no q/k/v biases, an explicit head_dim that differs from
hidden_size / num_attention_heads, grouped-query attention, untied head. Written:

  tiny-qwen3/config.json, tiny-qwen3/model.safetensors   the model (save_pretrained)
  ref.safetensors   logits.<k> [t, vocab] for each test sequence (f32)
  ref.json          sequences (token ids), greedy.<k>: 6 greedy tokens after each
                    sequence, versions

The Rust test crates/agfsync-models/tests/llama_parity.rs reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

OUT = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "qwen3"


def main():
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    # Random norm scales, so that q_norm / k_norm are not identity.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    mdir = OUT / "tiny-qwen3"
    model.save_pretrained(mdir, safe_serialization=True)
    seqs = [[1, 5, 17, 33, 60, 8], [1, 90, 4], [1, 11, 12, 13, 14, 15, 16, 70, 71]]
    tensors, greedy = {}, {}
    with torch.no_grad():
        for k, s in enumerate(seqs):
            ids = torch.tensor([s])
            tensors[f"logits.{k}"] = model(ids).logits[0].float().contiguous()
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            greedy[str(k)] = out[0, len(s):].tolist()
    save_file(tensors, OUT / "ref.safetensors")
    (OUT / "ref.json").write_text(json.dumps({
        "sequences": seqs,
        "greedy": greedy,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
