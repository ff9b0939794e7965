//! Registry credentials, looked up where `docker`, `podman` and `skopeo` keep them, and the
//! `WWW-Authenticate` challenges a registry answers with.
//!
//! Order (first match wins): `LORA_OCI_USERNAME` + `LORA_OCI_PASSWORD`; `$REGISTRY_AUTH_FILE`;
//! `$XDG_RUNTIME_DIR/containers/auth.json`; `~/.config/containers/auth.json`;
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. In a file, `credHelpers[registry]`
//! (runs `docker-credential-<name> get`), then an `auths` entry (the longest key matching
//! `registry/repository` wins; `https://` and `/v1/` forms are accepted), then `credsStore`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

use super::reference::Reference;

/// A credential for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken` in a docker config, or a helper's `<token>` user).
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <password>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<token>)"),
        }
    }
}

/// A credential and where it was found (for error messages: never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub credential: Credential,
    pub source: String,
}

/// The credential files lora reads, in order, with whether each exists.
pub fn auth_files() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let mut files = Vec::new();
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    if let Some(d) = var("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config"))) {
        files.push(d.join("containers/auth.json"));
    }
    match var("DOCKER_CONFIG") {
        Some(d) => files.push(d.join("config.json")),
        None => {
            if let Some(h) = &home {
                files.push(h.join(".docker/config.json"));
            }
        }
    }
    files
}

/// Where [`lookup`] looks, as one line for an error message.
pub fn places() -> String {
    let mut p = vec!["LORA_OCI_USERNAME/LORA_OCI_PASSWORD".to_string()];
    p.extend(auth_files().iter().map(|f| f.display().to_string()));
    p.join(", ")
}

#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The registry names a config key may use for `registry` (Docker Hub has several).
fn registry_aliases(registry: &str) -> Vec<&str> {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => vec!["docker.io", "index.docker.io", "registry-1.docker.io"],
        r => vec![r],
    }
}

/// A config key as `registry[/path]`: no scheme, no trailing `/`, no `/v1` or `/v2`.
fn normalise_key(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.trim_end_matches('/');
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    k.trim_end_matches('/').to_string()
}

/// How well `key` matches the reference: `Some(len)` of the matched `registry/path` (longer is
/// more specific), `None` when it does not match.
fn key_match(key: &str, r: &Reference) -> Option<usize> {
    let key = normalise_key(key);
    let (reg, path) = match key.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (key.as_str(), None),
    };
    if !registry_aliases(&r.registry).contains(&reg) {
        return None;
    }
    match path {
        None => Some(reg.len()),
        Some(p) if r.repository == p || r.repository.starts_with(&format!("{p}/")) => Some(reg.len() + 1 + p.len()),
        Some(_) => None,
    }
}

fn decode_entry(e: &AuthEntry, file: &str) -> Result<Option<Credential>, String> {
    if let Some(t) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::IdentityToken(t.clone())));
    }
    if let Some(auth) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|err| format!("{file}: an `auth` value is not base64 ({err})"))?;
        let text = String::from_utf8(raw).map_err(|_| format!("{file}: an `auth` value is not UTF-8 `user:password`"))?;
        let (u, p) = text.split_once(':').ok_or_else(|| format!("{file}: an `auth` value is not `user:password`"))?;
        return Ok(Some(Credential::Basic { username: u.into(), password: p.into() }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic { username: u.clone(), password: p.clone() })),
        _ => Ok(None),
    }
}

/// Runs `docker-credential-<helper> get` for the registry. `Ok(None)` when the helper has no
/// entry for it.
fn run_helper(helper: &str, registry: &str) -> Result<Option<Credential>, String> {
    let program = format!("docker-credential-{helper}");
    let server = if registry_aliases(registry).len() > 1 { "https://index.docker.io/v1/" } else { registry };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("credential helper `{program}` could not be started: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("credential helper `{program}`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // The protocol's way of saying "no entry".
        if stdout.contains("credentials not found") || String::from_utf8_lossy(&out.stderr).contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!("credential helper `{program} get` failed ({}): {}", out.status, stdout.trim()));
    }
    #[derive(Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: HelperAnswer =
        serde_json::from_str(&stdout).map_err(|e| format!("credential helper `{program} get` did not print its JSON answer: {e}"))?;
    Ok(Some(if a.username == "<token>" {
        Credential::IdentityToken(a.secret)
    } else {
        Credential::Basic { username: a.username, password: a.secret }
    }))
}

/// The credential for `r`, or `None` (anonymous). A file that exists but cannot be read or
/// parsed is an error naming it: silently pulling anonymously would hide a broken login.
pub fn lookup(r: &Reference) -> Result<Option<Found>, String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(username), Some(password)) = (var("LORA_OCI_USERNAME"), var("LORA_OCI_PASSWORD")) {
        return Ok(Some(Found { credential: Credential::Basic { username, password }, source: "LORA_OCI_USERNAME/LORA_OCI_PASSWORD".into() }));
    }
    for path in auth_files() {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading registry credentials {}: {e}", path.display())),
        };
        let shown = path.display().to_string();
        let file: AuthFile = serde_json::from_str(&text).map_err(|e| format!("registry credentials {shown} are not valid JSON: {e}"))?;
        if let Some(helper) = registry_aliases(&r.registry).iter().find_map(|a| file.cred_helpers.get(*a)) {
            if let Some(c) = run_helper(helper, &r.registry)? {
                return Ok(Some(Found { credential: c, source: format!("docker-credential-{helper} (credHelpers in {shown})") }));
            }
            continue;
        }
        let best = file.auths.iter().filter_map(|(k, e)| key_match(k, r).map(|n| (n, k, e))).max_by_key(|(n, _, _)| *n);
        if let Some((_, key, entry)) = best
            && let Some(c) = decode_entry(entry, &shown)?
        {
            return Ok(Some(Found { credential: c, source: format!("{shown} (auths.\"{key}\")") }));
        }
        if let Some(store) = &file.creds_store
            && let Some(c) = run_helper(store, &r.registry)?
        {
            return Ok(Some(Found { credential: c, source: format!("docker-credential-{store} (credsStore in {shown})") }));
        }
    }
    Ok(None)
}

/// One challenge of a `WWW-Authenticate` header: `Bearer realm="...",service="...",scope="..."`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower case: `bearer` or `basic`.
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value (RFC 7235: comma-separated challenges, quoted or token params).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && !matches!(s[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        String::from_utf8_lossy(&s[start..*i]).to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        if i < s.len() && s[i] == b'=' {
            // A parameter of the current challenge.
            i += 1;
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i += 1;
                String::from_utf8_lossy(&v).to_string()
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else if !word.is_empty() {
            out.push(Challenge { scheme: word.to_ascii_lowercase(), params: BTreeMap::new() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn challenges_parse_with_quotes_and_commas() {
        let c = parse_challenges(r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.example.com/token");
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
        let c = parse_challenges(r#"Basic realm="Registry Realm", Bearer realm=https://x/t"#);
        assert_eq!(c.iter().map(|c| c.scheme.as_str()).collect::<Vec<_>>(), ["basic", "bearer"]);
        assert_eq!(c[1].params["realm"], "https://x/t");
    }

    #[test]
    fn config_keys_match_the_most_specific_entry() {
        let tiny = r("oci://127.0.0.1:5000/models/tiny:1");
        assert_eq!(key_match("127.0.0.1:5000", &tiny), Some(14));
        assert_eq!(key_match("http://127.0.0.1:5000/v2/", &tiny), Some(14));
        assert!(key_match("127.0.0.1:5000/models", &tiny) > key_match("127.0.0.1:5000", &tiny));
        assert_eq!(key_match("127.0.0.1:5000/mod", &tiny), None, "a path prefix only matches whole parts");
        assert_eq!(key_match("127.0.0.1:5001", &tiny), None);
        assert!(key_match("https://index.docker.io/v1/", &r("oci://ubuntu")).is_some());
    }

    #[test]
    fn entries_decode_auth_and_identity_tokens() {
        let e = AuthEntry { auth: Some(base64::engine::general_purpose::STANDARD.encode("u:p:with:colons")), ..AuthEntry::default() };
        assert_eq!(decode_entry(&e, "f").unwrap(), Some(Credential::Basic { username: "u".into(), password: "p:with:colons".into() }));
        let e = AuthEntry { identitytoken: Some("refresh".into()), auth: Some("eA==".into()), ..AuthEntry::default() };
        assert_eq!(decode_entry(&e, "f").unwrap(), Some(Credential::IdentityToken("refresh".into())));
        let e = AuthEntry { auth: Some("not base64!".into()), ..AuthEntry::default() };
        assert!(decode_entry(&e, "/x/config.json").unwrap_err().contains("/x/config.json"));
        assert_eq!(decode_entry(&AuthEntry::default(), "f").unwrap(), None, "an empty entry (credsStore style) is no credential");
        let shown = format!("{:?}", Credential::Basic { username: "u".into(), password: "secret".into() });
        assert!(!shown.contains("secret"), "{shown}");
    }
}
