#!/usr/bin/env python3
"""Checks lora-engine's exports with the real libraries (torch + transformers + peft):
the PEFT adapter folder loads with PeftModel.from_pretrained and gives our logits, and the merged
model folder loads with AutoModelForCausalLM and gives the same logits.

    LORA_ENGINE_INTEROP_DIR=/tmp/interop cargo test -p lora-engine --test export -- --ignored
    /work/venv/bin/python tests/engine/check_peft_interop.py /tmp/interop
"""
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def logits_of(model, ids, seq_lens):
    out, s = [], 0
    for n in seq_lens:
        out.append(model(input_ids=torch.tensor(ids[s:s + n])[None]).logits[0])
        s += n
    return torch.cat(out)


def main(root):
    worst = 0.0
    for case in ("lora", "dora"):
        d = os.path.join(root, case)
        ours = json.load(open(os.path.join(d, "ours.json")))
        want = torch.tensor(ours["logits"]).view(len(ours["input_ids"]), -1)
        base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32, attn_implementation="eager")
        peft = PeftModel.from_pretrained(base, os.path.join(d, "adapter")).eval()
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            for what, model in (("peft adapter", peft), ("merged model", merged)):
                got = logits_of(model, ours["input_ids"], ours["seq_lens"])
                err = float((got - want).abs().max())
                print(f"{case}: {what}: max |logit difference| vs lora-engine = {err:.2e}")
                worst = max(worst, err)
    if worst > 1e-3:
        sys.exit(f"FAIL: max difference {worst:.2e} > 1e-3")
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
