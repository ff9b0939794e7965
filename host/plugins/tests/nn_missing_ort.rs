//! A model grant without an ONNX Runtime library: a clear error at plugin load, no panic. Its
//! own test binary, since ONNX Runtime, once loaded, stays loaded in a process.

mod common;

use std::path::Path;
use std::sync::Arc;

use lora_plugins::WasmPreprocessor;

#[test]
fn missing_onnx_runtime_is_a_clear_error_at_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.onnx"), b"not read: the library is missing first").unwrap();
    let missing = dir.path().join("no/libonnxruntime.so");
    // SAFETY: the only test of this binary; nothing reads the environment concurrently.
    unsafe { std::env::set_var("ORT_DYLIB_PATH", &missing) };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let wasm = lora_plugins::testing::build_guest_plugins(&repo, &target, &["hostile-nn"], false)
        .unwrap()
        .join("hostile_nn.wasm");
    let (mut o, _) = common::options();
    o.grants.models.insert("tiny".into(), dir.path().to_path_buf());
    let err = WasmPreprocessor::load(&wasm, &o, Some(Arc::new(common::RecordingTools::default())))
        .err()
        .expect("must fail without the library")
        .to_string();
    assert!(err.contains("plugin:hostile_nn") && err.contains("models"), "{err}");
    assert!(err.contains("cannot load ONNX Runtime") && err.contains("no/libonnxruntime.so"), "{err}");
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
}
