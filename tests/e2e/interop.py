"""Interop proof against the real Python stack (transformers + PEFT), on the fixture written by
`cargo test -p lora --test e2e write_interop_fixture -- --ignored` (LORA_INTEROP_DIR=<dir>).

For each variant (LoRA, rsLoRA, DoRA) it checks:
1. `output_model/adapter/` loads with `PeftModel.from_pretrained(base, ...)` and its logits
   match our engine's logits for the same tokens (f32 model: |ours - peft| <= 2e-4 + 1e-4 |peft|);
2. `output_model/` (our merged model) loads with `AutoModelForCausalLM.from_pretrained` and its
   logits match PEFT's `merge_and_unload()` logits (same tolerance).
Prints the max errors; exits non-zero on a mismatch.

    python tests/e2e/interop.py <LORA_INTEROP_DIR>
"""
import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ATOL, RTOL = 2e-4, 1e-4


def compare(name, ours, ref):
    err = (ours - ref).abs()
    bound = ATOL + RTOL * ref.abs()
    bad = (err > bound).sum().item()
    print(f"  {name}: max |diff| {err.max().item():.3e}, max |ref| {ref.abs().max().item():.3f}, "
          f"{bad} of {ref.numel()} outside {ATOL:g} + {RTOL:g}|ref|")
    return bad == 0


def main(root):
    torch.manual_seed(0)
    ok = True
    for variant in ["lora", "rslora", "dora"]:
        work = pathlib.Path(root) / variant
        if not work.exists():
            continue
        fixture = json.loads((work / "our_logits.json").read_text())
        ids = torch.tensor([fixture["input_ids"]])
        ours = torch.tensor(fixture["logits"]).view(1, len(fixture["input_ids"]), fixture["vocab"])
        print(f"{variant}: {ids.shape[1]} tokens")

        base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, work / "out/model/adapter").eval()
        with torch.no_grad():
            peft_logits = peft_model(input_ids=ids).logits
        ok &= compare("adapter: our forward vs PeftModel.from_pretrained", ours, peft_logits)

        with torch.no_grad():
            merged_ref = peft_model.merge_and_unload().eval()
            ref_logits = merged_ref(input_ids=ids).logits
            ours_merged = AutoModelForCausalLM.from_pretrained(work / "out/model", dtype=torch.float32).eval()
            merged_logits = ours_merged(input_ids=ids).logits
        ok &= compare("merged: our output_model vs merge_and_unload()", merged_logits, ref_logits)
        # The adapter must actually change the model, or the checks above prove nothing.
        with torch.no_grad():
            base_logits = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)(input_ids=ids).logits
        moved = (base_logits - peft_logits).abs().max().item()
        print(f"  the adapter moves the logits by up to {moved:.3f}")
        ok &= moved > 1e-2
    if not ok:
        print("FAIL: interop mismatch")
        sys.exit(1)
    print("OK: adapters load in PEFT and match our forward; merged models match merge_and_unload()")


if __name__ == "__main__":
    main(sys.argv[1])
