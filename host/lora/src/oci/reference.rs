//! `oci://` references: `oci://[registry/]repository[:tag][@sha256:<hex>]`, with the grammar of
//! the distribution project's `reference` package. A name without a registry (no `.` or `:` in
//! its first part, and not `localhost`) is on Docker Hub (`library/` added to a one-part name), as
//! `docker pull` reads it. No tag and no digest means `latest`.

use std::fmt;

/// A parsed `oci://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// `org/name` (lower case, `/`-separated parts).
    pub repository: String,
    /// The tag, when the reference names one (or `latest` when it names neither tag nor digest).
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when the reference pins a digest.
    pub digest: Option<String>,
}

/// Is `d` a digest lora can verify (`sha256:` and 64 lower-case hex digits)?
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut prev_sep: Option<u8> = None;
    let mut run = 0;
    for &ch in b {
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            prev_sep = None;
            run = 0;
        } else if matches!(ch, b'.' | b'_' | b'-') {
            run += 1;
            let ok = match (prev_sep, ch) {
                (None, _) => true,
                (Some(b'_'), b'_') => run == 2,
                (Some(b'-'), b'-') => true,
                _ => false,
            };
            if !ok {
                return false;
            }
            prev_sep = Some(ch);
        } else {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `host[:port]` split; `[v6]` hosts keep their brackets off. `None` when the shape is wrong.
fn split_host_port(r: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = r.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => after.strip_prefix(':').map(|p| (host, Some(p))),
        };
    }
    Some(match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    })
}

fn valid_registry(r: &str) -> bool {
    let Some((host, port)) = split_host_port(r) else { return false };
    let host_ok = if r.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && !l.starts_with('-') && !l.ends_with('-') && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    host_ok && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()))
}

impl Reference {
    /// Parses `oci://...`; the error says what is wrong with it.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let rest = spec.strip_prefix("oci://").ok_or("it does not start with oci://")?;
        if rest.is_empty() {
            return Err("it names no image (expected oci://registry/repository:tag)".into());
        }
        let (name_tag, digest) = match rest.split_once('@') {
            Some((n, d)) => {
                if !is_sha256_digest(d) {
                    return Err(format!("`@{d}` is not a sha256 digest (expected @sha256: and 64 lower-case hex digits)"));
                }
                (n, Some(d.to_string()))
            }
            None => (rest, None),
        };
        // A tag follows the last `:` after the last `/` (a `:` before it is the registry's port).
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name_tag[last_slash + i + 1..];
                if !valid_tag(tag) {
                    return Err(format!("`{tag}` is not a valid tag (letters, digits, `_`, `.`, `-`; at most 128)"));
                }
                (&name_tag[..last_slash + i], Some(tag.to_string()))
            }
            None => (name_tag, None),
        };
        let mut parts: Vec<&str> = name.split('/').collect();
        let first = parts[0];
        let registry = if parts.len() > 1 && (first.contains(['.', ':']) || first == "localhost" || first.starts_with('[')) {
            parts.remove(0);
            if !valid_registry(first) {
                return Err(format!("`{first}` is not a registry host[:port]"));
            }
            first.to_string()
        } else {
            if parts.len() == 1 {
                parts.insert(0, "library");
            }
            "docker.io".to_string()
        };
        if let Some(bad) = parts.iter().find(|p| !valid_component(p)) {
            return Err(format!(
                "`{bad}` is not a valid repository part (lower-case letters and digits, separated by `.`, `_`, `__` or `-`)"
            ));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(Reference { registry, repository: parts.join("/"), tag, digest })
    }

    /// The host the registry API is on (Docker Hub's API is not at `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" || self.registry == "index.docker.io" { "registry-1.docker.io" } else { &self.registry }
    }

    /// The tag or digest to ask the registry for (the digest when both are given).
    pub fn target(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Is the registry on this machine (127.0.0.0/8, `localhost`, `[::1]`)?
    pub fn is_loopback(&self) -> bool {
        let host = split_host_port(&self.registry).map_or("", |(h, _)| h);
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn references_parse_as_docker_reads_them() {
        let r = parse("oci://127.0.0.1:5000/models/tiny:1");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_deref()), ("127.0.0.1:5000", "models/tiny", Some("1"), None));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/models/tiny:1");

        let r = parse(&format!("oci://quay.io/org/granite-modelcar@{D}"));
        assert_eq!((r.registry.as_str(), r.tag.as_deref(), r.target()), ("quay.io", None, D));
        assert!(!r.is_loopback());

        let r = parse(&format!("oci://registry.example.com/a/b/c:v1.2-rc_3@{D}"));
        assert_eq!((r.repository.as_str(), r.tag.as_deref(), r.target()), ("a/b/c", Some("v1.2-rc_3"), D));

        let r = parse("oci://ubuntu");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.api_host()), ("docker.io", "library/ubuntu", Some("latest"), "registry-1.docker.io"));
        let r = parse("oci://localhost/m");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "m"));
        assert!(r.is_loopback());
        assert_eq!(parse("oci://[::1]:5000/m:x").registry, "[::1]:5000");
        assert!(parse("oci://[::1]:5000/m:x").is_loopback());
        assert!(parse("oci://[::1]/m:x").is_loopback());
        assert_eq!(parse("oci://my_org__x/a-b--c:t").repository, "my_org__x/a-b--c");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (spec, says) in [
            ("oci://", "names no image"),
            ("oci://quay.io/Org/model:1", "`Org`"),
            ("oci://quay.io/org/../etc:1", "`..`"),
            ("oci://quay.io/org/model:-bad", "not a valid tag"),
            ("oci://quay.io/org/model@sha256:abc", "not a sha256 digest"),
            ("oci://quay.io/org/model@md5:0123", "not a sha256 digest"),
            ("oci://bad_host.io:x/m:1", "not a registry"),
            ("oci://quay.io//m:1", "``"),
        ] {
            let err = Reference::parse(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }
}
