//! Sources, cache, validation sets and the dry-run summary, end to end on real files with a real
//! tokenizer.

mod common;

use std::path::Path;

use lora_data::{
    DataConfig, DatasetInput, DatasetSource, DatasetType, PreparedData, builtin_preprocessor,
    prepare, resolve_dataset,
};

fn conv(i: usize) -> String {
    format!(
        r#"{{"messages": [{{"role": "user", "content": "question {i}?"}}, {{"role": "assistant", "content": "answer number {i}, with {} words"}}]}}"#,
        "some ".repeat(i % 7)
    )
}

fn write_jsonl(path: &Path, n: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let lines: Vec<String> = (0..n).map(conv).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn run(cfg: &DataConfig, src: &DatasetSource) -> PreparedData {
    let tools = common::tools("smollm2");
    let mut pre = builtin_preprocessor(cfg);
    prepare(cfg, src, &mut *pre, &tools).unwrap()
}

#[test]
fn the_cache_is_written_then_reused_and_keyed_by_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_jsonl(&data, 50);
    let cache = dir.path().join("cache");
    let cfg = DataConfig {
        cache_dir: Some(cache.clone()),
        ..DataConfig::default()
    };
    let src = DatasetSource::from_path(&data).unwrap();
    let first = run(&cfg, &src);
    assert!(!first.report.from_cache);
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one complete entry, no temp folder left: {entries:?}"
    );
    let second = run(&cfg, &src);
    assert!(second.report.from_cache);
    assert_eq!(second.train, first.train);
    assert_eq!(second.report.cache_key, first.report.cache_key);
    // Another parameter that changes the samples: another entry.
    let cfg2 = DataConfig {
        train_on_inputs: true,
        ..cfg.clone()
    };
    let third = run(&cfg2, &src);
    assert!(!third.report.from_cache);
    assert_ne!(third.report.cache_key, first.report.cache_key);
    // Changed data: another entry.
    write_jsonl(&data, 51);
    let fourth = run(&cfg, &src);
    assert!(!fourth.report.from_cache);
    assert_eq!(fourth.train.len(), 51);
}

#[test]
fn a_validation_split_folder_is_used() {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(&dir.path().join("train/data.jsonl"), 20);
    write_jsonl(&dir.path().join("test/data.jsonl"), 5);
    let src = DatasetSource::from_path(dir.path()).unwrap();
    let p = run(&DataConfig::default(), &src);
    assert_eq!((p.train.len(), p.validation.len()), (20, 5));
    assert_eq!(p.report.validation_from, "split");
    let eval: usize = p
        .eval_batches()
        .iter()
        .flat_map(|m| &m.rows)
        .map(|r| r.sample_ids.len())
        .sum();
    assert_eq!(eval, 5);
}

#[test]
fn a_held_out_fraction_is_seeded_and_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    write_jsonl(&data, 100);
    let src = DatasetSource::from_path(&data).unwrap();
    let cfg = DataConfig {
        validation_split: 0.1,
        ..DataConfig::default()
    };
    let a = run(&cfg, &src);
    let b = run(&cfg, &src);
    assert_eq!((a.train.len(), a.validation.len()), (90, 10));
    assert_eq!(a.report.validation_from, "held_out");
    assert_eq!(a.validation, b.validation);
    for v in &a.validation {
        assert!(!a.train.contains(v));
    }
}

#[test]
fn resolution_follows_the_reference_order() {
    let dir = tempfile::tempdir().unwrap();
    let pvc = dir.path().join("pvc");
    let artifact = dir.path().join("artifact.jsonl");
    write_jsonl(&artifact, 3);
    let mut input = DatasetInput {
        artifact_path: Some(artifact.clone()),
        pvc_path: Some(pvc.clone()),
        ..Default::default()
    };
    assert_eq!(resolve_dataset(&input).unwrap().train[0].path, artifact);
    // An existing non-empty <pvc_path>/dataset/train comes first.
    write_jsonl(&pvc.join("dataset/train/train.jsonl"), 2);
    let s = resolve_dataset(&input).unwrap();
    assert_eq!(s.train[0].path, pvc.join("dataset/train/train.jsonl"));
    assert!(s.origin.contains("reused"));
    // Metadata pvc_path when there is no artifact path.
    input = DatasetInput {
        metadata: serde_json::json!({"pvc_path": artifact.to_str().unwrap()})
            .as_object()
            .unwrap()
            .clone(),
        ..Default::default()
    };
    assert_eq!(resolve_dataset(&input).unwrap().train[0].path, artifact);
    // A remote artifact_path is refused with what to do instead.
    input = DatasetInput {
        metadata: serde_json::json!({"artifact_path": "s3://bucket/data.jsonl"})
            .as_object()
            .unwrap()
            .clone(),
        ..Default::default()
    };
    let err = resolve_dataset(&input).unwrap_err().to_string();
    assert!(
        err.contains("artifact_path")
            && err.contains("s3://bucket/data.jsonl")
            && err.contains("does not download"),
        "{err}"
    );
    let err = resolve_dataset(&DatasetInput::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no dataset"), "{err}");
}

#[test]
fn dry_run_summary_counts_match_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    write_jsonl(&data, 40);
    let src = DatasetSource::from_path(&data).unwrap();
    let cfg = DataConfig {
        effective_batch_size: 8,
        max_seq_len: 64,
        max_tokens_per_gpu: 128,
        num_epochs: 2,
        ..DataConfig::default()
    };
    let p = run(&cfg, &src);
    let s = p.summary();
    assert_eq!(s.epochs.len(), 2);
    for (e, counts) in s.epochs.iter().enumerate() {
        let plan = p.epoch_plan(e);
        assert_eq!(counts.optimizer_steps, plan.steps.len());
        assert_eq!(
            counts.micro_batches,
            plan.steps
                .iter()
                .map(|st| st.micro_batches.len())
                .sum::<usize>()
        );
        assert_eq!(
            counts.rows,
            plan.steps
                .iter()
                .flat_map(|st| &st.micro_batches)
                .map(|m| m.rows.len())
                .sum::<usize>()
        );
        assert_eq!(counts.trained_tokens, p.report.train_trained_tokens);
    }
    assert_eq!(s.report.records, 40);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["epochs"][0]["optimizer_steps"], 5);
    let text = s.to_string();
    assert!(text.contains("epoch 0: 5 optimizer steps"), "{text}");
}

#[test]
fn alpaca_records_are_laid_out_and_end_with_eos() {
    use lora_api::TextTools;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"Hi!\"}\n",
    )
    .unwrap();
    let cfg = DataConfig {
        dataset_type: DatasetType::Alpaca,
        ..DataConfig::default()
    };
    let p = run(&cfg, &DatasetSource::from_path(&data).unwrap());
    let tools = common::tools("smollm2");
    let s = &p.train[0];
    let text = tools.decode(&s.input_ids, false).unwrap();
    assert!(
        text.starts_with("Below is an instruction")
            && text.ends_with("### Response:\nHi!<|im_end|>"),
        "{text:?}"
    );
    let trained: Vec<u32> = s
        .input_ids
        .iter()
        .zip(&s.train_mask)
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tools.decode(&trained, false).unwrap(), "Hi!<|im_end|>");
}

/// A stand-in for a plugin: the built-in format under a plugin's name.
struct NamedPlugin(Box<dyn lora_api::Preprocessor>);

impl lora_api::Preprocessor for NamedPlugin {
    fn name(&self) -> &str {
        "plugin:renamed"
    }
    fn process_batch(
        &mut self,
        batch: u64,
        records: &[lora_api::RawRecord],
    ) -> Result<Vec<lora_api::RecordOutcome>, lora_api::ExtError> {
        self.0.process_batch(batch, records)
    }
}

#[test]
fn a_plugin_preprocessors_output_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_jsonl(&data, 5);
    let cache = dir.path().join("cache");
    let cfg = DataConfig {
        cache_dir: Some(cache.clone()),
        ..DataConfig::default()
    };
    let src = DatasetSource::from_path(&data).unwrap();
    let tools = common::tools("smollm2");
    for _ in 0..2 {
        let mut pre = NamedPlugin(builtin_preprocessor(&cfg));
        let p = prepare(&cfg, &src, &mut pre, &tools).unwrap();
        assert!(!p.report.from_cache);
        assert!(
            p.report.cache.contains("plugin:renamed"),
            "{}",
            p.report.cache
        );
    }
    assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none());
}

/// Issue 11, item 7: samples a plugin made are not the dataset's records; when one is bad (too
/// long, or the plugin's own per-record error), the message names the plugin.
#[test]
fn bad_samples_from_a_plugin_name_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_jsonl(&data, 3);
    let src = DatasetSource::from_path(&data).unwrap();
    let tools = common::tools("smollm2");
    let cfg = DataConfig {
        max_seq_len: 4,
        long_sample_policy: lora_data::LongSamplePolicy::Error,
        ..DataConfig::default()
    };
    let mut pre = NamedPlugin(builtin_preprocessor(&cfg));
    let err = prepare(&cfg, &src, &mut pre, &tools).err().unwrap().to_string();
    assert!(
        err.contains("train.jsonl record 1") && err.contains("preprocessor plugin:renamed made"),
        "{err}"
    );

    // The plugin's own error for a record (here the built-in format's, under the plugin's name).
    std::fs::write(&data, "{\"nothing\": 1}\n").unwrap();
    let cfg = DataConfig::default();
    let mut pre = NamedPlugin(builtin_preprocessor(&cfg));
    let err = prepare(&cfg, &src, &mut pre, &tools).err().unwrap().to_string();
    assert!(err.contains("reported by preprocessor plugin:renamed"), "{err}");
    // The built-in format itself is not named as a plugin.
    let mut pre = builtin_preprocessor(&cfg);
    let err = prepare(&cfg, &src, &mut *pre, &tools).err().unwrap().to_string();
    assert!(!err.contains("reported by preprocessor"), "{err}");
}
