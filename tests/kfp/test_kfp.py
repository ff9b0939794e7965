#!/usr/bin/env python3
"""The lora component against the real kfp SDK (kfp==2.17.3).

1. examples/kfp/lora.component.yaml loads with kfp.components.load_component_from_file and its
   interface is exactly the binary's parameter set (`lora params --json-schema`) plus pvc_path,
   the dataset input, the three output artifacts and `Output: str`.
2. examples/kfp/pipeline.py compiles (dsl.WORKSPACE_PATH_PLACEHOLDER for pvc_path).
3. From that compiled pipeline an executor input is built the way KFP's driver/launcher build it
   (constants and pipeline-input defaults resolved, `{{$.workspace_path}}` -> /kfp-workspace,
   component defaults applied, optional values left unset absent, TaskConfig present), as
   protobuf JSON of pipeline_spec_pb2.ExecutorInput; `lora kfp --dry-run` must read every field.
   The result is compared with the checked-in tests/kfp/executor_input.json (the Rust tests use
   it); LORA_BLESS=1 rewrites it.
4. tests/kfp/executor_output.golden.json (written by the Rust writer, see
   host/lora/tests/kfp_contract.rs) parses as pipeline_spec_pb2.ExecutorOutput with protobuf's
   strict JSON parser, as the launcher parses it, and lists every output artifact.

Usage: LORA_BIN=path/to/lora python tests/kfp/test_kfp.py
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jsonschema
import yaml
from google.protobuf import json_format
from kfp import compiler, components
from kfp.pipeline_spec import pipeline_spec_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "kfp"
COMPONENT = ROOT / "examples" / "kfp" / "lora.component.yaml"
LORA = os.environ.get("LORA_BIN", "lora")
WORKSPACE = "/kfp-workspace"  # what the launcher substitutes for {{$.workspace_path}}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}")


def lora(*args):
    return subprocess.run([LORA, *args], capture_output=True, text=True)


def test_component_loads_and_matches_the_binary():
    comp = components.load_component_from_file(str(COMPONENT))
    spec = comp.component_spec
    schema = json.loads(lora("params", "--json-schema").stdout)
    params = set(schema["properties"])
    inputs = set(spec.inputs)
    check(inputs == params | {"pvc_path", "dataset"}, f"component inputs differ from the binary's parameters: {sorted(inputs ^ (params | {'pvc_path', 'dataset'}))}")
    check(set(spec.outputs) == {"Output", "output_model", "output_metrics", "output_loss_chart"}, f"outputs: {sorted(spec.outputs)}")
    check(spec.outputs["Output"].type == "String", "Output is a string")
    check(spec.outputs["output_model"].type.startswith("system.Model"), "output_model is a system.Model")
    check(spec.outputs["output_metrics"].type.startswith("system.Metrics"), "output_metrics is a system.Metrics")
    check(spec.outputs["output_loss_chart"].type.startswith("system.HTML"), "output_loss_chart is a system.HTML")
    check(spec.inputs["dataset"].type.startswith("system.Dataset") and spec.inputs["dataset"].optional, "dataset is an optional system.Dataset")
    check(not spec.inputs["pvc_path"].optional, "pvc_path is required")
    check(spec.inputs["kubernetes_config"].type == "TaskConfig", f"kubernetes_config type {spec.inputs['kubernetes_config'].type}")
    for name, prop in schema["properties"].items():
        if name == "kubernetes_config":
            continue
        inp = spec.inputs[name]
        check(inp.optional, f"{name} is optional")
        want = prop["default"]
        got = inp.default
        check(got == want and type(got) is type(want) or (isinstance(want, int) and got == want),
              f"{name}: component default {got!r} != binary default {want!r}")
    cmd = spec.implementation.container.command
    check(cmd == ["lora", "kfp", "--executor-input", "{{$}}"], f"command {cmd}")
    return comp


def test_json_schema_is_valid_and_checks_params_files():
    schema = json.loads(lora("params", "--json-schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    good = {"training_lora_r": 8, "training_learning_rate": None, "kubernetes_config": {"env": []}}
    check(not list(v.iter_errors(good)), "a good params file passes the schema")
    bad = {"training_lora_rr": 8, "training_lora_r": "x"}
    check(len(list(v.iter_errors(bad))) == 2, "the schema refuses unknown keys and wrong types")


def compile_pipeline(tmp):
    sys.path.insert(0, str(ROOT / "examples" / "kfp"))
    import pipeline  # noqa: E402  (examples/kfp/pipeline.py)

    out = tmp / "pipeline.yaml"
    compiler.Compiler().compile(pipeline.lora_pipeline, str(out))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(next(yaml.safe_load_all(out.read_text())), spec, ignore_unknown_fields=True)
    return spec


def value_of(v):
    return json_format.MessageToDict(v)


def executor_input_for(spec):
    """Builds the ExecutorInput for task `lora` as KFP's driver does."""
    task = spec.root.dag.tasks["lora"]
    comp = spec.components[task.component_ref.name]
    executor = spec.deployment_spec.fields["executors"].struct_value.fields["exec-lora"]
    container = json_format.MessageToDict(executor)["container"]
    root_inputs = spec.root.input_definitions.parameters
    ei = pipeline_spec_pb2.ExecutorInput()
    for name, pdef in comp.input_definitions.parameters.items():
        if name in task.inputs.parameters:
            src = task.inputs.parameters[name]
            if src.HasField("runtime_value"):
                val = value_of(src.runtime_value.constant)
                if val == "{{$.workspace_path}}":
                    val = WORKSPACE
            else:
                val = value_of(root_inputs[src.component_input_parameter].default_value)
        elif pdef.parameter_type == pipeline_spec_pb2.ParameterType.TASK_CONFIG:
            res = container.get("resources", {})
            acc = res.get("accelerator", {})
            val = {
                "resources": {
                    "limits": {"cpu": res["resourceCpuLimit"], "memory": res["resourceMemoryLimit"], acc["resourceType"]: acc["resourceCount"]},
                },
                "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}],
                "volumes": [{"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-1-kfp-workspace"}}],
                "volumeMounts": [{"name": "kfp-workspace", "mountPath": WORKSPACE}],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        elif pdef.HasField("default_value"):
            val = value_of(pdef.default_value)
        else:
            continue  # optional and unset: absent
        json_format.ParseDict(val, ei.inputs.parameter_values[name])
    importer = spec.deployment_spec.fields["executors"].struct_value.fields["exec-importer"]
    imp = json_format.MessageToDict(importer)["importer"]
    ds = ei.inputs.artifacts["dataset"].artifacts.add()
    ds.name = "11"
    ds.uri = "minio://mlpipeline/v2/artifacts/imported/train.jsonl"
    ds.type.schema_title = "system.Dataset"
    json_format.ParseDict(imp.get("metadata", {}), ds.metadata)
    for name, adef in comp.output_definitions.artifacts.items():
        a = ei.outputs.artifacts[name].artifacts.add()
        a.name = {"output_model": "21", "output_metrics": "22", "output_loss_chart": "23"}[name]
        a.type.schema_title = adef.artifact_type.schema_title
        a.uri = f"minio://mlpipeline/v2/artifacts/lora-finetune/run-1/lora/exec-7/{name}"
    for name in comp.output_definitions.parameters:
        ei.outputs.parameters[name].output_file = f"/tmp/kfp/outputs/{name}"
    ei.outputs.output_file = "/tmp/kfp_outputs/output_metadata.json"
    return json.loads(json_format.MessageToJson(ei))


def test_executor_input_is_read(spec):
    ei = executor_input_for(spec)
    fixture = HERE / "executor_input.json"
    text = json.dumps(ei, indent=2, sort_keys=True) + "\n"
    if os.environ.get("LORA_BLESS"):
        fixture.write_text(text)
    check(fixture.read_text() == text, f"{fixture} differs from the executor input built now (LORA_BLESS=1 rewrites it)")

    res = lora("kfp", "--dry-run", "--executor-input", json.dumps(ei))
    check(res.returncode == 0, f"lora kfp --dry-run failed ({res.returncode}): {res.stderr}")
    if res.returncode != 0:
        return
    plan = json.loads(res.stdout)
    pv = ei["inputs"]["parameterValues"]
    for name, val in pv.items():
        if name == "pvc_path":
            check(plan["inputs"]["pvc_path"] == val, "pvc_path read")
            continue
        if name == "kubernetes_config":
            check(plan["pod"]["kubernetes_config"] == val, "kubernetes_config (TaskConfig) read")
            check(plan["parameters"][name]["value"] == val, "kubernetes_config in parameters")
            continue
        got = plan["parameters"][name]
        check(got["source"] == "KFP executor input", f"{name}: source {got['source']}")
        check(got["value"] == val, f"{name}: {got['value']!r} != {val!r}")
    # optional values left unset are absent in the executor input and resolved by lora
    check("training_learning_rate" in pv and plan["parameters"]["training_learning_rate"]["value"] == 1e-4, "learning rate from the pipeline")
    check("training_bf16" not in pv and plan["parameters"]["training_bf16"]["source"] == "training_hub default", "unset optional resolved")
    check(plan["parameters"]["training_num_epochs"]["value"] == 2, "pipeline input default reaches the component")
    outs = plan["outputs"]
    base = "/minio/mlpipeline/v2/artifacts/lora-finetune/run-1/lora/exec-7/"
    check(outs["model"] == base + "output_model", f"output_model path {outs['model']}")
    check(outs["metrics"] == base + "output_metrics", "output_metrics path")
    check(outs["loss_chart"] == base + "output_loss_chart", "output_loss_chart path")
    check(outs["executor_output"] == "/tmp/kfp_outputs/output_metadata.json", "outputs.outputFile read")
    check(outs["output_parameter"] == "/tmp/kfp/outputs/Output", "outputs.parameters.Output.outputFile read")
    ds = plan["inputs"]
    check(ds["dataset_artifact_path"] == "/minio/mlpipeline/v2/artifacts/imported/train.jsonl", "dataset uri mapped")
    check(ds["dataset_metadata"] == {"artifact_path": "s3://datasets/chat/train.jsonl"}, "dataset metadata read")
    check(ds["dataset"] == {"from": "remote", "artifact_path": "s3://datasets/chat/train.jsonl"}, f"dataset resolution {ds['dataset']}")
    check(plan["environment"].get("HF_HOME") == WORKSPACE + "/.cache/huggingface", "HF_HOME defaults into the workspace")
    check(plan["environment"].get("HF_HUB_ENABLE_HF_TRANSFER") == "0", "training_envs applied")
    check(plan["workspace"]["dataset_train"] == WORKSPACE + "/dataset/train", "workspace layout")
    check(not pathlib.Path(WORKSPACE).exists(), "dry run wrote nothing")


def test_executor_output_parses_as_the_launcher_parses_it(spec):
    text = (HERE / "executor_output.golden.json").read_text()
    out = pipeline_spec_pb2.ExecutorOutput()
    json_format.Parse(text, out)  # strict: unknown fields fail, as protojson.Unmarshal does
    comp = spec.components["comp-lora"]
    check(set(out.artifacts) == set(comp.output_definitions.artifacts), f"artifacts listed: {sorted(out.artifacts)}")
    for name, lst in out.artifacts.items():
        check(len(lst.artifacts) == 1 and lst.artifacts[0].uri.startswith("minio://"), f"{name}: one artifact with its uri")
    check(out.parameter_values["Output"].string_value != "", "Output parameter is a non-empty string")
    if "output_metrics" not in out.artifacts or not out.artifacts["output_metrics"].artifacts:
        return
    metrics = json_format.MessageToDict(out.artifacts["output_metrics"].artifacts[0].metadata)
    check(metrics and all(isinstance(v, (int, float)) for v in metrics.values()), f"metrics are scalars: {metrics}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_component_loads_and_matches_the_binary()
        test_json_schema_is_valid_and_checks_params_files()
        spec = compile_pipeline(pathlib.Path(tmp))
        test_executor_input_is_read(spec)
        test_executor_output_parses_as_the_launcher_parses_it(spec)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("kfp contract: all checks passed")


if __name__ == "__main__":
    main()
