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
5. kfp.local: an upstream Lightweight Python component writes its dataset to `out.path` (no
   extension, the most common pipeline shape) and feeds the lora component, which trains a tiny
   model (LORA_TINY_MODEL, written by the e2e test `write_tiny_model`) to SUCCESS. kfp.local's
   SubprocessRunner runs only Python components; the lora container's command is run as a local
   process instead (the `lora` binary is LORA_BIN), with everything else (executor input,
   placeholders, artifact paths, executor output) kfp.local's own.

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


def lora(*args, env=None):
    return subprocess.run([LORA, *args], capture_output=True, text=True, env=None if env is None else {**os.environ, **env})


def hub_cache_with(model_id, model_dir, root):
    """A Hugging Face hub cache at `root` holding `model_id` as the tiny model (its window widened
    to the pipeline's training_max_seq_len), so a dry run resolves it offline."""
    import shutil

    repo = root / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(model_dir, snapshot)
    cfg = json.loads((snapshot / "config.json").read_text())
    cfg["max_position_embeddings"] = 32768
    (snapshot / "config.json").write_text(json.dumps(cfg))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


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

    # The dry run reads the model and the data as the run would: the base model from a hub cache
    # (no network here). The pipeline's dataset is a remote s3 artifact, which the run refuses
    # (lora does not download datasets): so does the dry run, naming it.
    model = os.environ.get("LORA_TINY_MODEL")
    if not model:
        check(False, "LORA_TINY_MODEL is not set (tests/ci.d/10-kfp.sh writes the tiny model)")
        return
    tmp = pathlib.Path(tempfile.mkdtemp())
    env = hub_cache_with(ei["inputs"]["parameterValues"]["training_base_model"], model, tmp / "hub")
    res = lora("kfp", "--dry-run", "--json", "--executor-input", json.dumps(ei), env=env)
    check(res.returncode == 2 and "lora does not download datasets" in res.stderr and "s3://datasets/chat/train.jsonl" in res.stderr,
          f"a remote dataset fails the dry run as it fails the run ({res.returncode}): {res.stderr}")
    # With the dataset artifact on a local path, the whole plan.
    data = tmp / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    local = json.loads(json.dumps(ei))
    local["inputs"]["artifacts"]["dataset"]["artifacts"][0].update({"uri": str(data), "metadata": {}})
    res = lora("kfp", "--dry-run", "--json", "--executor-input", json.dumps(local), env=env)
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
    check(ds["dataset_artifact_path"] == str(data), "dataset uri mapped")
    check(ds["dataset"] == {"from": "artifact", "path": str(data)}, f"dataset resolution {ds['dataset']}")
    check(plan["training"]["records"] == 1 and plan["training"]["total_steps"] == 2, f"the data plan: {plan['training']}")
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


def run_lora_container_as_a_local_process():
    """Lets kfp.local's SubprocessRunner run the lora component's container command (`lora kfp
    --executor-input {{$}}`) as a process of LORA_BIN; every other component still goes through
    kfp's own checks."""
    from kfp.local import subprocess_task_handler as sth

    handler = sth.SubprocessTaskHandler
    original = handler.__init__

    def init(self, image, full_command, pipeline_root, runner, env_vars=None):
        if image.startswith("ghcr.io/lora-rs/lora:") and full_command[:2] == ["lora", "kfp"]:
            self.image, self.pipeline_root, self.runner = image, pipeline_root, runner
            self.full_command = [LORA, *full_command[1:]]
            self.env_vars = env_vars or {}
            return
        original(self, image, full_command, pipeline_root, runner, env_vars)

    handler.__init__ = init


def test_kfp_local_extension_less_upstream_dataset(tmp):
    model = os.environ.get("LORA_TINY_MODEL")
    if not model:
        check(False, "LORA_TINY_MODEL is not set (tests/ci.d/10-kfp.sh writes the tiny model)")
        return
    from kfp import dsl, local

    run_lora_container_as_a_local_process()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp / "pipeline-root"),
        workspace_root=str(tmp / "workspace"),
        raise_on_error=True,
    )
    lora = components.load_component_from_file(str(COMPONENT))

    @dsl.component
    def make_chat(out: dsl.Output[dsl.Dataset]):
        import json

        with open(out.path, "w") as f:  # no extension: `out.path` is `.../out`
            for i in range(12):
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                ]}) + "\n")

    @dsl.pipeline(pipeline_config=dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(size="1Gi")))
    def upstream_then_lora(base_model: str):
        data = make_chat()
        lora(
            pvc_path=dsl.WORKSPACE_PATH_PLACEHOLDER,
            dataset=data.outputs["out"],
            training_base_model=base_model,
            training_device="cpu",
            training_num_epochs=1,
            training_effective_batch_size=4,
            training_max_seq_len=256,
            training_max_tokens_per_gpu=1024,
            # kfp.local (2.17.3) casts every integer parameter with int(), an unset Optional[int]
            # (None) included, and fails before running the task; a KFP backend leaves them
            # unset. So each is given here, with the value lora would resolve anyway.
            training_lr_warmup_steps=1,
            training_micro_batch_size=4,
            training_gradient_accumulation_steps=1,
            training_save_steps=500,
            training_eval_steps=500,
            training_logging_steps=1,
            training_save_total_limit=3,
            training_max_steps=100,
            training_seed=3407,
        )

    try:
        upstream_then_lora(base_model=model)  # raises unless every task ends in SUCCESS
    except Exception as e:  # noqa: BLE001 (reported as a failed check, with kfp's message)
        check(False, f"the pipeline ran to SUCCESS: {e}")
        return
    # A pipeline run's tasks: SUCCESS for both, and lora's outputs where kfp.local put them.
    roots = sorted((tmp / "pipeline-root").glob("upstream-then-lora-*"))
    check(len(roots) == 1, f"one pipeline run folder under the pipeline root: {roots}")
    if not roots:
        return
    out_path = next(roots[0].glob("make-chat/out"), None)
    check(out_path is not None and out_path.is_file() and out_path.suffix == "", f"the upstream dataset is an extension-less file: {out_path}")
    lora_dir = roots[0] / "lora"
    adapter = lora_dir / "output_model" / "adapter" / "adapter_model.safetensors"
    check(adapter.is_file(), f"lora wrote its adapter: {adapter}")
    metrics_file = lora_dir / "output_metrics"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        check(metrics.get("training_steps") == 3, f"12 records at batch 4 give 3 steps: {metrics.get('training_steps')}")
    else:
        check(False, f"lora wrote its metrics: {metrics_file}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_component_loads_and_matches_the_binary()
        test_json_schema_is_valid_and_checks_params_files()
        spec = compile_pipeline(pathlib.Path(tmp))
        test_executor_input_is_read(spec)
        test_executor_output_parses_as_the_launcher_parses_it(spec)
    with tempfile.TemporaryDirectory() as tmp:
        test_kfp_local_extension_less_upstream_dataset(pathlib.Path(tmp))
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("kfp contract: all checks passed")


if __name__ == "__main__":
    main()
