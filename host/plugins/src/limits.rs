//! What a guest can make the host hold, counted against its limits: linear memories and tables
//! together against `memory_mib`; live host resources (streams, pollables, `wasi:http` header
//! maps, ...) by count, with a per-resource size cap, so they too stay within about
//! `memory_mib` on the host side.

use wasmtime::ResourceLimiter;

/// Bytes the host keeps per table element (a function or GC reference: one pointer).
pub(crate) const TABLE_ELEMENT_BYTES: usize = 8;

/// The largest host-side size of one `wasi:http` header map (`fields`): wire size plus the
/// in-memory overhead of the map (wasmtime's own default is 128 KiB).
pub(crate) const FIELDS_BYTES: usize = 64 << 10;

/// Live host resources an instance may hold: enough that header maps at their size cap stay
/// within the memory cap, and never fewer than 256 (a reporter sending a request holds about ten).
pub(crate) fn max_host_resources(memory_bytes: u64) -> usize {
    ((memory_bytes / FIELDS_BYTES as u64) as usize).clamp(256, 1 << 20)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Caps the instance's linear memories and tables (together) at `memory_mib`.
pub(crate) struct Limiter {
    pub(crate) cap: usize,
    pub(crate) used: usize,
    /// Set when a growth was refused; turns the resulting trap into a `Limit` error.
    pub(crate) hit: Option<String>,
}

impl Limiter {
    pub(crate) fn new(cap: u64) -> Limiter {
        Limiter {
            cap: cap.min(usize::MAX as u64) as usize,
            used: 0,
            hit: None,
        }
    }

    /// Grows the count by `delta` bytes or refuses, recording why.
    fn grow(&mut self, delta: usize, what: impl FnOnce(usize) -> String) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(delta);
        if total > self.cap {
            let msg = format!(
                "memory limit of {} MiB exceeded ({}); raise `memory_mib` in training_plugin_config if this is expected",
                self.cap >> 20,
                what(total)
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        self.used = total;
        Ok(true)
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(desired.saturating_sub(current), |total| {
            format!("memories and tables growing to {}", mib(total))
        })
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired
            .saturating_sub(current)
            .saturating_mul(TABLE_ELEMENT_BYTES);
        self.grow(delta, |total| {
            format!(
                "a table growing to {desired} elements brings memories and tables to {}",
                mib(total)
            )
        })
    }

    fn instances(&self) -> usize {
        100
    }
    fn tables(&self) -> usize {
        1000
    }
    fn memories(&self) -> usize {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_memories_share_one_cap() {
        let mut l = Limiter::new(16 << 20);
        assert!(l.memory_growing(0, 8 << 20, None).unwrap());
        // 2^20 funcref elements are 8 MiB: the first table fits next to 8 MiB of memory ...
        assert!(l.table_growing(0, 1 << 19, None).unwrap());
        // ... a second one does not.
        let err = l.table_growing(0, 1 << 20, None).unwrap_err().to_string();
        assert!(
            err.contains("memory limit of 16 MiB") && err.contains("1048576 elements"),
            "{err}"
        );
        assert_eq!(l.used, 12 << 20);
        assert!(l.hit.is_some());
    }

    #[test]
    fn host_resources_follow_the_memory_cap() {
        assert_eq!(max_host_resources(16 << 20), 256);
        assert_eq!(max_host_resources(512 << 20), 8192);
        assert!(max_host_resources(512 << 20) * FIELDS_BYTES <= 512 << 20);
    }
}
