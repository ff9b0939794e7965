"""Writes tests/data/goldens/*.json: token ids and assistant masks made by transformers.

For each template style (Qwen2.5, Qwen3, Llama 3, SmolLM2) and each conversation in
CONVERSATIONS, records what `transformers` produces:
  - `text`: `tokenizer.apply_chat_template(messages, tokenize=False)` (HF's Jinja2),
  - `input_ids`: `apply_chat_template(messages, tokenize=True)` (checked to equal tokenizing
    `text` without special tokens),
  - `train_mask`: the assistant mask by the rule lora-data documents (tokenize.rs): each
    assistant turn is trained from the end of `apply_chat_template(messages[:i],
    add_generation_prompt=True)` to the end of the first end-of-turn token after its content;
    token 0 is never trained. Spans come from HF's rendering and HF's offsets.
For SmolLM2 the masks are also asserted equal to transformers' own
`return_assistant_tokens_mask` on the same template with `{% generation %}` markers.
Plus prompt/completion samples (alpaca layout): ids of prompt+completion with special tokens,
EOS appended, completion + EOS trained.

Run: /work/venv/bin/python tests/data/make_goldens.py   (transformers 5.x)
"""
import json
import os
import shutil
import tempfile

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FX = os.path.join(HERE, "fixtures")
OUT = os.path.join(HERE, "goldens")

END_OF_TURN = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>"]
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "Write a haiku about Rust.\nMake it rhyme."},
     {"role": "assistant", "content": "Borrowed, never lost—\nlifetimes fold like autumn leaves;\nthe compiler knows."}],
    [{"role": "user", "content": "Übersetze: 猫が好き 🐱"}, {"role": "assistant", "content": "Ich mag Katzen 🐱."}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " leading and trailing spaces \n"}],
    [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "```python\ndef f(x):\n    return x * 2\n```"},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome."}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nThe answer."}],
]

PROMPT_COMPLETIONS = [
    (ALPACA.format(instruction="Name a colour.", input=""), "Blue."),
    (ALPACA.format(instruction="Summarise.", input="The cat sat on the mat. It was warm."), "A cat sat on a warm mat."),
    ("Question: what is 7*6?\nAnswer:", " 42"),
]

STYLES = {
    # name: (tokenizer.json folder, tokenizer_config.json folder, template file or None)
    "qwen2.5": ("qwen3", "qwen3", "templates/qwen2.5.jinja"),
    "qwen3": ("qwen3", "qwen3", None),
    "smollm2": ("smollm2", "smollm2", "smollm2/chat_template.jinja"),
    "llama3": ("smollm2", "llama3-style", None),
}


def load(style):
    tok_dir, cfg_dir, tmpl = STYLES[style]
    d = tempfile.mkdtemp()
    shutil.copy(os.path.join(FX, tok_dir, "tokenizer.json"), d)
    shutil.copy(os.path.join(FX, cfg_dir, "tokenizer_config.json"), d)
    tok = AutoTokenizer.from_pretrained(d)
    template = open(os.path.join(FX, tmpl)).read() if tmpl else None
    return tok, template


def render(tok, template, messages, gen):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template)


def chat_case(tok, template, messages):
    full = render(tok, template, messages, False)
    ids = tok.apply_chat_template(messages, tokenize=True, chat_template=template, return_dict=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ids) == enc["input_ids"], "apply_chat_template(tokenize=True) != tokenize(text)"
    ends = [t for t in END_OF_TURN if tok.convert_tokens_to_ids(t) not in (None, tok.unk_token_id)]
    if tok.eos_token and tok.eos_token not in ends:
        ends.append(tok.eos_token)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, template, messages[:i], True)
        assert full.startswith(prefix)
        start = len(prefix)
        rest = full[start:]
        content_end = start
        for c in (m["content"], m["content"].strip()):
            if c and c in rest:
                content_end = start + rest.index(c) + len(c)
                break
        tail = full[content_end:]
        found = [content_end + tail.index(t) + len(t) for t in ends if t in tail]
        spans.append((start, min(found) if found else content_end))
    mask = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    mask[0] = False
    return {"messages": messages, "text": full, "input_ids": list(ids), "train_mask": mask}


def pc_case(tok, prompt, completion):
    text = prompt + completion
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [e > s and e > len(prompt) for s, e in enc["offset_mapping"]]
    if ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
        mask.append(True)
    mask[0] = False
    return {"prompt": prompt, "completion": completion, "input_ids": ids, "train_mask": mask}


# SmolLM2's template with transformers' generation markers around each assistant answer and its
# end-of-turn token: `return_assistant_tokens_mask` is then HF's own assistant mask, an
# independent check of the prefix-render rule above.
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_against_generation_markers(tok, template, cases):
    for c in cases:
        out = tok.apply_chat_template(c["messages"], chat_template=SMOLLM2_MARKED, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == c["input_ids"], "marked template renders differently"
        hf = [bool(m) for m in out["assistant_masks"]]
        hf[0] = False
        assert hf == c["train_mask"], f"assistant mask differs from HF's generation-marker mask: {c['messages']}"


def main():
    os.makedirs(OUT, exist_ok=True)
    for style in STYLES:
        tok, template = load(style)
        cases = [chat_case(tok, template, m) for m in CONVERSATIONS]
        pcs = [pc_case(tok, p, c) for p, c in PROMPT_COMPLETIONS]
        if style == "smollm2":
            check_against_generation_markers(tok, template, cases)
        out = {"style": style, "vocab_size": len(tok), "eos_token": tok.eos_token, "chat": cases, "prompt_completion": pcs}
        with open(os.path.join(OUT, f"{style}.json"), "w") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
        print(style, len(tok), tok.eos_token, [sum(c["train_mask"]) for c in cases])


if __name__ == "__main__":
    main()
