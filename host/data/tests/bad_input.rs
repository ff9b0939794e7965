//! Bad input: every case stops with an error naming the file, the record number and the field;
//! `training_bad_records=skip` skips and reports instead.

mod common;

use std::path::Path;

use lora_data::{
    BadRecords, DataConfig, DataError, DatasetSource, DatasetType, HfTextTools, LongSamplePolicy,
    builtin_preprocessor, prepare,
};

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

struct Case {
    name: &'static str,
    file: &'static str,
    content: Vec<u8>,
    setup: fn(&mut DataConfig),
    /// Substrings the message must contain (besides the file name).
    expect: &'static [&'static str],
}

fn jsonl(lines: &[&str]) -> Vec<u8> {
    lines.join("\n").into_bytes()
}

fn chat(_: &mut DataConfig) {}
fn alpaca(c: &mut DataConfig) {
    c.dataset_type = DatasetType::Alpaca;
}
fn passthrough(c: &mut DataConfig) {
    c.dataset_type = DatasetType::Passthrough;
}
fn prompt_completion(c: &mut DataConfig) {
    c.dataset_type = DatasetType::PromptCompletion;
}
fn tokenized(c: &mut DataConfig) {
    c.dataset_type = DatasetType::Tokenized;
}
fn long_error(c: &mut DataConfig) {
    c.max_seq_len = 8;
    c.max_tokens_per_gpu = 8;
    c.long_sample_policy = LongSamplePolicy::Error;
}
fn field_conversation(c: &mut DataConfig) {
    c.field_messages = "conversation".into();
}

fn cases() -> Vec<Case> {
    let mut non_utf8 = jsonl(&[GOOD, GOOD]);
    non_utf8.extend_from_slice(b"\n{\"messages\": \"\xff\xfe\"}");
    vec![
        Case {
            name: "invalid JSON line",
            file: "a.jsonl",
            content: jsonl(&[GOOD, "{\"messages\": [", GOOD]),
            setup: chat,
            expect: &["record 2", "(line)", "invalid JSON"],
        },
        Case {
            name: "non-UTF-8 bytes",
            file: "a.jsonl",
            content: non_utf8,
            setup: chat,
            expect: &["record 3", "(line)", "UTF-8"],
        },
        Case {
            name: "record is not an object",
            file: "a.jsonl",
            content: jsonl(&["[1, 2]"]),
            setup: chat,
            expect: &["record 1", "(record)", "JSON object"],
        },
        Case {
            name: "messages missing",
            file: "a.jsonl",
            content: jsonl(&[GOOD, r#"{"text": "x"}"#]),
            setup: chat,
            expect: &["record 2", "`messages`", "missing"],
        },
        Case {
            name: "messages not a list",
            file: "a.jsonl",
            content: jsonl(&[r#"{"messages": "hi"}"#]),
            setup: chat,
            expect: &["record 1", "`messages`", "a string"],
        },
        Case {
            name: "empty messages",
            file: "a.jsonl",
            content: jsonl(&[r#"{"messages": []}"#]),
            setup: chat,
            expect: &["record 1", "`messages`", "no messages"],
        },
        Case {
            name: "message not an object",
            file: "a.jsonl",
            content: jsonl(&[r#"{"messages": ["hi"]}"#]),
            setup: chat,
            expect: &["record 1", "`messages[0]`"],
        },
        Case {
            name: "role missing",
            file: "a.jsonl",
            content: jsonl(&[
                r#"{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}"#,
            ]),
            setup: chat,
            expect: &["record 1", "`messages[1].role`", "missing"],
        },
        Case {
            name: "role not a string",
            file: "a.jsonl",
            content: jsonl(&[r#"{"messages": [{"role": 1, "content": "a"}]}"#]),
            setup: chat,
            expect: &["record 1", "`messages[0].role`", "a number"],
        },
        Case {
            name: "unknown role",
            file: "a.jsonl",
            content: jsonl(&[
                GOOD,
                GOOD,
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
            ]),
            setup: chat,
            expect: &["record 3", "`messages[1].role`", "unknown role `bot`"],
        },
        Case {
            name: "content missing",
            file: "a.jsonl",
            content: jsonl(&[r#"{"messages": [{"role": "user"}]}"#]),
            setup: chat,
            expect: &["record 1", "`messages[0].content`", "missing"],
        },
        Case {
            name: "content not a string",
            file: "a.jsonl",
            content: jsonl(&[
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}"#,
            ]),
            setup: chat,
            expect: &["record 1", "`messages[1].content`", "a number"],
        },
        Case {
            name: "no assistant turn",
            file: "a.jsonl",
            content: jsonl(&[GOOD, r#"{"messages": [{"role": "user", "content": "a"}]}"#]),
            setup: chat,
            expect: &[
                "record 2",
                "`messages`",
                "no trained tokens",
                "training_train_on_inputs",
            ],
        },
        Case {
            name: "renamed messages field missing",
            file: "a.jsonl",
            content: jsonl(&[GOOD]),
            setup: field_conversation,
            expect: &["record 1", "`conversation`", "training_field_messages"],
        },
        Case {
            name: "bad record in a JSON array",
            file: "d.json",
            content: format!("[{GOOD}, {GOOD}, {{\"messages\": 3}}]").into_bytes(),
            setup: chat,
            expect: &["record 3", "`messages`"],
        },
        Case {
            name: "alpaca instruction missing",
            file: "a.jsonl",
            content: jsonl(&[r#"{"output": "x"}"#]),
            setup: alpaca,
            expect: &["record 1", "`instruction`", "missing"],
        },
        Case {
            name: "alpaca output not a string",
            file: "a.jsonl",
            content: jsonl(&[r#"{"instruction": "i", "output": ["x"]}"#]),
            setup: alpaca,
            expect: &["record 1", "`output`", "a list"],
        },
        Case {
            name: "alpaca empty output",
            file: "a.jsonl",
            content: jsonl(&[r#"{"instruction": "i", "input": null, "output": ""}"#]),
            setup: alpaca,
            expect: &["record 1", "`output`", "empty"],
        },
        Case {
            name: "passthrough text missing",
            file: "a.jsonl",
            content: jsonl(&[r#"{"txt": "x"}"#]),
            setup: passthrough,
            expect: &["record 1", "`text`", "missing"],
        },
        Case {
            name: "completion missing",
            file: "a.jsonl",
            content: jsonl(&[r#"{"prompt": "x"}"#]),
            setup: prompt_completion,
            expect: &["record 1", "`completion`", "missing"],
        },
        Case {
            name: "negative token id",
            file: "a.jsonl",
            content: jsonl(&[r#"{"input_ids": [1, -2, 3]}"#]),
            setup: tokenized,
            expect: &["record 1", "`input_ids[1]`", "non-negative"],
        },
        Case {
            name: "labels of another length",
            file: "a.jsonl",
            content: jsonl(&[r#"{"input_ids": [1, 2, 3], "labels": [-100, 2]}"#]),
            setup: tokenized,
            expect: &["record 1", "`labels`", "2 labels for 3"],
        },
        Case {
            name: "label that is not the token",
            file: "a.jsonl",
            content: jsonl(&[r#"{"input_ids": [1, 2, 3], "labels": [-100, 2, 4]}"#]),
            setup: tokenized,
            expect: &["record 1", "`labels[2]`", "-100 or the token id 3"],
        },
        Case {
            name: "token id outside the vocabulary",
            file: "a.jsonl",
            content: jsonl(&[r#"{"input_ids": [1, 2, 99999999]}"#]),
            setup: tokenized,
            expect: &[
                "record 1",
                "`input_ids`",
                "outside the tokenizer's vocabulary of 49152",
            ],
        },
        Case {
            name: "too long with policy error",
            file: "a.jsonl",
            content: jsonl(&[GOOD]),
            setup: long_error,
            expect: &[
                "record 1",
                "`messages`",
                "training_max_seq_len 8",
                "training_long_sample_policy",
            ],
        },
    ]
}

fn write(dir: &Path, file: &str, content: &[u8]) -> DatasetSource {
    let p = dir.join(file);
    std::fs::write(&p, content).unwrap();
    DatasetSource::from_path(&p).unwrap()
}

fn run(
    tools: &HfTextTools,
    cfg: &DataConfig,
    src: &DatasetSource,
) -> Result<lora_data::PreparedData, DataError> {
    let mut pre = builtin_preprocessor(cfg);
    prepare(cfg, src, &mut *pre, tools)
}

#[test]
fn every_bad_input_names_file_record_and_field() {
    let tools = common::tools("smollm2");
    let cases = cases();
    assert!(cases.len() >= 20);
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), case.file, &case.content);
        let mut cfg = DataConfig::default();
        (case.setup)(&mut cfg);
        let err = match run(&tools, &cfg, &src) {
            Ok(_) => panic!("{}: accepted", case.name),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(case.file),
            "{}: message does not name the file: {err}",
            case.name
        );
        for want in case.expect {
            assert!(
                err.contains(want),
                "{}: message lacks {want:?}: {err}",
                case.name
            );
        }
    }
}

#[test]
fn a_template_that_raises_names_the_record_and_its_message() {
    let fx = common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let tmpl = dir.path().join("t.jinja");
    std::fs::write(&tmpl, "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}").unwrap();
    let tools = HfTextTools::from_files(
        &fx.join("smollm2/tokenizer.json"),
        Some(&fx.join("smollm2/tokenizer_config.json")),
        Some(&tmpl),
    )
    .unwrap();
    let src = write(
        dir.path(),
        "t.jsonl",
        &jsonl(&[
            GOOD,
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}"#,
        ]),
    );
    let err = run(&tools, &DataConfig::default(), &src)
        .unwrap_err()
        .to_string();
    for want in [
        "t.jsonl",
        "record 2",
        "`messages`",
        "Conversations must start with a user turn",
    ] {
        assert!(err.contains(want), "lacks {want:?}: {err}");
    }
}

#[test]
fn empty_dataset_is_an_error() {
    let tools = common::tools("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "empty.jsonl", b"\n\n");
    let err = run(&tools, &DataConfig::default(), &src)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nothing to train on")
            && err.contains("empty.jsonl")
            && err.contains("no records"),
        "{err}"
    );
}

#[test]
fn a_json_file_that_is_not_an_array_is_an_error_naming_it() {
    let tools = common::tools("smollm2");
    let dir = tempfile::tempdir().unwrap();
    // Pretty-printed: one JSON object over several lines (a one-line object is JSON Lines).
    let pretty = "{\n  \"messages\": []\n}\n";
    let src = write(dir.path(), "obj.json", pretty.as_bytes());
    let err = run(&tools, &DataConfig::default(), &src)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("obj.json") && err.contains("JSON array"),
        "{err}"
    );
}

#[test]
fn skip_policy_skips_counts_and_names_bad_records() {
    let tools = common::tools("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let src = write(
        dir.path(),
        "mixed.jsonl",
        &jsonl(&[
            GOOD,
            "not json",
            GOOD,
            r#"{"messages": [{"role": "bot", "content": "x"}]}"#,
            GOOD,
        ]),
    );
    let cfg = DataConfig {
        bad_records: BadRecords::Skip,
        ..DataConfig::default()
    };
    let p = run(&tools, &cfg, &src).unwrap();
    assert_eq!(p.train.len(), 3);
    assert_eq!(p.report.records, 5);
    assert_eq!(p.report.dropped.get("bad_record"), Some(&2));
    let listed: Vec<(u64, &str)> = p
        .report
        .listed
        .iter()
        .map(|s| (s.index, s.field.as_str()))
        .collect();
    assert_eq!(listed, vec![(2, "(line)"), (4, "messages[0].role")]);
    let text = p.summary().to_string();
    assert!(
        text.contains("bad_record=2") && text.contains("mixed.jsonl record 4"),
        "{text}"
    );
}

#[test]
fn skip_policy_with_only_bad_records_is_an_error() {
    let tools = common::tools("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "bad.jsonl", &jsonl(&["x", "y"]));
    let cfg = DataConfig {
        bad_records: BadRecords::Skip,
        ..DataConfig::default()
    };
    let err = run(&tools, &cfg, &src).unwrap_err().to_string();
    assert!(
        err.contains("all 2 records were left out") && err.contains("bad_record=2"),
        "{err}"
    );
}

#[test]
fn inconsistent_sizes_are_refused_naming_the_parameter() {
    let tools = common::tools("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "a.jsonl", GOOD.as_bytes());
    let cfg = DataConfig {
        max_seq_len: 4096,
        max_tokens_per_gpu: 1000,
        ..DataConfig::default()
    };
    let err = run(&tools, &cfg, &src).unwrap_err().to_string();
    assert!(
        err.contains("training_max_tokens_per_gpu") && err.contains("training_max_seq_len"),
        "{err}"
    );
}
