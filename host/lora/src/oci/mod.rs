//! `oci://` models: a model image pulled from a registry through the OCI distribution API and
//! unpacked into a cache keyed by its manifest digest.
//!
//! Two shapes are read (see [`unpack`]): a *modelcar* (KServe's way: an image whose layers put
//! the model folder under `/models`) and an *OCI artifact* whose layers are the model files,
//! named by their `org.opencontainers.image.title` annotations (what `oras push` writes).
//!
//! - Every byte is verified: the manifest against the digest asked for (or the registry's
//!   `Docker-Content-Digest`), each layer against its descriptor's digest and size, while it
//!   streams. A failed check leaves nothing in the cache.
//! - Cache (`$LORA_OCI_CACHE`, default `$HF_HOME/oci`, so `~/.cache/huggingface/oci`, and under
//!   KFP on the PVC): `models/sha256-<hex>/` is the unpacked tree of the digest the reference
//!   resolved to (the index or manifest digest, what `@sha256:` pins); `refs/<registry>/<repo>/<tag>`
//!   holds the digest a tag last resolved to. An entry is unpacked into `models/.partial-*` and
//!   renamed into place when complete, so an interrupted pull never looks complete.
//! - Offline (`HF_HUB_OFFLINE=1`, which already means "models from the cache only" for hub ids):
//!   a digest or a tag resolves from the cache without the network. Online, a registry that cannot
//!   be reached falls back to the cached tag with a warning, as the hub client does.
//! - Credentials: [`auth`]; transport and challenges: [`registry`].

mod auth;
mod reference;
mod registry;
mod unpack;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use reference::Reference;
use registry::{Client, Descriptor};

use crate::hub::{self, HubOptions, Progress, ResolvedModel, hex};

/// Where and how `oci://` models are pulled; read from the environment by [`OciOptions::from_env`].
#[derive(Debug, Clone, PartialEq)]
pub struct OciOptions {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub progress: bool,
    /// Registries (`host[:port]`) spoken to over plain http besides loopback ones.
    pub insecure: Vec<String>,
}

impl OciOptions {
    /// `LORA_OCI_CACHE` (default `$HF_HOME/oci`), `LORA_OCI_INSECURE` (comma-separated
    /// `host[:port]`), and the hub options' offline switch and progress setting.
    pub fn from_env(hub_opts: &HubOptions) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        OciOptions {
            cache_dir: var("LORA_OCI_CACHE").map(PathBuf::from).unwrap_or_else(|| hub::hf_home().join("oci")),
            offline: hub_opts.offline,
            progress: hub_opts.progress,
            insecure: var("LORA_OCI_INSECURE")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("training_base_model `{spec}` is not an OCI reference: {why} (expected oci://registry/repository:tag or @sha256:<digest>)")]
    BadReference { spec: String, why: String },
    #[error(
        "training_base_model `{reference}`: HF_HUB_OFFLINE is set and the image is not in the OCI cache at {cache}. \
         Run once with network (unset HF_HUB_OFFLINE), or pass a local model folder"
    )]
    OfflineNotCached { reference: String, cache: PathBuf },
    #[error(
        "training_base_model `{reference}`: cannot reach the registry at {url} ({why}) and the image is not cached. \
         Check that the registry is up and reachable, or pass a local model folder"
    )]
    Unreachable { reference: String, url: String, why: String },
    #[error("training_base_model `{reference}`: {what} not found in the registry ({detail}); check the name and tag (`skopeo list-tags docker://<registry>/<repository>` lists the tags)")]
    NotFound { reference: String, what: String, detail: String },
    #[error(
        "training_base_model `{reference}`: the registry {registry} asks for credentials and none were found (looked in: {looked}). \
         Log in (`skopeo login`, `podman login` or `docker login`), mount a docker config.json and point DOCKER_CONFIG or \
         REGISTRY_AUTH_FILE at it, or set LORA_OCI_USERNAME and LORA_OCI_PASSWORD"
    )]
    NeedsAuth { reference: String, registry: String, looked: String },
    #[error("training_base_model `{reference}`: the registry {registry} refused the credentials from {from}: {why}")]
    AuthRejected { reference: String, registry: String, from: String, why: String },
    #[error("training_base_model `{reference}`: registry credentials: {why}")]
    Credentials { reference: String, why: String },
    #[error("training_base_model `{reference}`: the registry answered {status} for {url}: {detail}")]
    Http { reference: String, url: String, status: u16, detail: String },
    #[error("training_base_model `{reference}`: the registry's answer for {url} is not what an OCI registry sends: {why}")]
    Protocol { reference: String, url: String, why: String },
    #[error(
        "training_base_model `{reference}`: {what} failed its digest check: expected {expected}, got {actual}. \
         The registry (or something between) sent other bytes than the image names; nothing was kept"
    )]
    Digest { reference: String, what: String, expected: String, actual: String },
    #[error("training_base_model `{reference}`: {what} has {actual} bytes, its descriptor says {expected}; nothing was kept")]
    Size { reference: String, what: String, expected: u64, actual: u64 },
    #[error("training_base_model `{reference}`: downloading {what}: {why}")]
    Download { reference: String, what: String, why: String },
    #[error("training_base_model `{reference}`: {why}")]
    Unsupported { reference: String, why: String },
    #[error("training_base_model `{reference}`: layer {layer} is refused: {why}; nothing was kept")]
    Layer { reference: String, layer: String, why: String },
    #[error(
        "training_base_model `{reference}` ({digest}) has no model files: {why}. A modelcar keeps the model folder \
         (config.json, *.safetensors, tokenizer files) under /models; an OCI artifact names each file with an \
         org.opencontainers.image.title annotation"
    )]
    NoModel { reference: String, digest: String, why: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

impl OciError {
    /// The reference, its credentials or the image's content is wrong (exit 2): running again
    /// would fail the same way. A registry that is down, a transfer that broke or bytes that
    /// failed their digest (corruption in transit) are run failures (exit 1).
    pub fn is_input_problem(&self) -> bool {
        matches!(
            self,
            OciError::BadReference { .. }
                | OciError::OfflineNotCached { .. }
                | OciError::NotFound { .. }
                | OciError::NeedsAuth { .. }
                | OciError::AuthRejected { .. }
                | OciError::Credentials { .. }
                | OciError::Unsupported { .. }
                | OciError::Layer { .. }
                | OciError::NoModel { .. }
        )
    }

    /// A registry that cannot be reached (or answers 5xx): a cached tag may stand in.
    fn is_unreachable(&self) -> bool {
        matches!(self, OciError::Unreachable { .. }) || matches!(self, OciError::Http { status, .. } if *status >= 500)
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OciError + 'a {
    move |source| OciError::Io { what, path: path.to_path_buf(), source }
}

/// The digest-keyed cache of unpacked images.
struct Cache {
    root: PathBuf,
}

impl Cache {
    fn entry(&self, digest: &str) -> PathBuf {
        self.root.join("models").join(digest.replace(':', "-"))
    }

    /// The model folder of a complete entry.
    fn cached(&self, digest: &str) -> Option<PathBuf> {
        let e = self.entry(digest);
        e.is_dir().then(|| unpack::model_folder(&e).ok()).flatten()
    }

    fn ref_path(&self, r: &Reference) -> Option<PathBuf> {
        let tag = r.tag.as_ref()?;
        Some(self.root.join("refs").join(&r.registry).join(&r.repository).join(tag))
    }

    fn read_ref(&self, r: &Reference) -> Option<String> {
        let d = fs::read_to_string(self.ref_path(r)?).ok()?;
        let d = d.trim().to_string();
        reference::is_sha256_digest(&d).then_some(d)
    }

    fn write_ref(&self, r: &Reference, digest: &str) -> Result<(), OciError> {
        let Some(path) = self.ref_path(r) else { return Ok(()) };
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().and_then(|f| f.to_str()).unwrap_or("ref"), std::process::id()));
        fs::write(&tmp, digest).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming into", &path))
    }

    /// This host's name, so that a shared cache (a PVC) only sweeps its own crashed pulls.
    fn host() -> String {
        fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().replace(['/', '-'], "_"))
            .unwrap_or_else(|_| "host".into())
    }

    fn partial(&self, digest: &str) -> PathBuf {
        self.root.join("models").join(format!(".partial-{}-{}-{}", digest.replace(':', "-"), Self::host(), std::process::id()))
    }

    /// Removes `.partial-*` folders left by pulls of this host whose process is gone.
    fn sweep(&self) {
        let host = Self::host();
        let Ok(entries) = fs::read_dir(self.root.join("models")) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix(".partial-") else { continue };
            let mut parts = rest.rsplitn(3, '-');
            let (Some(pid), Some(h)) = (parts.next(), parts.next()) else { continue };
            if h == host && pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Removes the partial folder unless the pull finished.
struct PartialGuard(Option<PathBuf>);

impl Drop for PartialGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// A blob being read: hashes and counts every byte, and stops past the descriptor's size.
struct Verified<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    size: u64,
    progress: Progress,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::other(format!("the blob is larger than the {} bytes its descriptor says", self.size)));
        }
        self.progress.update(self.read);
        Ok(n)
    }
}

const TITLE: &str = "org.opencontainers.image.title";
const ORAS_UNPACK: &str = "io.deis.oras.content.unpack";

/// What one layer is: a tar to apply, or a file to write.
enum LayerKind<'d> {
    Modelcar,
    File(&'d str),
    Folder(&'d str),
}

fn layer_kind<'d>(r: &Reference, i: usize, d: &'d Descriptor) -> Result<LayerKind<'d>, OciError> {
    let mt = d.media_type.as_str();
    let unsupported = |why: String| OciError::Unsupported { reference: r.to_string(), why };
    if mt.contains("zstd") {
        return Err(unsupported(format!("layer {i} ({}) is zstd-compressed; lora reads tar and tar+gzip layers: push the image with gzip layers", d.digest)));
    }
    if mt.contains("foreign") || mt.contains("nondistributable") {
        return Err(unsupported(format!("layer {i} ({}) is a foreign layer ({mt}) that registries do not serve", d.digest)));
    }
    let is_tar = mt.contains(".tar") || mt.ends_with("rootfs.diff.tar.gzip");
    match d.annotations.get(TITLE).map(String::as_str) {
        Some(t) if is_tar && d.annotations.get(ORAS_UNPACK).is_some_and(|v| v == "true") => Ok(LayerKind::Folder(t)),
        Some(t) => Ok(LayerKind::File(t)),
        None if is_tar => Ok(LayerKind::Modelcar),
        None => Err(unsupported(format!(
            "layer {i} ({}) has media type `{mt}` and no {TITLE} annotation: lora cannot tell which model file it is",
            d.digest
        ))),
    }
}

/// Resolves an `oci://` reference to an unpacked model folder in the cache.
pub fn resolve(spec: &str, opts: &OciOptions) -> Result<ResolvedModel, OciError> {
    let r = Reference::parse(spec).map_err(|why| OciError::BadReference { spec: spec.to_string(), why })?;
    let cache = Cache { root: opts.cache_dir.clone() };
    let done = |dir: PathBuf, digest: String| ResolvedModel { dir, name: spec.to_string(), commit: Some(digest) };

    // A digest names immutable content: a cached one needs no network.
    if let Some(d) = &r.digest
        && let Some(dir) = cache.cached(d)
    {
        return Ok(done(dir, d.clone()));
    }
    if opts.offline {
        let digest = r.digest.clone().or_else(|| cache.read_ref(&r));
        return match digest.and_then(|d| cache.cached(&d).map(|dir| (dir, d))) {
            Some((dir, d)) => Ok(done(dir, d)),
            None => Err(OciError::OfflineNotCached { reference: r.to_string(), cache: cache.root.clone() }),
        };
    }

    let mut client = Client::new(&r, opts)?;
    let top = match client.manifest(r.target()) {
        Ok(top) => top,
        Err(e) if e.is_unreachable() => {
            if let Some(d) = cache.read_ref(&r)
                && let Some(dir) = cache.cached(&d)
            {
                eprintln!("lora: {e}\nlora: using the cached {r} ({d})");
                return Ok(done(dir, d));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let digest = top.digest.clone();
    if let Some(dir) = cache.cached(&digest) {
        cache.write_ref(&r, &digest)?;
        eprintln!("lora: {r} is {digest}, already unpacked in {}", cache.entry(&digest).display());
        return Ok(done(dir, digest));
    }
    let (image, image_digest) = client.image(top)?;
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    eprintln!(
        "lora: pulling {r} ({digest}{}; {} layer(s), {})",
        if image_digest != digest { format!(", image {image_digest}") } else { String::new() },
        image.layers.len(),
        hub::human(total)
    );
    let kinds = image.layers.iter().enumerate().map(|(i, l)| layer_kind(&r, i, l)).collect::<Result<Vec<_>, _>>()?;

    let models = cache.root.join("models");
    fs::create_dir_all(&models).map_err(io_err("creating", &models))?;
    cache.sweep();
    let partial = cache.partial(&digest);
    let _ = fs::remove_dir_all(&partial);
    let mut guard = PartialGuard(Some(partial.clone()));
    let mut tree = unpack::Tree::new(&partial).map_err(io_err("creating", &partial))?;
    for (i, (layer, kind)) in image.layers.iter().zip(&kinds).enumerate() {
        pull_layer(&mut client, &r, opts, &mut tree, i, layer, kind)?;
    }
    let layer_err = |why: String| OciError::Layer { reference: r.to_string(), layer: "links".into(), why };
    tree.check_links().map_err(|e| layer_err(e.0))?;
    unpack::model_folder(&partial).map_err(|why| OciError::NoModel { reference: r.to_string(), digest: digest.clone(), why })?;

    let entry = cache.entry(&digest);
    if let Err(e) = fs::rename(&partial, &entry) {
        // Another pull of the same digest finished first: its entry is as good as ours.
        if !entry.is_dir() {
            return Err(OciError::Io { what: "renaming into", path: entry, source: e });
        }
    } else {
        guard.0 = None;
    }
    drop(guard);
    cache.write_ref(&r, &digest)?;
    let dir = unpack::model_folder(&entry).map_err(|why| OciError::NoModel { reference: r.to_string(), digest: digest.clone(), why })?;
    Ok(done(dir, digest))
}

/// Streams one layer into the tree, verifying its size and digest as it goes.
fn pull_layer(
    client: &mut Client,
    r: &Reference,
    opts: &OciOptions,
    tree: &mut unpack::Tree,
    i: usize,
    layer: &Descriptor,
    kind: &LayerKind,
) -> Result<(), OciError> {
    let what = format!("layer {i} ({})", layer.digest);
    let body = client.blob(layer)?;
    let label = format!("layer {i} {}", &layer.digest[..19.min(layer.digest.len())]);
    let mut v = Verified {
        inner: body.into_reader(),
        hasher: Sha256::new(),
        read: 0,
        size: layer.size,
        progress: Progress::new(&label, Some(layer.size), opts.progress),
    };
    let applied = match kind {
        LayerKind::Modelcar => tree.apply_tar(&mut v, Some("models"), Path::new("")),
        LayerKind::Folder(t) => tree.apply_tar(&mut v, None, Path::new(t)),
        LayerKind::File(t) => tree.write_file(t, &mut v),
    };
    // Read what the unpacker left (a tar's padding, or all of a layer it gave up on), so that
    // the digest speaks first: a tampered layer is a digest error, not a corrupt-tar error.
    let drained = io::copy(&mut v, &mut io::sink());
    v.progress.finish(v.read);
    let actual = format!("sha256:{}", hex(&v.hasher.clone().finalize()));
    if v.read > layer.size {
        return Err(OciError::Size { reference: r.to_string(), what, expected: layer.size, actual: v.read });
    }
    if let Err(e) = drained {
        return Err(OciError::Download { reference: r.to_string(), what: format!("{what} from {}", client.blob_url(layer)), why: e.to_string() });
    }
    if v.read != layer.size {
        return Err(OciError::Size { reference: r.to_string(), what, expected: layer.size, actual: v.read });
    }
    if actual != layer.digest {
        return Err(OciError::Digest { reference: r.to_string(), what, expected: layer.digest.clone(), actual });
    }
    applied.map_err(|e| OciError::Layer { reference: r.to_string(), layer: what, why: e.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(name: &str) -> OciOptions {
        let cache_dir = std::env::temp_dir().join(format!("lora-oci-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache_dir);
        OciOptions { cache_dir, offline: true, progress: false, insecure: vec![] }
    }

    #[test]
    fn offline_and_not_cached_says_so() {
        let o = opts("offline");
        let err = resolve("oci://127.0.0.1:9/models/tiny:1", &o).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE") && err.contains("oci://127.0.0.1:9/models/tiny:1"), "{err}");
    }

    #[test]
    fn offline_resolves_tags_and_digests_from_the_cache() {
        let o = opts("cached");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cache = Cache { root: o.cache_dir.clone() };
        let entry = cache.entry(&digest);
        fs::create_dir_all(&entry).unwrap();
        fs::write(entry.join("config.json"), "{}").unwrap();
        let r = Reference::parse("oci://127.0.0.1:9/models/tiny:1").unwrap();
        cache.write_ref(&r, &digest).unwrap();
        let m = resolve("oci://127.0.0.1:9/models/tiny:1", &o).unwrap();
        assert_eq!((m.dir.as_path(), m.commit.as_deref()), (entry.as_path(), Some(digest.as_str())));
        let by_digest = format!("oci://127.0.0.1:9/models/other@{digest}");
        assert_eq!(resolve(&by_digest, &o).unwrap().dir, entry, "a digest needs no tag");
        // A partial entry (a crashed pull) is not an entry.
        let other = format!("sha256:{}", "cd".repeat(32));
        fs::create_dir_all(cache.partial(&other)).unwrap();
        fs::write(cache.partial(&other).join("config.json"), "{}").unwrap();
        assert!(resolve(&format!("oci://127.0.0.1:9/m@{other}"), &o).is_err());
        let _ = fs::remove_dir_all(&o.cache_dir);
    }

    #[test]
    fn a_dead_pull_of_this_host_is_swept() {
        let o = opts("sweep");
        let cache = Cache { root: o.cache_dir.clone() };
        let d = format!("sha256:{}", "ef".repeat(32));
        let dead = cache.root.join("models").join(format!(".partial-{}-{}-{}", d.replace(':', "-"), Cache::host(), u32::MAX - 1));
        let elsewhere = cache.root.join("models").join(format!(".partial-{}-otherhost-{}", d.replace(':', "-"), u32::MAX - 1));
        fs::create_dir_all(&dead).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        cache.sweep();
        assert!(!dead.exists());
        assert!(elsewhere.exists(), "another host's pull may still be running");
        let _ = fs::remove_dir_all(&o.cache_dir);
    }

    #[test]
    fn layer_kinds_follow_media_type_and_title() {
        let r = Reference::parse("oci://127.0.0.1:9/m:1").unwrap();
        let d = |mt: &str, ann: &[(&str, &str)]| Descriptor {
            media_type: mt.into(),
            digest: format!("sha256:{}", "00".repeat(32)),
            size: 1,
            annotations: ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            platform: None,
        };
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert!(matches!(layer_kind(&r, 0, &d(gz, &[])).unwrap(), LayerKind::Modelcar));
        assert!(matches!(layer_kind(&r, 0, &d("application/vnd.docker.image.rootfs.diff.tar.gzip", &[])).unwrap(), LayerKind::Modelcar));
        assert!(matches!(layer_kind(&r, 0, &d("application/octet-stream", &[(TITLE, "config.json")])).unwrap(), LayerKind::File("config.json")));
        assert!(matches!(layer_kind(&r, 0, &d(gz, &[(TITLE, "tok"), (ORAS_UNPACK, "true")])).unwrap(), LayerKind::Folder("tok")));
        let err = layer_kind(&r, 2, &d("application/vnd.oci.image.layer.v1.tar+zstd", &[])).err().unwrap().to_string();
        assert!(err.contains("zstd") && err.contains("layer 2"), "{err}");
        let err = layer_kind(&r, 1, &d("application/octet-stream", &[])).err().unwrap().to_string();
        assert!(err.contains(TITLE), "{err}");
    }
}
