//! The run request's dataset resolution (the reference's order) and workspace layout.

use std::path::PathBuf;

use lora::request::{DatasetSource, RunRequest};
use serde_json::json;

fn request(root: &std::path::Path, dataset: Option<PathBuf>) -> RunRequest {
    let params = lora_params::Loader::new().finish().unwrap();
    RunRequest::local(params, dataset, root)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-request-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn dataset_resolution_follows_the_reference_order() {
    let root = temp_dir("order");
    let file = root.join("train.jsonl");
    std::fs::write(&file, "{}\n").unwrap();

    // 1. the artifact path when it exists
    let req = request(&root, Some(file.clone()));
    assert_eq!(
        req.dataset_source().unwrap(),
        DatasetSource::Artifact { path: file.clone() }
    );

    // 2. metadata pvc_path / pvc_dir when the artifact path does not exist
    let mut req = request(&root, Some(root.join("missing.jsonl")));
    req.dataset
        .metadata
        .insert("pvc_dir".into(), json!(root.display().to_string()));
    assert_eq!(
        req.dataset_source().unwrap(),
        DatasetSource::MetadataPath {
            key: "pvc_dir".into(),
            path: root.clone()
        }
    );

    // 3. metadata artifact_path (remote)
    let mut req = request(&root, None);
    req.dataset
        .metadata
        .insert("artifact_path".into(), json!("s3://b/train.parquet"));
    assert_eq!(
        req.dataset_source().unwrap(),
        DatasetSource::Remote {
            artifact_path: "s3://b/train.parquet".into()
        }
    );

    // errors name what is missing
    let mut req = request(&root, None);
    req.dataset.metadata.insert("pvc_path".into(), json!(7));
    assert!(
        req.dataset_source()
            .unwrap_err()
            .to_string()
            .contains("`pvc_path` must be a string")
    );
    let req = request(&root, Some(root.join("missing.jsonl")));
    assert!(
        req.dataset_source()
            .unwrap_err()
            .to_string()
            .contains("missing.jsonl does not exist")
    );
    let req = request(&root, None);
    assert!(
        req.dataset_source()
            .unwrap_err()
            .to_string()
            .contains("no training dataset")
    );

    // 0. an existing non-empty <pvc_path>/dataset/train wins over everything
    let ws = req.workspace().dataset_train;
    std::fs::create_dir_all(&ws).unwrap();
    let req = request(&root, Some(file.clone()));
    assert_eq!(
        req.dataset_source().unwrap(),
        DatasetSource::Artifact { path: file.clone() },
        "empty: not used"
    );
    std::fs::write(ws.join("train.jsonl"), "{}\n").unwrap();
    assert_eq!(
        req.dataset_source().unwrap(),
        DatasetSource::Workspace { path: ws }
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn workspace_layout_is_the_references() {
    let root = PathBuf::from("/pvc");
    let req = request(&root, None);
    let ws = req.workspace();
    assert_eq!(
        ws.dataset_train,
        PathBuf::from("/pvc/workspace/dataset/train")
    );
    assert_eq!(ws.checkpoints, PathBuf::from("/pvc/workspace/checkpoints"));
    assert_eq!(ws.final_model, PathBuf::from("/pvc/workspace/final_model"));
    assert_eq!(
        ws.data_output_dir,
        PathBuf::from("/pvc/workspace/checkpoints/_internal_data_processing")
    );
    let mut l = lora_params::Loader::new();
    l.apply_cli("training_data_output_dir", "/fast/cache");
    let req = RunRequest::local(l.finish().unwrap(), None, &root);
    assert_eq!(
        req.workspace().data_output_dir,
        PathBuf::from("/fast/cache")
    );
}
