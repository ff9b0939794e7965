//! Checkers for the string forms parameters use: `KEY=VAL,KEY=VAL` lists, Kubernetes label
//! keys and values, resource quantities, plugin lists.

/// Parses `KEY=VAL,KEY=VAL` (empty string = empty list). Whitespace around items is trimmed;
/// values may contain `=`. Errors name the item.
pub fn parse_kv_list(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!(
                "item {item:?} is not KEY=VALUE (expected KEY=VAL,KEY=VAL)"
            ));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!(
                "item {item:?} has an empty key (expected KEY=VAL,KEY=VAL)"
            ));
        }
        out.push((k.to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_name(k: &str) -> Result<(), String> {
    let mut cs = k.chars();
    let ok = cs
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ))
    }
}

/// `[a-z0-9A-Z]([-_.a-z0-9A-Z]*[a-z0-9A-Z])?`, at most `max` characters (Kubernetes names and label values).
fn is_k8s_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain (label/annotation key prefix): lowercase, dot-separated, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
                && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label or annotation key: `[prefix/]name`, prefix a DNS subdomain, name at most 63 characters.
pub fn check_k8s_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(format!(
            "key {k:?}: the prefix before '/' must be a DNS subdomain (lowercase, e.g. example.com)"
        ));
    }
    if !is_k8s_name(name, 63) {
        return Err(format!(
            "key {k:?}: the name must be 1-63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// A label value: empty, or at most 63 characters of `[A-Za-z0-9-_.]`, alphanumeric at both ends.
pub fn check_k8s_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_k8s_name(v, 63) {
        Ok(())
    } else {
        Err(format!(
            "label value {v:?}: must be at most 63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"
        ))
    }
}

/// Splits a Kubernetes quantity into its number and suffix; the number must be non-negative.
fn quantity(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    if num.is_empty() || num == "." {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    Some((n, suffix))
}

/// A memory quantity: `32Gi`, `500M`, `1e9`, `128974848` (binary Ki..Ei, decimal k..E), > 0.
/// Returns bytes.
pub fn parse_memory(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a memory quantity (e.g. 32Gi, 500Mi, 8G, 1e9)");
    let (n, suffix) = quantity(s).ok_or_else(bad)?;
    let mult = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        sfx if sfx.starts_with(['e', 'E']) => {
            let exp: i32 = sfx[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let bytes = n * mult;
    if bytes > 0.0 {
        Ok(bytes)
    } else {
        Err(format!("{s:?} must be more than zero"))
    }
}

/// A CPU quantity: `4`, `0.5`, `500m`, > 0. Returns cores.
pub fn parse_cpu(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a CPU quantity (e.g. 4, 0.5, 500m)");
    let (n, suffix) = quantity(s).ok_or_else(bad)?;
    let cores = match suffix {
        "" => n,
        "m" => n / 1000.0,
        _ => return Err(bad()),
    };
    if cores > 0.0 {
        Ok(cores)
    } else {
        Err(format!("{s:?} must be more than zero"))
    }
}

/// The three plugin kinds.
pub const PLUGIN_KINDS: [&str; 3] = ["preprocessor", "scheduler", "reporter"];

/// One `kind=path` entry of `training_plugins`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginSpec {
    pub kind: String,
    pub path: std::path::PathBuf,
}

/// Parses `training_plugins`: `kind=path,...`; at most one preprocessor and one scheduler.
pub fn parse_plugins(s: &str) -> Result<Vec<PluginSpec>, String> {
    let mut out: Vec<PluginSpec> = Vec::new();
    for (kind, path) in parse_kv_list(s)? {
        if !PLUGIN_KINDS.contains(&kind.as_str()) {
            return Err(format!(
                "unknown plugin kind {kind:?} (allowed: preprocessor, scheduler, reporter)"
            ));
        }
        if path.is_empty() {
            return Err(format!("{kind}= has no path to a .wasm component"));
        }
        if kind != "reporter" && out.iter().any(|p| p.kind == kind) {
            return Err(format!(
                "more than one {kind} plugin (only reporters can be several)"
            ));
        }
        out.push(PluginSpec {
            kind,
            path: path.into(),
        });
    }
    Ok(out)
}

/// Parses a string parameter holding a JSON object ("" = empty object).
pub fn parse_json_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if s.trim().is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("must be a JSON object ({...})".to_owned()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("32Gi").unwrap(), 32.0 * 1024f64.powi(3));
        assert_eq!(parse_memory("500M").unwrap(), 5e8);
        assert_eq!(parse_memory("1e9").unwrap(), 1e9);
        assert_eq!(parse_memory("1.5Ki").unwrap(), 1536.0);
        assert_eq!(parse_memory("128974848").unwrap(), 128974848.0);
        for bad in ["32Gb", "", "Gi", "-1Gi", "32 Gi", "0", "1e", "abc"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu("4").unwrap(), 4.0);
        assert_eq!(parse_cpu("0.5").unwrap(), 0.5);
        assert_eq!(parse_cpu("500m").unwrap(), 0.5);
        for bad in ["0", "4 cores", "1Gi", "", "m"] {
            assert!(parse_cpu(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kubernetes_keys_and_values() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "a-b_c.d",
            "example.com/X_y",
        ] {
            assert!(check_k8s_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-a",
            "a-",
            "Example.com/a",
            "a/b/c",
            "",
            "x/",
            &"a".repeat(64),
        ] {
            assert!(check_k8s_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_k8s_label_value("").is_ok());
        assert!(check_k8s_label_value("v1.2-x").is_ok());
        assert!(check_k8s_label_value("has space").is_err());
        assert!(check_k8s_label_value(&"v".repeat(64)).is_err());
    }

    #[test]
    fn kv_lists() {
        assert_eq!(parse_kv_list("").unwrap(), vec![]);
        assert_eq!(
            parse_kv_list(" A=1 , B=x=y ,").unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert!(parse_kv_list("A").is_err());
        assert!(parse_kv_list("=1").is_err());
        assert!(check_env_name("_OK9").is_ok());
        assert!(check_env_name("9NO").is_err());
        assert!(check_env_name("A-B").is_err());
    }

    #[test]
    fn plugin_lists() {
        let p = parse_plugins("preprocessor=a.wasm,reporter=b.wasm,reporter=c.wasm").unwrap();
        assert_eq!(p.len(), 3);
        assert!(parse_plugins("reporter=").is_err());
        assert!(parse_plugins("preprocessor=a.wasm,preprocessor=b.wasm").is_err());
        assert!(parse_plugins("loader=a.wasm").is_err());
    }
}
