//! The `lora` binary's parameter commands, run for real in a temp dir: help, schema, dry runs,
//! exit codes and messages.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn lora(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(*v))).collect();
    lora_os(dir, args, &env)
}

/// [`lora`] with environment values that need not be UTF-8.
fn lora_os(dir: &Path, args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lora"));
    cmd.current_dir(dir).args(args);
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"LORA_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

/// `caf\xe9`: "café" in latin-1, not valid UTF-8.
fn latin1() -> OsString {
    OsStr::from_bytes(b"caf\xe9").to_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid chat record.
const CHAT: &str = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";

/// A Hugging Face hub cache (for `HF_HUB_CACHE`, with `HF_HUB_OFFLINE=1`) holding the default
/// base model and the KFP fixture's as a tiny model (random weights, the SmolLM2 tokenizer), so a
/// dry run resolves them and reads the data as the run would, without a network.
fn hub_cache() -> &'static Path {
    static CACHE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("lora-cli-{}-hub-cache", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/fixtures/smollm2");
        let cfg = lora_engine::ModelConfig { max_position_embeddings: 32768, ..lora_engine::ModelConfig::tiny_llama(49152) };
        for id in ["Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"] {
            let repo = root.join(format!("models--{}", id.replace('/', "--")));
            let snapshot = repo.join("snapshots/0123456789abcdef");
            lora_engine::testing::write_random_model(&snapshot, &cfg, lora_engine::DType::F32, 7).unwrap();
            for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
                std::fs::copy(fixture.join(f), snapshot.join(f)).unwrap();
            }
            std::fs::create_dir_all(repo.join("refs")).unwrap();
            std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
        }
        root
    })
}

/// The environment of a dry run that resolves its model from [`hub_cache`].
fn cached_hub() -> [(&'static str, &'static str); 2] {
    [("HF_HUB_CACHE", hub_cache().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn train_help_lists_every_parameter_with_its_default() {
    let dir = temp_dir("help");
    let out = lora(&dir, &["train", "--help"], &[]);
    let (help, _) = text(&out);
    assert!(out.status.success());
    for d in lora_params::PARAMS {
        let flag = format!("--{}", d.flag());
        let pos = help
            .find(&format!("{flag} "))
            .unwrap_or_else(|| panic!("{flag} missing from help"));
        let entry = &help[pos..help[pos..]
            .find("\n      --")
            .map_or(help.len(), |e| pos + e)];
        // Wrapped to the terminal width: compare words, not lines.
        let entry = entry.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            entry.contains(&format!("[default: {}]", d.default_display())),
            "{flag}: {entry}"
        );
        assert!(entry.contains(&d.env_var()), "{flag}: {entry}");
    }
    assert!(help.contains("ADDITION."), "additions are marked");
    for flag in [
        "--dataset",
        "--output-model",
        "--output-metrics",
        "--output-loss-chart",
        "--pvc-path",
        "--params",
        "--dry-run", "--json",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}

/// `-h` is a summary of the most used flags; `--help` is every parameter, wrapped to the
/// terminal's width (`COLUMNS` when the output is not a terminal), issue 15.
#[test]
fn short_help_summarises_and_long_help_wraps_to_the_terminal() {
    let dir = temp_dir("short-help");
    let out = lora(&dir, &["train", "-h"], &[("COLUMNS", "100")]);
    let (short, _) = text(&out);
    assert!(out.status.success());
    for name in lora::cli::SHORT_HELP_PARAMS {
        let flag = format!("--{}", name.replace('_', "-"));
        assert!(short.contains(&flag), "{flag} missing from -h:\n{short}");
    }
    for flag in ["--dataset", "--dry-run", "--output-model"] {
        assert!(short.contains(flag), "{flag} missing from -h");
    }
    assert!(!short.contains("--training-wandb-project") && !short.contains("--training-lora-bnb-4bit-quant-type"), "{short}");
    assert!(short.contains("`lora train --help` lists all"), "{short}");
    for columns in [100, 80] {
        let out = lora(&dir, &["train", "--help"], &[("COLUMNS", &columns.to_string())]);
        let (long, _) = text(&out);
        let widest = long.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest <= columns, "a --help line is {widest} wide at COLUMNS={columns}");
        assert!(long.lines().count() > short.lines().count() * 2);
    }
}

#[test]
fn json_schema_and_version() {
    let dir = temp_dir("schema");
    let out = lora(&dir, &["params", "--json-schema"], &[]);
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schema["properties"].as_object().unwrap().len(),
        lora_params::PARAMS.len()
    );
    assert_eq!(schema["additionalProperties"], json!(false));
    let out = lora(&dir, &["--version"], &[]);
    assert_eq!(
        text(&out).0.trim(),
        format!("lora {}", env!("CARGO_PKG_VERSION"))
    );
    let out = lora(&dir, &["params", "--markdown"], &[]);
    assert!(
        text(&out)
            .0
            .contains("| `training_lora_r` | `int` | `16` |")
    );
}

#[test]
fn train_dry_run_resolves_everything_and_writes_nothing() {
    let dir = temp_dir("dry");
    std::fs::write(dir.join("data.jsonl"), CHAT).unwrap();
    std::fs::write(
        dir.join("p.yaml"),
        "training_lora_r: 4\ntraining_num_epochs: 9\n",
    )
    .unwrap();
    let out = lora(
        &dir,
        &[
            "train",
            "--dry-run", "--json",
            "--dataset",
            "data.jsonl",
            "--params",
            "p.yaml",
            "--training-num-epochs",
            "2",
            "--training-envs",
            "A=1",
        ],
        &[("LORA_TRAINING_LORA_ALPHA", "64"), cached_hub()[0], cached_hub()[1]],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    let p = &plan["parameters"];
    assert_eq!(
        p["training_lora_r"],
        json!({"value": 4, "source": "params file p.yaml"})
    );
    assert_eq!(
        p["training_lora_alpha"],
        json!({"value": 64, "source": "environment variable LORA_TRAINING_LORA_ALPHA"})
    );
    assert_eq!(
        p["training_num_epochs"],
        json!({"value": 2, "source": "command line --training-num-epochs"})
    );
    assert_eq!(
        p["training_learning_rate"],
        json!({"value": 2e-4, "source": "training_hub default"})
    );
    assert_eq!(p["training_seed"]["value"], json!(3407));
    assert_eq!(
        p["training_lora_dropout"],
        json!({"value": 0.0, "source": "default"})
    );
    assert!(
        plan["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("3407"))
    );
    assert_eq!(
        plan["inputs"]["dataset"],
        json!({"from": "artifact", "path": "data.jsonl"})
    );
    assert_eq!(
        plan["inputs"]["base_model"],
        json!({"kind": "hub", "id": "Qwen/Qwen2.5-1.5B-Instruct"})
    );
    assert_eq!(plan["outputs"]["model"], json!("./lora-output/model"));
    assert_eq!(
        plan["workspace"]["checkpoints"],
        json!("./lora-output/workspace/checkpoints")
    );
    assert_eq!(
        plan["environment"],
        json!({"A": "1"}),
        "HF_HOME is only defaulted under KFP"
    );
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 2, "a dry run writes nothing: {entries:?}");
}

#[test]
fn bad_parameters_exit_2_naming_each_one() {
    let dir = temp_dir("bad");
    let out = lora(
        &dir,
        &[
            "train",
            "--dry-run", "--json",
            "--training-lora-r",
            "-1",
            "--training-lr-scheduler",
            "cosine_annealing",
            "--training-lora-bnb-4bit-quant-type",
            "nf4",
        ],
        &[("LORA_TRAINING_MAX_SEQ_LEN", "long")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("4 parameter problems"), "{stderr}");
    for want in [
        "training_lora_r = -1 (from command line --training-lora-r): must be an integer >= 1",
        "training_lr_scheduler",
        "training_lora_bnb_4bit_quant_type = \"nf4\" (from command line --training-lora-bnb-4bit-quant-type): applies only with training_lora_load_in_4bit=true",
        "training_max_seq_len = \"long\" (from environment variable LORA_TRAINING_MAX_SEQ_LEN)",
        "hint:",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
    assert_eq!(
        stderr.matches("training_lora_r = -1").count(),
        1,
        "each problem once:\n{stderr}"
    );
}

#[test]
fn missing_dataset_is_a_bad_input_and_nothing_is_created() {
    let dir = temp_dir("nodata");
    for args in [
        vec!["train", "--dry-run", "--json", "--dataset", "nope.jsonl"],
        vec!["train", "--dataset", "nope.jsonl"],
    ] {
        let out = lora(&dir, &args, &[]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("nope.jsonl") && stderr.contains("does not exist"),
            "{stderr}"
        );
    }
    let out = lora(&dir, &["train", "--dry-run", "--json"], &[]);
    assert!(
        text(&out).1.contains("no training dataset"),
        "{}",
        text(&out).1
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn kfp_dry_run_reads_the_executor_input_from_a_file() {
    let dir = temp_dir("kfp");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/kfp/executor_input.json");
    // The fixture's dataset is an s3 artifact (refused: lora does not download datasets): the
    // dry run, which reads the data as the run would, gets a local file in its place.
    let mut input: Value = serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    std::fs::write(dir.join("train.jsonl"), CHAT).unwrap();
    input["inputs"]["artifacts"]["dataset"]["artifacts"][0] = json!({
        "name": "11", "type": {"schemaTitle": "system.Dataset"}, "metadata": {},
        "uri": dir.join("train.jsonl").display().to_string(),
    });
    std::fs::write(dir.join("input.json"), input.to_string()).unwrap();
    let arg = format!("@{}", dir.join("input.json").display());
    let out = lora(&dir, &["kfp", "--dry-run", "--json", "--executor-input", &arg], &cached_hub());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["command"], json!("kfp"));
    assert_eq!(
        plan["parameters"]["training_lora_r"],
        json!({"value": 8, "source": "KFP executor input"})
    );
    assert_eq!(plan["inputs"]["pvc_path"], json!("/kfp-workspace"));
    assert_eq!(
        plan["environment"]["HF_HOME"],
        json!("/kfp-workspace/.cache/huggingface")
    );
    // KFP wins over the environment
    let out = lora(
        &dir,
        &["kfp", "--dry-run", "--json", "--executor-input", &arg],
        &[
            ("LORA_TRAINING_LORA_R", "32"),
            ("LORA_TRAINING_TF32", "true"),
            cached_hub()[0],
            cached_hub()[1],
        ],
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["parameters"]["training_lora_r"]["value"], json!(8));
    assert_eq!(plan["parameters"]["training_tf32"]["value"], json!(true));
}

#[test]
fn kfp_bad_executor_input_exits_2() {
    let dir = temp_dir("kfpbad");
    let out = lora(&dir, &["kfp", "--executor-input", "{not json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("not valid JSON"));
    let out = lora(
        &dir,
        &[
            "kfp",
            "--executor-input",
            r#"{"inputs": {"parameterValues": {"pvc_path": "/w", "training_lora_r": "8"}}}"#,
        ],
        &[],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("training_lora_r = \"8\" (from KFP executor input): expected an integer"),
        "{stderr}"
    );
    let out = lora(
        &dir,
        &[
            "kfp",
            "--executor-input",
            r#"{"inputs": {"parameterValues": {"pvc_path": "/w"}}}"#,
        ],
        &[],
    );
    assert!(
        text(&out).1.contains("outputs.artifacts.output_model"),
        "{}",
        text(&out).1
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn component_command_prints_the_spec() {
    let dir = temp_dir("comp");
    let out = lora(&dir, &["component"], &[]);
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/kfp/lora.component.yaml"),
    )
    .unwrap();
    assert_eq!(text(&out).0, want);
}

#[test]
fn readme_parameter_table_is_the_generated_one() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme
        .find("<!-- params:begin -->\n")
        .expect("README has the params:begin marker")
        + "<!-- params:begin -->\n".len();
    let end = readme
        .find("<!-- params:end -->")
        .expect("README has the params:end marker");
    assert_eq!(
        &readme[start..end],
        lora_params::markdown_table(),
        "README's parameter table is stale: paste `lora params --markdown` between the markers"
    );
}

#[test]
fn dry_run_checks_a_local_model_path_and_hides_secret_env_values() {
    let dir = temp_dir("model");
    std::fs::write(dir.join("d.jsonl"), CHAT).unwrap();
    let out = lora(
        &dir,
        &[
            "train",
            "--dry-run", "--json",
            "--dataset",
            "d.jsonl",
            "--training-base-model",
            "./models/missing",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out)
            .1
            .contains("training_base_model = \"./models/missing\": no such model folder"),
        "{}",
        text(&out).1
    );
    // A model folder (the cached tiny model's files).
    std::fs::create_dir(dir.join("m")).unwrap();
    let snapshot = hub_cache().join("models--Qwen--Qwen2.5-1.5B-Instruct/snapshots/0123456789abcdef");
    for e in std::fs::read_dir(&snapshot).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("m").join(e.file_name())).unwrap();
    }
    let out = lora(
        &dir,
        &[
            "train",
            "--dry-run", "--json",
            "--dataset",
            "d.jsonl",
            "--training-base-model",
            "./m",
            "--training-envs",
            "HF_TOKEN=hf_abc,HF_HOME=/c",
        ],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("hf_abc"), "the token is not printed");
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        plan["environment"],
        json!({"HF_TOKEN": "<hidden>", "HF_HOME": "/c"})
    );
    assert_eq!(plan["inputs"]["base_model"]["kind"], json!("local"));
}

/// Issue 11 item 9: one latin-1 byte in any environment variable made `lora` panic (exit 101),
/// even in a variable it never reads. Such a variable is ignored.
#[test]
fn a_non_utf8_variable_lora_does_not_read_is_ignored() {
    let dir = temp_dir("env-latin1");
    std::fs::write(dir.join("data.jsonl"), CHAT).unwrap();
    let args = ["train", "--dry-run", "--json", "--dataset", "data.jsonl"];
    let [(k1, v1), (k2, v2)] = cached_hub();
    let out = lora_os(&dir, &args, &[("SOME_VAR", &latin1()), (k1, OsStr::new(v1)), (k2, OsStr::new(v2))]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["parameters"]["training_lora_r"]["value"], 16);
    for cmd in [&["params", "--markdown"][..], &["component"][..]] {
        let out = lora_os(&dir, cmd, &[("SOME_VAR", &latin1())]);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", text(&out).1);
    }
}

/// Issue 11 item 9: a non-UTF-8 value of a variable lora reads (a parameter's `LORA_*`, the
/// Hugging Face cache's `HF_HOME`) is a bad input naming it (exit 2), all of them at once.
#[test]
fn a_non_utf8_value_of_a_variable_lora_reads_is_a_bad_input_naming_it() {
    let dir = temp_dir("env-latin1-read");
    std::fs::write(dir.join("data.jsonl"), CHAT).unwrap();
    let args = ["train", "--dry-run", "--json", "--dataset", "data.jsonl"];
    for var in ["LORA_TRAINING_LORA_R", "HF_HOME"] {
        let out = lora_os(&dir, &args, &[(var, &latin1())]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(stderr.contains(&format!("{var}=\"caf\u{FFFD}\"")) && stderr.contains("not valid UTF-8"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = lora_os(&dir, &args, &[("LORA_TRAINING_LORA_R", &latin1()), ("HF_HOME", &latin1()), ("SOME_VAR", &latin1())]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("LORA_TRAINING_LORA_R=") && stderr.contains("HF_HOME=") && !stderr.contains("SOME_VAR"), "{stderr}");
}

/// Issue 11 item 14: an unknown or bad `training_lr_scheduler_kwargs` entry failed the run after
/// loading the model and data (exit 1, "rerun resumes"); now a parameter problem, exit 2, before
/// anything (here in a dry run, which loads nothing).
#[test]
fn bad_scheduler_kwargs_are_parameter_problems() {
    let dir = temp_dir("kwargs");
    std::fs::write(dir.join("data.jsonl"), CHAT).unwrap();
    for (kwargs, scheduler, needles) in [
        (r#"{"num_cycle": 2}"#, "cosine", &["training_lr_scheduler_kwargs = \"{\\\"num_cycle\\\": 2}\" (from command line", "`num_cycle` is not a setting of the `cosine` schedule (it takes: num_cycles)"][..]),
        (r#"{"power": 2}"#, "linear", &["`power` is not a setting of the `linear` schedule (it takes: nothing)"][..]),
        (r#"{"lr_end": "soon"}"#, "polynomial", &["`lr_end` = \"soon\" for `polynomial`: expected a finite number"][..]),
    ] {
        let out = lora(&dir, &["train", "--dry-run", "--json", "--dataset", "data.jsonl", "--training-lr-scheduler", scheduler, "--training-lr-scheduler-kwargs", kwargs], &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stdout.is_empty() && stderr.contains("1 parameter problem:") && stderr.contains("hint: `lora train --help`"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "missing `{n}` in {stderr}");
        }
    }
    let out = lora(&dir, &["train", "--dry-run", "--json", "--dataset", "data.jsonl", "--training-lr-scheduler", "cosine", "--training-lr-scheduler-kwargs", r#"{"num_cycles": 2}"#], &cached_hub());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
}

/// Issue 11 item 10: every output path is checked before anything runs, in a dry run and a real
/// one alike; an existing file where a folder goes is refused (it was silently moved aside and
/// deleted), so is a folder where a file goes, a parent that is a file, and an output folder that
/// holds the dataset. Every problem is named at once and nothing is created or changed.
#[test]
fn output_paths_are_checked_before_anything_runs() {
    let dir = temp_dir("outpaths");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/d.jsonl"), "{\"messages\": []}\n").unwrap();
    std::fs::write(dir.join("taken"), "keep me").unwrap();
    std::fs::create_dir_all(dir.join("metrics_dir")).unwrap();
    let before: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    let cases: [(&[&str], &str); 6] = [
        (&["--output-model", "taken"], "output_model taken: is an existing file, and a folder goes here"),
        (&["--output-metrics", "metrics_dir"], "output_metrics metrics_dir: is an existing folder, and a file goes here"),
        (&["--output-loss-chart", "taken/chart.html"], "output_loss_chart taken/chart.html: taken is not a folder"),
        (&["--output-model", "data"], "output_model data: holds the dataset"),
        (&["--output-metrics", "out/m.json", "--output-loss-chart", "out/m.json"], "output_loss_chart out/m.json: is the same path as output_metrics"),
        (&["--output-model", "ws/final_model/m"], "<pvc_path>/final_model ws/final_model: holds output_model"),
    ];
    for (flags, needle) in cases {
        for dry in [true, false] {
            let mut args = vec!["train", "--dataset", "data/d.jsonl", "--pvc-path", "ws"];
            if dry {
                args.push("--dry-run");
                args.push("--json");
            }
            args.extend_from_slice(flags);
            let out = lora(&dir, &args, &[]);
            let (stdout, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(2), "{flags:?} dry={dry}: {stderr}");
            assert!(stdout.is_empty() && stderr.contains(needle), "{flags:?} dry={dry}: missing `{needle}` in {stderr}");
            assert!(stderr.contains("hint: `--dry-run`"), "{stderr}");
        }
    }
    // All at once.
    let out = lora(&dir, &["train", "--dry-run", "--json", "--dataset", "data/d.jsonl", "--output-model", "taken", "--output-metrics", "metrics_dir"], &[]);
    assert!(text(&out).1.contains("2 output path problems:"), "{}", text(&out).1);
    // Nothing was created, renamed or changed.
    let after: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after);
    assert_eq!(std::fs::read_to_string(dir.join("taken")).unwrap(), "keep me");
}

/// Issue 11 item 10: a folder the run cannot write to is found before anything runs. As root
/// (who may write anywhere) the run is started as `nobody`.
#[test]
fn an_unwritable_output_folder_is_refused_before_anything_runs() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let dir = temp_dir("unwritable");
    std::fs::write(dir.join("d.jsonl"), "{\"messages\": []}\n").unwrap();
    let locked = dir.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::set_permissions(dir.join("ws"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let root = std::fs::metadata(dir.join("d.jsonl")).unwrap().uid() == 0;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lora"));
    cmd.current_dir(&dir)
        .args(["train", "--dry-run", "--json", "--dataset", "d.jsonl", "--pvc-path", "ws", "--output-model", "locked/model", "--output-metrics", "locked/m.json"])
        .env_remove("HF_HOME");
    if root {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for name in ["output_model locked/model", "output_metrics locked/m.json"] {
        assert!(stderr.contains(&format!("{name}: locked is not writable")), "missing {name}: {stderr}");
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
}
