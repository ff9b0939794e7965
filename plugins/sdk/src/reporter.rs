//! Reporters: told about a run's progress. A reporter granted a directory sees it as `/out`.

use std::cell::RefCell;

use crate::{Settings, not_implemented};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "reporter",
        pub_export_macro: true,
        export_macro_name: "__export_reporter_world",
        default_bindings_module: "lora_plugin::reporter::bindings",
    });
}

pub use bindings::exports::lora::plugin::report::{
    CheckpointInfo, EvalMetrics, RunInfo, RunSummary, StepMetrics,
};

/// Where a granted output directory appears inside the sandbox.
pub const OUTPUT_DIR: &str = "/out";

/// A reporter. One value is created per run (by [`Reporter::configure`]).
pub trait Reporter: Sized + 'static {
    /// Creates the reporter from its settings; refuse settings you do not know.
    fn configure(settings: &Settings) -> Result<Self, String>;

    /// The run started.
    fn on_start(&mut self, info: RunInfo) -> Result<(), String> {
        let _ = info;
        Err(not_implemented("Reporter::on_start"))
    }
    /// A step was logged.
    fn on_step(&mut self, metrics: StepMetrics) -> Result<(), String> {
        let _ = metrics;
        Err(not_implemented("Reporter::on_step"))
    }
    /// An evaluation finished (ignored by default).
    fn on_eval(&mut self, metrics: EvalMetrics) -> Result<(), String> {
        let _ = metrics;
        Ok(())
    }
    /// A checkpoint was written (ignored by default).
    fn on_checkpoint(&mut self, checkpoint: CheckpointInfo) -> Result<(), String> {
        let _ = checkpoint;
        Ok(())
    }
    /// The run finished.
    fn on_finish(&mut self, summary: RunSummary) -> Result<(), String> {
        let _ = summary;
        Err(not_implemented("Reporter::on_finish"))
    }
}

#[doc(hidden)]
pub fn __configure<T: Reporter>(
    slot: &RefCell<Option<T>>,
    settings: Vec<(String, String)>,
) -> Result<(), String> {
    *slot.borrow_mut() = Some(T::configure(&Settings(settings))?);
    Ok(())
}

#[doc(hidden)]
pub fn __with<T: Reporter, R>(
    slot: &RefCell<Option<T>>,
    call: &str,
    f: impl FnOnce(&mut T) -> Result<R, String>,
) -> Result<R, String> {
    let mut slot = slot.borrow_mut();
    let r = slot
        .as_mut()
        .ok_or_else(|| format!("`{call}` was called before `configure`"))?;
    f(r)
}

/// Exports `$t` (a [`Reporter`]) as this component's reporter and stamps the API version.
#[macro_export]
macro_rules! export_reporter {
    ($t:ty) => {
        const _: () = {
            use $crate::reporter::Reporter as _;
            use $crate::reporter::bindings::exports::lora::plugin::report as __wit;
            struct __LoraPluginExport;
            ::std::thread_local! {
                static __LORA_PLUGIN: ::std::cell::RefCell<::std::option::Option<$t>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            impl __wit::Guest for __LoraPluginExport {
                fn configure(
                    settings: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN.with(|slot| $crate::reporter::__configure::<$t>(slot, settings))
                }
                fn on_start(
                    info: __wit::RunInfo,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN.with(|s| {
                        $crate::reporter::__with::<$t, _>(s, "on-start", |r| r.on_start(info))
                    })
                }
                fn on_step(
                    m: __wit::StepMetrics,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN
                        .with(|s| $crate::reporter::__with::<$t, _>(s, "on-step", |r| r.on_step(m)))
                }
                fn on_eval(
                    m: __wit::EvalMetrics,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN
                        .with(|s| $crate::reporter::__with::<$t, _>(s, "on-eval", |r| r.on_eval(m)))
                }
                fn on_checkpoint(
                    c: __wit::CheckpointInfo,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN.with(|s| {
                        $crate::reporter::__with::<$t, _>(s, "on-checkpoint", |r| {
                            r.on_checkpoint(c)
                        })
                    })
                }
                fn on_finish(
                    summary: __wit::RunSummary,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN.with(|s| {
                        $crate::reporter::__with::<$t, _>(s, "on-finish", |r| r.on_finish(summary))
                    })
                }
            }
            $crate::reporter::bindings::__export_reporter_world!(
                __LoraPluginExport with_types_in $crate::reporter::bindings
            );
            $crate::__stamp_api_version!();
        };
    };
}
