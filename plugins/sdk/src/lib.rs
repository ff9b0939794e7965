//! `lora-plugin`: the guest SDK for lora plugins (WebAssembly components for `wasm32-wasip2`).
//!
//! Enable exactly one feature, the kind of plugin you write (`preprocessor`, `scheduler` or
//! `reporter`), implement that module's trait and name your type in its export macro:
//!
//! ```ignore
//! use lora_plugin::scheduler::{Scheduler, ScheduleContext};
//! #[derive(Default)]
//! struct Constant { lr: f64 }
//! impl Scheduler for Constant {
//!     fn create(ctx: ScheduleContext) -> Result<Self, String> { Ok(Constant { lr: ctx.base_lr }) }
//!     fn learning_rate(&mut self, _step: u64) -> Result<f64, String> { Ok(self.lr) }
//! }
//! lora_plugin::export_scheduler!(Constant);
//! ```
//!
//! The export macro also stamps the API version ([`API_VERSION`]) into a `lora-plugin-api`
//! custom section, which `lora plugin inspect` shows; the host checks the version carried by the
//! component's export names (`lora:plugin/schedule@0.1.0`) and refuses one it does not support.
//!
//! This crate owns the guest side of the contract only. It must not do I/O of its own: a plugin
//! has no filesystem, network, environment or clock unless the run grants them.

#[cfg(any(
    all(feature = "preprocessor", feature = "scheduler"),
    all(feature = "preprocessor", feature = "reporter"),
    all(feature = "scheduler", feature = "reporter"),
))]
compile_error!(
    "lora-plugin: enable exactly one of the features `preprocessor`, `scheduler`, `reporter` \
     (a component is one kind of plugin; build each plugin with its own `cargo build -p`)"
);

mod settings;
pub use settings::Settings;

/// `cos`, `exp`, `pow`, `log`, … exactly as lora's built-in schedules compute them: the `libm`
/// crate (musl's libm in Rust), the same bits on every host. Use these rather than `f64::cos` in a
/// scheduler that must reproduce a built-in schedule bit for bit; `f64::cos` in a guest is
/// wasi-libc's copy of the same code today, but that is the toolchain's choice, not a promise.
pub mod math {
    pub use libm::*;
}

#[cfg(feature = "preprocessor")]
pub mod preprocessor;
#[cfg(feature = "reporter")]
pub mod reporter;
#[cfg(feature = "scheduler")]
pub mod scheduler;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "nn")]
pub mod nn;

#[cfg(all(feature = "http", not(feature = "reporter")))]
compile_error!(
    "lora-plugin: the `http` feature is for reporters (only a reporter may be granted wasi:http)"
);

/// The version of the WIT package `lora:plugin` this SDK builds against.
pub const API_VERSION: &str = "0.1.0";

/// The message every not-overridden trait method returns, naming the method.
pub fn not_implemented(method: &str) -> String {
    format!("this plugin does not implement `{method}`")
}

#[doc(hidden)]
pub const fn __api_version_bytes<const N: usize>() -> [u8; N] {
    let src = API_VERSION.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = src[i];
        i += 1;
    }
    out
}

/// Stamps [`API_VERSION`] into the `lora-plugin-api` custom section (used by the export macros).
#[doc(hidden)]
#[macro_export]
macro_rules! __stamp_api_version {
    () => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(link_section = "lora-plugin-api")]
        #[used]
        static __LORA_PLUGIN_API_VERSION: [u8; $crate::API_VERSION.len()] =
            $crate::__api_version_bytes();
    };
}

/// Logging into the run's log (shared by every plugin kind).
pub mod log {
    #[cfg(feature = "preprocessor")]
    use crate::preprocessor::bindings::lora::plugin::{host, types::LogLevel};
    #[cfg(feature = "reporter")]
    use crate::reporter::bindings::lora::plugin::{host, types::LogLevel};
    #[cfg(feature = "scheduler")]
    use crate::scheduler::bindings::lora::plugin::{host, types::LogLevel};

    /// A debug line in the run's log.
    #[cfg(any(feature = "preprocessor", feature = "scheduler", feature = "reporter"))]
    pub fn debug(message: &str) {
        host::log(LogLevel::Debug, message)
    }
    /// An info line in the run's log.
    #[cfg(any(feature = "preprocessor", feature = "scheduler", feature = "reporter"))]
    pub fn info(message: &str) {
        host::log(LogLevel::Info, message)
    }
    /// A warning in the run's log.
    #[cfg(any(feature = "preprocessor", feature = "scheduler", feature = "reporter"))]
    pub fn warn(message: &str) {
        host::log(LogLevel::Warn, message)
    }
    /// An error line in the run's log (it does not fail the run; return an `Err` for that).
    #[cfg(any(feature = "preprocessor", feature = "scheduler", feature = "reporter"))]
    pub fn error(message: &str) {
        host::log(LogLevel::Error, message)
    }
}
