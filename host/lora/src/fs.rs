//! File writes that do not follow links, for every file lora writes where someone else (a plugin
//! granted a folder, another process) might have planted one: a temp file is created exclusively
//! under a fresh name (`O_CREAT | O_EXCL`, never through an existing name or link), written,
//! synced and renamed over the target (a rename replaces a link at the target instead of
//! following it); files read or appended to are opened with `O_NOFOLLOW`.
//!
//! Use these instead of `fs::write`, `File::create` and `OpenOptions::open` on paths in the
//! workspace or the outputs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Opening a path whose last component is a symlink fails (`ELOOP`).
const O_NOFOLLOW: i32 = libc::O_NOFOLLOW;

/// Explains an `ELOOP` from `O_NOFOLLOW` as what it is.
fn link_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link, which lora does not follow when writing its files (something else put it there)",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// Creates a new file next to `path` under a fresh temp name (`.<name>.tmp-<pid>-<n>`), exclusively:
/// an existing file or link of that name is never opened.
pub fn create_temp_sibling(path: &Path) -> io::Result<(PathBuf, File)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut last = None;
    for n in 0..100u32 {
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temp name")))
}

/// Writes `bytes` to `path` atomically without following links: an exclusive temp file in the
/// same folder, synced, renamed over `path` (replacing a link there, not writing through it).
/// Creates the folder if needed. On failure the temp file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let (tmp, mut f) = create_temp_sibling(path)?;
    let written = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .and_then(|_| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Reads `path` unless it is a symbolic link; `Ok(None)` when it does not exist.
pub fn read_nofollow(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(link_error(path, e)),
    }
}

/// Opens an existing `path` for appending unless it is a symbolic link.
pub fn open_append_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(|e| link_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_planted_links_instead_of_following_them() {
        let root = std::env::temp_dir().join(format!("lora-fs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("pvc/checkpoints");
        fs::create_dir_all(&dir).unwrap();
        let victim = root.join("victim.txt");
        fs::write(&victim, "precious").unwrap();
        let target = dir.join("training_metrics.jsonl");
        // Links planted at the target and at every temp name the old writer used.
        std::os::unix::fs::symlink("../../victim.txt", &target).unwrap();
        std::os::unix::fs::symlink("../../victim.txt", dir.join("training_metrics.jsonl.tmp"))
            .unwrap();
        std::os::unix::fs::symlink(
            "../../victim.txt",
            dir.join(format!(
                ".training_metrics.jsonl.tmp-{}-0",
                std::process::id()
            )),
        )
        .unwrap();

        let err = read_nofollow(&target).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert!(open_append_nofollow(&target).is_err());
        write_atomic(&target, b"rows\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(
            !fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "rows\n");
        assert_eq!(read_nofollow(&dir.join("missing")).unwrap(), None);
        let _ = fs::remove_dir_all(&root);
    }
}
