#!/usr/bin/env python3
"""Writes examples/data/countries.jsonl: short chat conversations about the world's countries
(which currency each uses, which languages are official there), from the Unicode CLDR data that
the Babel package ships (PyPI `babel`, BSD-3-Clause; the CLDR data is under the Unicode License
v3, a permissive licence: https://www.unicode.org/license.txt). Deterministic: the same Babel
version writes the same file.

    python3 -m venv .venv-data && .venv-data/bin/pip install 'babel==2.18.0'
    .venv-data/bin/python examples/data/make_countries.py

The answers follow one house style, so a model fine-tuned on them visibly learns it: the loss
falls over the README's example run.
"""
import json
import pathlib
import random

import babel
from babel import Locale, languages, numbers

OUT = pathlib.Path(__file__).resolve().parent / "countries.jsonl"
CURRENCY_Q = ["Which currency is used in {c}?", "What money do people pay with in {c}?", "What is the currency of {c}?"]
LANGUAGE_Q = ["What is the official language of {c}?", "Which languages are official in {c}?", "What language do they officially speak in {c}?"]


def and_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def main():
    en = Locale("en")
    rng = random.Random(15)
    rows = []
    for code in sorted(k for k in en.territories if len(k) == 2 and k.isalpha()):
        name = en.territories[code]
        currencies = [c for c in numbers.get_territory_currencies(code, tender=True) if c in en.currencies]
        langs = [en.languages[l] for l in languages.get_official_languages(code) if l in en.languages]
        if not currencies or not langs:
            continue
        cur = currencies[0]
        rows.append((rng.choice(CURRENCY_Q).format(c=name), f"{name} uses the {en.currencies[cur]} ({cur})."))
        if len(langs) == 1:
            answer = f"The official language of {name} is {langs[0]}."
        else:
            answer = f"{name} has {len(langs)} official languages: {and_list(langs)}."
        rows.append((rng.choice(LANGUAGE_Q).format(c=name), answer))
    rng.shuffle(rows)
    with OUT.open("w") as f:
        for q, a in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(rows)} conversations, CLDR via Babel {babel.__version__})")


if __name__ == "__main__":
    main()
