"""Data pipeline benchmark: lora-data vs Python (datasets + transformers) on the same work.

Work: 100k synthetic chat conversations (JSONL) → chat template (Qwen2.5's, on the Qwen3
tokenizer fixture) → tokenize → assistant-only loss mask (the prefix-render rule both sides
use) → best-fit-decreasing packing into rows of 4096 tokens. Prints records/s and peak memory
for each, side by side, with the ratio.

Python side: datasets.load_dataset("json") + Dataset.map(batched, num_proc=2) calling
tokenizer.apply_chat_template and the fast tokenizer with offsets; packing in Python.
Rust side: `cargo run --example data_bench` (dev profile: dependencies at opt-level 2).

Run: /work/venv/bin/python tests/bench/data_bench.py [--records N]
"""
import argparse
import bisect
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FX = os.path.join(ROOT, "tests", "data", "fixtures")
TOKENIZER = os.path.join(FX, "qwen3", "tokenizer.json")
CONFIG = os.path.join(FX, "qwen3", "tokenizer_config.json")
TEMPLATE = os.path.join(FX, "templates", "qwen2.5.jinja")
END_OF_TURN = ["<|im_end|>", "<|endoftext|>"]
MAX_SEQ_LEN = 4096

WORDS = ("the model learns to answer questions about data pipelines tokenizers templates packing "
         "rust python gpu memory batch sequence token loss mask assistant user system hello world "
         "é ü 猫 数据 🙂 code fn main() { let x = 42; } why how what when").split()


def make_data(path, n):
    rng = random.Random(1234)
    with open(path, "w") as f:
        for i in range(n):
            msgs = []
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 15)))})
            for _ in range(rng.randint(1, 3)):
                msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 150)))})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def peak_rss_mb_self_and_children():
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (me + kids) / 1024.0


def python_side(data):
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_progress_bars()
    d = tempfile.mkdtemp()
    shutil.copy(TOKENIZER, d)
    shutil.copy(CONFIG, d)
    start = time.time()
    tok = AutoTokenizer.from_pretrained(d)
    template = open(TEMPLATE).read()

    def process(batch):
        ids_out, mask_out = [], []
        for msgs in batch["messages"]:
            full = tok.apply_chat_template(msgs, tokenize=False, chat_template=template)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prefix = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, chat_template=template)
                s = len(prefix)
                rest = full[s:]
                c_end = s + rest.index(m["content"]) + len(m["content"]) if m["content"] in rest else s
                tail = full[c_end:]
                found = [c_end + tail.index(t) + len(t) for t in END_OF_TURN if t in tail]
                spans.append((s, min(found) if found else c_end))
            enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
            mask = [any(a < b2 and b > a2 for a2, b2 in spans) for a, b in enc["offset_mapping"]]
            mask[0] = False
            ids_out.append(enc["input_ids"])
            mask_out.append(mask)
        return {"input_ids": ids_out, "train_mask": mask_out}

    ds = load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(d, "cache"))
    records = len(ds)
    ds = ds.map(process, batched=True, batch_size=1000, num_proc=2, remove_columns=ds.column_names)
    ds = ds.filter(lambda b: [len(x) <= MAX_SEQ_LEN for x in b["input_ids"]], batched=True, num_proc=2)
    lengths = [len(x) for x in ds["input_ids"]]
    # Best-fit decreasing into rows of MAX_SEQ_LEN (steps of 128 samples, as lora-data does).
    rows = 0
    order = list(range(len(lengths)))
    random.Random(42).shuffle(order)
    for s in range(0, len(order), 128):
        free = []  # sorted remaining capacities
        for n in sorted((lengths[i] for i in order[s:s + 128]), reverse=True):
            k = bisect.bisect_left(free, n)
            if k < len(free):
                rem = free.pop(k) - n
            else:
                rows += 1
                rem = MAX_SEQ_LEN - n
            if rem > 0:
                bisect.insort(free, rem)
    secs = time.time() - start
    return {"impl": "Python (datasets + transformers)", "records": records, "samples": len(lengths),
            "tokens": sum(lengths), "rows": rows, "seconds": secs, "records_per_s": records / secs,
            "peak_rss_mb": peak_rss_mb_self_and_children()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--python-only", metavar="DATA")
    args = ap.parse_args()
    if args.python_only:
        print(json.dumps(python_side(args.python_only)))
        return
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "chat.jsonl")
    make_data(data, args.records)
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "-q", "-p", "lora-data", "--example", "data_bench"], cwd=ROOT, check=True, env=env)
    exe = os.path.join(env["CARGO_TARGET_DIR"], "debug", "examples", "data_bench")
    rust = json.loads(subprocess.run([exe, data, TOKENIZER, CONFIG, TEMPLATE], check=True, capture_output=True, text=True).stdout)
    py = json.loads(subprocess.run([sys.executable, __file__, "--python-only", data], check=True, capture_output=True, text=True).stdout)
    print(f"{args.records} conversations, template + tokenize + mask + pack, {os.cpu_count()} CPUs")
    print(f"{'':34} {'records/s':>12} {'seconds':>9} {'peak MB':>9} {'samples':>8} {'tokens':>11}")
    for r in (rust, py):
        print(f"{r['impl']:34} {r['records_per_s']:12.0f} {r['seconds']:9.2f} {r['peak_rss_mb']:9.0f} {r['samples']:8} {r['tokens']:11}")
    print(f"speed ratio (Rust / Python): {rust['records_per_s'] / py['records_per_s']:.1f}x;  "
          f"peak memory ratio (Python / Rust): {py['peak_rss_mb'] / rust['peak_rss_mb']:.1f}x")
    if rust["tokens"] != py["tokens"] or rust["samples"] != py["samples"]:
        print(f"WARNING: the two sides disagree on samples/tokens: {rust['samples']}/{rust['tokens']} vs {py['samples']}/{py['tokens']}")


if __name__ == "__main__":
    main()
