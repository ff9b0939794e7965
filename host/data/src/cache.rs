//! The processed-data cache: `<cache_dir>/<key>/{samples.bin, report.json}`, where `key` is a
//! SHA-256 of the data files, tokenizer, template, format and parameters. Written to a temporary
//! folder and renamed, so a half-written cache is never read.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::tokenize::TokenizedSample;

const MAGIC: &[u8; 8] = b"LORADAT1";

fn write_split(w: &mut impl Write, samples: &[TokenizedSample]) -> std::io::Result<()> {
    w.write_all(&(samples.len() as u64).to_le_bytes())?;
    for s in samples {
        w.write_all(&(s.len() as u32).to_le_bytes())?;
        for id in &s.input_ids {
            w.write_all(&id.to_le_bytes())?;
        }
        let mask: Vec<u8> = s.train_mask.iter().map(|&m| m as u8).collect();
        w.write_all(&mask)?;
    }
    Ok(())
}

fn read_split(r: &mut impl Read) -> std::io::Result<Vec<TokenizedSample>> {
    let mut b8 = [0u8; 8];
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b8)?;
    let n = u64::from_le_bytes(b8) as usize;
    let mut out = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        r.read_exact(&mut b4)?;
        let len = u32::from_le_bytes(b4) as usize;
        let mut ids = vec![0u8; len * 4];
        r.read_exact(&mut ids)?;
        let mut mask = vec![0u8; len];
        r.read_exact(&mut mask)?;
        out.push(TokenizedSample {
            input_ids: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            train_mask: mask.iter().map(|&m| m != 0).collect(),
        });
    }
    Ok(out)
}

pub(crate) fn entry_dir(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(key)
}

/// Train samples, validation samples and the stored report.
pub(crate) type Entry = (
    Vec<TokenizedSample>,
    Vec<TokenizedSample>,
    serde_json::Value,
);

/// Loads a cache entry, if a complete one exists.
pub(crate) fn load(dir: &Path) -> Result<Option<Entry>> {
    let bin = dir.join("samples.bin");
    let report = dir.join("report.json");
    if !bin.is_file() || !report.is_file() {
        return Ok(None);
    }
    let f = std::fs::File::open(&bin).map_err(|e| DataError::io("open cache", &bin, e))?;
    let mut r = std::io::BufReader::new(f);
    let mut magic = [0u8; 8];
    let parsed = (|| -> std::io::Result<_> {
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad magic",
            ));
        }
        let train = read_split(&mut r)?;
        let val = read_split(&mut r)?;
        Ok((train, val))
    })();
    let (train, val) = parsed.map_err(|e| {
        DataError::format(
            &bin,
            format!(
                "corrupt processed-data cache ({e}); delete the folder {}",
                dir.display()
            ),
        )
    })?;
    let report_bytes =
        std::fs::read(&report).map_err(|e| DataError::io("read cache", &report, e))?;
    let report: serde_json::Value = serde_json::from_slice(&report_bytes)
        .map_err(|e| DataError::format(&report, format!("corrupt cache report: {e}")))?;
    Ok(Some((train, val, report)))
}

/// Writes a cache entry atomically (temp folder, then rename).
pub(crate) fn store(
    dir: &Path,
    train: &[TokenizedSample],
    val: &[TokenizedSample],
    report: &serde_json::Value,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io("create cache folder", parent, e))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io("create cache folder", &tmp, e))?;
    let bin = tmp.join("samples.bin");
    let write = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&bin)?);
        w.write_all(MAGIC)?;
        write_split(&mut w, train)?;
        write_split(&mut w, val)?;
        w.flush()?;
        std::fs::write(
            tmp.join("report.json"),
            serde_json::to_vec_pretty(report).unwrap_or_default(),
        )?;
        Ok(())
    };
    write().map_err(|e| DataError::io("write cache", &tmp, e))?;
    if dir.exists() {
        // Another run finished the same entry first; theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    std::fs::rename(&tmp, dir).map_err(|e| DataError::io("rename cache into place", dir, e))
}
