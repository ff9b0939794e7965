#!/usr/bin/env python3
"""Writes the engine's golden files with transformers + PEFT (torch on CPU, float32).

    .venv-interop/bin/python tests/engine/make_goldens.py          # rewrites tests/engine/golden/
    .venv-interop/bin/python tests/engine/make_goldens.py CASE...  # rewrites only these cases

Pinned (the interop stage's venv): torch 2.11, transformers 5.17, peft 0.21.2; another version
is refused, since goldens are only comparable when made by the same reference.

For each case: a tiny random model folder (models/<name>/: config.json + model.safetensors),
and cases/<case>.safetensors + cases/<case>.json holding a packed batch of several documents
with a loss mask, the adapter before training (A and B both random, so every gradient is
non-zero; DoRA magnitude as PEFT initialises it), logits, loss, every adapter gradient, and
the adapter after 5 AdamW steps with global-norm clipping (plus per-step loss and grad norm).

Packing: transformers isolates packed documents only under flash-attention, so each document
is run on its own here and the results are concatenated. Label convention (the engine's):
train_mask[i] means token i is a target predicted from position i-1 of the same document;
a document's first token is never a target. Loss = sum of target cross-entropies / number of
targets in the batch.
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
import peft
import transformers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteMoeHybridConfig, LlamaConfig,
                          MistralConfig, Phi3Config, Qwen2Config, Qwen3Config, Qwen3MoeConfig, SmolLM3Config)
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

PINNED = {"torch": (torch.__version__, "2.11."), "transformers": (transformers.__version__, "5.17."),
          "peft": (peft.__version__, "0.21.2")}

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              max_position_embeddings=64, attn_implementation="eager")

MODELS = {
    # name: (config class, extra config, tied, file dtype)
    "llama": (LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                rope_theta=500.0), False, torch.float32),
    "qwen2": (Qwen2Config, dict(rope_theta=10000.0), True, torch.float32),
    "qwen3": (Qwen3Config, dict(rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}), False, torch.float32),
    "mistral": (MistralConfig, dict(sliding_window=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                    max_position_embeddings=8), True, torch.float32),
    "granite": (GraniteConfig, dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                    logits_scaling=2.5), False, torch.bfloat16),
    # SmolLM3-3B's layout (tied, no RoPE on every 4th layer) shrunk to 2 layers: layer 1 has no RoPE.
    "smollm3": (SmolLM3Config, dict(no_rope_layers=[1, 0], rope_theta=5000000.0, pad_token_id=0), True, torch.bfloat16),
    # A window of 6 cuts every document of the batch (17, 13, 9, 11 tokens).
    "mistral_sw": (MistralConfig, dict(sliding_window=6, rope_theta=10000.0), False, torch.float32),
    # Gemma 3's layout in 2 layers: layer 0 slides (window 6, local RoPE base), layer 1 is global
    # (its own base, linear scaling); query_pre_attn_scalar differs from head_dim.
    "gemma3": (Gemma3TextConfig, dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                                      query_pre_attn_scalar=16,
                                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
               True, torch.float32),
    # Phi-4-mini's layout: fused qkv_proj / gate_up_proj, RoPE on 6 of 8 head dims.
    "phi3": (Phi3Config, dict(partial_rotary_factor=0.75, rope_theta=1000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
             False, torch.float32),
    # LongRoPE on 4 of 8 head dims; every document is longer than original_max_position_embeddings
    # (8), so the long factors apply, and the attention factor is sqrt(1 + ln 8 / ln 8).
    "phi3_longrope": (Phi3Config, dict(rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                                                        "short_factor": [1.0, 1.7], "long_factor": [1.3, 4.5]},
                                       original_max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                      True, torch.bfloat16),
    # Granite 4.0 dense: GraniteMoeHybrid with attention layers only, no experts, RoPE, multipliers.
    "granite4": (GraniteMoeHybridConfig, dict(shared_intermediate_size=40, num_local_experts=0, layer_types=["attention", "attention"],
                                              position_embedding_type="rope", rope_theta=10000.0, mamba_n_heads=4,
                                              embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                              logits_scaling=2.5), False, torch.bfloat16),
    # Phi-3 with a sliding window of 6 (it slides on every layer): every document is longer.
    "phi3_sw": (Phi3Config, dict(sliding_window=6, partial_rotary_factor=0.75, rope_theta=1000.0, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2), False, torch.float32),
    # Granite 4.0 dense without RoPE on any layer (position_embedding_type "nope").
    "granite4_nope": (GraniteMoeHybridConfig, dict(shared_intermediate_size=40, num_local_experts=0, layer_types=["attention", "attention"],
                                                   position_embedding_type="nope", mamba_n_heads=4, embedding_multiplier=3.0,
                                                   attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.5),
                      False, torch.float32),
    # Qwen3-MoE in 3 layers: layer 0 dense (mlp_only_layers), layers 1 and 2 with 4 experts of
    # MLP 16, top-2 renormalised; output_router_logits adds the load-balancing loss (x0.1),
    # pooled over both sparse layers.
    "qwen3_moe": (Qwen3MoeConfig, dict(num_hidden_layers=3, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                       mlp_only_layers=[0], norm_topk_prob=True, output_router_logits=True,
                                       router_aux_loss_coef=0.1, rope_theta=1000.0), False, torch.float32),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    # case: (model, adapter settings)
    "llama_lora": ("llama", dict(target_modules=ALL7)),
    "llama_rslora": ("llama", dict(target_modules="all-linear", use_rslora=True)),
    "llama_dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "qwen2_lora": ("qwen2", dict(target_modules=ALL7)),
    "qwen2_rslora": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True)),
    "qwen2_dora": ("qwen2", dict(target_modules=ALL7, use_dora=True)),
    "qwen3_lora": ("qwen3", dict(target_modules=ALL7)),
    "qwen3_rslora": ("qwen3", dict(target_modules=["o_proj", "up_proj"], use_rslora=True)),
    "qwen3_dora": ("qwen3", dict(target_modules=ALL7, use_dora=True)),
    "mistral_lora": ("mistral", dict(target_modules=["q_proj", "v_proj"])),
    "mistral_rslora": ("mistral", dict(target_modules=ALL7, use_rslora=True)),
    "mistral_dora": ("mistral", dict(target_modules=ALL7, use_dora=True)),
    "granite_lora": ("granite", dict(target_modules=ALL7)),
    "granite_rslora": ("granite", dict(target_modules=ALL7, use_rslora=True)),
    "granite_dora": ("granite", dict(target_modules=["k_proj", "o_proj", "gate_proj"], use_dora=True)),
    "smollm3_lora": ("smollm3", dict(target_modules=ALL7)),
    "smollm3_dora": ("smollm3", dict(target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True)),
    "mistral_sw_lora": ("mistral_sw", dict(target_modules=ALL7)),
    "mistral_sw_rslora": ("mistral_sw", dict(target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True)),
    "gemma3_lora": ("gemma3", dict(target_modules=ALL7)),
    "gemma3_dora": ("gemma3", dict(target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"], use_dora=True)),
    "phi3_lora": ("phi3", dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
    "phi3_dora": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj"], use_dora=True)),
    "phi3_longrope_lora": ("phi3_longrope", dict(target_modules="all-linear")),
    "granite4_lora": ("granite4", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear"])),
    "granite4_dora": ("granite4", dict(target_modules=["v_proj", "input_linear", "output_linear"], use_dora=True)),
    "phi3_sw_lora": ("phi3_sw", dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
    "granite4_nope_lora": ("granite4_nope", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "input_linear", "output_linear"])),
    # PEFT's target_parameters on the 3-D experts (both: nested wrappers; one: a plain one).
    "qwen3_moe_lora": ("qwen3_moe", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=EXPERTS)),
    "qwen3_moe_gate_up": ("qwen3_moe", dict(target_modules=["v_proj"], target_parameters=EXPERTS[:1])),
}
R, ALPHA = 4, 8.0
# eps 1e-4 (not torch's 1e-8): with eps ~0 Adam's first update is lr * sign(grad), so an element
# whose gradient is ~0 flips on float noise; a larger eps keeps the comparison well conditioned
# while testing the same formula.
LR, WD, MAX_NORM, STEPS, EPS = 1e-3, 0.01, 0.3, 5, 1e-4
# Documents all longer than mistral's max_position_embeddings (8), longest first, so that
# transformers' stateful dynamic-RoPE cache holds the longest document's frequencies for every
# document: the same as the engine's per-batch rule (longest document of the batch).
SEQ_LENS = [17, 13, 9, 11]


def make_model(name):
    cls, extra, tied, dtype = MODELS[name]
    kw = dict(COMMON)
    kw.update(extra)
    attn = kw.pop("attn_implementation")
    cfg = cls(tie_word_embeddings=tied, **kw)
    if name == "qwen3":
        cfg.attention_bias = False
    torch.manual_seed(1234 + len(name))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                # Gemma 3 scales by 1 + w: its weights sit around 0.
                p.copy_((0.0 if name == "gemma3" else 1.0) + 0.2 * torch.rand_like(p) - 0.1)
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    folder = os.path.join(OUT, "models", name)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    # Reload in float32 (bf16 files upcast exactly), eager attention.
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(SEQ_LENS)
    ids = torch.randint(0, VOCAB, (t,), generator=g)
    mask = torch.rand(t, generator=g) < 0.7
    start = 0
    for n in SEQ_LENS:
        mask[start] = True  # a first token's mask must be ignored by the engine
        start += n
    return ids, mask


def peft_key(param_name):
    k = param_name.replace(".default", "")
    if k.endswith("lora_magnitude_vector.weight"):
        k = k[: -len(".weight")]
    return k


def loss_and_logits(model, ids, mask):
    """Sum of target cross-entropies over documents, logits of all tokens, number of targets, and
    the objective: their mean plus, for Qwen3-MoE with output_router_logits, the router
    load-balancing loss times router_aux_loss_coef. That loss is transformers' own
    load_balancing_loss_func over the router logits of every token of the batch (each document's
    rows concatenated per layer), as one forward of the packed batch would compute it."""
    total, logits_all, n = 0.0, [], 0
    router = []
    start = 0
    cfg = model.config
    for L in SEQ_LENS:
        doc = ids[start:start + L]
        m = mask[start:start + L].clone()
        m[0] = False
        out = model(input_ids=doc[None])
        logits = out.logits[0]
        if getattr(cfg, "output_router_logits", False):
            router.append(out.router_logits)
        logits_all.append(logits)
        tgt_mask = m[1:]
        if tgt_mask.any():
            lp = torch.log_softmax(logits[:-1].float(), dim=-1)
            nll = -lp.gather(1, doc[1:, None])[:, 0]
            total = total + nll[tgt_mask].sum()
            n += int(tgt_mask.sum())
        start += L
    aux = torch.zeros(())
    if router:
        layers = tuple(torch.cat([r[i] for r in router]) for i in range(len(router[0])))
        aux = load_balancing_loss_func(layers, cfg.num_experts, cfg.num_experts_per_tok)
    objective = total / n + (cfg.router_aux_loss_coef * aux if router else 0.0)
    return total, torch.cat(logits_all), n, aux, objective


def run_case(case, model_name, adapter, base):
    torch.manual_seed(99)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                            task_type="CAUSAL_LM", **adapter))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(0.1 * torch.randn_like(p))
    params = [(peft_key(n), p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = {f"init.{k}": p.detach().clone() for k, p in params}
    ids, mask = make_batch(7)
    tensors["input_ids"] = ids.to(torch.int64)
    tensors["train_mask"] = mask.to(torch.int64)
    tensors["seq_lens"] = torch.tensor(SEQ_LENS, dtype=torch.int64)

    model.train()
    loss_sum, logits, n, aux, objective = loss_and_logits(model, ids, mask)
    objective.backward()
    tensors["logits"] = logits.detach()
    for k, p in params:
        tensors[f"grad.{k}"] = p.grad.detach().clone()
    model.zero_grad()

    opt = torch.optim.AdamW([p for _, p in params], lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WD, foreach=False)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        ls, _, n, _, obj = loss_and_logits(model, ids, mask)
        obj.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in params], MAX_NORM)))
        losses.append(float(ls / n))
        opt.step()
    for k, p in params:
        tensors[f"final.{k}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "cases", f"{case}.safetensors"))
    targets = adapter["target_modules"]
    if adapter.get("target_parameters"):
        targets = list(targets) + list(adapter["target_parameters"])
    meta = dict(model=model_name, r=R, lora_alpha=ALPHA, target_modules=targets, aux_loss=float(aux),
                use_rslora=adapter.get("use_rslora", False), use_dora=adapter.get("use_dora", False),
                loss=float(loss_sum / n), trained_tokens=n, lr=LR, eps=EPS, weight_decay=WD, max_grad_norm=MAX_NORM,
                step_losses=losses, step_grad_norms=norms,
                param_names=[k for k, _ in params])
    with open(os.path.join(OUT, "cases", f"{case}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{case}: loss {meta['loss']:.6f}, {len(params)} adapter tensors, grad norms {norms[0]:.4f}..{norms[-1]:.4f}")


def main():
    for lib, (have, want) in PINNED.items():
        if not have.startswith(want):
            sys.exit(f"make_goldens.py needs {lib} {want}*, found {have} (pip install as tests/ci.d/40-interop.sh does)")
    torch.set_num_threads(2)
    only = sys.argv[1:]
    unknown = [c for c in only if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if not only:
        shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(os.path.join(OUT, "cases"), exist_ok=True)
    for case, (model_name, adapter) in CASES.items():
        if only and case not in only:
            continue
        base = make_model(model_name)  # same seed -> same weights every time
        run_case(case, model_name, adapter, base)
    for name in MODELS:
        for extra in ("generation_config.json",):
            p = os.path.join(OUT, "models", name, extra)
            if os.path.exists(p):
                os.remove(p)


if __name__ == "__main__":
    main()
