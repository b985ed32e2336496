#!/usr/bin/env python3
"""Make the CLIP tokenizer parity fixture for crates/agfsync-models/tests/clip_tokenizer.rs.

1. Runs the Rust writer (`write_tiny_clip_tokenizer`, through an ignored test) to
   produce two tiny tokenizer folders: tiny-sd15/ (pad "<|endoftext|>") and
   tiny-sd2/ (pad "!"), unless --no-cargo is given and they already exist.
2. Loads each folder with transformers' CLIPTokenizer (and CLIPTokenizerFast
   when it is a distinct class, as in transformers < 5) and encodes tricky
   strings, raw and padded/truncated to 77 like diffusers does.
3. Encodes them also with an independent pure-Python implementation of the
   original OpenAI CLIP BPE ("reference"); it must agree with transformers on
   every case except those listed in KNOWN_REFERENCE_DIFFERENCES.
4. Writes ids.json and transformers' tokenizer.json for each folder.

Usage (from the repo root):  python tools/parity/make_tokenizer_fixture.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import regex

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "fixtures" / "parity" / "tokenizer"
MAX_LENGTH = 77
VARIANTS = ["tiny-sd15", "tiny-sd2"]

LONG_PROMPT = " ".join(
    ["a", "photo", "of", "the", "red", "cat", "sitting", "on", "wooden", "table", "bright"][i % 11]
    for i in range(200)
)

CASES = [
    "a photo of a cat",
    "A PHOTO of a Cat!!!",
    "  leading and   trailing\t\nwhitespace  ",
    "the dog's ball isn't here, they're gone & we'll see what I'd do",
    "don''t stop -- it's 3:45pm on 2024/01/02",
    "café naïve résumé",
    "cafe\u0301 with a combining accent",
    "東京タワー at night",
    "emoji 🐱🚀 test!",
    "<|endoftext|> inside text <|startoftext|>",
    "<|ENDOFTEXT|> upper-case special",
    "hello!world?! (parens) [brackets] {braces}",
    "numbers 1234567890 and 3.14",
    "",
    "masterpiece, best quality, ultra-detailed, 8k, octane render",
    "Ｆｕｌｌｗｉｄｔｈ letters",
    "İstanbul ΣΊΣΥΦΟΣ straße",
    "a\u00a0non-breaking\u2003space and\u3000ideographic",
    "tab\tand\r\nnewlines",
    "zxqv qwzj unusual words",
    "'s 't 're 've 'm 'll 'd alone",
    LONG_PROMPT,
]

# Cases where the pure-Python reference (OpenAI's original algorithm) is known
# to differ from transformers; documented, not asserted.
KNOWN_REFERENCE_DIFFERENCES: dict[str, str] = {
    "<|ENDOFTEXT|> upper-case special": (
        "transformers matches special tokens before lower-casing (they are not normalized), "
        "so the upper-case form is plain text; OpenAI lower-cases first"
    ),
    "İstanbul ΣΊΣΥΦΟΣ straße": (
        "tokenizers' Lowercase maps each char (final Σ -> σ); Python's str.lower() gives ς"
    ),
    "A PHOTO of a Cat!!!": "SD 2.x pad token '!' is a special added token in transformers (id 0)",
    "emoji 🐱🚀 test!": "SD 2.x pad token '!' is a special added token in transformers (id 0)",
    "hello!world?! (parens) [brackets] {braces}": (
        "SD 2.x pad token '!' is a special added token in transformers (id 0)"
    ),
}


def run_rust_writer(out: Path) -> None:
    env = dict(os.environ)
    env["AGFSYNC_TOKENIZER_FIXTURE_DIR"] = str(out)
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "agfsync-target"))
    cmd = [
        "cargo",
        "test",
        "-p",
        "agfsync-models",
        "--test",
        "clip_tokenizer",
        "write_parity_tokenizer_folders",
        "--",
        "--ignored",
        "--exact",
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceClip:
    """Independent re-implementation of OpenAI CLIP's simple_tokenizer BPE."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.specials = {"<|startoftext|>", "<|endoftext|>"}

    def bpe(self, token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids: list[int] = []
        for piece in self.PATTERN.findall(text):
            if piece in self.specials:
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


def encode_all(tok, text: str) -> dict:
    raw = tok(text, add_special_tokens=False)["input_ids"]
    padded = tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
    return {"raw": raw, "padded": padded, "truncated": len(raw) > MAX_LENGTH - 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-cargo", action="store_true", help="reuse existing tiny-* folders")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_cargo:
        run_rust_writer(out)

    import tokenizers
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    classes = {"CLIPTokenizer": CLIPTokenizer}
    if CLIPTokenizerFast is not CLIPTokenizer:
        classes["CLIPTokenizerFast"] = CLIPTokenizerFast

    result = {
        "generated_by": "tools/parity/make_tokenizer_fixture.py",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "python_classes": list(classes),
        "max_length": MAX_LENGTH,
        "tokenizers": {},
        "cases": [{"text": t} for t in CASES],
        "reference_differences": [],
    }
    for variant in VARIANTS:
        folder = out / variant
        toks = {name: cls.from_pretrained(str(folder)) for name, cls in classes.items()}
        main_tok = toks["CLIPTokenizer"]
        ref = ReferenceClip(folder)
        result["tokenizers"][variant] = {
            "bos_token_id": main_tok.bos_token_id,
            "eos_token_id": main_tok.eos_token_id,
            "pad_token_id": main_tok.pad_token_id,
            "vocab_size": len(main_tok),
        }
        main_tok.backend_tokenizer.save(str(out / f"{variant}.tokenizer.json"), pretty=True)
        for case in result["cases"]:
            text = case["text"]
            encoded = {name: encode_all(tok, text) for name, tok in toks.items()}
            first = encoded["CLIPTokenizer"]
            for name, enc in encoded.items():
                if enc != first:
                    raise SystemExit(f"{variant}: {name} disagrees with CLIPTokenizer on {text!r}")
            case[variant] = first
            ref_ids = ref.encode(text)
            if ref_ids != first["raw"]:
                diff = {
                    "variant": variant,
                    "text": text,
                    "reference_raw": ref_ids,
                    "why": KNOWN_REFERENCE_DIFFERENCES.get(text, "unexplained"),
                }
                result["reference_differences"].append(diff)
                if text not in KNOWN_REFERENCE_DIFFERENCES:
                    print(f"warning: reference differs on {variant} {text!r}:\n  ref {ref_ids}\n  hf  {first['raw']}",
                          file=sys.stderr)
    path = out / "ids.json"
    text = json.dumps(result, ensure_ascii=False, indent=1)
    # One line per id list keeps the fixture readable and diffable.
    text = re.sub(
        r"\[[\d,\s]*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",") if x.strip()) + "]",
        text,
    )
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(CASES)} cases, {len(result['reference_differences'])} reference differences)")


if __name__ == "__main__":
    main()
