"""Writes tests/e2e/golden/schedulers.json: the learning rate of every optimizer step, as
`transformers.get_scheduler` gives it (transformers 5.17, torch 2.11), for each built-in schedule
and a few settings. `host/lora/tests/schedulers_golden.rs` compares our schedules value for value.

Run with the project's Python (torch + transformers):
    /work/venv/bin/python tests/e2e/make_scheduler_goldens.py
"""
import json
import pathlib
import struct

import torch
import transformers
from transformers import get_scheduler

BASE_LR = 2e-4

# (name, warmup, total, kwargs)
CASES = [
    ("linear", 0, 20, {}),
    ("linear", 3, 20, {}),
    ("linear", 10, 7, {}),  # warmup longer than the run (the reference's default warmup on a tiny run)
    ("cosine", 0, 20, {}),
    ("cosine", 4, 25, {}),
    ("cosine", 2, 17, {"num_cycles": 1.5}),
    ("cosine_with_restarts", 0, 20, {}),
    ("cosine_with_restarts", 3, 30, {"num_cycles": 3}),
    ("polynomial", 0, 20, {}),
    ("polynomial", 5, 20, {"power": 2.0, "lr_end": 1e-5}),
    ("polynomial", 2, 13, {"power": 0.5}),
    ("constant", 0, 10, {}),
    ("constant", 3, 10, {}),
    ("constant_with_warmup", 0, 10, {}),
    ("constant_with_warmup", 6, 15, {}),
    ("inverse_sqrt", 0, 20, {}),
    ("inverse_sqrt", 5, 30, {}),
    ("inverse_sqrt", 4, 30, {"timescale": 9}),
    ("warmup_stable_decay", 3, 30, {"num_decay_steps": 10}),
    ("warmup_stable_decay", 4, 30, {"num_decay_steps": 8, "num_stable_steps": 10, "warmup_type": "cosine", "decay_type": "linear", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 5, 24, {"num_decay_steps": 12, "warmup_type": "1-sqrt", "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", 2, 20, {"num_decay_steps": 9, "decay_type": "cosine", "num_cycles": 1.0}),
]


def bits(x: float) -> str:
    return "%016x" % struct.unpack("<Q", struct.pack("<d", x))[0]


def main():
    out = []
    for name, warmup, total, kwargs in CASES:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=BASE_LR)
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=dict(kwargs))
        lrs = []
        for _ in range(total + 3):  # a few steps past the end, as a run whose plan grew would see
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out.append({
            "name": name, "warmup_steps": warmup, "total_steps": total, "kwargs": kwargs,
            "lr": lrs, "lr_bits": [bits(x) for x in lrs],
        })
    path = pathlib.Path(__file__).parent / "golden" / "schedulers.json"
    doc = {"transformers": transformers.__version__, "torch": torch.__version__, "base_lr": BASE_LR, "cases": out}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path} ({len(out)} cases)")


if __name__ == "__main__":
    main()
