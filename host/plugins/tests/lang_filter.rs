//! The `plugins/lang-filter` preprocessor on the real fastText `lid.176` model (converted to ONNX
//! by tests/nn/make_langid.py) through wasi:nn and ONNX Runtime, against fastText itself
//! (`fasttext-predict`, tests/nn/make_langid_goldens.py) on every message of real chat data.
//! Setup by tests/ci.d/35-wasi-nn.sh: `LORA_LANGID_DIR` (model.onnx + vocab.json),
//! `LORA_LANGID_GOLDENS` (one `{"text", "label", "p"}` per message) and `ORT_DYLIB_PATH`.

mod common;

#[path = "../../../plugins/lang-filter/src/featurize.rs"]
mod featurize;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use lora_api::{Preprocessor, RawRecord, Sample};
use lora_plugins::{PluginOptions, WasmPreprocessor};

use common::RecordingTools;

struct Golden {
    text: String,
    label: String,
    p: f64,
}

struct Setup {
    plugin: PathBuf,
    model: PathBuf,
    goldens: Vec<Golden>,
}

fn env_path(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run tests/ci.d/35-wasi-nn.sh, which makes the model and the goldens"))
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let model = env_path("LORA_LANGID_DIR");
        let goldens = std::fs::read_to_string(env_path("LORA_LANGID_GOLDENS"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Golden { text: v["text"].as_str().unwrap().into(), label: v["label"].as_str().unwrap().into(), p: v["p"].as_f64().unwrap() }
            })
            .collect::<Vec<_>>();
        assert!(goldens.len() > 1000, "{} golden messages", goldens.len());
        let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
        let dir = lora_plugins::testing::build_guest_plugins(&repo, &target, &["lang-filter"], true).unwrap_or_else(|e| panic!("{e}"));
        Setup { plugin: dir.join("lang_filter.wasm"), model, goldens }
    })
}

fn options_logged(settings: &[(&str, &str)]) -> (PluginOptions, Arc<Mutex<Vec<String>>>) {
    let (mut o, logs) = common::options();
    for (k, v) in settings {
        o.settings.insert(k.to_string(), v.to_string());
    }
    o.grants.models.insert("langid".into(), setup().model.clone());
    (o, logs)
}

fn options(settings: &[(&str, &str)]) -> PluginOptions {
    options_logged(settings).0
}

fn load(o: &PluginOptions) -> Result<WasmPreprocessor, lora_plugins::PluginError> {
    WasmPreprocessor::load(&setup().plugin, o, Some(Arc::new(RecordingTools::default())))
}

fn records(texts: &[&str]) -> Vec<RawRecord> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let value = serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}]});
            RawRecord { index: i as u64 + 1, source: "chat.jsonl".into(), json: Some(value.to_string()), value }
        })
        .collect()
}

/// The plugin's decision per record (`emit = decision`): label and probability.
fn decisions(p: &mut WasmPreprocessor, texts: &[&str]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (b, chunk) in texts.chunks(512).enumerate() {
        for o in p.process_batch(b as u64, &records(chunk)).unwrap() {
            match o.result.unwrap().as_slice() {
                [Sample::Text { text }] => {
                    let (l, p) = text.split_once(' ').unwrap();
                    out.push((l.to_string(), p.parse().unwrap()));
                }
                other => panic!("expected one text sample, got {other:?}"),
            }
        }
    }
    out
}

#[test]
fn top1_language_equals_fasttext_on_every_message() {
    let s = setup();
    let mut p = load(&options(&[("languages", "en"), ("emit", "decision")])).unwrap();
    let texts: Vec<&str> = s.goldens.iter().map(|g| g.text.as_str()).collect();
    let got = decisions(&mut p, &texts);
    let mut worst = 0f64;
    let mut wrong = Vec::new();
    for (g, (label, prob)) in s.goldens.iter().zip(&got) {
        worst = worst.max((g.p - prob).abs());
        if *label != g.label {
            wrong.push(format!("{:?}: plugin {label} {prob}, fastText {} {}", g.text, g.label, g.p));
        }
    }
    let langs: std::collections::BTreeSet<&str> = s.goldens.iter().map(|g| g.label.as_str()).collect();
    println!("lang-filter vs fastText: top-1 {}/{} agree over {} languages, max |dp| {worst:.2e}", got.len() - wrong.len(), got.len(), langs.len());
    assert!(wrong.is_empty(), "{} disagreements, first: {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
    // fastText's predict uses an exact sigmoid; ONNX Runtime sums in another order.
    assert!(worst < 1e-4, "max |dp| {worst}");
}

#[test]
fn keeps_exactly_the_configured_languages_above_the_threshold() {
    let s = setup();
    let pick: Vec<&Golden> = s.goldens.iter().step_by(7).take(400).collect();
    let texts: Vec<&str> = pick.iter().map(|g| g.text.as_str()).collect();
    let (o, logs) = options_logged(&[("languages", "en,de"), ("threshold", "0.8")]);
    let mut p = load(&o).unwrap();
    let out = p.process_batch(0, &records(&texts)).unwrap();
    let mut kept = 0;
    for (g, o) in pick.iter().zip(&out) {
        let samples = o.result.as_ref().unwrap();
        let want = (g.label == "en" || g.label == "de") && g.p >= 0.8;
        assert_eq!(!samples.is_empty(), want, "{:?} ({} {})", g.text, g.label, g.p);
        if want {
            kept += 1;
            // The record itself is the sample, system prompt included.
            match &samples[0] {
                Sample::Chat { messages } => assert_eq!((messages.len(), messages[1].content.as_str()), (2, g.text.as_str())),
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(kept > 20 && kept < pick.len() - 20, "kept {kept} of {}", pick.len());
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains(&format!("dropped {} of {} records by language", pick.len() - kept, pick.len())), "{logs}");
}

#[test]
fn the_same_input_gives_the_same_bytes() {
    let s = setup();
    let texts: Vec<&str> = s.goldens.iter().take(300).map(|g| g.text.as_str()).collect();
    let run = || decisions(&mut load(&options(&[("languages", "en"), ("emit", "decision")])).unwrap(), &texts);
    let (a, b) = (run(), run());
    assert_eq!(a, b);
}

#[test]
fn bad_settings_are_refused_naming_them() {
    let err = |settings: &[(&str, &str)], grant: bool| {
        let mut o = options(settings);
        if !grant {
            o.grants.models.clear();
        }
        match load(&o) {
            Ok(_) => panic!("{settings:?} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(&[("languages", "en,xx")], true);
    assert!(e.contains("languages: `xx` is not a label"), "{e}");
    let e = err(&[("languages", "en"), ("threshold", "1.5")], true);
    assert!(e.contains("threshold: 1.5"), "{e}");
    let e = err(&[("languages", "en"), ("emit", "all")], true);
    assert!(e.contains("emit: `all`"), "{e}");
    let e = err(&[("languages", "en"), ("colour", "red")], true);
    assert!(e.contains("colour"), "{e}");
    let e = err(&[("threshold", "0.5")], true);
    assert!(e.contains("languages: required"), "{e}");
    // Not granted: neither its directory nor its graph is there.
    let e = err(&[("languages", "en")], false);
    assert!(e.contains("/models/langid/vocab.json") && e.contains("granted"), "{e}");
}

/// Records/s of the filter as a WASM plugin vs the same featurizer and model called natively
/// (ONNX Runtime through `ort`, one thread, as the plugin's host runs it). Prints, never asserts
/// a time: `cargo test ... -- --ignored --nocapture lang_filter_benchmark`.
#[test]
#[ignore]
fn lang_filter_benchmark() {
    let s = setup();
    let texts: Vec<&str> = s.goldens.iter().map(|g| g.text.as_str()).collect();
    let mut p = load(&options(&[("languages", "en")])).unwrap();
    let recs = records(&texts);
    p.process_batch(0, &recs[..64]).unwrap();
    let t = Instant::now();
    for (b, chunk) in recs.chunks(512).enumerate() {
        p.process_batch(b as u64 + 1, chunk).unwrap();
    }
    let wasm = texts.len() as f64 / t.elapsed().as_secs_f64();

    let vocab: featurize::Vocab = serde_json::from_str(&std::fs::read_to_string(s.model.join("vocab.json")).unwrap()).unwrap();
    let f = featurize::Featurizer::new(&vocab);
    assert_eq!(vocab.labels.len(), 176, "lid.176's labels");
    let mut session = lora_plugins::nn::native_session(&s.model.join("model.onnx")).unwrap();
    let mut native = |text: &str| {
        let ids = f.line(&text.replace(['\n', '\r'], " "));
        let input = ort::value::Tensor::from_array(([ids.len()], ids)).unwrap();
        let out = session.run(ort::inputs!["ids" => input]).unwrap();
        let (_, logp) = out["logp"].try_extract_tensor::<f32>().unwrap();
        logp.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
    };
    for t in &texts[..64] {
        native(t);
    }
    let t = Instant::now();
    for text in &texts {
        // The plugin also parses each record's JSON; so does this side.
        let v: serde_json::Value = serde_json::from_str(&records(&[text])[0].json.clone().unwrap()).unwrap();
        let joined = v["messages"].as_array().unwrap().iter().filter(|m| m["role"] != "system").map(|m| m["content"].as_str().unwrap()).collect::<Vec<_>>().join(" ");
        native(&joined);
    }
    let nat = texts.len() as f64 / t.elapsed().as_secs_f64();
    println!("lang-filter over {} records: wasm plugin {wasm:.0} records/s, native {nat:.0} records/s, native/wasm {:.2}x", texts.len(), nat / wasm);
}
