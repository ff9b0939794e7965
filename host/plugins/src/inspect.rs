//! `lora plugin inspect FILE.wasm`: what a plugin is, what it asks for and what it would get.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::cache::{self, CacheOutcome};
use crate::sandbox::{identify, imports};
use crate::{GUEST_OUTPUT_DIR, PluginError, PluginKind, PluginOptions, PluginSet};

/// The facts `lora plugin inspect` prints.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
    pub kind: PluginKind,
    /// The API version from the component's export names (what the host checks).
    pub api_version: String,
    /// The `lora-plugin-api` custom section stamped by the SDK, if present.
    pub sdk_stamp: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The options it would run with under `config_json` (grants, limits, settings).
    pub options: PluginOptions,
    pub cache: CacheOutcome,
}

/// Inspects `path`; `config_json` is a `training_plugin_config` value (may be empty) used to
/// show what this plugin would be granted.
pub fn inspect(path: &Path, config_json: &str) -> Result<Inspection, PluginError> {
    let loaded = cache::load(path, crate::default_cache_dir().as_deref(), true)?;
    let (kind, api_version) = identify(path, &loaded.component)?;
    let engine = cache::engine()?;
    let exports = loaded
        .component
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_string())
        .collect();
    let set = PluginSet::from_params(&format!("{kind}={}", path.display()), config_json, 0)?;
    let options = set
        .specs()
        .next()
        .map(|s| s.options.clone())
        .unwrap_or_default();
    Ok(Inspection {
        path: path.to_path_buf(),
        size_bytes: loaded.bytes.len() as u64,
        sha256: loaded.sha256.clone(),
        kind,
        api_version,
        sdk_stamp: custom_section(&loaded.bytes, "lora-plugin-api")
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        imports: imports(&loaded.component)?,
        exports,
        options,
        cache: loaded.outcome,
    })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "file:        {} ({} bytes, sha256 {})",
            self.path.display(),
            self.size_bytes,
            self.sha256
        )?;
        writeln!(f, "kind:        {}", self.kind)?;
        writeln!(
            f,
            "api version: {} (supported: {})",
            self.api_version,
            crate::SUPPORTED_API_VERSIONS.join(", ")
        )?;
        writeln!(
            f,
            "sdk stamp:   {}",
            self.sdk_stamp
                .as_deref()
                .unwrap_or("none (not built with the lora-plugin SDK)")
        )?;
        writeln!(f, "exports:     {}", self.exports.join(", "))?;
        writeln!(f, "imports:")?;
        for i in &self.imports {
            writeln!(f, "  {i}")?;
        }
        writeln!(f, "would be granted:")?;
        match &o.grants.dir {
            Some(d) => writeln!(
                f,
                "  filesystem: {} (read-write, seen as {GUEST_OUTPUT_DIR})",
                d.display()
            )?,
            None => writeln!(f, "  filesystem: none")?,
        }
        let imports_http = self.imports.iter().any(|i| i.starts_with("wasi:http/"));
        if o.grants.http.is_empty() && imports_http {
            writeln!(
                f,
                "  network:    none; it imports wasi:http, so it is refused unless `grants.http` lists its hosts"
            )?;
        } else if o.grants.http.is_empty() {
            writeln!(f, "  network:    none")?;
        } else {
            writeln!(
                f,
                "  network:    wasi:http to {} only (no sockets)",
                o.grants.http.join(", ")
            )?;
        }
        if o.grants.env.is_empty() {
            writeln!(f, "  env:        none")?;
        } else {
            writeln!(f, "  env:        {}", o.grants.env.join(", "))?;
        }
        writeln!(
            f,
            "  clocks:     {}",
            if o.grants.clocks {
                "real"
            } else {
                "frozen at 0"
            }
        )?;
        writeln!(f, "  random:     deterministic, seeded from the run seed")?;
        writeln!(
            f,
            "limits:      memory {} MiB, {} ms per call, output {} MiB per call, text-tools input {} KiB per call, directory quota {} MiB",
            o.limits.memory_bytes >> 20,
            o.limits.deadline.as_millis(),
            o.limits.max_output_bytes >> 20,
            o.limits.max_text_input_bytes >> 10,
            o.limits.max_dir_bytes >> 20
        )?;
        if !o.settings.is_empty() {
            writeln!(f, "settings:")?;
            for (k, v) in &o.settings {
                writeln!(f, "  {k} = {v}")?;
            }
        }
        Ok(())
    }
}

/// The first custom section called `name` in a component or module, searching nested core
/// modules and components (the SDK's stamp lives in the core module inside the component).
pub(crate) fn custom_section(bytes: &[u8], name: &str) -> Option<Vec<u8>> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return None;
    }
    let mut pos = 8;
    while pos < bytes.len() {
        let id = bytes[pos];
        pos += 1;
        let (size, n) = leb128(&bytes[pos..])?;
        pos += n;
        let body = bytes.get(pos..pos.checked_add(size as usize)?)?;
        pos += size as usize;
        match id {
            0 => {
                let (len, n) = leb128(body)?;
                let section_name = body.get(n..n + len as usize)?;
                if section_name == name.as_bytes() {
                    return Some(body[n + len as usize..].to_vec());
                }
            }
            // A core module (1) or a nested component (4) inside a component.
            1 | 4 if is_component(bytes) => {
                if let Some(found) = custom_section(body, name) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

fn is_component(bytes: &[u8]) -> bool {
    // Layer field of the header: 1 for components, 0 for core modules.
    bytes.len() >= 8 && bytes[6] == 1
}

fn leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}
