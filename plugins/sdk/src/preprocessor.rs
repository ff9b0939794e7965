//! Preprocessors: raw dataset records in, training samples out.

use std::cell::RefCell;

use crate::{Settings, not_implemented};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "preprocessor",
        pub_export_macro: true,
        export_macro_name: "__export_preprocessor_world",
        default_bindings_module: "lora_plugin::preprocessor::bindings",
    });
}

pub use bindings::exports::lora::plugin::preprocess::{RawRecord, RecordOutcome};
pub use bindings::lora::plugin::types::{Message, PromptCompletion, Sample, Tokens};

/// The run's tokenizer and chat template (host functions).
pub mod text {
    pub use super::bindings::lora::plugin::text_tools::{
        apply_chat_template, count_tokens, decode, encode,
    };
}

/// A preprocessor. One value is created per run (by [`Preprocessor::configure`]) and given
/// every batch of records in dataset order.
pub trait Preprocessor: Sized + 'static {
    /// Creates the preprocessor from its settings; refuse settings you do not know
    /// ([`Settings::allow_only`]).
    fn configure(settings: &Settings) -> Result<Self, String>;

    /// The samples made from one record: none drops it, several split it; an `Err` is this
    /// record's error (the run's bad-record policy decides whether it fails the run).
    fn process_record(&mut self, record: &RawRecord) -> Result<Vec<Sample>, String> {
        let _ = record;
        Err(not_implemented("Preprocessor::process_record"))
    }

    /// One batch; by default [`Preprocessor::process_record`] on each record. Must return one
    /// outcome per record, in order; an `Err` fails the run.
    fn process_batch(
        &mut self,
        batch: u64,
        records: Vec<RawRecord>,
    ) -> Result<Vec<RecordOutcome>, String> {
        let _ = batch;
        Ok(records
            .iter()
            .map(|r| RecordOutcome {
                index: r.index,
                result: self.process_record(r),
            })
            .collect())
    }
}

#[doc(hidden)]
pub fn __configure<T: Preprocessor>(
    slot: &RefCell<Option<T>>,
    settings: Vec<(String, String)>,
) -> Result<(), String> {
    *slot.borrow_mut() = Some(T::configure(&Settings(settings))?);
    Ok(())
}

#[doc(hidden)]
pub fn __process_batch<T: Preprocessor>(
    slot: &RefCell<Option<T>>,
    batch: u64,
    records: Vec<RawRecord>,
) -> Result<Vec<RecordOutcome>, String> {
    let mut slot = slot.borrow_mut();
    let p = slot
        .as_mut()
        .ok_or("`process-batch` was called before `configure`")?;
    p.process_batch(batch, records)
}

/// Exports `$t` (a [`Preprocessor`]) as this component's preprocessor and stamps the API version.
#[macro_export]
macro_rules! export_preprocessor {
    ($t:ty) => {
        const _: () = {
            struct __LoraPluginExport;
            ::std::thread_local! {
                static __LORA_PLUGIN: ::std::cell::RefCell<::std::option::Option<$t>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }
            impl $crate::preprocessor::bindings::exports::lora::plugin::preprocess::Guest
                for __LoraPluginExport
            {
                fn configure(
                    settings: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __LORA_PLUGIN
                        .with(|slot| $crate::preprocessor::__configure::<$t>(slot, settings))
                }
                fn process_batch(
                    batch: u64,
                    records: ::std::vec::Vec<$crate::preprocessor::RawRecord>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::preprocessor::RecordOutcome>,
                    ::std::string::String,
                > {
                    __LORA_PLUGIN.with(|slot| {
                        $crate::preprocessor::__process_batch::<$t>(slot, batch, records)
                    })
                }
            }
            $crate::preprocessor::bindings::__export_preprocessor_world!(
                __LoraPluginExport with_types_in $crate::preprocessor::bindings
            );
            $crate::__stamp_api_version!();
        };
    };
}
