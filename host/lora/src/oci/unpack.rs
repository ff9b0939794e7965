//! Writes an image's model files into a fresh folder that only this process writes to.
//!
//! - A modelcar layer (a tar, gzip-compressed or not) contributes the entries under `models/`;
//!   layers apply in order, with whiteouts (`.wh.<name>` removes a lower layer's entry,
//!   `.wh..wh..opq` empties a folder of lower layers' entries). Entries outside `models/` are
//!   read (for the digest) and skipped.
//! - An artifact layer with an `org.opencontainers.image.title` annotation is the file of that
//!   name (an ORAS folder, `io.deis.oras.content.unpack=true`, is a tar unpacked under it).
//!
//! Refused, naming the entry: names with `..` or an absolute path (anywhere in a layer), an entry
//! written through a symlink, a symlink whose target leaves the model folder or points nowhere,
//! a hard link to something that is not a file of the model, devices, fifos and sockets.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Why a layer's content cannot be used (the caller adds the image and the layer).
#[derive(Debug)]
pub struct Refused(pub String);

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Self {
        Refused(e.to_string())
    }
}

/// A relative path of plain parts, or why not: no `..`, no root, no empty name.
pub fn safe_relative(name: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{}` contains `..`", name.display())),
            Component::RootDir | Component::Prefix(_) => return Err(format!("`{}` is an absolute path", name.display())),
        }
    }
    Ok(out)
}

/// `r` that is gzip when it starts with the gzip magic number, else plain. Multi-member: umoci
/// (pgzip) and other parallel compressors write a layer as several concatenated gzip members.
fn maybe_gunzip<'r, R: Read + 'r>(r: R) -> io::Result<Box<dyn Read + 'r>> {
    let mut b = BufReader::with_capacity(1 << 16, r);
    let magic = b.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) { Box::new(flate2::read::MultiGzDecoder::new(b)) } else { Box::new(b) })
}

/// Applies layers, in order, onto one model folder.
pub struct Tree {
    root: PathBuf,
    /// Paths (relative to `root`) written by the layer being applied: a whiteout spares them.
    this_layer: HashSet<PathBuf>,
}

impl Tree {
    pub fn new(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(Tree { root: root.to_path_buf(), this_layer: HashSet::new() })
    }

    /// Makes every parent of `rel` a real folder; refuses to go through a symlink or a file.
    fn parents(&self, rel: &Path) -> Result<(), Refused> {
        let mut at = self.root.clone();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Refused(format!("`{}` would be written through the symlink `{}`", rel.display(), c.as_os_str().to_string_lossy())));
                }
                Ok(_) => {
                    fs::remove_file(&at)?;
                    fs::create_dir(&at)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&at)?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes whatever is at `path` (not following symlinks).
    fn remove(path: &Path) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn whiteout(&self, dir: &Path, name: &str) -> Result<(), Refused> {
        let dir_abs = self.root.join(dir);
        if name == ".wh..opq" {
            // Opaque folder: lower layers' entries go, this layer's stay.
            if let Ok(entries) = fs::read_dir(&dir_abs) {
                for e in entries.flatten() {
                    let rel = dir.join(e.file_name());
                    if !self.this_layer.contains(&rel) {
                        Self::remove(&e.path())?;
                    }
                }
            }
            return Ok(());
        }
        let rel = dir.join(name);
        if !self.this_layer.contains(&rel) {
            Self::remove(&self.root.join(&rel))?;
        }
        Ok(())
    }

    /// Applies one tar layer. `subtree`: only entries under this top folder (`models` for a
    /// modelcar) land, re-rooted; `None`: every entry lands (an ORAS folder).
    pub fn apply_tar(&mut self, layer: impl Read, subtree: Option<&str>, under: &Path) -> Result<(), Refused> {
        self.this_layer.clear();
        let mut archive = tar::Archive::new(maybe_gunzip(layer)?);
        for entry in archive.entries()? {
            let mut entry = match entry {
                Ok(e) => e,
                // Every entry before was read in full (checked below), so this is a layer that
                // ends right after its last entry's data, without the padding and end-of-archive
                // blocks (umoci 0.4.7's `insert` writes such layers): nothing is missing.
                Err(e) if e.to_string().contains("unexpected EOF during skip") => break,
                Err(e) => return Err(e.into()),
            };
            let size = entry.size();
            let copied = self.apply_entry(&mut entry, subtree, under)?;
            let rest = io::copy(&mut entry, &mut io::sink())?;
            if copied + rest < size {
                let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(Refused(format!("`{name}` is cut short: {} of its {size} bytes are in the layer", copied + rest)));
            }
        }
        Ok(())
    }

    /// Applies one entry; returns how many of its data bytes it read.
    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<R>, subtree: Option<&str>, under: &Path) -> Result<u64, Refused> {
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink) {
            return Ok(0);
        }
        let raw = entry.path()?.into_owned();
        let name = safe_relative(&raw).map_err(Refused)?;
        let rel = match subtree {
            Some(top) => match name.strip_prefix(top) {
                Ok(rest) => rest.to_path_buf(),
                Err(_) => {
                    // A whiteout of `models` itself, or an opaque root, reaches the subtree.
                    let file = name.file_name().and_then(|f| f.to_str()).unwrap_or("");
                    let at_root = name.parent().is_none_or(|p| p.as_os_str().is_empty());
                    if at_root && (file == format!(".wh.{top}") || file == ".wh..wh..opq") {
                        self.whiteout(Path::new(""), ".wh..opq")?;
                    }
                    return Ok(0);
                }
            },
            None => name,
        };
        let rel = under.join(rel);
        let file_name = rel.file_name().and_then(|f| f.to_str()).unwrap_or("").to_string();
        if let Some(target) = file_name.strip_prefix(".wh.") {
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            self.whiteout(&dir, if target == ".wh..opq" { ".wh..opq" } else { target })?;
            return Ok(0);
        }
        let shown = raw.display().to_string();
        let abs = self.root.join(&rel);
        if rel.as_os_str().is_empty() || rel == under {
            if !kind.is_dir() {
                return Err(Refused(format!("`{shown}` must be a folder")));
            }
            return Ok(0);
        }
        self.parents(&rel)?;
        let mut copied = 0;
        match kind {
            tar::EntryType::Directory => {
                if !fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                    Self::remove(&abs)?;
                    fs::create_dir(&abs)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Self::remove(&abs)?;
                // create_new: never follows a link left at this name.
                let mut out = fs::OpenOptions::new().write(true).create_new(true).open(&abs)?;
                copied = io::copy(entry, &mut out)?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.ok_or_else(|| Refused(format!("symlink `{shown}` has no target")))?.into_owned();
                if target.is_absolute() {
                    return Err(Refused(format!("symlink `{shown}` points to the absolute path {}, outside the model", target.display())));
                }
                Self::remove(&abs)?;
                symlink(&target, &abs)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name()?.ok_or_else(|| Refused(format!("hard link `{shown}` has no target")))?.into_owned();
                let target_rel = safe_relative(&target).map_err(|w| Refused(format!("hard link `{shown}`: {w}")))?;
                let target_rel = match subtree {
                    Some(top) => target_rel
                        .strip_prefix(top)
                        .map_err(|_| Refused(format!("hard link `{shown}` points to `{}`, outside /{top}", target.display())))?
                        .to_path_buf(),
                    None => target_rel,
                };
                let source = self.root.join(under.join(&target_rel));
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(Refused(format!("hard link `{shown}` points to `{}`, which is not a file of the model", target.display())));
                }
                Self::remove(&abs)?;
                fs::hard_link(&source, &abs)?;
            }
            other => {
                return Err(Refused(format!("`{shown}` is a {} entry: a model image holds files, folders and links only", entry_kind(other))));
            }
        }
        self.this_layer.insert(rel);
        Ok(copied)
    }

    /// Streams an artifact layer into the file `title`.
    pub fn write_file(&mut self, title: &str, mut layer: impl Read) -> Result<(), Refused> {
        let rel = safe_relative(Path::new(title)).map_err(|w| Refused(format!("title {w}")))?;
        if rel.as_os_str().is_empty() {
            return Err(Refused(format!("title `{title}` names no file")));
        }
        self.parents(&rel)?;
        let abs = self.root.join(&rel);
        Self::remove(&abs)?;
        let mut out = fs::OpenOptions::new().write(true).create_new(true).open(&abs)?;
        io::copy(&mut layer, &mut out)?;
        Ok(())
    }

    /// Checks every symlink of the finished tree: it must resolve, inside the tree.
    pub fn check_links(&self) -> Result<(), Refused> {
        let root = self.root.canonicalize()?;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir)? {
                let e = e?;
                let t = e.file_type()?;
                let path = e.path();
                if t.is_dir() {
                    stack.push(path);
                } else if t.is_symlink() {
                    let shown = path.strip_prefix(&self.root).unwrap_or(&path).display().to_string();
                    let target = fs::read_link(&path)?;
                    match path.canonicalize() {
                        Ok(real) if real.starts_with(&root) => {}
                        Ok(_) => return Err(Refused(format!("symlink `{shown}` -> `{}` leaves the model folder", target.display()))),
                        Err(_) => return Err(Refused(format!("symlink `{shown}` -> `{}` points to nothing", target.display()))),
                    }
                }
            }
        }
        Ok(())
    }
}

fn entry_kind(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        tar::EntryType::GNUSparse => "sparse file",
        _ => "special",
    }
}

#[cfg(unix)]
fn symlink(target: &Path, at: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, at)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, at: &Path) -> io::Result<()> {
    Err(io::Error::other(format!("{}: symlinks in model images need a unix host", at.display())))
}

/// The folder of a finished tree that holds the model: the tree itself when it has config.json,
/// else its only subfolder that has one. `Err` lists what the tree holds.
pub fn model_folder(root: &Path) -> Result<PathBuf, String> {
    if root.join("config.json").is_file() {
        return Ok(root.to_path_buf());
    }
    let mut names = Vec::new();
    let mut with_config = Vec::new();
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type().is_ok_and(|t| t.is_dir()) && e.path().join("config.json").is_file() {
                with_config.push(e.path());
            }
            names.push(name);
        }
    }
    names.sort();
    if with_config.len() == 1 {
        return Ok(with_config.remove(0));
    }
    if names.is_empty() {
        return Err("nothing under /models and no titled layers".into());
    }
    let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
    Err(format!("no config.json at the top or in exactly one subfolder (found: {})", shown.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// A real tar (gzip-compressed when `gz`) with raw names, so hostile names can be written.
    fn tarball(entries: &[E], gz: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, data): (&str, &[u8]) = match e {
                E::File(n, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    (n, d)
                }
                E::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    (n, b"")
                }
                E::Link(n, t) | E::Hard(n, t) => {
                    h.set_entry_type(if matches!(e, E::Link(..)) { tar::EntryType::Symlink } else { tar::EntryType::Link });
                    h.set_link_name_literal(t).unwrap();
                    (n, b"")
                }
                E::Fifo(n) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    (n, b"")
                }
            };
            // Raw bytes into the name field: `set_path` would refuse `..`, a hostile tool does not.
            let field = &mut h.as_old_mut().name;
            field[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        let raw = b.into_inner().unwrap();
        if !gz {
            return raw;
        }
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut enc, &raw).unwrap();
        enc.finish().unwrap()
    }

    fn fresh(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lora-oci-unpack-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<Tree, Refused> {
        let mut t = Tree::new(root).unwrap();
        for l in layers {
            t.apply_tar(&l[..], Some("models"), Path::new(""))?;
        }
        t.check_links()?;
        Ok(t)
    }

    fn refused(root: &Path, layers: &[Vec<u8>]) -> String {
        match apply(root, layers) {
            Ok(_) => panic!("accepted"),
            Err(Refused(why)) => why,
        }
    }

    #[test]
    fn modelcar_layers_apply_in_order_with_whiteouts() {
        let root = fresh("layers");
        let base = tarball(
            &[E::Dir("bin/"), E::File("bin/sh", b"#!"), E::Dir("models/"), E::File("models/config.json", b"{}"), E::File("models/old.bin", b"x"),
              E::Dir("models/sub/"), E::File("models/sub/a", b"a"), E::File("models/sub/b", b"b")],
            true,
        );
        let top = tarball(
            &[E::File("./models/.wh.old.bin", b""), E::File("models/sub/c", b"c"), E::File("models/sub/.wh..wh..opq", b""),
              E::File("models/model.safetensors", b"w"), E::Link("models/weights", "model.safetensors"), E::Hard("models/config2.json", "models/config.json")],
            false,
        );
        apply(&root, &[base, top]).unwrap();
        let mut names: Vec<String> = Vec::new();
        for e in walk(&root) {
            names.push(e);
        }
        names.sort();
        assert_eq!(names, ["config.json", "config2.json", "model.safetensors", "sub", "sub/c", "weights"]);
        assert_eq!(fs::read(root.join("weights")).unwrap(), b"w");
        assert!(!root.join("bin").exists(), "entries outside /models are not unpacked");
        assert_eq!(model_folder(&root).unwrap(), root);
        let _ = fs::remove_dir_all(&root);
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let root = fresh("hostile");
        let outside = std::env::temp_dir().join(format!("lora-oci-victim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&outside);
        for (entries, says) in [
            (vec![E::File("models/../../etc/passwd", b"x")], "contains `..`"),
            (vec![E::File("/models/config.json", b"x")], "absolute path"),
            (vec![E::File("../x", b"x")], "contains `..`"),
            (vec![E::Link("models/etc", "/etc")], "absolute path /etc"),
            (vec![E::Link("models/up", "../.."), E::File("models/config.json", b"{}")], "leaves the model folder"),
            (vec![E::Link("models/d", "."), E::Link("models/d/x", "..")], "through the symlink"),
            (vec![E::Link("models/gone", "nothing-here")], "points to nothing"),
            (vec![E::Hard("models/h", "etc/shadow")], "outside /models"),
            (vec![E::Hard("models/h", "models/missing")], "not a file of the model"),
            (vec![E::Fifo("models/f")], "fifo"),
            (vec![E::File("models", b"not a folder")], "must be a folder"),
        ] {
            let _ = fs::remove_dir_all(&root);
            let why = refused(&root, &[tarball(&entries, true)]);
            assert!(why.contains(says), "expected `{says}`, got: {why}");
        }
        // A symlinked folder cannot carry a later entry out of the tree.
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&outside).unwrap();
        let link = format!("{}{}", "../".repeat(10), outside.display());
        let why = refused(&root, &[tarball(&[E::Link("models/esc", &link), E::File("models/esc/owned", b"x")], false)]);
        assert!(why.contains("through the symlink"), "{why}");
        assert!(!outside.join("owned").exists());
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&outside);
    }

    #[test]
    fn a_layer_without_its_end_blocks_is_read_but_a_cut_entry_is_refused() {
        let root = fresh("unterminated");
        let full = tarball(&[E::File("models/config.json", b"{}"), E::File("models/tokenizer.json", b"0123456789")], false);
        // umoci 0.4.7 insert: the data of the last entry, no padding, no end-of-archive blocks.
        let unterminated = full[..512 * 3 + 10].to_vec();
        apply(&root, &[unterminated]).unwrap();
        assert_eq!(fs::read(root.join("tokenizer.json")).unwrap(), b"0123456789");
        let _ = fs::remove_dir_all(&root);
        let cut = full[..512 * 3 + 4].to_vec();
        assert!(refused(&root, &[cut]).contains("`models/tokenizer.json` is cut short: 4 of its 10 bytes"));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_corrupt_layer_is_an_error_not_a_panic() {
        let root = fresh("corrupt");
        let mut gz = tarball(&[E::File("models/config.json", b"{}")], true);
        let n = gz.len();
        gz.truncate(n / 2);
        assert!(apply(&root, &[gz]).is_err());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_model_folder_is_the_top_or_its_only_subfolder_with_a_config() {
        let root = fresh("folder");
        fs::create_dir_all(root.join("granite")).unwrap();
        fs::write(root.join("granite/config.json"), "{}").unwrap();
        fs::write(root.join("README.md"), "").unwrap();
        assert_eq!(model_folder(&root).unwrap(), root.join("granite"));
        fs::create_dir_all(root.join("other")).unwrap();
        fs::write(root.join("other/config.json"), "{}").unwrap();
        let err = model_folder(&root).unwrap_err();
        assert!(err.contains("README.md") && err.contains("granite"), "{err}");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        assert!(model_folder(&root).unwrap_err().contains("nothing under /models"));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn artifact_titles_are_checked() {
        let root = fresh("titles");
        let mut t = Tree::new(&root).unwrap();
        t.write_file("config.json", &b"{}"[..]).unwrap();
        t.write_file("sub/tokenizer.json", &b"{}"[..]).unwrap();
        assert!(t.write_file("../evil", &b""[..]).unwrap_err().0.contains(".."));
        assert!(t.write_file("/etc/x", &b""[..]).unwrap_err().0.contains("absolute"));
        assert!(t.write_file("", &b""[..]).unwrap_err().0.contains("names no file"));
        assert_eq!(fs::read(root.join("sub/tokenizer.json")).unwrap(), b"{}");
        let _ = fs::remove_dir_all(&root);
    }
}
