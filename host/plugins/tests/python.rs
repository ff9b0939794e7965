//! A non-Rust guest: `plugins/py-alpaca` (Python, componentize-py) runs behind the same trait
//! and sandbox. Building it needs componentize-py from PyPI, so the stage script
//! `tests/ci.d/30-plugins.sh` builds it and runs this test with `LORA_PY_PLUGIN` set; a plain
//! `cargo test` says it skipped.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use lora_api::{RawRecord, Sample};
use serde_json::json;

#[test]
fn python_preprocessor_runs_behind_the_same_trait() {
    let Some(path) = std::env::var_os("LORA_PY_PLUGIN").map(PathBuf::from) else {
        eprintln!("skipped: LORA_PY_PLUGIN is not set (tests/ci.d/30-plugins.sh sets it)");
        return;
    };
    let (mut opts, logs) = common::options();
    opts.settings = BTreeMap::from([("min_output_chars".into(), "2".into())]);
    let mut p =
        lora_plugins::load_preprocessor(&path, &opts, Arc::new(common::RecordingTools::default()))
            .unwrap();
    let rec = |index, value| RawRecord {
        index,
        source: "alpaca.jsonl".into(),
        value,
        json: None,
    };
    let out = p
        .process_batch(
            0,
            &[
                rec(
                    1,
                    json!({"instruction": "Add", "input": "2+2", "output": "4!"}),
                ),
                rec(2, json!({"instruction": "Say hi", "output": "hello"})),
                rec(3, json!({"instruction": "Empty", "output": "x"})),
                rec(4, json!({"output": "no instruction"})),
            ],
        )
        .unwrap();
    assert_eq!(
        out[0].result,
        Ok(vec![Sample::PromptCompletion {
            prompt: "### Instruction:\nAdd\n\n### Input:\n2+2\n\n### Response:\n".into(),
            completion: "4!".into()
        }])
    );
    assert!(matches!(&out[1].result, Ok(s) if s.len() == 1));
    assert_eq!(out[2].result, Ok(vec![]));
    assert!(
        matches!(&out[3].result, Err(e) if e.contains("instruction")),
        "{:?}",
        out[3].result
    );
    assert!(
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("py-alpaca configured")),
        "{logs:?}"
    );

    let mut bad = opts.clone();
    bad.settings = BTreeMap::from([("nope".into(), "1".into())]);
    let err =
        lora_plugins::load_preprocessor(&path, &bad, Arc::new(common::RecordingTools::default()))
            .err()
            .unwrap();
    assert!(err.to_string().contains("unknown setting `nope`"), "{err}");
}
