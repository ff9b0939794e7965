"""Writes the tiny ONNX models the wasi:nn host tests run, each as <out>/<name>/model.onnx.

  tiny: x f32[1,4] -> y = 2x + 1 (f32[1,4])
  ids:  ids i64[n] -> Gather over a fixed 8x3 table, ReduceMean -> emb f32[1,3]
  slow: x f32[?,?] -> 300 chained MatMul(x, x) (several seconds on one thread at 512x512)

Usage: python make_test_models.py OUT_DIR   (needs the `onnx` and `numpy` packages)
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model, out, name):
    os.makedirs(os.path.join(out, name), exist_ok=True)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, name, "model.onnx"))


def tiny():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    two = numpy_helper.from_array(np.array([2.0], np.float32), "two")
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [two, one]))


def ids():
    table = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(8, 3) / 8.0, "table")
    i = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    o = helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 3])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("ReduceMean", ["rows"], ["emb"], axes=[0], keepdims=1),
    ]
    return helper.make_model(helper.make_graph(nodes, "ids", [i], [o], [table]), opset_imports=[helper.make_opsetid("", 17)])


def slow():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])
    nodes, prev = [], "x"
    for k in range(300):
        nodes.append(helper.make_node("MatMul", [prev, "x"], [f"m{k}"]))
        prev = f"m{k}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "slow", [x], [y]))


if __name__ == "__main__":
    out = sys.argv[1]
    for name, make in [("tiny", tiny), ("ids", ids), ("slow", slow)]:
        save(make(), out, name)
    print(f"models in {out}: tiny ids slow")
