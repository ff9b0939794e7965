"""Engine-only vs full-run throughput, same binary, same model shape, same tokens per step.

- engine only: `lora bench --device cpu --shape smollm2-135m --rows R --seq-len L` (random weights,
  one packed batch of R x L tokens per optimizer step, no data pipeline, no reporters);
- full run: `lora train` on a model folder of the same shape (random weights written by
  transformers, SmolLM2 tokenizer fixture) and a synthetic chat dataset whose samples fill rows of
  L tokens, R samples per optimizer step; tokens/s as the run logs it (optimizer steps only:
  data plan, scheduler, logging and reporters included; checkpoint writes timed separately).

Prints both side by side with the ratio.
    python tests/e2e/bench_loop.py <path to lora binary> [rows] [seq_len] [steps]
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    binary = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    seq_len = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    work = pathlib.Path(tempfile.mkdtemp(prefix="lora-bench-loop-"))
    try:
        # The smollm2-135m shape of `lora bench`.
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        model_dir = work / "model"
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
        for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
            shutil.copy(ROOT / "tests/data/fixtures/smollm2" / f, model_dir / f)
        # Samples of roughly seq_len tokens (one per row: packing has nothing to add).
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
        with open(work / "data.jsonl", "w") as f:
            for i in range(rows * (steps + 2)):
                answer = " ".join(words[(i + j) % len(words)] for j in range(int(seq_len * 0.85)))
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Say something, number {i}."},
                                                 {"role": "assistant", "content": answer}]}) + "\n")

        def engine():
            bench = subprocess.run([binary, "bench", "--device", "cpu", "--shape", "smollm2-135m", "--rows", str(rows),
                                    "--seq-len", str(seq_len), "--steps", str(steps), "--json"],
                                   capture_output=True, text=True, check=True)
            return json.loads(bench.stdout)["tokens_per_sec"]

        # The machine is shared: measure the engine before and after the run and report both.
        engine_before = engine()

        run = subprocess.run([binary, "train", "--training-base-model", str(model_dir), "--dataset", str(work / "data.jsonl"),
                              "--output-model", str(work / "out/model"), "--output-metrics", str(work / "out/m.json"),
                              "--output-loss-chart", str(work / "out/c.html"), "--pvc-path", str(work / "pvc"),
                              "--training-device", "cpu", "--training-max-seq-len", str(seq_len),
                              "--training-max-tokens-per-gpu", str(rows * seq_len),
                              "--training-effective-batch-size", str(rows), "--training-max-steps", str(steps + 1),
                              "--training-num-epochs", "1", "--training-save-steps", "2",
                              "--training-train-on-inputs", "true"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr)
            sys.exit(1)
        engine_after = engine()
        engine_tps = (engine_before + engine_after) / 2
        rows_logged = [json.loads(l) for l in open(work / "pvc/checkpoints/training_metrics.jsonl") if '"loss"' in l]
        # Skip the first step (warm-up, as the bench does).
        timed = rows_logged[1:]
        run_tps = sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_second"] for r in timed)
        ckpt = re.search(r"([0-9.]+)s writing checkpoints", run.stderr)
        tokens_per_step = sum(r["tokens"] for r in timed) / len(timed)
        print(f"shape smollm2-135m, {rows} x {seq_len} tokens per step (full run: {tokens_per_step:.0f} tokens/step)")
        print(f"{'engine only (lora bench)':<34} {engine_tps:>10.1f} tokens/s (before {engine_before:.1f}, after {engine_after:.1f})")
        print(f"{'full run (lora train)':<34} {run_tps:>10.1f} tokens/s")
        print(f"{'ratio full / engine':<34} {run_tps / engine_tps:>10.3f}")
        if ckpt:
            print(f"checkpoint writes: {ckpt.group(1)} s in total (the loop waits exactly for the write)")
        print(run.stderr.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
