"""Writes the small columnar dataset fixtures under tests/data/fixtures/datasets/ with the real
writers users have: pyarrow (Parquet, Snappy and zstd) and datasets.save_to_disk (a DatasetDict
with train and test splits). The same conversations are in chat.jsonl for comparison.

Run: /work/venv/bin/python tests/data/make_datasets.py
"""
import json
import os
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "datasets")


def conv(i):
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
        ],
        "id": i,
        "score": i / 4,
        "tag": None if i % 3 == 0 else f"t{i}",
    }


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    rows = [conv(i) for i in range(12)]
    with open(os.path.join(OUT, "chat.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, os.path.join(OUT, "chat.snappy.parquet"), compression="snappy", row_group_size=5)
    pq.write_table(table, os.path.join(OUT, "chat.zstd.parquet"), compression="zstd")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:9]),
        "test": datasets.Dataset.from_list(rows[9:]),
    })
    dd.save_to_disk(os.path.join(OUT, "hf_dict"))
    print(sorted(os.listdir(OUT)), sorted(os.listdir(os.path.join(OUT, "hf_dict", "train"))))


if __name__ == "__main__":
    main()
