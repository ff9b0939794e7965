//! The OCI distribution API, pull side: manifests (OCI and Docker media types, image indexes)
//! and blobs, with the `WWW-Authenticate` flow: an answer 401 names a Bearer token realm (asked
//! with the credential as Basic auth, or an identity token as an OAuth2 refresh token) or Basic
//! auth; the request is repeated once with it.
//!
//! Plain `http://` is used only for registries on this machine (127.0.0.0/8, localhost, [::1])
//! and those listed in `LORA_OCI_INSECURE`; everything else is HTTPS, and a token realm on plain
//! http is refused for other hosts (it would send the credential in clear).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::{self, Credential, Found};
use super::reference::{Reference, is_sha256_digest};
use super::{OciError, OciOptions};
use crate::hub::hex;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &[&str] =
    &["application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws"];

/// Manifests larger than this are refused (the distribution spec's registries cap them at 4 MiB).
const MANIFEST_LIMIT: u64 = 4 << 20;

/// A content descriptor (OCI image spec `descriptor.md`).
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct MediaTypeOnly {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// A manifest as fetched: its bytes' digest and media type.
pub struct Fetched {
    pub digest: String,
    pub media_type: String,
    pub body: Vec<u8>,
}

pub struct Client<'a> {
    r: &'a Reference,
    base: String,
    plain_http: bool,
    agent: ureq::Agent,
    creds: Option<Found>,
    /// The `Authorization` header value in use (after a challenge was answered).
    authorization: Option<String>,
}

/// The architecture name OCI uses for this machine.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, k: &str) -> Option<String> {
    resp.headers().get(k).and_then(|v| v.to_str().ok()).map(String::from)
}

/// The distribution API's error body (`{"errors":[{"code","message"}]}`) as one line.
fn registry_detail(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let text = resp.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(Deserialize)]
    struct Es {
        errors: Vec<E>,
    }
    match serde_json::from_str::<Es>(&text) {
        Ok(es) if !es.errors.is_empty() => es.errors.iter().map(|e| format!("{} ({})", e.code, e.message)).collect::<Vec<_>>().join("; "),
        _ => text.chars().take(200).collect::<String>().trim().to_string(),
    }
}

impl<'a> Client<'a> {
    pub fn new(r: &'a Reference, opts: &OciOptions) -> Result<Self, OciError> {
        let plain_http = r.is_loopback() || opts.insecure.iter().any(|h| h == &r.registry);
        let creds = auth::lookup(r).map_err(|why| OciError::Credentials { reference: r.to_string(), why })?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(10)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("lora/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let scheme = if plain_http { "http" } else { "https" };
        Ok(Client { r, base: format!("{scheme}://{}/v2/{}", r.api_host(), r.repository), plain_http, agent, creds, authorization: None })
    }

    fn unreachable(&self, url: &str, e: &ureq::Error) -> OciError {
        let hint = if self.plain_http {
            String::new()
        } else {
            format!(" (if {} speaks plain http, list it in LORA_OCI_INSECURE)", self.r.registry)
        };
        OciError::Unreachable { reference: self.r.to_string(), url: url.to_string(), why: format!("{e}{hint}") }
    }

    /// GET `url`, answering one authentication challenge.
    fn get(&mut self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let mut answered = false;
        loop {
            let mut req = self.agent.get(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(auth) = &self.authorization {
                req = req.header("Authorization", auth);
            }
            let mut resp = req.call().map_err(|e| self.unreachable(url, &e))?;
            let status = resp.status().as_u16();
            if status != 401 {
                return Ok(resp);
            }
            let challenge = header(&resp, "WWW-Authenticate").unwrap_or_default();
            let detail = registry_detail(&mut resp);
            if answered {
                return Err(self.auth_error(status, &detail));
            }
            self.answer(&challenge, &detail)?;
            answered = true;
        }
    }

    fn auth_error(&self, status: u16, detail: &str) -> OciError {
        match &self.creds {
            Some(found) => OciError::AuthRejected {
                reference: self.r.to_string(),
                registry: self.r.registry.clone(),
                from: found.source.clone(),
                why: format!("HTTP {status}: {detail}"),
            },
            None => OciError::NeedsAuth { reference: self.r.to_string(), registry: self.r.registry.clone(), looked: auth::places() },
        }
    }

    /// Sets `self.authorization` for the challenge (`WWW-Authenticate` value) of a 401.
    fn answer(&mut self, challenge: &str, detail: &str) -> Result<(), OciError> {
        let challenges = auth::parse_challenges(challenge);
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.token(&bearer.params)?;
            self.authorization = Some(format!("Bearer {token}"));
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return match &self.creds {
                Some(Found { credential: Credential::Basic { username, password }, .. }) => {
                    let b = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{username}:{password}"));
                    self.authorization = Some(format!("Basic {b}"));
                    Ok(())
                }
                Some(found) => Err(OciError::AuthRejected {
                    reference: self.r.to_string(),
                    registry: self.r.registry.clone(),
                    from: found.source.clone(),
                    why: "the registry asks for Basic auth and this credential is an identity token".into(),
                }),
                None => Err(self.auth_error(401, detail)),
            };
        }
        Err(OciError::Protocol {
            reference: self.r.to_string(),
            url: self.base.clone(),
            why: format!("the registry answered 401 with an authentication challenge lora cannot answer: `{challenge}`"),
        })
    }

    /// A Bearer token from the realm (distribution `docs/spec/auth/token.md`, `oauth.md`).
    fn token(&self, params: &BTreeMap<String, String>) -> Result<String, OciError> {
        let protocol = |why: String| OciError::Protocol { reference: self.r.to_string(), url: self.base.clone(), why };
        let realm = params.get("realm").ok_or_else(|| protocol("a Bearer challenge without a realm".into()))?;
        let realm_host = realm.strip_prefix("http://").map(|rest| rest.split(['/', '?']).next().unwrap_or(""));
        if let Some(host) = realm_host {
            let ok = self.plain_http && (host == self.r.api_host() || host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]"));
            if !ok {
                return Err(protocol(format!("the token realm {realm} is plain http: lora does not send credentials in clear")));
            }
        } else if !realm.starts_with("https://") {
            return Err(protocol(format!("the token realm `{realm}` is not an http(s) URL")));
        }
        let scope = format!("repository:{}:pull", self.r.repository);
        let service = params.get("service").cloned().unwrap_or_default();
        let call = match self.creds.as_ref().map(|f| &f.credential) {
            Some(Credential::IdentityToken(refresh)) => self.agent.post(realm).send_form([
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("service", service.as_str()),
                ("scope", scope.as_str()),
                ("client_id", "lora"),
            ]),
            basic => {
                let mut req = self.agent.get(realm).query("scope", &scope);
                if !service.is_empty() {
                    req = req.query("service", &service);
                }
                if let Some(Credential::Basic { username, password }) = basic {
                    let b = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{username}:{password}"));
                    req = req.header("Authorization", format!("Basic {b}"));
                }
                req.call()
            }
        };
        let mut resp = call.map_err(|e| self.unreachable(realm, &e))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            let detail = registry_detail(&mut resp);
            return Err(self.auth_error(status, &format!("the token service {realm} refused: {detail}")));
        }
        if status != 200 {
            let detail = registry_detail(&mut resp);
            return Err(OciError::Http { reference: self.r.to_string(), url: realm.clone(), status, detail });
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let text = resp.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| protocol(format!("reading the token: {e}")))?;
        let t: Token = serde_json::from_str(&text).map_err(|e| protocol(format!("the token service {realm} sent no JSON token: {e}")))?;
        t.token.or(t.access_token).filter(|t| !t.is_empty()).ok_or_else(|| protocol(format!("the token service {realm} sent no `token`")))
    }

    fn status_error(&self, url: &str, status: u16, detail: String, what: &str) -> OciError {
        if status == 404 {
            return OciError::NotFound { reference: self.r.to_string(), what: what.to_string(), detail };
        }
        if status == 401 || status == 403 {
            return self.auth_error(status, &detail);
        }
        OciError::Http { reference: self.r.to_string(), url: url.to_string(), status, detail }
    }

    /// The manifest for a tag or digest, with its digest verified (equal to the requested
    /// digest, and to `Docker-Content-Digest` when the registry sends one).
    pub fn manifest(&mut self, target: &str) -> Result<Fetched, OciError> {
        let url = format!("{}/manifests/{target}", self.base);
        let accept = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", ");
        let mut resp = self.get(&url, Some(&accept))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let detail = registry_detail(&mut resp);
            let what = if target.starts_with("sha256:") { format!("manifest {target}") } else { format!("tag `{target}`") };
            return Err(self.status_error(&url, status, detail, &what));
        }
        let content_type = header(&resp, "Content-Type").unwrap_or_default();
        let announced = header(&resp, "Docker-Content-Digest");
        let body = resp.body_mut().with_config().limit(MANIFEST_LIMIT).read_to_vec().map_err(|e| OciError::Protocol {
            reference: self.r.to_string(),
            url: url.clone(),
            why: format!("reading the manifest (at most {MANIFEST_LIMIT} bytes): {e}"),
        })?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
        let expected = if target.starts_with("sha256:") { Some(target.to_string()) } else { announced.filter(|d| d.starts_with("sha256:")) };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(OciError::Digest { reference: self.r.to_string(), what: format!("the manifest from {url}"), expected, actual: digest });
        }
        let head: MediaTypeOnly = serde_json::from_slice(&body)
            .map_err(|e| OciError::Protocol { reference: self.r.to_string(), url: url.clone(), why: format!("the manifest is not JSON: {e}") })?;
        let media_type = head.media_type.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| {
            let ct = content_type.split(';').next().unwrap_or("").trim().to_string();
            // An OCI manifest may omit mediaType; an index has `manifests`.
            if ct.is_empty() || ct == "application/json" {
                if head.manifests.is_some() { OCI_INDEX.to_string() } else { OCI_MANIFEST.to_string() }
            } else {
                ct
            }
        });
        if DOCKER_SCHEMA1.contains(&media_type.as_str()) || head.schema_version == Some(1) {
            return Err(OciError::Unsupported {
                reference: self.r.to_string(),
                why: "the image has a Docker schema 1 manifest (deprecated since 2017); push it again with a current tool".into(),
            });
        }
        Ok(Fetched { digest, media_type, body })
    }

    /// Follows image indexes down to an image manifest: `linux/<this machine's arch>`, or the
    /// only manifest. Returns the image manifest and its digest.
    pub fn image(&mut self, top: Fetched) -> Result<(ImageManifest, String), OciError> {
        let mut current = top;
        for _ in 0..3 {
            let protocol = |why: String| OciError::Protocol { reference: self.r.to_string(), url: format!("{}/manifests/{}", self.base, current.digest), why };
            match current.media_type.as_str() {
                OCI_MANIFEST | DOCKER_MANIFEST => {
                    let m: ImageManifest = serde_json::from_slice(&current.body).map_err(|e| protocol(format!("not an image manifest: {e}")))?;
                    for d in std::iter::once(&m.config).chain(&m.layers) {
                        if !is_sha256_digest(&d.digest) {
                            return Err(protocol(format!("descriptor digest `{}` is not sha256:<64 hex> (lora verifies sha256 only)", d.digest)));
                        }
                    }
                    return Ok((m, current.digest));
                }
                OCI_INDEX | DOCKER_LIST => {
                    let index: Index = serde_json::from_slice(&current.body).map_err(|e| protocol(format!("not an image index: {e}")))?;
                    // Attestations and signatures ride along as `unknown/unknown` entries.
                    let candidates: Vec<&Descriptor> =
                        index.manifests.iter().filter(|d| d.platform.as_ref().is_none_or(|p| p.architecture != "unknown")).collect();
                    let arch = oci_arch();
                    let chosen = candidates
                        .iter()
                        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
                        .or_else(|| if candidates.len() == 1 { candidates.first() } else { None })
                        .ok_or_else(|| {
                            let platforms: Vec<String> = candidates
                                .iter()
                                .map(|d| d.platform.as_ref().map_or("(no platform)".to_string(), |p| format!("{}/{}", p.os, p.architecture)))
                                .collect();
                            protocol(format!("the image index has no linux/{arch} manifest (it has: {})", platforms.join(", ")))
                        })?;
                    let digest = chosen.digest.clone();
                    if !is_sha256_digest(&digest) {
                        return Err(protocol(format!("index entry digest `{digest}` is not sha256:<64 hex>")));
                    }
                    current = self.manifest(&digest)?;
                }
                other => {
                    return Err(protocol(format!(
                        "unsupported manifest media type `{other}` (lora reads {OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST})"
                    )));
                }
            }
        }
        Err(OciError::Protocol { reference: self.r.to_string(), url: self.base.clone(), why: "image indexes nest more than 3 deep".into() })
    }

    /// Opens a blob for streaming (the caller verifies its digest and size as it reads).
    pub fn blob(&mut self, d: &Descriptor) -> Result<ureq::Body, OciError> {
        let url = format!("{}/blobs/{}", self.base, d.digest);
        let mut resp = self.get(&url, None)?;
        let status = resp.status().as_u16();
        if status != 200 {
            let detail = registry_detail(&mut resp);
            return Err(self.status_error(&url, status, detail, &format!("blob {}", d.digest)));
        }
        Ok(resp.into_body())
    }

    /// Where blobs come from, for messages.
    pub fn blob_url(&self, d: &Descriptor) -> String {
        format!("{}/blobs/{}", self.base, d.digest)
    }
}
