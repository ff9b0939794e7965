//! Shared helpers for lora-data's integration tests: the checked-in tokenizer fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use lora_data::HfTextTools;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

pub fn fixtures() -> PathBuf {
    data_dir().join("fixtures")
}

/// The tokenizer and template of a golden style, loaded the way make_goldens.py loads them.
pub fn tools(style: &str) -> HfTextTools {
    let fx = fixtures();
    let (tok, cfg, tmpl): (&str, &str, Option<&str>) = match style {
        "qwen2.5" => ("qwen3", "qwen3", Some("templates/qwen2.5.jinja")),
        "qwen3" => ("qwen3", "qwen3", None),
        "smollm2" => ("smollm2", "smollm2", Some("smollm2/chat_template.jinja")),
        "llama3" => ("smollm2", "llama3-style", None),
        other => panic!("unknown style {other}"),
    };
    let tmpl = tmpl.map(|t| fx.join(t));
    HfTextTools::from_files(
        &fx.join(tok).join("tokenizer.json"),
        Some(&fx.join(cfg).join("tokenizer_config.json")),
        tmpl.as_deref(),
    )
    .unwrap_or_else(|e| panic!("loading {style}: {e}"))
}
