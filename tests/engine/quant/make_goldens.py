#!/usr/bin/env python3
"""Writes the quantization goldens in tests/engine/quant/golden/ with bitsandbytes 0.50.2 on CPU
(torch, transformers, peft: the interop venv), read by host/engine/tests/quant.rs.

    python tests/engine/quant/make_goldens.py      # needs cargo (writes the e2e tiny model)

1. formats.safetensors / formats.json: real tensors of the e2e tiny model (`tests/e2e`'s
   `tiny_model`: ModelConfig::tiny_llama(49152), bf16, seed 7, written by
   `cargo test -p lora-engine --test quant e2e_model_fixture -- --ignored`): layer 0 q_proj
   [64, 64], the first 260 embedding rows [260, 64] (260 blocks of 64: two nested blocks, the
   second partial, so not a multiple of 64 x 256), and the first 65 values of layer 0 k_proj as
   [5, 13] (a partial block and an odd count). For nf4/fp4 x double quant off/on: the packed
   codes, absmax (or its 8-bit codes, nested absmax, nested map and offset), and bitsandbytes'
   own dequantization of them to bf16 (and f32 for q_proj); for 8-bit: CB, SCB and the f32
   dequantization.

   The expected codes follow bitsandbytes' CUDA kernels (real checkpoints are made on GPUs).
   Where bitsandbytes' CPU path differs, the CPU result is checked to be one of these cases,
   and each variant's count is recorded in formats.json:
   - FP4 (`dQuantizeFP4`): the sign is `x < 0` (the CPU path gives values that round to zero the
     opposite sign nibble) and |x| is compared with the kernel's literals, which lie up to
     14 ulp from the CPU path's f32 midpoints (a value between the two takes another code);
   - NF4 (`dQuantizeNF4`): the kernel's literals read as f32 (as nvcc reads `0.848...f`) equal
     the CPU midpoints except 4 that are 1 ulp off; a value between the two differs;
   - double quant (`kQuantizeBlockwise` with `dQuantize<0>`): `x * (1/absmax)` and the nearest
     code by midpoint; the CPU path's BinSearch sometimes returns the farther neighbour;
   - the offset is bitsandbytes' `absmax.mean()` (as stored); the engine's own is an f64 sum
     (formats.json records both; the codes are compared given bitsandbytes' offset).
   The dequantized values are bitsandbytes' (`dequantize_4bit` of the expected codes), except
   that FP4's negative-zero code dequantizes to -0.0 as on the GPU (bitsandbytes' CPU kernel
   gives +0.0): the engine's decoder must equal them bit for bit.

2. checkpoints/<variant>/: a tiny f32 Llama (source/: one layer, hidden 64) loaded by
   transformers with a BitsAndBytesConfig on CPU and saved: nf4, nf4_dq, fp4_dq, int8.

3. step.safetensors / step.json: one QLoRA training step, PEFT 0.21.2 over the nf4_dq checkpoint
   (compute dtype float32, so nothing is rounded below f32): loss and every LoRA gradient, for
   LoRA and DoRA (A and B random so every gradient is non-zero).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
OUT = os.path.join(HERE, "golden")
f32 = np.float32


def literal_f32(s):
    """A C float literal (`0.29166667f`) as nvcc reads it: the decimal rounded once to f32."""
    exact = Fraction(s)
    guess = np.float32(float(s))
    cands = [np.nextafter(guess, f32(-np.inf)), guess, np.nextafter(guess, f32(np.inf))]
    def err(c):
        return abs(Fraction(float(c)) - exact)
    best = min(cands, key=lambda c: (err(c), int(c.view(np.uint32)) & 1))
    return f32(best)


NF4_LITERALS = [literal_f32(s) for s in [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]]
FP4_LIT = {k: literal_f32(v) for k, v in dict(a="0.29166667", b="0.583333", c="0.8333333", d="0.4166667",
                                             e="0.0859375", f="0.20833333", g="0.00260417").items()}
NF4 = F.get_4bit_type("nf4", device="cpu").numpy().astype(f32)
FP4 = F.get_4bit_type("fp4", device="cpu").numpy().astype(f32)
DYN = F.create_dynamic_map().numpy().astype(f32)


def q_nf4(x):
    return int(sum(1 for t in NF4_LITERALS if x > t))


def q_fp4(x):
    sign = 8 if x < 0 else 0
    a = f32(abs(x))
    L = FP4_LIT
    if a > L["a"]:
        c = (3 if a > L["c"] else 2) if a > L["b"] else (5 if a > L["d"] else 4)
    elif a > L["e"]:
        c = 7 if a > L["f"] else 6
    elif a > L["g"]:
        c = 1
    else:
        c = 0
    return c | sign


def q_dynamic(x, code):
    pivot, up, lo = 127, 255, 0
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lo, lower, pivot = pivot, val, pivot + i
        else:
            up, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if up == 255:
        upper = code[up]
    if lo == 0:
        lower = code[lo]
    if x > val:
        return up if x > f32((upper + val) * f32(0.5)) else pivot
    return lo if x < f32((lower + val) * f32(0.5)) else pivot


def blocks_absmax(x, bs):
    return np.array([np.abs(x[i:i + bs]).max() for i in range(0, x.size, bs)], dtype=f32)


def cuda_codes(x, absmax, bs, quant):
    rcp = (f32(1) / absmax).astype(f32)
    scaled = (x * np.repeat(rcp, bs)[:x.size]).astype(f32)
    return scaled, np.array([quant(v) for v in scaled], dtype=np.uint8)


def pack(codes, pad_code):
    c = codes if codes.size % 2 == 0 else np.concatenate([codes, np.array([pad_code], np.uint8)])
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack(packed, n):
    return np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]


def in_window(x, a, b):
    lo, hi = min(a, b), max(a, b)
    return lo <= x <= hi


def explain_4bit(kind, scaled, ours, theirs):
    """Every element where bitsandbytes-CPU's code differs from the CUDA kernel's is in a window."""
    counts = {"zero_sign": 0, "threshold_window": 0}
    for i in np.nonzero(ours != theirs)[0]:
        x = f32(scaled[i])
        if kind == "fp4":
            if (ours[i] & 7) == 0 and (theirs[i] & 7) == 0:
                counts["zero_sign"] += 1
                continue
            order = np.argsort(FP4[:8])
            mids = [(FP4[:8][order[j]] + FP4[:8][order[j + 1]]) / f32(2) for j in range(7)]
            lits = sorted(FP4_LIT.values())
            if any(in_window(f32(abs(x)), f32(m), l) for m, l in zip(mids, lits)):
                counts["threshold_window"] += 1
                continue
        else:
            mids = [(NF4[j] + NF4[j + 1]) / f32(2) for j in range(15)]
            if any(in_window(x, f32(m), l) for m, l in zip(mids, NF4_LITERALS)):
                counts["threshold_window"] += 1
                continue
        raise SystemExit(f"{kind}: element {i} ({x!r}): CUDA code {ours[i]} vs CPU {theirs[i]} is not a known difference")
    return counts


def explain_nested(x, ours, theirs):
    n = 0
    for i in np.nonzero(ours != theirs)[0]:
        d_ours, d_cpu = abs(f32(x[i] - DYN[ours[i]])), abs(f32(x[i] - DYN[theirs[i]]))
        if not d_ours < d_cpu:
            raise SystemExit(f"nested code {i}: CUDA {ours[i]} is not nearer than CPU {theirs[i]} for {x[i]!r}")
        n += 1
    return n


def e2e_model():
    d = tempfile.mkdtemp()
    env = dict(os.environ, LORA_E2E_MODEL_DIR=d)
    subprocess.run(["cargo", "test", "-q", "-p", "lora-engine", "--test", "quant", "e2e_model_fixture", "--", "--ignored", "--exact"],
                   cwd=ROOT, env=env, check=True)
    return d


def formats():
    src = e2e_model()
    from safetensors.torch import load_file as load_torch
    model = load_torch(os.path.join(src, "model.safetensors"))
    inputs = {
        "q_proj": model["model.layers.0.self_attn.q_proj.weight"],
        "embed": model["model.embed_tokens.weight"][:260].contiguous(),
        "odd": model["model.layers.0.self_attn.k_proj.weight"].reshape(-1)[:65].reshape(5, 13).contiguous(),
    }
    shutil.rmtree(src)
    tensors, meta = {}, {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "blocksize": 64, "variants": {}}
    for name, w in inputs.items():
        assert w.dtype == torch.bfloat16
        tensors[f"{name}.input"] = w
        x = w.float().numpy().reshape(-1)
        n = x.size
        for kind, quant, code in [("nf4", q_nf4, NF4), ("fp4", q_fp4, FP4)]:
            for dq in (False, True):
                v = f"{name}.{kind}{'_dq' if dq else ''}"
                packed_cpu, st = F.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=dq)
                _, st_plain = F.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=False)
                absmax = blocks_absmax(x, 64)
                assert np.array_equal(absmax, st_plain.absmax.numpy()), f"{v}: absmax"
                scaled, codes = cuda_codes(x, absmax, 64, quant)
                info = explain_4bit(kind, scaled, codes, unpack(packed_cpu.numpy().reshape(-1), n))
                rcp_last = f32(1) / absmax[-1]
                packed = pack(codes, quant(f32(0) * rcp_last))
                tensors[f"{v}.packed"] = packed
                state = F.QuantState(absmax=torch.from_numpy(absmax), shape=w.shape, dtype=torch.bfloat16, blocksize=64,
                                     code=torch.from_numpy(code.copy()), quant_type=kind)
                if dq:
                    offset = f32(st.offset.item())
                    centered = (absmax - offset).astype(f32)
                    nested = blocks_absmax(centered, 256)
                    assert np.array_equal(nested, st.state2.absmax.numpy()), f"{v}: nested absmax"
                    xs = (centered * np.repeat((f32(1) / nested).astype(f32), 256)[:centered.size]).astype(f32)
                    ncodes = np.array([q_dynamic(t, DYN) for t in xs], dtype=np.uint8)
                    info["nested_cpu_farther"] = explain_nested(xs, ncodes, st.absmax.numpy())
                    nmap = st.state2.code.numpy().astype(f32)
                    assert np.array_equal(nmap, DYN)
                    tensors[f"{v}.absmax_codes"] = ncodes
                    tensors[f"{v}.nested_absmax"] = nested
                    tensors[f"{v}.nested_map"] = nmap
                    tensors[f"{v}.offset"] = np.array([offset], dtype=f32)
                    info["offset_bnb"] = float(offset)
                    info["offset_f64_mean"] = float(f32(absmax.astype(np.float64).sum() / absmax.size))
                    state2 = F.QuantState(absmax=torch.from_numpy(nested), code=torch.from_numpy(nmap.copy()), blocksize=256, dtype=torch.float32)
                    state = F.QuantState(absmax=torch.from_numpy(ncodes), shape=w.shape, dtype=torch.bfloat16, blocksize=64,
                                         code=torch.from_numpy(code.copy()), quant_type=kind, offset=torch.tensor(offset, dtype=torch.float32), state2=state2)
                else:
                    tensors[f"{v}.absmax"] = absmax
                pt = torch.from_numpy(packed).reshape(-1, 1)
                for dt, tag in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
                    if tag == "f32" and name != "q_proj":
                        continue
                    state.dtype = dt
                    deq = F.dequantize_4bit(pt, state).reshape(-1)
                    if kind == "fp4":
                        # Code 8 is FP4's negative zero: the CUDA kernel's tree returns
                        # `0 * absmax * -1` = -0.0; bitsandbytes' CPU kernel returns +0.0.
                        neg_zero = torch.from_numpy(codes == 8)
                        assert bool((deq[neg_zero] == 0).all())
                        deq[neg_zero] = -0.0
                        info["negative_zero_codes"] = int(neg_zero.sum())
                    tensors[f"{v}.dequant_{tag}"] = deq.clone()
                meta["variants"][v] = info
                print(v, info)
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        tensors[f"{name}.int8.cb"] = cb.numpy().copy()
        tensors[f"{name}.int8.scb"] = scb.numpy().copy()
        if name != "embed":
            tensors[f"{name}.int8.dequant_f32"] = F.int8_vectorwise_dequant(cb, scb).numpy().copy()
    save_file({k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous()) for k, v in tensors.items()},
              os.path.join(OUT, "formats.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "formats.json"), "w") as f:
        json.dump(meta, f, indent=1)


def checkpoints():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
    base = os.path.join(OUT, "checkpoints", "source")
    # in_features a multiple of 64: bitsandbytes 0.50.2's CPU dequantization reads the wrong absmax
    # when a row is shorter than a block (in_features 32 with blocksize 64).
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(11)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1.0 + 0.2 * torch.rand_like(p) - 0.1 if "norm" in n else 0.15 * torch.randn_like(p))
    m.save_pretrained(base)
    os.remove(os.path.join(base, "generation_config.json"))
    variants = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32),
        "nf4_dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        "fp4_dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }
    for name, qc in variants.items():
        q = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, device_map="cpu", dtype=torch.float32)
        d = os.path.join(OUT, "checkpoints", name)
        q.save_pretrained(d)
        os.remove(os.path.join(d, "generation_config.json"))
        print("checkpoint", name, sorted(os.listdir(d)))


SEQ_LENS = [11, 7, 9]


def step():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    ckpt = os.path.join(OUT, "checkpoints", "nf4_dq")
    g = torch.Generator().manual_seed(5)
    t = sum(SEQ_LENS)
    ids = torch.randint(0, 64, (t,), generator=g)
    mask = torch.rand(t, generator=g) < 0.8
    tensors = {"input_ids": ids.to(torch.int64), "train_mask": mask.to(torch.int64), "seq_lens": torch.tensor(SEQ_LENS, dtype=torch.int64)}
    meta = {"r": 4, "lora_alpha": 8, "cases": {}}
    for case, dora in [("lora", False), ("dora", True)]:
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float32)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        torch.manual_seed(99)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                                 use_dora=dora))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n or "lora_B" in n:
                    p.copy_(0.1 * torch.randn_like(p))
        params = [(n.replace(".default", "").removesuffix(".weight") if "magnitude" in n else n.replace(".default", ""), p)
                  for n, p in model.named_parameters() if p.requires_grad]
        for k, p in params:
            tensors[f"{case}.init.{k}"] = p.detach().clone()
        model.train()
        total, n_t, start = 0.0, 0, 0
        for L in SEQ_LENS:
            doc = ids[start:start + L]
            m = mask[start:start + L].clone()
            m[0] = False
            logits = model(input_ids=doc[None]).logits[0]
            lp = torch.log_softmax(logits[:-1].float(), dim=-1)
            nll = -lp.gather(1, doc[1:, None])[:, 0]
            total = total + nll[m[1:]].sum()
            n_t += int(m[1:].sum())
            start += L
        (total / n_t).backward()
        for k, p in params:
            tensors[f"{case}.grad.{k}"] = p.grad.detach().clone()
        meta["cases"][case] = {"use_dora": dora, "loss": float(total / n_t), "trained_tokens": n_t, "param_names": [k for k, _ in params]}
        print("step", case, meta["cases"][case]["loss"], len(params), "tensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "step.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "step.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main():
    torch.set_num_threads(2)
    assert bnb.__version__ == "0.50.2", bnb.__version__
    assert not torch.cuda.is_available() or os.environ.get("LORA_GOLDEN_ALLOW_GPU"), "make the goldens on CPU"
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    formats()
    checkpoints()
    step()


if __name__ == "__main__":
    main()
