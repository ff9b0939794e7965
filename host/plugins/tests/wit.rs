//! The WIT contract's versioning rule: a released version is frozen byte for byte in
//! `wit/since_vX.Y.Z/`, and the host binds exactly the frozen versions it lists as supported.

use std::path::Path;

fn wit_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit")
}

fn package_version(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with("package lora:plugin@"))
        .expect("no package line");
    line.trim_start_matches("package lora:plugin@")
        .trim_end_matches(';')
        .to_string()
}

#[test]
fn every_supported_version_has_a_frozen_folder() {
    for v in lora_plugins::SUPPORTED_API_VERSIONS {
        let frozen = std::fs::read_to_string(wit_dir().join(format!("since_v{v}/plugin.wit")))
            .unwrap_or_else(|e| panic!("wit/since_v{v}/plugin.wit: {e}"));
        assert_eq!(&package_version(&frozen), v);
    }
}

/// Protects: editing a released contract in place. Change the package version in `wit/plugin.wit`
/// first (and freeze the new version when it is released).
#[test]
fn the_working_contract_equals_its_frozen_copy_while_the_version_is_unchanged() {
    let current = std::fs::read_to_string(wit_dir().join("plugin.wit")).unwrap();
    let v = package_version(&current);
    if let Ok(frozen) = std::fs::read_to_string(wit_dir().join(format!("since_v{v}/plugin.wit"))) {
        assert!(
            frozen == current,
            "wit/plugin.wit differs from the released wit/since_v{v}/plugin.wit; bump the version"
        );
    }
}

#[test]
fn every_wit_item_is_documented() {
    let text = std::fs::read_to_string(wit_dir().join("plugin.wit")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let starts = [
        "interface ",
        "world ",
        "record ",
        "variant ",
        "enum ",
        "resource ",
        "type ",
    ];
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let is_item = starts.iter().any(|s| t.starts_with(s))
            || (t.contains(": func(")
                || t.contains(": static func(")
                || t.starts_with("constructor("))
            || (t.ends_with(',') && !t.starts_with("//"));
        if is_item && i > 0 {
            let prev = lines[i - 1].trim();
            assert!(
                prev.starts_with("///"),
                "wit/plugin.wit line {}: `{t}` has no /// doc",
                i + 1
            );
        }
    }
}
