"""Reads the experiment trackers' data of real lora runs back with each tool's own library and
compares it with the run's `training_metrics.jsonl`.

The fixture is written by `cargo test -p lora --test trackers write_tracker_fixture -- --ignored`
(LORA_TRACKERS_DIR=<dir>, LORA_TRACKERS_MLFLOW_URI=<server>); `tests/ci.d/45-trackers.sh` runs
both. For the runs `ref` (uninterrupted) and `resumed` (killed twice, resumed):

1. TensorBoard (`tensorboard` package): `EventAccumulator` finds one run folder whose scalars
   `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second`,
   `train/epoch`, `eval/loss`, `eval/perplexity` have each logged step once, equal (as float32,
   TensorBoard's scalar type) to the jsonl rows, and the totals; the HParams plugin's own
   handlers (`get_experiment`, `list_session_groups`, what the HParams tab calls) list the run's
   parameters and its session with the parameter values and the last metric values.
2. MLflow (`mlflow.MlflowClient` against the server): one run in the experiment, FINISHED, with
   the parameters (secrets hidden), the tags, each metric's history equal to the jsonl (every
   step once, exact), and the artifacts equal byte for byte to the run's files.
3. W&B (`wandb` package): `wandb leet inspect --json` (wandb-core's reader of the transaction
   log, which `wandb sync` uses) reads the offline run: entity/project/name, the config, one
   history row per step equal to the jsonl (exact), the summary with the totals, a clean exit;
   `wandb sync --dry-run` lists the run as one it would upload.
Prints what it checked; exits non-zero on the first mismatch.

    python tests/e2e/check_trackers.py <LORA_TRACKERS_DIR>
"""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np

STEP_KEYS = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch", "tokens", "trained_tokens"]
EVAL_KEYS = {"eval_loss": "eval/loss", "perplexity": "eval/perplexity", "eval_tokens": "eval/tokens"}
TOTALS = ["train_runtime", "train_loss", "train_tokens_per_second", "final_loss", "min_loss"]


def hf(key):
    return EVAL_KEYS.get(key, f"train/{key}")


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def rows_of(work):
    rows = [json.loads(l) for l in (work / "pvc/checkpoints/training_metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r and "train_runtime" not in r]
    totals = [r for r in rows if "train_runtime" in r]
    check(len(totals) == 1, f"{work}: one totals row")
    return steps, evals, totals[0]


def check_tensorboard(name, work, steps, evals, totals):
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_multiplexer, data_provider
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups
    from tensorboard import context as tb_context

    logdir = work / "tb"
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    check(len(runs) == 1, f"{name}: one TensorBoard run folder, got {runs}")
    acc = event_accumulator.EventAccumulator(str(runs[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for key in STEP_KEYS:
        got = [(e.step, e.value) for e in acc.Scalars(hf(key))]
        want = [(r["step"], float(np.float32(r[key]))) for r in steps]
        check(got == want, f"{name}: tensorboard {hf(key)} {got} != jsonl {want}")
    for key, tag in EVAL_KEYS.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(r["step"], float(np.float32(r[key]))) for r in evals]
        check(got == want, f"{name}: tensorboard {tag} {got} != jsonl {want}")
    for key in TOTALS:
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        check(got == [(totals["step"], float(np.float32(totals[key])))], f"{name}: tensorboard train/{key} {got} vs {totals[key]}")
    print(f"  tensorboard: {len(tags)} scalar tags, {len(steps)} steps and {len(evals)} evaluations, each once, equal to the jsonl (float32)")

    # The HParams tab: the plugin's own request handlers over TensorBoard's data provider.
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    context = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider))
    ctx = tb_context.RequestContext()
    exp = get_experiment.Handler(ctx, context, "", api_pb2.GetExperimentRequest()).run()
    hparams = {h.name for h in exp.hparam_infos}
    metrics = {m.name.tag for m in exp.metric_infos}
    for p in ["training_lora_r", "training_learning_rate", "training_lr_scheduler", "training_seed"]:
        check(p in hparams, f"{name}: hparams experiment lacks {p}: {sorted(hparams)}")
    check({"train/loss", "eval/loss"} <= metrics, f"{name}: hparams metrics {metrics}")
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=10,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING],
        col_params=[api_pb2.ColParams(hparam=h) for h in sorted(hparams)]
        + [api_pb2.ColParams(metric=api_pb2.MetricName(tag=t)) for t in sorted(metrics)],
    )
    groups = list_session_groups.Handler(ctx, context, "", request).run().session_groups
    check(len(groups) == 1 and len(groups[0].sessions) == 1, f"{name}: one HParams session, got {groups}")
    session = groups[0].sessions[0]
    check(session.status == api_pb2.STATUS_SUCCESS, f"{name}: session status {session.status}")
    hp = groups[0].hparams
    check(hp["training_lora_r"].number_value == 16 and hp["training_lr_scheduler"].string_value == "linear", f"{name}: session hparams {hp}")
    values = {m.name.tag: m.value for m in session.metric_values}
    check(values.get("train/loss") == float(np.float32(steps[-1]["loss"])), f"{name}: session train/loss {values}")
    print(f"  tensorboard hparams: {len(hparams)} hyperparameters, {len(metrics)} metrics, session {runs[0].name} ({api_pb2.Status.Name(session.status)})")


def check_mlflow(name, work, uri, experiment, steps, evals, totals):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    check(exp is not None, f"{name}: mlflow experiment {experiment} missing")
    runs = client.search_runs([exp.experiment_id])
    check(len(runs) == 1, f"{name}: one MLflow run, got {len(runs)}")
    run = runs[0]
    check(run.info.status == "FINISHED", f"{name}: mlflow run status {run.info.status}")
    params = run.data.params
    check(params.get("training_lora_r") == "16" and params.get("training_num_epochs") == "3", f"{name}: mlflow params {params}")
    check("MLFLOW_EXPERIMENT_NAME=" + experiment in params.get("training_envs", ""), f"{name}: training_envs {params.get('training_envs')}")
    tags = run.data.tags
    for t in ["lora.version", "lora.run_id", "lora.base_model", "lora.device"]:
        check(t in tags, f"{name}: mlflow tag {t} missing: {tags}")
    check(tags["lora.device"] == "cpu", f"{name}: device tag {tags['lora.device']}")
    # MLflow cannot delete points: a step an interrupted attempt had already sent keeps that
    # attempt's value (the resumed attempt does not send it twice). The engine's loss can differ
    # in the last bit between processes, so those points are compared to 1e-12 relative.
    rel = 0.0 if name == "ref" else 1e-12
    inexact = 0
    for key, rows in [(k, steps) for k in STEP_KEYS] + [(k, evals) for k in EVAL_KEYS]:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = [(r["step"], float(r[key])) for r in rows]
        same = len(got) == len(want) and all(gs == ws and math.isclose(g, w, rel_tol=rel, abs_tol=0.0) for (gs, g), (ws, w) in zip(got, want))
        check(same, f"{name}: mlflow {key} {got} != jsonl {want}")
        inexact += sum(g != w for (_, g), (_, w) in zip(got, want))
    for key in TOTALS:
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        check(got == [(totals["step"], float(totals[key]))], f"{name}: mlflow {key} {got} vs {totals[key]}")
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    check(names == ["loss_chart.html", "metrics.json", "run_manifest.json", "training_metrics.jsonl"], f"{name}: artifacts {names}")
    dest = pathlib.Path(client.download_artifacts(run.info.run_id, "loss_chart.html", str(work / "mlflow-download")))
    check(dest.read_bytes() == (work / "out/loss_chart.html").read_bytes(), f"{name}: the loss chart artifact differs")
    print(f"  mlflow: run {run.info.run_id} FINISHED, {len(params)} params, {len(STEP_KEYS) + len(EVAL_KEYS) + len(TOTALS)} metric histories with each step once equal to the jsonl ({inexact} value(s) from an interrupted attempt within 1e-12), {len(names)} artifacts")


def wandb_cli(*args):
    exe = pathlib.Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        fail(f"wandb {' '.join(args)} exited {out.returncode}: {out.stdout}{out.stderr}")
    return out.stdout + out.stderr


def check_wandb(name, work, steps, evals, totals, run_name):
    runs = sorted((work / "pvc/wandb").glob("offline-run-*"))
    check(len(runs) == 1, f"{name}: one W&B offline run, got {runs}")
    records = [json.loads(l) for l in wandb_cli("leet", "inspect", str(runs[0]), "--json").splitlines() if l.startswith("{")]
    kinds = [r["type"] for r in records]
    check(kinds[0] == "header" and kinds[1] == "run" and kinds[-1] == "exit", f"{name}: record kinds {kinds}")
    run = records[1]["run"]
    check(run["project"] == "lora-e2e" and run.get("display_name") == run_name, f"{name}: run record {run}")
    config = run["config"]["update"]
    check(config["training_lora_r"] == 16 and config["training_num_epochs"] == 3, f"{name}: config {config}")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    # One row per logged step, and one of step 0 for the eval before the first step.
    before = [0] if any(e["step"] == 0 for e in evals) else []
    check([h["_step"] for h in history] == before + [r["step"] for r in steps], f"{name}: history steps {[h['_step'] for h in history]}")
    by_step = {e["step"]: e for e in evals}
    for h in history[:len(before)]:
        for key, tag in EVAL_KEYS.items():
            check(h.get(tag) == by_step[0][key], f"{name}: wandb eval before the first step {tag}")
    for h, r in zip(history[len(before):], steps):
        for key in STEP_KEYS:
            check(h[hf(key)] == r[key], f"{name}: wandb step {r['step']} {hf(key)} {h[hf(key)]} != {r[key]}")
        e = by_step.get(r["step"])
        for key, tag in EVAL_KEYS.items():
            check((tag in h) == (e is not None) and (e is None or h[tag] == e[key]), f"{name}: wandb step {r['step']} {tag}")
    exit_record = records[-1]["exit"]
    check(exit_record.get("exit_code", 0) == 0, f"{name}: exit {exit_record}")
    out = wandb_cli("leet", "inspect", str(runs[0]), "--summary", "--json")
    state = json.loads(out[out.index("{"):])
    check(state["state"] == "finished" and state["exit_code"] == 0, f"{name}: wandb run state {state['state']} exit {state['exit_code']}")
    check(state["project"] == "lora-e2e" and state["name"] == (run_name or "") and state["step"] == steps[-1]["step"], f"{name}: wandb state {state}")
    summary = state["summary"]
    check(summary["train/loss"] == steps[-1]["loss"] and summary["eval/loss"] == evals[-1]["eval_loss"], f"{name}: wandb summary {summary}")
    for key in TOTALS:
        check(summary[f"train/{key}"] == totals[key], f"{name}: wandb summary train/{key} {summary.get('train/' + key)} != {totals[key]}")
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    check(sorted(files) == ["loss_chart.html", "metrics.json", "run_manifest.json", "training_metrics.jsonl"], f"{name}: files {files}")
    check((runs[0] / "files/loss_chart.html").read_bytes() == (work / "out/loss_chart.html").read_bytes(), f"{name}: W&B copy of the chart")
    dry = wandb_cli("sync", "--dry-run", str(runs[0]))
    check("Would sync 1 run" in dry and runs[0].name in dry, f"{name}: wandb sync --dry-run: {dry}")
    print(f"  wandb: {runs[0].name}: {len(records)} records read by wandb-core, {len(history)} history rows equal to the jsonl; `wandb sync` would upload it")


def main(root):
    root = pathlib.Path(root)
    fixture = json.loads((root / "fixture.json").read_text())
    for name, spec in fixture["runs"].items():
        work = root / name
        steps, evals, totals = rows_of(work)
        print(f"{name}: {len(steps)} logged steps, {len(evals)} evaluations")
        check(len(steps) > 0 and len(evals) > 0 and all(math.isfinite(r["loss"]) for r in steps), f"{name}: the run logged steps and evaluations")
        check_tensorboard(name, work, steps, evals, totals)
        check_mlflow(name, work, fixture["mlflow_uri"], spec["experiment"], steps, evals, totals)
        check_wandb(name, work, steps, evals, totals, run_name=name)
    outage = (root / "outage/stderr.txt").read_text()
    print("outage: the run finished with its MLflow server gone:")
    for line in outage.splitlines():
        if "warning: mlflow" in line:
            print("   ", line)
    print("trackers: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
