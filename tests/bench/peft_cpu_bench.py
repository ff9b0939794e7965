#!/usr/bin/env python3
"""LoRA training throughput on CPU: lora-engine vs PyTorch + PEFT, same shape, same batch.

    cargo build --release -p lora-engine --example bench
    /work/venv/bin/python tests/bench/peft_cpu_bench.py --bin $CARGO_TARGET_DIR/release/examples/bench \
        --shape smollm2-135m --rows 4 --seq 512 --steps 3

Both sides: random weights of the preset shape (float32), LoRA r=16 alpha=32 on all seven
projections, dropout 0, one document per row, every token a target, AdamW + clipping 0.3,
2 threads. PyTorch runs `model(input_ids, labels=...)` (eager attention, the HF loss), backward,
clip, step. Each side runs in its own process; peak memory is the process's VmHWM (ru_maxrss).
Prints both numbers side by side with the ratio.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {
    # layers, hidden, mlp, heads, kv heads, vocab, tied, arch
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, True, "llama"),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936, True, "qwen2"),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936, True, "qwen2"),
}


def torch_side(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.set_num_threads(a.threads)
    layers, hidden, mlp, heads, kv, vocab, tied, arch = SHAPES[a.shape]
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
              max_position_embeddings=32768)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (a.rows, a.seq), generator=g)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    tokens = a.rows * a.seq
    print(json.dumps(dict(backend=f"torch {torch.__version__} + peft ({a.attn})", tokens_per_step=tokens,
                          step_seconds=times, tokens_per_sec=tokens * len(times) / sum(times),
                          peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          final_loss=float(loss))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", help="lora-engine bench example binary")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--recompute", action="store_true", help="lora-engine: recompute activations per layer")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_only:
        torch_side(a)
        return
    common = ["--shape", a.shape, "--rows", str(a.rows), "--seq", str(a.seq), "--steps", str(a.steps),
              "--warmup", str(a.warmup), "--r", str(a.r)]
    ours_cmd = [a.bin] + common + ["--threads", str(a.threads)] + (["--recompute"] if a.recompute else [])
    theirs_cmd = [sys.executable, __file__, "--torch-only", "--threads", str(a.threads), "--attn", a.attn] + common
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    ours = json.loads(subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    theirs = json.loads(subprocess.run(theirs_cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
    mb = lambda b: f"{b / 2**20:,.0f} MiB"
    print(f"shape {a.shape}, {a.rows} rows x {a.seq} tokens, LoRA r={a.r} on all seven, {a.threads} threads, "
          f"{a.steps} timed steps after {a.warmup} warm-up")
    print(f"{'':24}{'lora-engine (cpu)':>22}{theirs['backend']:>36}{'ratio':>10}")
    print(f"{'tokens/s':24}{ours['tokens_per_sec']:>22.1f}{theirs['tokens_per_sec']:>36.1f}"
          f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:>9.2f}x")
    print(f"{'peak memory (VmHWM)':24}{mb(ours['peak_rss_bytes']):>22}{mb(theirs['peak_rss_bytes']):>36}"
          f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:>9.2f}x")
    print(f"{'step seconds':24}{' '.join(f'{s:.2f}' for s in ours['step_seconds']):>22}"
          f"{' '.join(f'{s:.2f}' for s in theirs['step_seconds']):>36}")
    print(f"{'loss after last step':24}{ours['final_loss']:>22.4f}{theirs['final_loss']:>36.4f}")


if __name__ == "__main__":
    main()
