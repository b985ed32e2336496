#!/usr/bin/env python3
"""Generate the parity fixtures of the VQA score (LLaVA-1.5) and the Llama/Qwen2 decoder.

Rerun from the repository root (CPU only, no network, a few seconds):

    python3 tools/parity/make_vqa_fixtures.py              # writes fixtures/parity/vqa/
    python3 tools/parity/make_vqa_fixtures.py --out DIR    # writes elsewhere

Everything is built here with fixed seeds: a word-level tokenizer.json (tokenizers'
WordLevel model, whitespace split + isolated punctuation, `<s>` prepended, `<image>` an
added special token), a tiny random `LlavaForConditionalGeneration` (CLIP vision tower
28 px / patch 7 = 16 patches, 3 layers; Llama LM with grouped-query attention, 2 layers)
saved by transformers 5's `save_pretrained` (which writes the legacy hub key layout:
`vision_tower.embeddings.*` / `vision_tower.encoder.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), its
`preprocessor_config.json` (CLIPImageProcessor, PIL backend), a tiny random
`Qwen2ForCausalLM` (q/k/v biases, tied embeddings, GQA, rope_theta 1e6), and test
images of several sizes and aspect ratios written with Pillow. transformers' init is
tiny; every tensor is redrawn at O(1) scale so that logits are far from uniform.

Quantities (the contract of crates/agfsync-feedback/tests/vqa_parity.rs and
crates/agfsync-models/tests/llama_parity.rs):

  prompt(text)    "USER: <image>\\n{text} ASSISTANT:" (the llava-hf template)
  yes/no text     "Question: {q} Choices: ['yes', 'no'] Answer:"
  vqascore text   'Does this figure show "{prompt}"? Please answer yes or no.'
  input ids       tokenizer(prompt) with the one `<image>` id repeated 16 times (what
                  LlavaProcessor's expansion gives: 16 patches, CLS dropped)
  yes ids         every id that is the first token of "Yes", "yes", " Yes" or " yes"
                  (no special tokens) and decodes, trimmed and lower-cased, to "yes";
                  no ids likewise
  P(yes)          sum over yes ids of softmax(last-position logits) (full vocabulary,
                  not renormalised over yes/no); P(no) likewise
  greedy          model.generate(do_sample=False, max_new_tokens=6, eos_token_id=2):
                  the new ids, cut before the first eos
  MC log-lik      for choice c: ids(prompt + " " + c) split from ids(prompt) at their
                  longest common prefix; the sum of log_softmax of the continuation
                  tokens (each predicted from the previous position)

Files written:

  tokenizer.json              the word-level tokenizer (also copied into tiny-llava/)
  tiny-llava/                 config.json, model.safetensors, tokenizer.json,
                              preprocessor_config.json
  tiny-qwen2/                 config.json, model.safetensors
  images/*.png                the test images
  ref.safetensors             pixel_values.<img> (3, 28, 28), image_features.<img>
                              (16, 32: projector output), logits (n_img, n_prompt, vocab:
                              last position), p_yes / p_no (n_img, n_prompt),
                              mc_loglik (n_img, n_mc, n_choice), llama_logits.<k>
                              (t, vocab: the LLaVA LM alone on token ids, all positions),
                              qwen2_logits.<k> (t, vocab)
  ref.json                    image names, prompts (full strings), their input ids,
                              yes/no ids, greedy answers per image and prompt, MC
                              questions and choices, llama/qwen2 token sequences and
                              greedy continuations, versions
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 28
PATCH = 7
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2

WORDS = (
    "USER ASSISTANT : Question Choices Answer [ ] ' , yes no Yes No Does this figure show \" ? "
    "Please answer or a an the is there are of in on red blue green cube sphere cat dog "
    "What How many color one two three Is . photo image"
).split()

TEMPLATE = "USER: <image>\n{} ASSISTANT:"
YES_NO = "Question: {} Choices: ['yes', 'no'] Answer:"
VQASCORE = 'Does this figure show "{}"? Please answer yes or no.'
MC = "Question: {} Choices: {} Answer:"


def build_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<image>"])
    return tok


def word_ids(tok: Tokenizer, word: str) -> list[int]:
    out = []
    for v in (word.capitalize(), word, " " + word.capitalize(), " " + word):
        ids = tok.encode(v, add_special_tokens=False).ids
        if ids and tok.decode([ids[0]], skip_special_tokens=False).strip().lower() == word and ids[0] not in out:
            out.append(ids[0])
    return sorted(out)


def redraw(model, seed):
    """transformers' init is tiny: every tensor O(1) so references carry signal."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5))


def smooth_noise(rng, h, w, amount=60):
    base = rng.integers(0, 256, size=(1, 1, 3)).astype(np.float64)
    noise = rng.normal(0, amount, size=(h, w, 3)).cumsum(axis=0).cumsum(axis=1) / 10
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_images(out: Path):
    rng = np.random.default_rng(7)
    (out / "images").mkdir(parents=True, exist_ok=True)
    made = []
    for name, (h, w) in [("wide.png", (37, 61)), ("tall.png", (50, 23)), ("square.png", (28, 28)), ("big.png", (90, 70))]:
        Image.fromarray(smooth_noise(rng, h, w)).save(out / "images" / name)
        made.append(name)
    return made


def expand_image(ids: list[int], image_id: int) -> list[int]:
    out = []
    for i in ids:
        out.extend([image_id] * N_PATCHES if i == image_id else [i])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures/parity/vqa")
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(2)

    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    image_id = tok.token_to_id("<image>")

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=N_PATCHES,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    redraw(model, 1)
    llava_dir = out / "tiny-llava"
    model.save_pretrained(str(llava_dir), safe_serialization=True)
    tok.save(str(llava_dir / "tokenizer.json"))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor.save_pretrained(str(llava_dir))

    images = make_images(out)
    yes_ids, no_ids = word_ids(tok, "yes"), word_ids(tok, "no")
    assert yes_ids and no_ids, (yes_ids, no_ids)

    questions = ["is there a red cube ?", "Is there a cat in the photo ?", "are there two blue sphere ?"]
    prompts = [TEMPLATE.format(YES_NO.format(q)) for q in questions]
    prompts.append(TEMPLATE.format(VQASCORE.format("a red cube on a blue sphere")))
    mc = [
        ("What color is the cube ?", ["red", "blue", "green"]),
        ("How many cat are there ?", ["one", "two", "three"]),
    ]

    def choices_repr(cs):
        return "[" + ", ".join(f"'{c}'" for c in cs) + "]"

    def ids_of(text_):
        return expand_image(tok.encode(text_).ids, image_id)

    tensors: dict[str, torch.Tensor] = {}
    logits_all, p_yes, p_no, mc_ll = [], [], [], []
    greedy: dict[str, list[list[int]]] = {}
    mc_split = []
    with torch.no_grad():
        for name in images:
            key = name.replace(".", "_")
            pil = Image.open(out / "images" / name).convert("RGB")
            pv = processor(images=pil, return_tensors="pt")["pixel_values"]
            tensors[f"pixel_values.{key}"] = pv[0].contiguous()
            feats = model.model.get_image_features(pixel_values=pv).pooler_output[0]
            tensors[f"image_features.{key}"] = feats.contiguous()
            row_l, row_y, row_n, row_g = [], [], [], []
            for p in prompts:
                ids = torch.tensor([ids_of(p)])
                o = model(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids))
                last = o.logits[0, -1].float()
                probs = last.softmax(-1)
                row_l.append(last)
                row_y.append(probs[yes_ids].sum().item())
                row_n.append(probs[no_ids].sum().item())
                g = model.generate(
                    input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=6, eos_token_id=2, pad_token_id=3,
                )[0, ids.shape[1]:].tolist()
                if 2 in g:
                    g = g[: g.index(2)]
                row_g.append(g)
            logits_all.append(torch.stack(row_l))
            p_yes.append(row_y)
            p_no.append(row_n)
            greedy[name] = row_g
            rows = []
            for q, cs in mc:
                prompt = TEMPLATE.format(MC.format(q, choices_repr(cs)))
                base = ids_of(prompt)
                lls = []
                for c in cs:
                    full = ids_of(prompt + " " + c)
                    k = 0
                    while k < min(len(base), len(full)) and base[k] == full[k]:
                        k += 1
                    ids = torch.tensor([full])
                    lp = model(input_ids=ids, pixel_values=pv).logits[0].float().log_softmax(-1)
                    lls.append(sum(lp[i - 1, full[i]].item() for i in range(k, len(full))))
                    if name == images[0]:
                        mc_split.append({"prompt": prompt, "choice": c, "ids": full, "continuation_from": k})
                rows.append(lls)
            mc_ll.append(rows)
        tensors["logits"] = torch.stack(logits_all).contiguous()
        tensors["p_yes"] = torch.tensor(p_yes, dtype=torch.float64)
        tensors["p_no"] = torch.tensor(p_no, dtype=torch.float64)
        tensors["mc_loglik"] = torch.tensor(mc_ll, dtype=torch.float64)

        # The LLaVA LM alone, on token ids (crates/agfsync-models/tests/llama_parity.rs).
        lm_seqs = [[1, 5, 6, 7, 8, 9], [1, 20, 21, 22], [1, 30, 31, 32, 33, 34, 35, 36, 2]]
        lm = model.model.language_model
        llama_greedy = []
        for k, s in enumerate(lm_seqs):
            ids = torch.tensor([s])
            h = lm(input_ids=ids).last_hidden_state
            tensors[f"llama_logits.{k}"] = model.lm_head(h)[0].float().contiguous()
            seq = list(s)
            for _ in range(5):  # greedy with the LM alone, no cache subtleties
                h = lm(input_ids=torch.tensor([seq])).last_hidden_state
                seq.append(int(model.lm_head(h)[0, -1].argmax()))
            llama_greedy.append(seq[len(s):])

        qcfg = Qwen2Config(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=95, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        torch.manual_seed(2)
        qwen = Qwen2ForCausalLM(qcfg).eval()
        redraw(qwen, 3)
        qdir = out / "tiny-qwen2"
        qwen.save_pretrained(str(qdir), safe_serialization=True)
        q_seqs = [[3, 17, 42, 8, 60, 61, 5], [90, 1, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
        q_greedy = []
        for k, s in enumerate(q_seqs):
            ids = torch.tensor([s])
            tensors[f"qwen2_logits.{k}"] = qwen(input_ids=ids).logits[0].float().contiguous()
            g = qwen.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=5, eos_token_id=95, pad_token_id=0)[0, len(s):].tolist()
            q_greedy.append(g)

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "ref.safetensors"))
    ref = {
        "images": images,
        "prompts": prompts,
        "questions": questions,
        "prompt_input_ids": [ids_of(p) for p in prompts],
        "yes_ids": yes_ids,
        "no_ids": no_ids,
        "image_token_id": image_id,
        "greedy": greedy,
        "greedy_max_new_tokens": 6,
        "eos_token_id": 2,
        "mc": [{"question": q, "choices": cs} for q, cs in mc],
        "mc_split_first_image": mc_split,
        "llama_sequences": lm_seqs,
        "llama_greedy": llama_greedy,
        "qwen2_sequences": q_seqs,
        "qwen2_greedy": q_greedy,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
        },
    }
    (out / "ref.json").write_text(json.dumps(ref, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB); yes ids {yes_ids}, no ids {no_ids}")
    print("p_yes", np.array(p_yes).round(4).tolist())
    print("greedy", greedy)


if __name__ == "__main__":
    main()
