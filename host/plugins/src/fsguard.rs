//! The granted directory (`grants.dir`, seen as `/out`), guarded where WASI alone does not:
//!
//! - **Links stay inside.** wasmtime-wasi refuses absolute symlink targets, and the guest cannot
//!   follow a link out of its preopen, but lora's own code (or another program) could. So a
//!   symlink's target must be relative and must not climb (`..`): such a link can only ever name
//!   something inside the directory it was made in.
//! - **A disk quota.** What the plugin's writes add to the directory (allocated blocks, every entry
//!   counted as at least one 4 KiB block) may not exceed `max_dir_mib` over the run; a write past it,
//!   or a full disk under it, ends the call with a limit naming the plugin and the directory.
//!
//! Both are shadowing definitions of `wasi:filesystem/types` functions that check, then call
//! wasmtime-wasi's own implementation; file streams are wrapped to count what they write.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{
    DynOutputStream, FsResult, OutputStream, Pollable, StreamError, StreamResult,
};

use crate::sandbox::{LogLevel, State};

/// The WASI filesystem interface as wasmtime-wasi 48 defines it (guests' older 0.2.x imports
/// resolve to it by semver).
const FS_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Disk space every directory entry is counted at, at least.
const ENTRY_BYTES: u64 = 4096;

/// The granted directory's disk quota, shared by the store and the file streams it handed out.
pub(crate) struct DirQuota {
    root: PathBuf,
    limit: u64,
    state: Mutex<QuotaState>,
}

struct QuotaState {
    /// Usage when the plugin was loaded: only what it adds counts.
    baseline: u64,
    /// Usage at the last scan, and bytes charged since.
    scanned: u64,
    since_scan: u64,
    /// Why a write was refused (the call's error says it).
    hit: Option<String>,
}

impl DirQuota {
    pub(crate) fn new(root: &Path, limit: u64) -> DirQuota {
        let baseline = usage(root);
        DirQuota {
            root: root.to_path_buf(),
            limit,
            state: Mutex::new(QuotaState {
                baseline,
                scanned: baseline,
                since_scan: 0,
                hit: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QuotaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `bytes` about to be written; refuses when the directory would grow past the quota.
    /// The estimate (last scan + bytes since) only over-counts (rewrites, deletions), so it is
    /// checked against a fresh scan before anything is refused.
    pub(crate) fn charge(&self, bytes: u64) -> Result<(), String> {
        let mut s = self.lock();
        let allowed = s.baseline.saturating_add(self.limit);
        if s.scanned + s.since_scan + bytes <= allowed {
            s.since_scan += bytes;
            return Ok(());
        }
        s.scanned = usage(&self.root);
        s.since_scan = 0;
        if s.scanned + bytes <= allowed {
            s.since_scan = bytes;
            return Ok(());
        }
        let msg = format!(
            "wrote more than its directory quota of {} MiB into {} (`max_dir_mib`; the directory grew by {} MiB in this run and the next write adds {} KiB)",
            self.limit >> 20,
            self.root.display(),
            s.scanned.saturating_sub(s.baseline) >> 20,
            bytes.div_ceil(1024)
        );
        s.hit = Some(msg.clone());
        Err(msg)
    }

    /// Records a full disk under the directory and returns the message.
    fn disk_full(&self, e: &dyn std::fmt::Display) -> String {
        let mut s = self.lock();
        let grown = usage(&self.root).saturating_sub(s.baseline);
        let msg = format!(
            "the disk holding its directory {} is full ({e}); the plugin's writes grew the directory by {} MiB in this run",
            self.root.display(),
            grown >> 20
        );
        s.hit = Some(msg.clone());
        msg
    }

    /// The reason a write was refused since the last call to this, if any.
    pub(crate) fn take_hit(&self) -> Option<String> {
        self.lock().hit.take()
    }
}

/// Disk space under `root`: allocated blocks of every entry, at least [`ENTRY_BYTES`] each,
/// symlinks not followed. Unreadable entries count as one entry.
fn usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                total += ENTRY_BYTES;
                continue;
            };
            total += (meta.blocks() * 512).max(ENTRY_BYTES);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Whether a symlink with this target, made anywhere inside a directory tree, names something
/// inside that tree: a relative path that never climbs.
fn link_target_stays_inside(target: &str) -> bool {
    let p = Path::new(target);
    !target.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn fs_result<T>(r: FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => e.downcast().map(Err),
    }
}

/// Whether an error is the disk (or the quota of the filesystem) being full.
fn is_storage_full(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    })
}

impl State {
    /// Charges the directory quota (when a directory is granted) or ends the call.
    fn charge_dir(&mut self, bytes: u64) -> wasmtime::Result<()> {
        match self.quota.as_ref().map(|q| q.charge(bytes)) {
            Some(Err(msg)) => Err(self.limit_hit(msg)),
            _ => Ok(()),
        }
    }

    /// Turns a full disk into a limit naming the directory; other results pass through.
    fn check_disk<T>(&mut self, r: FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
        if let Err(e) = &r
            && let Some(ErrorCode::InsufficientSpace) = e.downcast_ref()
            && let Some(q) = self.quota.clone()
        {
            let msg = q.disk_full(&"no space left on device");
            return Err(self.limit_hit(msg));
        }
        fs_result(r)
    }

    /// Wraps a file stream the guest just opened so its writes count against the quota.
    fn guard_stream(
        &mut self,
        r: FsResult<Resource<DynOutputStream>>,
    ) -> wasmtime::Result<Result<Resource<DynOutputStream>, ErrorCode>> {
        let Some(quota) = self.quota.clone() else {
            return fs_result(r);
        };
        let stream = match r {
            Ok(stream) => stream,
            Err(e) => return fs_result(Err(e)),
        };
        let inner: DynOutputStream = self.table.delete(stream)?;
        let guarded: DynOutputStream = Box::new(QuotaStream { inner, quota });
        Ok(Ok(self.table.push(guarded)?))
    }
}

/// Adds the guarded `wasi:filesystem/types` functions over wasmtime-wasi's (already in `linker`).
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut i = linker.instance(FS_TYPES)?;
    i.func_wrap_async(
        "[method]descriptor.write",
        |mut store: StoreContextMut<'_, State>,
         (fd, buf, offset): (Resource<Descriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let s = store.data_mut();
                s.charge_dir(buf.len() as u64)?;
                let r = HostDescriptor::write(&mut s.filesystem(), fd, buf, offset).await;
                Ok((s.check_disk(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store: StoreContextMut<'_, State>, (fd, offset): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let s = store.data_mut();
                let r = HostDescriptor::write_via_stream(&mut s.filesystem(), fd, offset);
                Ok((s.guard_stream(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: StoreContextMut<'_, State>, (fd,): (Resource<Descriptor>,)| {
            Box::new(async move {
                let s = store.data_mut();
                let r = HostDescriptor::append_via_stream(&mut s.filesystem(), fd);
                Ok((s.guard_stream(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, State>,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let s = store.data_mut();
                if oflags.contains(OpenFlags::CREATE) {
                    s.charge_dir(ENTRY_BYTES)?;
                }
                let r = HostDescriptor::open_at(
                    &mut s.filesystem(),
                    fd,
                    path_flags,
                    path,
                    oflags,
                    flags,
                )
                .await;
                Ok((s.check_disk(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.create-directory-at",
        |mut store: StoreContextMut<'_, State>, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                let s = store.data_mut();
                s.charge_dir(ENTRY_BYTES)?;
                let r = HostDescriptor::create_directory_at(&mut s.filesystem(), fd, path).await;
                Ok((s.check_disk(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store: StoreContextMut<'_, State>,
         (fd, old_flags, old_path, new_fd, new_path): (
            Resource<Descriptor>,
            PathFlags,
            String,
            Resource<Descriptor>,
            String,
        )| {
            Box::new(async move {
                let s = store.data_mut();
                s.charge_dir(ENTRY_BYTES)?;
                let r = HostDescriptor::link_at(
                    &mut s.filesystem(),
                    fd,
                    old_flags,
                    old_path,
                    new_fd,
                    new_path,
                )
                .await;
                Ok((s.check_disk(r)?,))
            })
        },
    )?;
    i.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store: StoreContextMut<'_, State>, (fd, target, path): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                let s = store.data_mut();
                if !link_target_stays_inside(&target) {
                    s.log_line(
                        LogLevel::Warn,
                        &format!(
                            "refused to create the symbolic link `{path}` -> `{target}`: a link's target must be a relative path without `..`, so it stays inside the granted directory"
                        ),
                    );
                    return Ok((Err(ErrorCode::NotPermitted),));
                }
                s.charge_dir(ENTRY_BYTES)?;
                let r = HostDescriptor::symlink_at(&mut s.filesystem(), fd, target, path).await;
                Ok((s.check_disk(r)?,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A file stream whose writes are charged to the directory quota first.
struct QuotaStream {
    inner: DynOutputStream,
    quota: Arc<DirQuota>,
}

impl QuotaStream {
    fn charge(&self, bytes: usize) -> StreamResult<()> {
        self.quota
            .charge(bytes as u64)
            .map_err(|m| StreamError::Trap(wasmtime::Error::msg(m)))
    }

    /// A write that failed on a full disk ends the call naming the directory.
    fn disk<T>(&self, r: StreamResult<T>) -> StreamResult<T> {
        match r {
            Err(StreamError::LastOperationFailed(e)) if is_storage_full(&e) => Err(
                StreamError::Trap(wasmtime::Error::msg(self.quota.disk_full(&e))),
            ),
            r => r,
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for QuotaStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        let r = self.inner.write(bytes);
        self.disk(r)
    }

    fn flush(&mut self) -> StreamResult<()> {
        let r = self.inner.flush();
        self.disk(r)
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let r = self.inner.check_write();
        self.disk(r)
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        let r = self.inner.blocking_write_and_flush(bytes).await;
        self.disk(r)
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.charge(nelem)?;
        let r = self.inner.write_zeroes(nelem);
        self.disk(r)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_targets_that_never_climb_stay_inside() {
        for ok in ["a", "a/b", "./a", "sub/dir/file.txt"] {
            assert!(link_target_stays_inside(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "..",
            "a/../b",
        ] {
            assert!(!link_target_stays_inside(bad), "{bad}");
        }
    }

    #[test]
    fn the_quota_counts_what_the_directory_grows_by_and_rescans_before_refusing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.bin"), vec![1u8; 1 << 20]).unwrap();
        let q = DirQuota::new(dir.path(), 2 << 20);
        // What was there before does not count.
        q.charge(1 << 20).unwrap();
        std::fs::write(dir.path().join("new.bin"), vec![1u8; 1 << 20]).unwrap();
        // Rewriting the same file many times: the estimate runs over, a scan shows the truth.
        for _ in 0..10 {
            q.charge(1 << 20).unwrap();
            std::fs::write(dir.path().join("new.bin"), vec![2u8; 1 << 20]).unwrap();
        }
        // Growing past the quota is refused, saying by how much it grew.
        let err = q.charge(2 << 20).unwrap_err();
        assert!(
            err.contains("quota of 2 MiB") && err.contains("grew by 1 MiB"),
            "{err}"
        );
        assert_eq!(q.take_hit().as_deref(), Some(err.as_str()));
        assert!(q.take_hit().is_none());
    }
}
