//! Parquet and `datasets.save_to_disk` folders read the same records as the JSONL they were made
//! from (tests/data/make_datasets.py).

mod common;

use lora_data::{
    DataConfig, DataFile, DatasetSource, FileKind, builtin_preprocessor, prepare, read_records,
    read_records_keeping_text,
};

fn datasets() -> std::path::PathBuf {
    common::fixtures().join("datasets")
}

fn records(file: &DataFile) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    read_records(file, &mut |r| {
        out.push(r.expect("readable record").value);
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn parquet_rows_equal_the_jsonl_records() {
    let jsonl = records(&DataFile {
        path: datasets().join("chat.jsonl"),
        kind: FileKind::Jsonl,
    });
    let parquet = records(&DataFile {
        path: datasets().join("chat.snappy.parquet"),
        kind: FileKind::Parquet,
    });
    assert_eq!(jsonl.len(), 12);
    assert_eq!(parquet, jsonl);
}

/// A preprocessor that takes JSON text gets each JSONL line as it is in the file (no line break);
/// columnar sources have no text, and readers keep none unless asked.
#[test]
fn jsonl_lines_are_kept_verbatim_only_when_asked() {
    let path = datasets().join("chat.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_end().to_string())
        .collect();
    let texts = |file: &DataFile, keep: bool| {
        let mut out = Vec::new();
        read_records_keeping_text(file, keep, &mut |r| {
            out.push(r.expect("readable record").json);
            Ok(())
        })
        .unwrap();
        out
    };
    let jsonl = DataFile { path, kind: FileKind::Jsonl };
    let kept: Vec<String> = texts(&jsonl, true).into_iter().map(|t| t.expect("text kept")).collect();
    assert_eq!(kept, lines);
    assert!(texts(&jsonl, false).iter().all(Option::is_none));
    let parquet = DataFile { path: datasets().join("chat.snappy.parquet"), kind: FileKind::Parquet };
    assert!(texts(&parquet, true).iter().all(Option::is_none));
}

#[test]
fn a_save_to_disk_dataset_dict_gives_train_and_validation() {
    let src = DatasetSource::from_path(&datasets().join("hf_dict")).unwrap();
    assert_eq!(src.train.len(), 1);
    assert_eq!(src.train[0].kind, FileKind::Arrow);
    let jsonl = records(&DataFile {
        path: datasets().join("chat.jsonl"),
        kind: FileKind::Jsonl,
    });
    assert_eq!(records(&src.train[0]), jsonl[..9].to_vec());
    assert_eq!(records(&src.validation[0]), jsonl[9..].to_vec());
    let cfg = DataConfig::default();
    let tools = common::tools("smollm2");
    let mut pre = builtin_preprocessor(&cfg);
    let p = prepare(&cfg, &src, &mut *pre, &tools).unwrap();
    assert_eq!(
        (
            p.train.len(),
            p.validation.len(),
            p.report.validation_from.as_str()
        ),
        (9, 3, "split")
    );
}

#[test]
fn an_unsupported_codec_is_a_clear_error_naming_the_file() {
    let src = DatasetSource::from_path(&datasets().join("chat.zstd.parquet")).unwrap();
    let cfg = DataConfig::default();
    let tools = common::tools("smollm2");
    let mut pre = builtin_preprocessor(&cfg);
    let err = prepare(&cfg, &src, &mut *pre, &tools)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat.zstd.parquet") && err.contains("Snappy"),
        "{err}"
    );
}
