"""Interop proof against the real Python stack (transformers + PEFT + bitsandbytes), on the
fixture written by `cargo test -p lora --test e2e write_interop_fixture -- --ignored`
(LORA_INTEROP_DIR=<dir>).

For each variant (LoRA, rsLoRA, DoRA on a Llama; LoRA on a SmolLM3 with a no-RoPE layer and on a
Mistral whose sliding window is shorter than the prompt; LoRA on a Gemma 3 with a sliding and
a global layer; LoRA on a Qwen3-MoE's attention and 3-D experts, PEFT target_parameters) it checks:
1. `output_model/adapter/` loads with `PeftModel.from_pretrained(base, ...)` and its logits
   match our engine's logits for the same tokens (f32 model: |ours - peft| <= 2e-4 + 1e-4 |peft|);
2. `output_model/` (our merged model) loads with `AutoModelForCausalLM.from_pretrained` and its
   logits match PEFT's `merge_and_unload()` logits (same tolerance).
For the QLoRA variants (`lora train --training-lora-load-in-4bit true` on a bf16 model; nf4,
double quant, compute float32; LoRA and DoRA):
3. our bitsandbytes checkpoint of the base (`base4/`) loads in transformers as a 4-bit model, and
   `PeftModel.from_pretrained` of our adapter over it gives our engine's logits (same tolerance);
4. transformers' own CPU quantization of the bf16 base holds the same 4-bit codes as ours (its
   double-quant offset and codes may differ where bitsandbytes' CPU path rounds differently:
   counted and printed);
5. the merged model is `bf16(f32(W16 + s·B·A))` of the original 16-bit weights, bit for bit (the
   sum exact in f64, as the engine computes it), every other tensor is the base's byte for byte,
   and it loads in transformers as a plain model (no quantization_config).
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
    for variant in ["lora", "rslora", "dora", "smollm3", "mistral_sw", "gemma3", "phi3", "granite4", "qwen3_moe"]:
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
    for variant in ["qlora", "qlora_dora"]:
        work = pathlib.Path(root) / variant
        if work.exists():
            ok &= qlora(variant, work)
    if not ok:
        print("FAIL: interop mismatch")
        sys.exit(1)
    print("OK: adapters load in PEFT and match our forward; merged models match merge_and_unload(); "
          "QLoRA adapters match PEFT over our 4-bit checkpoint and merge bit for bit into the 16-bit weights")


def qlora(variant, work):
    import numpy as np
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig
    fixture = json.loads((work / "our_logits.json").read_text())
    ids = torch.tensor([fixture["input_ids"]])
    ours = torch.tensor(fixture["logits"]).view(1, len(fixture["input_ids"]), fixture["vocab"])
    print(f"{variant}: {ids.shape[1]} tokens")
    ok = True
    # 3. PEFT over our 4-bit checkpoint. Train mode (dropout is 0): in eval mode bitsandbytes on
    # an AVX512-BF16 CPU repacks the weights for an inference kernel this comparison is not about.
    base4 = AutoModelForCausalLM.from_pretrained(work / "base4", dtype=torch.float32, device_map="cpu").train()
    kind = type(base4.model.layers[0].self_attn.q_proj).__name__
    ok &= kind == "Linear4bit"
    print(f"  our checkpoint loads in transformers with {kind} projections")
    peft4 = PeftModel.from_pretrained(base4, work / "out/model/adapter").train()
    with torch.no_grad():
        logits = peft4(input_ids=ids).logits
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    if variant == "qlora_dora":
        # PEFT's DoRA takes the weight norm of `dequantize_4bit(W)` in the quant state's dtype
        # (bfloat16: the checkpoint was made from bf16 weights), while the forward multiplies in
        # the compute dtype (float32 here); the engine uses one dequantized weight for both. So
        # the exact comparison is over the same codes quantized from f32-loaded weights (state
        # dtype float32), which transformers makes from the same 16-bit folder.
        err = (ours - logits).abs().max().item()
        print(f"  (PEFT over our bf16-state checkpoint: max |diff| {err:.3e}, from its bf16 DoRA norm)")
        base32 = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=qc, device_map="cpu", dtype=torch.float32).train()
        with torch.no_grad():
            logits = PeftModel.from_pretrained(base32, work / "out/model/adapter").train()(input_ids=ids).logits
        ok &= compare("adapter: our forward vs PEFT DoRA over the same 4-bit weights (f32 quant state)", ours, logits)
    else:
        ok &= compare("adapter: our forward vs PEFT over our 4-bit checkpoint", ours, logits)
    # 4. transformers' own quantization of the same bf16 weights.
    theirs = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)
    codes_differ = offsets_differ = nested_differ = 0
    for i, layer in enumerate(theirs.model.layers):
        mine = base4.model.layers[i]
        for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            a, b = layer.get_submodule(name).weight, mine.get_submodule(name).weight
            codes_differ += int((a.data.view(torch.uint8) != b.data.view(torch.uint8)).sum())
            offsets_differ += int(a.quant_state.offset.item() != b.quant_state.offset.item())
            nested_differ += int((a.quant_state.absmax != b.quant_state.absmax).sum())
    print(f"  transformers' CPU quantization vs ours: {codes_differ} packed bytes differ, {offsets_differ} of 14 offsets "
          f"(torch.mean vs our f64 mean), {nested_differ} absmax codes")
    ok &= codes_differ == 0
    # 5. The merged model, bit for bit.
    base16 = load_file(str(work / "base/model.safetensors"))
    merged = load_file(str(work / "out/model/model.safetensors"))
    adapter = load_file(str(work / "out/model/adapter/adapter_model.safetensors"))
    bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)
    exact, changed = True, 0
    for name, w in base16.items():
        m = merged[name]
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".lora_A.weight" not in adapter:
            exact &= bool(torch.equal(m.view(torch.int16), w.view(torch.int16)))
            continue
        if variant == "qlora_dora":
            continue  # DoRA's merge rescales rows; checked through the logits below
        a = adapter[prefix + ".lora_A.weight"].double().numpy()
        b = adapter[prefix + ".lora_B.weight"].double().numpy()
        want = (w.float().double().numpy() + fixture["scale"] * (b @ a)).astype(np.float32)
        exact &= bool(np.array_equal(f32_to_bf16_bits(want), bits(m)))
        changed += int((bits(m) != bits(w)).sum())
    if variant == "qlora_dora":
        print(f"  merged model: unadapted tensors {'are' if exact else 'are NOT'} the base's bytes (DoRA rescales rows: checked by its logits)")
    else:
        print(f"  merged model: adapted weights {'equal' if exact else 'DIFFER from'} bf16(f32(W16 + s*B*A)) bit for bit "
              f"({changed} weights moved); other tensors the base's bytes")
    ok &= exact and (changed > 0 or variant == "qlora_dora")
    config = json.loads((work / "out/model/config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(work / "out/model", dtype=torch.float32)
    ok &= "quantization_config" not in config and type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    with torch.no_grad():
        peft16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32), work / "out/model/adapter")
        ref = peft16(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    print(f"  merged model loads as a plain model; its logits vs PEFT over the 16-bit base: max |diff| "
          f"{(got - ref).abs().max().item():.3e} (the merge rounds to bf16)")
    return ok


def f32_to_bf16_bits(x):
    import numpy as np
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)


if __name__ == "__main__":
    main(sys.argv[1])
