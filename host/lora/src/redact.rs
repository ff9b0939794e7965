//! One rule for hiding secrets in parameters, used by everything that hands parameters to a plugin
//! (a reporter's run info) or prints or writes them (`--dry-run`, the run manifest in the outputs
//! and in every checkpoint).
//!
//! A key looks secret when one of its words (split at `_`, `-`, `.`, spaces and camelCase) is
//! `TOKEN`, `SECRET`, `PASSWORD`, `PASSWD`, `PASSPHRASE`, `KEY`, `APIKEY`, `CREDENTIAL(S)`, `CREDS`,
//! `AUTH`, `AUTHORIZATION`, `COOKIE` or `PRIVATE`, or ends in `TOKEN`, `SECRET`, `PASSWORD` or
//! `APIKEY` (`HFTOKEN`), case-insensitively: `HF_TOKEN`, `aws_secret_access_key`, `apiKey` are
//! secret; `TOKENIZERS_PARALLELISM`, `max_tokens`, `author` are not. Its value becomes
//! [`HIDDEN`] wherever it appears: `KEY=VALUE` lists (`training_envs`, the metadata labels and
//! annotations) and JSON objects at any depth (`training_plugin_config` settings,
//! `training_lr_scheduler_kwargs`, `kubernetes_config`).
//!
//! The manifest is redacted before its resume key is computed, so two runs that differ only in a
//! secret get the same key: rotating a token never blocks a resume (secrets do not change what is
//! trained), and the key never depends on a secret.

use serde_json::{Map, Value};

/// What a secret value is shown as.
pub const HIDDEN: &str = "<hidden>";

/// Parameters whose value is a `KEY=VALUE,KEY=VALUE` list.
const KV_PARAMS: &[&str] = &[
    "training_envs",
    "training_metadata_labels",
    "training_metadata_annotations",
];

/// Parameters whose value is a JSON object written as a string.
const JSON_STRING_PARAMS: &[&str] = &["training_plugin_config", "training_lr_scheduler_kwargs"];

const SECRET_WORDS: &[&str] = &[
    "TOKEN",
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWORDS",
    "PASSWD",
    "PASSPHRASE",
    "KEY",
    "KEYS",
    "APIKEY",
    "CREDENTIAL",
    "CREDENTIALS",
    "CREDS",
    "AUTH",
    "AUTHORIZATION",
    "COOKIE",
    "PRIVATE",
];
const SECRET_SUFFIXES: &[&str] = &["TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY"];

/// The words of a key, uppercased: split at non-alphanumerics and camelCase boundaries.
fn words(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in key
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
    {
        let chars: Vec<char> = part.chars().collect();
        let mut word = String::new();
        for (i, &c) in chars.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1);
            let boundary = c.is_ascii_uppercase()
                && prev.is_some_and(|p| {
                    p.is_ascii_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
                });
            if boundary && !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            word.push(c.to_ascii_uppercase());
        }
        out.push(word);
    }
    out
}

/// Whether values under `key` are hidden.
pub fn is_secret_key(key: &str) -> bool {
    words(key).iter().any(|w| {
        SECRET_WORDS.contains(&w.as_str())
            || SECRET_SUFFIXES
                .iter()
                .any(|s| w.len() > s.len() && w.ends_with(s))
    })
}

/// `value` as shown for `key`.
pub fn shown(key: &str, value: &str) -> String {
    if is_secret_key(key) && !value.is_empty() {
        HIDDEN.to_string()
    } else {
        value.to_string()
    }
}

/// A `KEY=VALUE,KEY=VALUE` list with secret values hidden (the rest of the text as it was).
pub fn kv_list(list: &str) -> String {
    list.split(',')
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) if is_secret_key(k.trim()) && !v.trim().is_empty() => {
                format!("{k}={HIDDEN}")
            }
            _ => entry.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Hides the values of secret keys in a JSON value, at any depth.
pub fn json(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let empty = v.is_null() || v.as_str() == Some("");
                if is_secret_key(k) && !empty {
                    *v = Value::String(HIDDEN.into());
                } else {
                    json(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        _ => {}
    }
}

/// [`json`] for a Kubernetes object (`kubernetes_config`, a KFP TaskConfig): there `key` names
/// a label or a toleration, never a secret value, so it is shown (a `secretKeyRef` is still
/// hidden whole, by its name); and an `env` entry `{name, value}` whose name looks secret (`HF_TOKEN`) has its
/// value hidden, which the field names alone would not show.
pub fn kubernetes(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let secret_env = map.get("name").and_then(Value::as_str).is_some_and(is_secret_key);
            for (k, v) in map.iter_mut() {
                let empty = v.is_null() || v.as_str() == Some("");
                if (k == "value" && secret_env || k != "key" && is_secret_key(k)) && !empty {
                    *v = Value::String(HIDDEN.into());
                } else {
                    kubernetes(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes),
        _ => {}
    }
}

/// Hides secrets in a parameter set keyed by parameter name (`params_as_used`).
pub fn params(params: &mut Map<String, Value>) {
    for (name, value) in params.iter_mut() {
        param(name, value);
    }
}

/// Hides secrets in one parameter's value.
pub fn param(name: &str, value: &mut Value) {
    match value {
        Value::String(s) if KV_PARAMS.contains(&name) => *s = kv_list(s),
        Value::String(s) if JSON_STRING_PARAMS.contains(&name) => {
            if let Ok(mut v) = serde_json::from_str::<Value>(s) {
                json(&mut v);
                *s = v.to_string();
            }
        }
        v if is_secret_key(name.trim_start_matches("training_")) && !v.is_null() => {
            *v = Value::String(HIDDEN.into())
        }
        v if name == "kubernetes_config" => kubernetes(v),
        v => json(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_keys_are_found_by_word_not_by_substring() {
        for k in [
            "HF_TOKEN",
            "hf_token",
            "WANDB_API_KEY",
            "aws_secret_access_key",
            "DB_PASSWORD",
            "passwd",
            "apiKey",
            "HFToken",
            "GITHUB_AUTH",
            "Authorization",
            "my-credentials",
            "SSH_PRIVATE_KEY",
            "HFTOKEN",
            "clientSecret",
            "bearer_token",
        ] {
            assert!(is_secret_key(k), "{k} should be secret");
        }
        for k in [
            "TOKENIZERS_PARALLELISM",
            "max_tokens",
            "author",
            "HF_HOME",
            "keyword",
            "monkey",
            "url",
            "tokens_per_step",
        ] {
            assert!(!is_secret_key(k), "{k} should not be secret");
        }
    }

    #[test]
    fn every_form_of_parameter_is_redacted_the_same_way() {
        let mut p = Map::new();
        p.insert(
            "training_envs".into(),
            json!("HF_HOME=/c, HF_TOKEN=hf_abc,TOKENIZERS_PARALLELISM=false,EMPTY_TOKEN="),
        );
        p.insert(
            "training_plugin_config".into(),
            json!(r#"{"webhook":{"settings":{"url":"https://x","api_key":"k1","nested":{"password":"p"}},"grants":{"env":["HF_TOKEN"]}}}"#),
        );
        p.insert(
            "training_lr_scheduler_kwargs".into(),
            json!(r#"{"min_lr": 0.1}"#),
        );
        p.insert(
            "kubernetes_config".into(),
            json!({"secret_ref": "s", "image": "i"}),
        );
        p.insert("training_seed".into(), json!(3));
        params(&mut p);
        assert_eq!(
            p["training_envs"],
            "HF_HOME=/c, HF_TOKEN=<hidden>,TOKENIZERS_PARALLELISM=false,EMPTY_TOKEN="
        );
        let cfg: Value =
            serde_json::from_str(p["training_plugin_config"].as_str().unwrap()).unwrap();
        assert_eq!(cfg["webhook"]["settings"]["api_key"], HIDDEN);
        assert_eq!(cfg["webhook"]["settings"]["nested"]["password"], HIDDEN);
        assert_eq!(cfg["webhook"]["settings"]["url"], "https://x");
        assert_eq!(
            cfg["webhook"]["grants"]["env"][0], "HF_TOKEN",
            "names of variables are not secrets"
        );
        assert_eq!(p["kubernetes_config"]["secret_ref"], HIDDEN);
        assert_eq!(p["kubernetes_config"]["image"], "i");
        assert_eq!(p["training_seed"], 3);
        // Redaction is idempotent and the same for two different secrets.
        let mut other = p.clone();
        other["training_envs"] =
            json!("HF_HOME=/c, HF_TOKEN=hf_xyz,TOKENIZERS_PARALLELISM=false,EMPTY_TOKEN=");
        params(&mut other);
        assert_eq!(other, p);
    }

    /// A TaskConfig's toleration and Secret keys are names (shown); a secret-looking env
    /// variable's value is hidden (the test_kfp contract check found the first).
    #[test]
    fn kubernetes_config_shows_keys_and_hides_secret_env_values() {
        let mut v = json!({
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "env": [{"name": "HF_TOKEN", "value": "hf_abc"}, {"name": "HF_HUB_OFFLINE", "value": "0"}],
            "affinity": {"nodeAffinity": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]}},
            "apiToken": "t0",
        });
        param("kubernetes_config", &mut v);
        assert_eq!(v["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(v["env"][0]["value"], HIDDEN);
        assert_eq!(v["env"][1]["value"], "0");
        assert_eq!(v["affinity"]["nodeAffinity"]["matchExpressions"][0]["key"], "gpu");
        assert_eq!(v["apiToken"], HIDDEN);
        assert!(!v.to_string().contains("hf_abc"));
    }
}
