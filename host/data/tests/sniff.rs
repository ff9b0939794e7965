//! Dataset files told by their content when their name says nothing: an upstream KFP step writes
//! its dataset to `out.path` (no extension), and the run must read it as the named file would
//! be read (issue 15). Ambiguous content is an error naming what was tried.

mod common;

use std::path::Path;
use std::sync::Arc;

use lora_data::{DataError, DatasetSource, FileKind, read_records, sniff};

/// Every record of a source's training files, as JSON values.
fn values(src: &DatasetSource) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for f in &src.train {
        read_records(f, &mut |r| {
            out.push(r.map(|r| r.value).map_err(|p| p.message).expect("readable record"));
            Ok(())
        })
        .unwrap();
    }
    out
}

fn fixture(name: &str) -> std::path::PathBuf {
    common::fixtures().join("datasets").join(name)
}

fn copy_as(from: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

#[test]
fn extension_less_files_read_as_their_named_twins() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("chat.jsonl", FileKind::Jsonl),
        ("chat.snappy.parquet", FileKind::Parquet),
        ("hf_dict/train/data-00000-of-00001.arrow", FileKind::Arrow),
    ];
    for (named, kind) in cases {
        let named = fixture(named);
        let bare = copy_as(&named, dir.path(), "out");
        assert_eq!(sniff(&bare).unwrap(), kind, "{}", named.display());
        let src = DatasetSource::from_path(&bare).unwrap();
        assert_eq!(src.train.len(), 1);
        assert_eq!(src.train[0].kind, kind);
        let expected = values(&DatasetSource::from_path(&named).unwrap());
        assert!(!expected.is_empty());
        assert_eq!(values(&src), expected, "{}", named.display());
    }
}

#[test]
fn a_json_array_and_an_arrow_ipc_file_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let array = dir.path().join("array");
    std::fs::write(&array, "\u{feff}\n  [{\"text\": \"a\"},\n {\"text\": \"b\"}]\n").unwrap();
    assert_eq!(sniff(&array).unwrap(), FileKind::Json);
    let v = values(&DatasetSource::from_path(&array).unwrap());
    assert_eq!(v, vec![serde_json::json!({"text": "a"}), serde_json::json!({"text": "b"})]);

    // The Arrow IPC *file* format (`ARROW1`), as pyarrow's `ipc.new_file` writes it.
    use arrow_array::{RecordBatch, StringArray};
    let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("text", arrow_schema::DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec!["x", "y", "z"]))]).unwrap();
    let ipc = dir.path().join("ipc");
    let mut w = arrow_ipc::writer::FileWriter::try_new(std::fs::File::create(&ipc).unwrap(), &schema).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    assert_eq!(sniff(&ipc).unwrap(), FileKind::Arrow);
    let v = values(&DatasetSource::from_path(&ipc).unwrap());
    assert_eq!(v.len(), 3);
    assert_eq!(v[2], serde_json::json!({"text": "z"}));
}

#[test]
fn a_folder_holding_one_extension_less_file_is_that_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_as(&fixture("chat.jsonl"), dir.path(), "data");
    // Hidden files and datasets' metadata files are not data.
    std::fs::write(dir.path().join(".keep"), "").unwrap();
    let src = DatasetSource::from_path(dir.path()).unwrap();
    assert_eq!(src.train.len(), 1);
    assert_eq!(src.train[0].kind, FileKind::Jsonl);
    assert_eq!(values(&src), values(&DatasetSource::from_path(&fixture("chat.jsonl")).unwrap()));

    // Two of them: not guessed at, both named.
    copy_as(&fixture("chat.jsonl"), dir.path(), "more");
    let err = DatasetSource::from_path(dir.path()).unwrap_err().to_string();
    assert!(err.contains("several files without a dataset extension") && err.contains("data, more"), "{err}");

    // Next to a named file, an extension-less one is not read (the folder's data is the named one).
    copy_as(&fixture("chat.jsonl"), dir.path(), "named.jsonl");
    let src = DatasetSource::from_path(dir.path()).unwrap();
    assert_eq!(src.train.len(), 1);
    assert!(src.train[0].path.ends_with("named.jsonl"));
}

#[test]
fn a_json_file_holding_json_lines_is_read_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = copy_as(&fixture("chat.jsonl"), dir.path(), "chat.json");
    let src = DatasetSource::from_path(&f).unwrap();
    assert_eq!(src.train[0].kind, FileKind::Jsonl);
    assert_eq!(values(&src), values(&DatasetSource::from_path(&fixture("chat.jsonl")).unwrap()));
}

#[test]
fn content_that_is_no_known_format_is_an_error_listing_what_was_tried() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 6] = [
        ("empty", b"", "is empty"),
        ("blank", b"  \n\n", "only white space"),
        ("csv", b"instruction,output\nhi,hello\n", "starts with 'i'"),
        ("pretty", b"{\n  \"messages\": []\n}\n", "not a whole JSON object"),
        ("binary", b"\x00\x01\x02\xff\xfe garbage", "binary"),
        ("cut", b"PAR1 and then nothing", "does not end with `PAR1`"),
    ];
    for (name, content, why) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let err = DatasetSource::from_path(&p).unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        for want in [name, why, "tried: Parquet", "Arrow IPC file", "Arrow IPC stream", "JSON array", "JSON Lines"] {
            assert!(msg.contains(want), "{name}: `{want}` missing from: {msg}");
        }
    }
}
