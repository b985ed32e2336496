#!/usr/bin/env python3
"""Generate the parity fixtures of the BERT encoder and the sentence embedder.

Rerun from the repository root (CPU only, no network, a few seconds):

    python3 tools/parity/make_bert_fixtures.py              # writes fixtures/parity/bert/
    python3 tools/parity/make_bert_fixtures.py --out DIR    # writes elsewhere

Everything is built here with fixed seeds: a small `vocab.txt` (the special tokens [PAD] [UNK]
[CLS] [SEP] [MASK], punctuation, digits, letters and `##` letters, and common English words),
built into a lower-casing WordPiece `tokenizer.json` with the `tokenizers` package
(BertNormalizer, BertPreTokenizer, `[CLS] $A [SEP]`) and saved through transformers'
`BertTokenizerFast`, and a tiny random `BertModel` (width 32, 2 layers, 4 heads, intermediate 64,
64 positions, exact-erf gelu, with pooler) saved by transformers 5's `save_pretrained`. The
initialisation of transformers is tiny (std 0.02); every tensor is redrawn at O(1) scale so
that attention, and therefore the padding mask, matter.

Quantities (the contract of crates/agfsync-author/tests/bert_parity.rs):

  input_ids, attention_mask   tokenizer(sentences, padding=True, truncation=True) as I64
                              [n, T] (right padding with [PAD] = 0; sentence 3 is longer than
                              the 64 positions and truncated to 64 ids ending in [SEP])
  last_hidden_state           model(input_ids, attention_mask).last_hidden_state [n, T, 32] F32
                              (every position, padding included)
  pooler_output               [n, 32] F32, tanh(dense(h[:, 0]))
  cls                         F.normalize(last_hidden_state[:, 0]) [n, 32]
  mean                        F.normalize(sum(h * mask) / clamp(sum(mask), 1e-9)) [n, 32], as
                              sentence-transformers' Pooling(mean) + Normalize

Files written:

  tiny-bert/                  config.json, model.safetensors, tokenizer.json,
                              tokenizer_config.json,
                              1_Pooling/config.json (CLS pooling, as bge)
  ref.safetensors             the tensors above
  ref.json                    sentences, token strings, versions
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, BertTokenizerFast

ROOT = Path(__file__).resolve().parents[2]

WORDS = (
    "the a an of and in on at to with for from by is are was were be this that it there "
    "photo picture image painting red blue green yellow black white cat dog horse bird "
    "man woman people child car bus road street city house tree trees flower mountain "
    "river lake sea beach sky snow water night day sunset big small old young happy "
    "sitting standing running riding playing eating holding one two three"
).split()

SENTENCES = [
    "A red cat sitting on a wooden table.",
    "a red cat sitting on a wooden table!",
    "Two horses running on the beach at sunset",
    # Over 64 tokens: truncated to the position table.
    " ".join(["the old man and the sea, with a small boat, on the river at night."] * 5),
    "Hi",
    "Snow-capped mountains; a lake (blue) & café",
]


def vocab_list() -> list[str]:
    v = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    v += list(".,!?;:'\"-()&/")
    v += [str(d) for d in range(10)]
    v += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    v += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    for w in WORDS:
        if w not in v:
            v.append(w)
    return v


def redraw(model, seed):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures/parity/bert")
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    model_dir = out / "tiny-bert"
    model_dir.mkdir(parents=True)
    torch.set_num_threads(2)

    vocab = vocab_list()
    wp = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                    max_input_chars_per_word=100))
    wp.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                               strip_accents=None, lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    wp.decoder = decoders.WordPiece(prefix="##")
    wp.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizerFast(
        tokenizer_object=wp, model_max_length=64, do_lower_case=True, unk_token="[UNK]",
        sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )
    tok.save_pretrained(str(model_dir))

    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=True).eval()
    redraw(model, 1)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2) + "\n")

    # Reload both from the folder, as a user would.
    tok = BertTokenizerFast.from_pretrained(str(model_dir))
    model = BertModel.from_pretrained(str(model_dir)).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        o = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    h = o.last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    refs = {
        "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
        "last_hidden_state": h.contiguous(),
        "pooler_output": o.pooler_output.contiguous(),
        "cls": F.normalize(h[:, 0], dim=-1).contiguous(),
        "mean": F.normalize(mean, dim=-1).contiguous(),
    }
    save_file(refs, str(out / "ref.safetensors"))
    (out / "ref.json").write_text(json.dumps({
        "sentences": SENTENCES,
        "tokens": [tok.convert_ids_to_tokens(ids) for ids in tok(SENTENCES, truncation=True)["input_ids"]],
        "lengths": enc["attention_mask"].sum(1).tolist(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
    }, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}; lengths {refs['attention_mask'].sum(1).tolist()}")


if __name__ == "__main__":
    main()
