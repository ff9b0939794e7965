//! Validation: every bad parameter set is refused with a message naming the parameter, all
//! problems at once; the precedence of sources; params-file and environment errors.

use std::io::Write;

use lora_params::{Loader, PARAMS, Source};
use serde_json::{Value, json};

/// Feeds `set` (parameter name → JSON value, as a params file or KFP would) and returns the error text.
fn refuse(set: &[(&str, Value)]) -> String {
    let mut l = Loader::new();
    let map: serde_json::Map<String, Value> = set
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    l.apply_kfp(&map);
    match l.finish() {
        Ok(r) => panic!("accepted a bad set {set:?}: {:?}", r.params_as_used()),
        Err(e) => e.to_string(),
    }
}

/// Feeds `set` as [`refuse`] does and returns the resolved parameters.
fn resolve(set: &[(&str, Value)]) -> Result<lora_params::ResolvedParams, String> {
    let mut l = Loader::new();
    let map: serde_json::Map<String, Value> = set.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    l.apply_kfp(&map);
    l.finish().map_err(|e| e.to_string())
}

/// A bad set, the parameter its message must name, and a fragment of the reason.
type Case = (Vec<(&'static str, Value)>, &'static str, &'static str);

#[test]
fn bad_parameter_sets_are_refused_naming_the_parameter() {
    let cases: Vec<Case> = vec![
        (
            vec![("training_effective_batch_size", json!(0))],
            "training_effective_batch_size",
            ">= 1",
        ),
        (
            vec![("training_effective_batch_size", json!(-4))],
            "training_effective_batch_size",
            ">= 1",
        ),
        (
            vec![("training_max_tokens_per_gpu", json!(0))],
            "training_max_tokens_per_gpu",
            ">= 1",
        ),
        (
            vec![("training_max_seq_len", json!(-1))],
            "training_max_seq_len",
            ">= 1",
        ),
        (
            vec![
                ("training_max_tokens_per_gpu", json!(1000)),
                ("training_max_seq_len", json!(2048)),
            ],
            "training_max_tokens_per_gpu",
            "training_max_seq_len",
        ),
        (
            vec![("training_learning_rate", json!(0.0))],
            "training_learning_rate",
            "> 0",
        ),
        (
            vec![("training_learning_rate", json!(-1e-4))],
            "training_learning_rate",
            "> 0",
        ),
        (
            vec![("training_lr_warmup_steps", json!(-1))],
            "training_lr_warmup_steps",
            ">= 0",
        ),
        (
            vec![("training_num_epochs", json!(0))],
            "training_num_epochs",
            ">= 1",
        ),
        (
            vec![("training_lr_scheduler", json!("cosine_annealing"))],
            "training_lr_scheduler",
            "cosine_with_restarts",
        ),
        (
            vec![("training_envs", json!("HF_HOME=/x,BROKEN"))],
            "training_envs",
            "KEY=VAL",
        ),
        (
            vec![("training_envs", json!("=value"))],
            "training_envs",
            "empty key",
        ),
        (
            vec![("training_envs", json!("1BAD=x"))],
            "training_envs",
            "environment variable name",
        ),
        (
            vec![("training_metadata_labels", json!("team"))],
            "training_metadata_labels",
            "KEY=VAL",
        ),
        (
            vec![("training_metadata_labels", json!("team=ml ops"))],
            "training_metadata_labels",
            "label value",
        ),
        (
            vec![("training_metadata_labels", json!("-team=ml"))],
            "training_metadata_labels",
            "key",
        ),
        (
            vec![("training_metadata_labels", json!("Example.COM/team=ml"))],
            "training_metadata_labels",
            "DNS subdomain",
        ),
        (
            vec![("training_metadata_annotations", json!("a/b/c=1"))],
            "training_metadata_annotations",
            "DNS subdomain",
        ),
        (
            vec![("training_resource_memory_per_worker", json!("32Gb"))],
            "training_resource_memory_per_worker",
            "memory quantity",
        ),
        (
            vec![("training_resource_memory_per_worker", json!("0Gi"))],
            "training_resource_memory_per_worker",
            "more than zero",
        ),
        (
            vec![("training_resource_cpu_per_worker", json!("four"))],
            "training_resource_cpu_per_worker",
            "CPU quantity",
        ),
        (
            vec![("training_resource_cpu_per_worker", json!("500x"))],
            "training_resource_cpu_per_worker",
            "CPU quantity",
        ),
        (
            vec![("training_resource_num_procs_per_worker", json!("many"))],
            "training_resource_num_procs_per_worker",
            "auto or an integer",
        ),
        (
            vec![("training_resource_num_procs_per_worker", json!("0"))],
            "training_resource_num_procs_per_worker",
            "auto or an integer",
        ),
        (
            vec![("training_resource_gpu_per_worker", json!(-1))],
            "training_resource_gpu_per_worker",
            ">= 0",
        ),
        (
            vec![("training_resource_num_workers", json!(0))],
            "training_resource_num_workers",
            ">= 1",
        ),
        (
            vec![("training_lora_r", json!(0))],
            "training_lora_r",
            ">= 1",
        ),
        (
            vec![("training_lora_alpha", json!(0))],
            "training_lora_alpha",
            ">= 1",
        ),
        (
            vec![("training_lora_dropout", json!(1.0))],
            "training_lora_dropout",
            "[0, 1)",
        ),
        (
            vec![("training_lora_dropout", json!(-0.1))],
            "training_lora_dropout",
            "[0, 1)",
        ),
        (
            vec![("training_lora_target_modules", json!("q_proj,v proj"))],
            "training_lora_target_modules",
            "module name",
        ),
        (
            vec![
                ("training_lora_load_in_4bit", json!(true)),
                ("training_lora_load_in_8bit", json!(true)),
            ],
            "training_lora_load_in_8bit",
            "choose one",
        ),
        (
            vec![
                ("training_fp16", json!(true)),
                ("training_bf16", json!(true)),
            ],
            "training_bf16",
            "choose one",
        ),
        (
            vec![("training_dataset_type", json!("sharegpt"))],
            "training_dataset_type",
            "chat_template, alpaca, passthrough",
        ),
        (
            vec![("training_field_messages", json!(""))],
            "training_field_messages",
            "non-empty",
        ),
        (
            vec![("training_runtime", json!("unsloth"))],
            "training_runtime",
            "training-hub, lora",
        ),
        (
            vec![("training_micro_batch_size", json!(0))],
            "training_micro_batch_size",
            ">= 1",
        ),
        (
            vec![("training_gradient_accumulation_steps", json!(-2))],
            "training_gradient_accumulation_steps",
            ">= 1",
        ),
        (
            vec![("training_save_steps", json!(0))],
            "training_save_steps",
            ">= 1",
        ),
        (
            vec![("training_eval_steps", json!(0))],
            "training_eval_steps",
            ">= 1",
        ),
        (
            vec![("training_logging_steps", json!(0))],
            "training_logging_steps",
            ">= 1",
        ),
        (
            vec![("training_save_total_limit", json!(0))],
            "training_save_total_limit",
            ">= 1",
        ),
        (vec![("training_seed", json!(-7))], "training_seed", ">= 0"),
        (
            vec![("training_data_output_dir", json!(" "))],
            "training_data_output_dir",
            "directory",
        ),
        (
            vec![("training_tensorboard_log_dir", json!(""))],
            "training_tensorboard_log_dir",
            "directory path",
        ),
        (
            vec![("training_wandb_project", json!("team/proj"))],
            "training_wandb_project",
            "must not contain '/'",
        ),
        (
            vec![("training_wandb_entity", json!(" "))],
            "training_wandb_entity",
            "non-empty",
        ),
        (
            vec![("training_wandb_run_name", json!(""))],
            "training_wandb_run_name",
            "non-empty",
        ),
        (
            vec![("training_base_model", json!(""))],
            "training_base_model",
            "model",
        ),
        (
            vec![("training_bad_records", json!("ignore"))],
            "training_bad_records",
            "error, skip",
        ),
        (
            vec![("training_validation_split", json!(1.0))],
            "training_validation_split",
            "[0, 1)",
        ),
        (
            vec![("training_long_sample_policy", json!("wrap"))],
            "training_long_sample_policy",
            "drop, truncate, error",
        ),
        (
            vec![("training_max_steps", json!(0))],
            "training_max_steps",
            ">= 1",
        ),
        (
            vec![("training_weight_decay", json!(-0.1))],
            "training_weight_decay",
            ">= 0",
        ),
        (
            vec![("training_max_grad_norm", json!(0.0))],
            "training_max_grad_norm",
            "> 0",
        ),
        (
            vec![("training_device", json!("tpu"))],
            "training_device",
            "auto, cpu, cuda",
        ),
        (
            vec![("training_resume", json!("always"))],
            "training_resume",
            "auto, never",
        ),
        (
            vec![("training_plugins", json!("optimizer=/x.wasm"))],
            "training_plugins",
            "plugin kind",
        ),
        (
            vec![(
                "training_plugins",
                json!("scheduler=a.wasm,scheduler=b.wasm"),
            )],
            "training_plugins",
            "more than one scheduler",
        ),
        (
            vec![("training_plugin_config", json!("[1,2]"))],
            "training_plugin_config",
            "JSON object",
        ),
        (
            vec![("training_lr_scheduler_kwargs", json!("{num_cycles: 2}"))],
            "training_lr_scheduler_kwargs",
            "not valid JSON",
        ),
        // wrong types, as a params file or KFP would send them
        (
            vec![("training_lora_r", json!("16"))],
            "training_lora_r",
            "expected an integer",
        ),
        (
            vec![("training_lora_r", json!(16.5))],
            "training_lora_r",
            "expected an integer",
        ),
        (
            vec![("training_learning_rate", json!("fast"))],
            "training_learning_rate",
            "expected a number",
        ),
        (
            vec![("training_bf16", json!("yes"))],
            "training_bf16",
            "expected true or false",
        ),
        (
            vec![("kubernetes_config", json!([1]))],
            "kubernetes_config",
            "JSON object",
        ),
        // 4-bit settings: only with 4-bit, and only their values
        (
            vec![("training_lora_bnb_4bit_quant_type", json!("nf4"))],
            "training_lora_bnb_4bit_quant_type",
            "applies only with training_lora_load_in_4bit=true",
        ),
        (
            vec![("training_lora_bnb_4bit_compute_dtype", json!("bfloat16"))],
            "training_lora_bnb_4bit_compute_dtype",
            "applies only with training_lora_load_in_4bit=true",
        ),
        (
            vec![("training_lora_bnb_4bit_use_double_quant", json!(false))],
            "training_lora_bnb_4bit_use_double_quant",
            "applies only with training_lora_load_in_4bit=true",
        ),
        (
            vec![
                ("training_lora_load_in_8bit", json!(true)),
                ("training_lora_bnb_4bit_quant_type", json!("nf4")),
            ],
            "training_lora_bnb_4bit_quant_type",
            "8-bit has no such setting",
        ),
        (
            vec![
                ("training_lora_load_in_4bit", json!(false)),
                ("training_lora_bnb_4bit_use_double_quant", json!(true)),
            ],
            "training_lora_bnb_4bit_use_double_quant",
            "applies only with training_lora_load_in_4bit=true",
        ),
        (
            vec![
                ("training_lora_load_in_4bit", json!(true)),
                ("training_lora_bnb_4bit_quant_type", json!("NF4")),
            ],
            "training_lora_bnb_4bit_quant_type",
            "must be one of: nf4, fp4",
        ),
        (
            vec![
                ("training_lora_load_in_4bit", json!(true)),
                ("training_lora_bnb_4bit_compute_dtype", json!("bf16")),
            ],
            "training_lora_bnb_4bit_compute_dtype",
            "must be one of: bfloat16, float16, float32",
        ),
        // features not built: refused by name with the reason
        (
            vec![("training_resource_num_workers", json!(2))],
            "training_resource_num_workers",
            "a TrainJob that `lora kfp` launches",
        ),
        (
            vec![("training_resource_num_procs_per_worker", json!("4"))],
            "training_resource_num_procs_per_worker",
            "not built",
        ),
        (
            vec![("training_enable_model_splitting", json!(true))],
            "training_enable_model_splitting",
            "not built",
        ),
        (
            vec![("training_fp16", json!(true))],
            "training_fp16",
            "bf16",
        ),
        // unknown names
        (
            vec![("training_lora_rank", json!(8))],
            "training_lora_rank",
            "did you mean `training_lora_r`",
        ),
    ];
    assert!(cases.len() >= 30);
    for (set, param, reason) in &cases {
        let msg = refuse(set);
        assert!(
            msg.contains(param),
            "message for {set:?} does not name {param}:\n{msg}"
        );
        assert!(
            msg.contains(reason),
            "message for {set:?} does not say {reason:?}:\n{msg}"
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let msg = refuse(&[
        ("training_lora_r", json!(0)),
        ("training_lr_scheduler", json!("nope")),
        ("training_envs", json!("A")),
        ("training_lora_bnb_4bit_quant_type", json!("nf4")),
        ("training_lora_dropuot", json!(0.1)),
    ]);
    assert!(msg.starts_with("5 parameter problems"), "{msg}");
    for p in [
        "training_lora_r",
        "training_lr_scheduler",
        "training_envs",
        "training_lora_bnb_4bit_quant_type",
        "did you mean `training_lora_dropout`",
    ] {
        assert!(msg.contains(p), "missing {p} in:\n{msg}");
    }
}

#[test]
fn defaults_resolve_to_training_hub_values() {
    let r = Loader::new().finish().expect("defaults are valid");
    assert_eq!(r.learning_rate, 2e-4);
    assert_eq!(r.num_epochs, 3);
    assert_eq!(r.lr_warmup_steps, 10);
    assert_eq!(r.lr_scheduler, "linear");
    assert!(r.sample_packing && r.bf16 && r.flash_attention);
    assert!(
        !r.tf32 && !r.use_rslora && !r.use_dora && !r.checkpoint_at_epoch && !r.train_on_inputs
    );
    assert_eq!(r.seed, 3407);
    assert!(r.notes.iter().any(|n| n.contains("3407")), "{:?}", r.notes);
    assert_eq!(
        (
            r.logging_steps,
            r.save_steps,
            r.eval_steps,
            r.save_total_limit
        ),
        (1, 500, 500, 3)
    );
    // micro batch = effective_batch_size // (grad_accum * world_size)
    assert_eq!(
        (r.micro_batch_size, r.gradient_accumulation_steps),
        (128, 1)
    );
    assert_eq!(r.dataset_type, "chat_template");
    assert_eq!(
        (
            r.field_messages.as_str(),
            r.field_instruction.as_str(),
            r.field_input.as_str(),
            r.field_output.as_str()
        ),
        ("messages", "instruction", "input", "output")
    );
    assert_eq!((r.weight_decay, r.max_grad_norm), (0.01, 0.3));
    assert_eq!(r.resource_memory_per_worker_bytes, 32.0 * 1024f64.powi(3));
    assert_eq!(r.sources["training_learning_rate"], Source::Resolved);
    assert_eq!(r.sources["training_lora_r"], Source::Default);
    // every parameter is in the resolved JSON
    let json = r.to_json();
    for d in PARAMS {
        assert!(
            json.contains_key(d.name),
            "{} missing from the resolved JSON",
            d.name
        );
    }
}

#[test]
fn micro_batch_follows_gradient_accumulation() {
    let mut l = Loader::new();
    l.apply_cli("training_effective_batch_size", "64")
        .apply_cli("training_gradient_accumulation_steps", "4");
    let r = l.finish().unwrap();
    assert_eq!((r.micro_batch_size, r.gradient_accumulation_steps), (16, 4));
    let mut l = Loader::new();
    l.apply_cli("training_effective_batch_size", "64")
        .apply_cli("training_micro_batch_size", "8");
    let r = l.finish().unwrap();
    assert_eq!((r.micro_batch_size, r.gradient_accumulation_steps), (8, 8));
}

/// Issue 17: the reference's arithmetic divides by the real number of data-parallel processes,
/// and a process count that disagrees with the processes mpirun started is refused by name.
#[test]
fn micro_batch_divides_by_the_real_world_size_and_the_process_count_must_match_it() {
    let mut l = Loader::new();
    l.apply_cli("training_effective_batch_size", "64").apply_cli("training_gradient_accumulation_steps", "4");
    let two = lora_params::resolve_for_world(l.params().clone(), Default::default(), 2).unwrap();
    assert_eq!((two.micro_batch_size, two.gradient_accumulation_steps, two.world_size), (8, 4, 2));
    let mut l = Loader::new();
    l.apply_cli("training_resource_num_procs_per_worker", "3");
    let e = l.finish().unwrap_err().to_string();
    assert!(e.contains("training_resource_num_procs_per_worker") && e.contains("not available"), "{e}");
    let mut l = Loader::new();
    l.apply_cli("training_resource_num_procs_per_worker", "2");
    let params = l.params().clone();
    let ok = lora_params::resolve_for_world(params.clone(), Default::default(), 2).unwrap();
    assert_eq!(ok.world_size, 2);
    let e = lora_params::resolve_for_world(params, Default::default(), 3).unwrap_err().to_string();
    assert!(e.contains("training_resource_num_procs_per_worker") && e.contains("started as 3 processes"), "{e}");
}

/// Issue 11 item 14: micro batch x accumulation x world size that cannot make the effective batch
/// size was accepted with a note; now refused, naming all three.
#[test]
fn batch_sizes_whose_product_is_not_the_effective_batch_size_are_refused_naming_all_three() {
    for (set, blamed) in [
        (vec![("training_effective_batch_size", json!(3)), ("training_gradient_accumulation_steps", json!(4))], "training_gradient_accumulation_steps"),
        (vec![("training_effective_batch_size", json!(100)), ("training_micro_batch_size", json!(8))], "training_micro_batch_size"),
        (
            vec![("training_effective_batch_size", json!(64)), ("training_micro_batch_size", json!(8)), ("training_gradient_accumulation_steps", json!(4))],
            "training_micro_batch_size",
        ),
    ] {
        let err = refuse(&set);
        assert!(err.starts_with("1 parameter problem:") && err.contains(&format!("- {blamed} = ")), "{err}");
        for name in ["training_micro_batch_size", "training_gradient_accumulation_steps", "world size", "training_effective_batch_size"] {
            assert!(err.contains(name), "{name} not named: {err}");
        }
    }
    let err = refuse(&[("training_effective_batch_size", json!(100)), ("training_micro_batch_size", json!(8))]);
    assert!(err.contains("training_micro_batch_size 8 x training_gradient_accumulation_steps 12 (derived) x world size 1 = 96 samples"), "{err}");
    // A product that fits is accepted whichever of the two is given.
    let mut l = Loader::new();
    l.apply_cli("training_effective_batch_size", "64")
        .apply_cli("training_micro_batch_size", "16")
        .apply_cli("training_gradient_accumulation_steps", "4");
    assert_eq!(l.finish().map(|r| (r.micro_batch_size, r.gradient_accumulation_steps)), Ok((16, 4)));
    // An invalid size is reported once, as itself, not again as a product mismatch.
    let err = refuse(&[("training_effective_batch_size", json!(64)), ("training_micro_batch_size", json!(0))]);
    assert!(err.starts_with("1 parameter problem:") && err.contains("must be an integer >= 1"), "{err}");
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-params-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

#[test]
fn precedence_is_defaults_file_env_cli_kfp() {
    let file = temp_file(
        "p.yaml",
        "training_lora_r: 4\ntraining_lora_alpha: 8\ntraining_num_epochs: 5\ntraining_seed: 1\ntraining_learning_rate: 1.0e-3\n",
    );
    let mut l = Loader::new();
    l.apply_file(&file)
        .apply_env([
            ("LORA_TRAINING_LORA_ALPHA", "16"),
            ("LORA_TRAINING_NUM_EPOCHS", "6"),
            ("LORA_TRAINING_SEED", "2"),
            ("HOME", "/root"),
        ])
        .apply_cli("training_num_epochs", "7")
        .apply_cli("training_seed", "3");
    let mut kfp = serde_json::Map::new();
    kfp.insert("training_seed".into(), json!(4.0));
    l.apply_kfp(&kfp);
    let r = l.finish().unwrap();
    assert_eq!(r.lora_r, 4, "file over default");
    assert_eq!(r.lora_alpha, 16, "env over file");
    assert_eq!(r.num_epochs, 7, "cli over env");
    assert_eq!(r.seed, 4, "kfp over cli");
    assert_eq!(r.learning_rate, 1e-3);
    assert_eq!(r.lora_dropout, 0.0, "default");
    assert_eq!(
        r.sources["training_lora_r"],
        Source::File { path: file.clone() }
    );
    assert_eq!(
        r.sources["training_lora_alpha"],
        Source::Env {
            var: "LORA_TRAINING_LORA_ALPHA".into()
        }
    );
    assert_eq!(
        r.sources["training_num_epochs"],
        Source::Cli {
            flag: "--training-num-epochs".into()
        }
    );
    assert_eq!(r.sources["training_seed"], Source::Kfp);
    assert_eq!(r.sources["training_lora_dropout"], Source::Default);
}

#[test]
fn kfp_null_means_unset_and_integers_may_be_doubles() {
    let mut kfp = serde_json::Map::new();
    kfp.insert("training_learning_rate".into(), Value::Null);
    kfp.insert("training_effective_batch_size".into(), json!(32.0));
    let mut l = Loader::new();
    l.apply_cli("training_learning_rate", "0.5").apply_kfp(&kfp);
    let r = l.finish().unwrap();
    assert_eq!(
        r.learning_rate, 2e-4,
        "null from KFP unsets, so the training_hub default applies"
    );
    assert_eq!(r.effective_batch_size, 32);
}

#[test]
fn params_file_unknown_key_suggests_the_name_and_names_the_file() {
    let file = temp_file(
        "bad.json",
        r#"{"training_lora_alpah": 8, "training_num_epochs": "three"}"#,
    );
    let mut l = Loader::new();
    l.apply_file(&file);
    let msg = l.finish().unwrap_err().to_string();
    assert!(
        msg.contains("training_lora_alpah") && msg.contains("did you mean `training_lora_alpha`"),
        "{msg}"
    );
    assert!(
        msg.contains("training_num_epochs") && msg.contains("expected an integer"),
        "{msg}"
    );
    assert!(
        msg.contains(&file.display().to_string()),
        "the file is named: {msg}"
    );
}

#[test]
fn params_file_that_is_not_an_object_or_not_parseable_is_refused() {
    for (name, text, want) in [
        ("list.yaml", "- 1\n- 2\n", "must be an object"),
        ("broken.json", "{\"training_lora_r\": ", "not valid JSON"),
        ("broken.yaml", "training_lora_r: [1\n", "not valid YAML"),
    ] {
        let file = temp_file(name, text);
        let mut l = Loader::new();
        l.apply_file(&file);
        let msg = l.finish().unwrap_err().to_string();
        assert!(
            msg.contains("--params") && msg.contains(want),
            "{name}: {msg}"
        );
    }
    let mut l = Loader::new();
    l.apply_file(std::path::Path::new("/nonexistent/params.yaml"));
    assert!(
        l.finish()
            .unwrap_err()
            .to_string()
            .contains("cannot read the params file")
    );
}

#[test]
fn env_wrong_type_and_unknown_names_the_variable() {
    let mut l = Loader::new();
    l.apply_env([
        ("LORA_TRAINING_LORA_R", "sixteen"),
        ("LORA_TRAINING_LORA_RR", "1"),
        ("LORA_BLESS", "1"),
    ]);
    let msg = l.finish().unwrap_err().to_string();
    assert!(
        msg.contains("environment variable LORA_TRAINING_LORA_R")
            && msg.contains("expected an integer"),
        "{msg}"
    );
    assert!(
        msg.contains("training_lora_rr") && msg.contains("did you mean `training_lora_r`"),
        "{msg}"
    );
    assert!(
        !msg.contains("bless"),
        "LORA_* variables that are not training parameters are not ours: {msg}"
    );
}

#[test]
fn optional_values_can_be_unset_from_text_and_booleans_take_values() {
    let mut l = Loader::new();
    l.apply_env([("LORA_TRAINING_SEED", "5"), ("LORA_TRAINING_BF16", "false")])
        .apply_cli("training_seed", "none");
    let r = l.finish().unwrap();
    assert_eq!(r.seed, 3407, "`none` unsets");
    assert!(!r.bf16, "an explicit false is kept");
}

#[test]
fn accepted_forms() {
    let mut l = Loader::new();
    for (k, v) in [
        (
            "training_envs",
            "HF_HOME=/pvc/.cache, TOKENIZERS_PARALLELISM=false,URL=a=b",
        ),
        (
            "training_metadata_labels",
            "app.kubernetes.io/name=lora,team=ml_ops.1,empty=",
        ),
        (
            "training_metadata_annotations",
            "example.com/note=any text: here",
        ),
        ("training_resource_memory_per_worker", "500M"),
        ("training_resource_cpu_per_worker", "500m"),
        ("training_resource_num_procs_per_worker", "1"),
        (
            "training_plugins",
            "preprocessor=/p/a.wasm,reporter=/p/b.wasm,reporter=/p/c.wasm",
        ),
        ("training_plugin_config", r#"{"reporter": {"dir": "/out"}}"#),
        ("training_lr_scheduler", "cosine_with_restarts"),
        ("training_lr_scheduler_kwargs", r#"{"num_cycles": 2}"#),
        ("training_lora_target_modules", "q_proj, v_proj"),
        ("training_runtime", "lora"),
        (
            "kubernetes_config",
            r#"{"resources": {"limits": {"cpu": "2"}}}"#,
        ),
    ] {
        l.apply_cli(k, v);
    }
    let r = l.finish().unwrap();
    assert_eq!(r.envs[2], ("URL".to_string(), "a=b".to_string()));
    assert_eq!(r.metadata_labels.len(), 3);
    assert_eq!(r.resource_cpu_per_worker, 0.5);
    assert_eq!(r.plugins.len(), 3);
    assert_eq!(r.lora_target_modules, ["q_proj", "v_proj"]);
    assert_eq!(r.lr_scheduler_kwargs["num_cycles"], json!(2));
    assert!(r.kubernetes_config.is_some());
}

#[test]
fn schema_lists_every_parameter_with_its_default() {
    let schema = lora_params::json_schema();
    let props = schema["properties"].as_object().unwrap();
    assert_eq!(props.len(), PARAMS.len());
    assert_eq!(props["training_lora_r"]["default"], json!(16));
    assert_eq!(
        props["training_learning_rate"]["type"],
        json!(["number", "null"])
    );
    assert_eq!(props["training_train_on_inputs"]["x-addition"], json!(true));
    assert_eq!(
        props["training_lora_r"]["x-env"],
        json!("LORA_TRAINING_LORA_R")
    );
}

#[test]
fn the_reference_parameters_are_all_defined() {
    // The 33 parameters of the seed README's table (the artifacts and pvc_path are not
    // training parameters) and the 21 further ones of the Python signature (issue 2).
    let reference = "training_base_model training_effective_batch_size training_max_tokens_per_gpu training_max_seq_len training_learning_rate training_lr_warmup_steps training_checkpoint_at_epoch training_num_epochs training_data_output_dir training_envs training_resource_cpu_per_worker training_resource_gpu_per_worker training_resource_memory_per_worker training_resource_num_procs_per_worker training_resource_num_workers training_metadata_labels training_metadata_annotations training_lora_r training_lora_alpha training_lora_dropout training_lora_target_modules training_lora_use_rslora training_lora_use_dora training_lora_load_in_4bit training_lora_load_in_8bit training_lora_bnb_4bit_quant_type training_lora_bnb_4bit_compute_dtype training_lora_bnb_4bit_use_double_quant training_lora_sample_packing training_seed training_use_liger training_lr_scheduler kubernetes_config training_micro_batch_size training_gradient_accumulation_steps training_flash_attention training_bf16 training_fp16 training_tf32 training_save_steps training_eval_steps training_logging_steps training_save_total_limit training_wandb_project training_wandb_entity training_wandb_run_name training_tensorboard_log_dir training_dataset_type training_field_messages training_field_instruction training_field_input training_field_output training_enable_model_splitting training_runtime";
    let names: Vec<&str> = reference.split(' ').collect();
    assert_eq!(names.len(), 54);
    for n in names {
        let d = lora_params::param_def(n).unwrap_or_else(|| panic!("{n} is not defined"));
        assert_eq!(d.origin, lora_params::Origin::Reference, "{n}");
    }
    let d = |n| lora_params::param_def(n).unwrap();
    assert_eq!(
        d("training_base_model").default_json(),
        json!("Qwen/Qwen2.5-1.5B-Instruct")
    );
    assert_eq!(
        d("training_resource_memory_per_worker").default_json(),
        json!("32Gi")
    );
    assert_eq!(
        d("training_resource_num_procs_per_worker").default_json(),
        json!("auto")
    );
    assert_eq!(d("training_runtime").default_json(), json!("training-hub"));
    assert!(d("training_seed").optional && d("training_seed").default_json().is_null());
}

#[test]
fn a_path_in_a_params_file_says_which_flag_takes_it() {
    let file = temp_file("paths.yaml", "pvc_path: /w\ntraining_lora_r: 8\n");
    let mut l = Loader::new();
    l.apply_file(&file);
    let msg = l.finish().unwrap_err().to_string();
    assert!(
        msg.contains("pvc_path") && msg.contains("--pvc-path"),
        "{msg}"
    );
}

#[test]
fn four_bit_settings_resolve_and_are_recorded_with_their_source() {
    let r = resolve(&[("training_lora_load_in_4bit", json!(true))]).expect("4-bit alone is valid");
    assert!(r.load_in_4bit && !r.load_in_8bit);
    assert_eq!(r.bnb_4bit_quant_type.as_deref(), Some("nf4"));
    assert_eq!(r.bnb_4bit_use_double_quant, Some(true));
    assert_eq!(r.bnb_4bit_compute_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(r.bnb_4bit_explicit(), (false, false, false));
    let j = r.to_json();
    assert_eq!(j["training_lora_bnb_4bit_quant_type"]["value"], "nf4");
    assert_eq!(j["training_lora_bnb_4bit_quant_type"]["source"], Source::Resolved.to_string());
    assert_eq!(j["training_lora_load_in_4bit"]["value"], true);
    assert_eq!(j["training_lora_load_in_8bit"]["value"], false);

    let r = resolve(&[
        ("training_lora_load_in_4bit", json!(true)),
        ("training_lora_bnb_4bit_quant_type", json!("fp4")),
        ("training_lora_bnb_4bit_use_double_quant", json!(false)),
        ("training_lora_bnb_4bit_compute_dtype", json!("torch.float16")),
    ])
    .expect("valid 4-bit settings");
    assert_eq!(r.bnb_4bit_quant_type.as_deref(), Some("fp4"));
    assert_eq!(r.bnb_4bit_use_double_quant, Some(false));
    assert_eq!(r.bnb_4bit_compute_dtype.as_deref(), Some("float16"), "the torch. prefix is dropped");
    assert_eq!(r.bnb_4bit_explicit(), (true, true, true));
    assert_ne!(r.to_json()["training_lora_bnb_4bit_quant_type"]["source"], Source::Resolved.to_string());

    // 8-bit: no 4-bit settings at all.
    let r = resolve(&[("training_lora_load_in_8bit", json!(true))]).expect("8-bit alone is valid");
    assert!(r.load_in_8bit && r.bnb_4bit_quant_type.is_none() && r.bnb_4bit_compute_dtype.is_none());
    assert!(r.to_json()["training_lora_bnb_4bit_quant_type"]["value"].is_null());
}
