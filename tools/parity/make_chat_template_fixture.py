"""Renders chat templates with transformers' own jinja2 setup (the one
`apply_chat_template` uses) and writes the expected strings that
crates/agfsync-author/tests/local_llm.rs compares minijinja's rendering with.

The Qwen2.5-Instruct template (tests/fixtures/qwen2_5_chat_template.jinja)
is data copied from the model's tokenizer_config.json. Run from the
repository root:

    python tools/parity/make_chat_template_fixture.py

Needs transformers (tested with 5.24) and jinja2; no network, no model.
"""

import json
import pathlib

from transformers.utils.chat_template_utils import render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "agfsync-author" / "tests" / "fixtures"

CONVERSATIONS = [
    [{"role": "user", "content": "Write three prompts."}],
    [
        {"role": "system", "content": "You write JSON.\nOnly JSON."},
        {"role": "user", "content": "Category \"animals\": 2 prompts, é ünïcode."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "{\"prompts\": [\"a cat\"]}"},
        {"role": "user", "content": "Again, with  two spaces and a trailing newline\n"},
    ],
]


# transformers' `tojson` (json.dumps with Python's separators, no HTML
# escaping) and string methods, which templates of other families use.
TOJSON_TEMPLATE = (
    "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    "{{ messages | tojson(indent=2) }}\n"
    "{{ messages[0].content.strip().upper() }}|{{ messages[-1].content.split(' ')[0] }}"
)


def render_cases(template: str) -> list:
    cases = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
            )[0][0]
            cases.append(
                {
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "expected": expected,
                }
            )
    return cases


def main() -> None:
    qwen = (FIXTURES / "qwen2_5_chat_template.jinja").read_text()
    fixture = [
        {"name": "qwen2.5", "template": qwen, "cases": render_cases(qwen)},
        {"name": "tojson", "template": TOJSON_TEMPLATE, "cases": render_cases(TOJSON_TEMPLATE)},
    ]
    out = FIXTURES / "chat_template_parity.json"
    out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {sum(len(f['cases']) for f in fixture)} cases to {out}")


if __name__ == "__main__":
    main()
