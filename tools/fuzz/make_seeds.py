#!/usr/bin/env python3
"""Writes the small seed corpora of fuzz/corpus/<target>/ (a few files of a
few hundred bytes each), from the repository's fixtures and from minimal
files built here with the standard library only. The Parquet seeds come from
our own writer: `cargo test -p agfsync-store --test fuzz_seeds -- --ignored`
(see tools/fuzz/README.md). Re-run after changing a format; the fuzzer adds
what it finds to the same folders only when run with a writable corpus."""

import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures" / "parity"
OUT = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def png(width, height, rgb):
    """A minimal 8-bit RGB PNG."""
    def chunk(kind, body):
        c = struct.pack(">I", len(body)) + kind + body
        return c + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    raw = b"".join(b"\0" + bytes(rgb[y * width * 3:(y + 1) * width * 3]) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"tEXt", b"prompt\0a cat")
            + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def safetensors(tensors, metadata=None):
    """tensors: name -> (dtype, shape, bytes)."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def fake_torch():
    """Module stand-ins so pickle writes torch's global names (nothing of
    torch is imported or needed)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    class FloatStorage:
        pass

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    torch.FloatStorage = FloatStorage
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return _rebuild_tensor_v2, FloatStorage


def pth(entries, extra=None):
    """A torch.save zip of `entries` (name -> list of floats, 1-D)."""
    rebuild, storage_cls = fake_torch()

    class Storage:
        def __init__(self, key, n):
            self.key, self.n = key, n

    class T:
        def __init__(self, key, n):
            self.key, self.n = key, n

        def __reduce__(self):
            return (rebuild, (Storage(self.key, self.n), 0, (self.n,), (1,), False,
                              collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", storage_cls, obj.key, "cpu", obj.n)
            return None

    root, blobs = {}, {}
    for i, (name, values) in enumerate(entries.items()):
        root[name] = T(str(i), len(values))
        blobs[str(i)] = struct.pack("<%df" % len(values), *values)
    if extra:
        root.update(extra)
    buf = io.BytesIO()
    P(buf, protocol=2).dump(root)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for k, v in blobs.items():
            z.writestr("archive/data/" + k, v)
    return out.getvalue()


def main():
    # config_toml
    put("config_toml", "tiny.toml", """[run]
seed = 1
[models]
diffusion = "models/tiny-sd15"
clip = "models/tiny-clip"
aesthetic = "models/tiny-aesthetic.safetensors"
[prompts]
source = "builtin"
limit = 4
[generate]
candidates = 4
steps = 4
width = 64
height = 64
[score]
metrics = ["clip", "aesthetic"]
[pairs]
weights = { clip = 0.85, aesthetic = 0.15 }
normalise = "zscore"
[limits]
max_image_pixels = 1000000
""")
    put("config_toml", "llm.toml", """[models]
diffusion = "runwayml/stable-diffusion-v1-5"
clip = "openai/clip-vit-large-patch14"
[llm]
base_url = "http://localhost:8000/v1"
model = "qwen"
api_key_env = "OPENAI_API_KEY"
max_response_bytes = 100000
[prompts]
source = "llm"
[score]
metrics = ["clip"]
[pairs]
weights = { clip = 1.0 }
""")

    # model_config: selector byte, then the JSON
    for sel, f in [(0, "tiny-sd15/unet/config.json"), (1, "tiny-sd15/text_encoder/config.json"),
                   (2, "tiny-sd15/vae/config.json"), (5, "tiny-sd15/model_index.json"),
                   (6, "feedback/tiny-clip/config.json"), (7, "hps/open_clip_config.json"),
                   (9, "feedback/tiny-clip/preprocessor_config.json"),
                   (10, "tiny-sd15/scheduler/scheduler_config.json"),
                   (21, "schedulers/scheduler_config_lcm.json")]:
        text = json.dumps(json.loads((FIX / f).read_text()), separators=(",", ":"))
        put("model_config", f.replace("/", "_"), bytes([sel]) + text.encode())
    put("model_config", "bert.json", b"\x03" + json.dumps({
        "model_type": "bert", "vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}).encode())
    put("model_config", "llama.json", b"\x04" + json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 64,
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": True}).encode())

    # safetensors_header
    f32 = lambda n: struct.pack("<%df" % n, *([0.5] * n))
    put("safetensors_header", "two.safetensors", safetensors(
        {"a": ("F32", [2, 2], f32(4)), "global_step": ("I64", [], struct.pack("<q", 7))},
        {"format": "pt"}))
    put("safetensors_header", "sd15ish.safetensors", safetensors({
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            ("F32", [4, 8], f32(32)),
        "first_stage_model.encoder.conv_in.weight": ("F16", [1], b"\0\0"),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            ("F32", [2, 8], f32(16))}))
    put("safetensors_header", "truncated.safetensors", safetensors({"a": ("F32", [4], f32(4))})[:-6])

    # pth
    put("pth", "head.pth", pth({"weight": [0.1, 0.2, 0.3], "bias": [0.5]}))
    put("pth", "meta.pth", pth({"w": [1.0]}, {"_metadata": {"": {"version": 1}}}))
    put("pth", "not_zip.pth", b"\x80\x02}q\x00.")

    # lora_keys: `name dims`, `@key=value` metadata
    for f in ["sd15-kohya", "sd15-peft", "sd15-legacy", "sd15-kohya-conv-ff"]:
        b = (FIX / "lora" / (f + ".safetensors")).read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        h = json.loads(b[8:8 + n])
        lines = []
        meta = h.pop("__metadata__", {})
        for k, v in meta.items():
            if len(v) < 100:
                lines.append("@%s=%s" % (k, v))
        for k in sorted(h)[:9]:
            lines.append(" ".join([k] + [str(d) for d in h[k]["shape"]]))
        put("lora_keys", f + ".txt", "\n".join(lines) + "\n")

    # prompt_import: selector byte (0 txt, 1 jsonl, 2 csv, 3 run TIFA, 4 eval TIFA, 5 HPS)
    put("prompt_import", "p.txt", b"\x00# prompts\na red cube\n\na blue sphere\na red cube\n")
    put("prompt_import", "p.jsonl",
        b'\x01{"prompt": "a cat", "category": "animals"}\n{"text": "a dog"}\n')
    put("prompt_import", "p.csv", b'\x02category,prompt\nanimals,"a cat, ""grumpy"""\nobjects,a cup\n')
    tifa = [{"id": "1", "caption": "a cat", "question": "is there a cat?",
             "choices": ["yes", "no"], "answer": "yes", "element_type": "animal",
             "element": "cat"},
            {"id": "1", "caption": "a cat", "question": "what animal is this?",
             "choices": ["cat", "dog"], "answer": "cat", "element_type": "animal",
             "element": "cat"}]
    put("prompt_import", "tifa_run.json", b"\x03" + json.dumps(tifa).encode())
    put("prompt_import", "tifa_eval.json", b"\x04" + json.dumps(tifa).encode())
    put("prompt_import", "hps.json", b"\x05" + json.dumps(
        {"anime": ["a girl"], "photo": ["a lake", "a car"]}).encode())

    # json_repair: LLM answers
    put("json_repair", "fenced.txt",
        'Sure! Here it is:\n```json\n{"prompts": ["a cat", "a dog"]}\n```\n')
    put("json_repair", "truncated.txt", '{"questions": [{"question": "is there a cat?", "choices": ["yes", "no"')
    put("json_repair", "trailing.txt", "{'a': 1, 'b': [1, 2,],} // done")
    put("json_repair", "sequence.txt", '{"q": 1}\n{"q": 2}\n')

    # image_decode: flag byte (bit 0: apply EXIF orientation), then the file
    for f in ["tiny.jpg", "grey_progressive.jpg", "bilevel.png", "palette_trns.png", "lossy.webp"]:
        put("image_decode", f, b"\x00" + (FIX / "feedback" / "images" / f).read_bytes())
    put("image_decode", "rgb2x2.png", b"\x01" + png(2, 2, [255, 0, 0] * 4))


if __name__ == "__main__":
    main()
