#!/usr/bin/env python3
"""PyTorch + PEFT equivalent of `lora bench`: the same model shape with random weights (no
download), LoRA on all seven projections, full rows of `--seq-len` tokens, `--tokens` tokens per
optimizer step (one micro-batch), bf16 weights, sdpa attention, AdamW. Prints one JSON line per
configuration: tokens/s, model FLOP utilisation and peak device memory (or "oom").

    python3 tests/gpu/peft_bench.py --shape qwen2.5-1.5b --device cuda           # GPU
    python3 tests/gpu/peft_bench.py --shape tiny --device cpu --steps 2 --warmup 1  # dry run

Configurations: plain; with gradient checkpointing; with Liger kernels (if `liger_kernel`
imports), with and without checkpointing. Model FLOPs per token use the same formula as ours:
6 x (parameters of every linear layer incl. the output head) + 6 x layers x seq x hidden (causal
attention: QK^T and PV, forward + input-gradient backward, halved for causality).
"""
import argparse
import gc
import json
import sys
import time

SHAPES = {
    # layers, hidden, mlp, heads, kv heads, vocab, tied
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936, True),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936, True),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, True),
    "tiny": (2, 64, 128, 4, 2, 256, True),
}
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def model_flops_per_token(shape, seq):
    layers, d, f, h, kv, vocab, _ = shape
    hd = d // h
    linear = layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f) + vocab * d
    return 6 * linear + 6 * layers * seq * d


def build(shape, device, dtype, liger):
    import torch
    from transformers import Qwen2Config, AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    layers, d, f, h, kv, vocab, tied = shape
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=h, num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    return model


def run_one(args, shape, name, liger, checkpointing):
    import torch
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = args.tokens // args.seq_len
    result = {"config": name, "rows": rows, "seq_len": args.seq_len, "tokens_per_step": rows * args.seq_len}
    try:
        model = build(shape, device, dtype, liger)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, shape[5], (rows, args.seq_len), generator=g).to(device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.warmup + args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        tps = rows * args.seq_len * len(times) / sum(times)
        result["tokens_per_s"] = round(tps, 1)
        result["loss"] = round(float(out.loss.detach()), 4)
        flops = model_flops_per_token(shape, args.seq_len) * tps
        if args.device == "cuda":
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
            result["gpu"] = gpu
            if peak:
                result["mfu"] = round(flops / (peak * 1e12), 4)
        result["model_tflops"] = round(flops / 1e12, 3)
    except torch.OutOfMemoryError:
        result["tokens_per_s"] = None
        result["oom"] = True
    except ImportError as e:
        result["skipped"] = f"import failed: {e}"
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per optimizer step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", default="peft,peft+ckpt,liger,liger+ckpt",
                    help="comma list of: peft, peft+ckpt, liger, liger+ckpt")
    args = ap.parse_args()
    if args.tokens % args.seq_len:
        sys.exit(f"--tokens {args.tokens} is not a multiple of --seq-len {args.seq_len}")
    shape = SHAPES[args.shape]
    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except ImportError:
        have_liger = False
    for c in args.configs.split(","):
        c = c.strip()
        liger = c.startswith("liger")
        if liger and not have_liger:
            print(json.dumps({"config": c, "skipped": "liger_kernel is not installed"}), flush=True)
            continue
        res = run_one(args, shape, c, liger, c.endswith("+ckpt"))
        res["shape"] = args.shape
        print(json.dumps(res), flush=True)
        # The model of this configuration is unreachable now: give its memory back before the next.
        gc.collect()
        if args.device == "cuda":
            import torch
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
