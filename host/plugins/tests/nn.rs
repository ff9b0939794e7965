//! wasi:nn for preprocessors (feature `wasi-nn`), through a real guest (`plugins/hostile/nn`),
//! real ONNX Runtime (the PyPI wheel's library) and real models written by
//! `tests/nn/make_test_models.py`. Setup: `ORT_DYLIB_PATH` (else the wheel in `.venv-nn/`) and a
//! Python with `onnx` + `numpy` (`LORA_NN_PYTHON`, else `.venv-nn/bin/python`); tests/ci.d/35-wasi-nn.sh
//! makes both.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lora_api::{ErrorKind, RawRecord, Sample};
use lora_plugins::{PluginError, PluginOptions, WasmPreprocessor};

use common::RecordingTools;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Setup {
    plugin: PathBuf,
    models: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let repo = repo();
        if std::env::var_os("ORT_DYLIB_PATH").is_none() {
            let lib = std::fs::read_dir(repo.join(".venv-nn/lib"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.path().join("site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"))
                .filter(|p| p.is_file())
                .expect("set ORT_DYLIB_PATH, or make .venv-nn with onnxruntime==1.31.1 (tests/ci.d/35-wasi-nn.sh)");
            // SAFETY: set once, before any test of this binary loads ONNX Runtime.
            unsafe { std::env::set_var("ORT_DYLIB_PATH", lib) };
        }
        let python = std::env::var_os("LORA_NN_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join(".venv-nn/bin/python"));
        let models = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nn-test-models");
        let status = std::process::Command::new(&python)
            .arg(repo.join("tests/nn/make_test_models.py"))
            .arg(&models)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} (set LORA_NN_PYTHON to a Python with onnx and numpy): {e}", python.display()));
        assert!(status.success(), "make_test_models.py failed: {status}");
        let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
        let dir = lora_plugins::testing::build_guest_plugins(&repo, &target, &["hostile-nn"], false)
            .unwrap_or_else(|e| panic!("{e}"));
        Setup { plugin: dir.join("hostile_nn.wasm"), models }
    })
}

fn options(attack: &str, graph: &str, grants: &[&str]) -> PluginOptions {
    let s = setup();
    let (mut o, _logs) = common::options();
    o.settings.insert("attack".into(), attack.into());
    o.settings.insert("graph".into(), graph.into());
    for g in grants {
        o.grants.models.insert(g.to_string(), s.models.join(g));
    }
    o
}

fn load(o: &PluginOptions) -> Result<WasmPreprocessor, PluginError> {
    WasmPreprocessor::load(&setup().plugin, o, Some(Arc::new(RecordingTools::default())))
}

fn record() -> Vec<RawRecord> {
    vec![RawRecord { index: 1, source: "t.jsonl".into(), value: serde_json::json!({"text": "hi"}), json: None }]
}

/// One batch: the sample text, or the error (kind and message).
fn run(o: &PluginOptions) -> Result<String, (ErrorKind, String)> {
    use lora_api::Preprocessor;
    let mut p = load(o).unwrap_or_else(|e| panic!("load: {e}"));
    let out = p.process_batch(0, &record()).map_err(|e| (e.kind, e.to_string()))?;
    match &out[0].result {
        Ok(samples) => match &samples[0] {
            Sample::Text { text } => Ok(text.clone()),
            other => panic!("unexpected sample {other:?}"),
        },
        Err(e) => panic!("record error {e}"),
    }
}

fn f32_hex(v: &[f32]) -> String {
    v.iter().flat_map(|x| x.to_le_bytes()).map(|b| format!("{b:02x}")).collect()
}

#[test]
fn granted_graph_computes_exactly() {
    let text = run(&options("ok", "tiny", &["tiny"])).unwrap();
    assert_eq!(text, format!("ok: y Fp32 [1, 4] {}", f32_hex(&[3.0, 5.0, 7.0, 9.0])));
}

#[test]
fn int64_input_model_runs() {
    // The upstream ONNX backend panics the host on any non-f32 input; ours runs it.
    let text = run(&options("ids", "ids", &["ids"])).unwrap();
    // rows 3,1,4,1,5 of arange(24).reshape(8,3)/8, averaged
    let mean = |c: usize| [3, 1, 4, 1, 5].iter().map(|r| (r * 3 + c) as f32 / 8.0).sum::<f32>() / 5.0;
    assert_eq!(text, format!("ok: emb Fp32 [1, 3] {}", f32_hex(&[mean(0), mean(1), mean(2)])));
}

#[test]
fn same_input_same_bytes_across_runs() {
    let a = run(&options("ids", "ids", &["ids"])).unwrap();
    let b = run(&options("ids", "ids", &["ids"])).unwrap();
    assert_eq!(a, b);
}

#[test]
fn ungranted_name_is_not_found() {
    // `ids` exists on disk but this run grants only `tiny`.
    let (kind, msg) = run(&options("ok", "ids", &["tiny"])).unwrap_err();
    assert_eq!(kind, ErrorKind::Failed, "{msg}");
    assert!(msg.contains("NotFound") && msg.contains("ids"), "{msg}");
}

#[test]
fn load_of_raw_bytes_is_refused_naming_the_plugin() {
    let (kind, msg) = run(&options("load-bytes", "tiny", &["tiny"])).unwrap_err();
    assert_eq!(kind, ErrorKind::Trap, "{msg}");
    assert!(msg.contains("plugin:hostile_nn") && msg.contains("`load` of model bytes is refused"), "{msg}");
    assert!(msg.contains("grants.models"), "{msg}");
}

#[test]
fn int64_into_f32_input_is_refused_before_inference() {
    let (kind, msg) = run(&options("i64-into-f32", "tiny", &["tiny"])).unwrap_err();
    assert_eq!(kind, ErrorKind::Failed, "{msg}");
    assert!(msg.contains("graph `tiny`") && msg.contains("input `x` must be f32 [1, 4], got i64"), "{msg}");
}

#[test]
fn wrong_rank_is_refused() {
    let (_, msg) = run(&options("wrong-rank", "tiny", &["tiny"])).unwrap_err();
    assert!(msg.contains("graph `tiny`") && msg.contains("must have rank 2"), "{msg}");
}

#[test]
fn two_gib_tensor_is_refused_by_its_dimensions() {
    // Dimensions of a 2 GiB f32 tensor with no data: refused on size before anything is copied
    // (dimension 1 = 2^29 is open in no model: use a model whose dims are open).
    let (_, msg) = run(&options("huge", "slow", &["slow"])).unwrap_err();
    assert!(msg.contains("graph `slow`") && msg.contains("2147483648 bytes"), "{msg}");
    assert!(msg.contains("max_tensor_mib"), "{msg}");
}

#[test]
fn model_past_the_deadline_fails_the_call_naming_plugin_and_graph() {
    let mut o = options("slow", "slow", &["slow"]);
    // Long enough for the guest to make its input even on a loaded machine, far shorter than
    // the model (300 chained 512×512 products: several seconds on one thread).
    o.limits.deadline = Duration::from_millis(1500);
    let t = Instant::now();
    let (kind, msg) = run(&o).unwrap_err();
    let took = t.elapsed();
    assert_eq!(kind, ErrorKind::Limit, "{msg}");
    assert!(msg.contains("plugin:hostile_nn") && msg.contains("graph `slow`") && msg.contains("deadline"), "{msg}");
    // The run is terminated at the deadline, not waited out.
    assert!(took < Duration::from_millis(4000), "took {took:?}");
}

#[test]
fn model_grant_hash_and_bad_dirs() {
    let s = setup();
    let o = options("ok", "tiny", &["tiny"]);
    let p = load(&o).unwrap();
    let bytes = std::fs::read(s.models.join("tiny/model.onnx")).unwrap();
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(p.models().len(), 1);
    assert_eq!(p.models()[0].sha256, want);

    let mut o = options("ok", "tiny", &[]);
    o.grants.models.insert("nope".into(), s.models.join("no-such-dir"));
    let err = load(&o).err().expect("a missing model dir must fail").to_string();
    assert!(err.contains("nope") && err.contains("no-such-dir"), "{err}");
}

#[test]
fn tensor_limit_is_per_plugin() {
    let mut o = options("slow", "slow", &["slow"]);
    o.limits.max_tensor_bytes = 1 << 19; // 512*512*4 = 1 MiB
    let (_, msg) = run(&o).unwrap_err();
    assert!(msg.contains("1048576 bytes") && msg.contains("limit of 524288 bytes (`max_tensor_mib`)"), "{msg}");
}

#[test]
fn models_are_for_preprocessors_only() {
    let s = setup();
    let mut o = PluginOptions { cache_dir: None, ..Default::default() };
    o.grants.models.insert("tiny".into(), s.models.join("tiny"));
    let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let reporter = lora_plugins::testing::build_guest_plugins(&repo(), &target, &["csv-reporter"], false)
        .unwrap()
        .join("csv_reporter.wasm");
    let err = lora_plugins::load_reporter(&reporter, &o).err().expect("must refuse").to_string();
    assert!(err.contains("only preprocessors may be granted models"), "{err}");
}

#[test]
fn training_plugin_config_grants_models_and_sets_the_tensor_limit() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("filter.wasm");
    let rep = dir.path().join("rep.wasm");
    std::fs::write(&pre, b"x").unwrap();
    std::fs::write(&rep, b"x").unwrap();
    let plugins = format!("preprocessor={},reporter={}", pre.display(), rep.display());
    let tiny = s.models.join("tiny");
    let config = serde_json::json!({"filter": {"grants": {"models": {"tiny": tiny}}, "max_tensor_mib": 3}});
    let set = lora_plugins::PluginSet::from_params(&plugins, &config.to_string(), 1).unwrap();
    let o = &set.preprocessor.as_ref().unwrap().options;
    assert_eq!(o.grants.models.get("tiny"), Some(&tiny));
    assert_eq!(o.limits.max_tensor_bytes, 3 << 20);

    let config = serde_json::json!({"rep": {"grants": {"models": {"tiny": tiny}}}});
    let err = lora_plugins::PluginSet::from_params(&plugins, &config.to_string(), 1).unwrap_err().to_string();
    assert!(err.contains("`grants.models` is for preprocessors only"), "{err}");
    let config = serde_json::json!({"filter": {"max_tensor_mib": 0}});
    let err = lora_plugins::PluginSet::from_params(&plugins, &config.to_string(), 1).unwrap_err().to_string();
    assert!(err.contains("max_tensor_mib"), "{err}");
}

/// A granted model's directory is visible read-only at `/models/<name>`, and only it: writing
/// into it, overwriting the model, `..` out of it and a link planted in it that points outside
/// all fail in the guest, and nothing on the host changes.
#[test]
fn the_granted_model_dir_is_read_only_and_confined() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    std::fs::create_dir(&model).unwrap();
    let bytes = std::fs::read(s.models.join("tiny/model.onnx")).unwrap();
    std::fs::write(model.join("model.onnx"), &bytes).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    std::os::unix::fs::symlink(&secret, model.join("outside")).unwrap();
    let attack = |a: &str| {
        let mut o = options(a, "tiny", &[]);
        o.grants.models.insert("tiny".into(), model.clone());
        run(&o).unwrap_or_else(|e| panic!("{a}: {e:?}"))
    };
    assert_eq!(attack("read-model"), format!("fs-ok: {}", bytes.len()));
    for a in ["write-model-dir", "overwrite-model", "dotdot", "symlink-out"] {
        let got = attack(a);
        assert!(got.starts_with("fs-refused:"), "{a}: {got}");
        assert!(!got.contains("host secret"), "{a}: {got}");
    }
    // Nothing but the granted directory is there: not even `/` can be listed.
    let got = attack("other-dir");
    assert!(got.starts_with("fs-refused:"), "other-dir: {got}");
    assert!(!model.join("planted").exists());
    assert_eq!(std::fs::read(model.join("model.onnx")).unwrap(), bytes);
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");
}

#[test]
fn a_model_name_that_is_not_a_plain_directory_name_is_refused() {
    let s = setup();
    for name in ["../up", ".hidden", "a/b", ""] {
        let mut o = options("ok", "tiny", &[]);
        o.grants.models.insert(name.into(), s.models.join("tiny"));
        let err = load(&o).err().unwrap_or_else(|| panic!("`{name}` was accepted")).to_string();
        assert!(err.contains("is not a model name"), "{name}: {err}");
    }
}
