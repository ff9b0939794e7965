//! `lora-params`: every parameter of the "lora" component as one typed struct.
//!
//! Owns the single parameter definition ([`PARAMS`], from which the [`Params`] struct, CLI
//! flags, environment names, params-file keys, the JSON Schema and the KFP component inputs all
//! come), reading values from their sources with precedence ([`Loader`]), validation that
//! reports every problem at once ([`ParamErrors`]) and resolution of training_hub's defaults
//! ([`ResolvedParams`]).
//!
//! It must not read the process environment or files on its own (callers pass them in), print,
//! or exit; it knows nothing of KFP's executor input beyond a map of parameter values.

mod availability;
mod defs;
mod error;
mod resolve;
mod schema;
mod sources;
pub mod syntax;
mod value;

pub use availability::{UNAVAILABLE, Unavailable};
pub use defs::{Origin, PARAMS, ParamDef, Params, param_def};
pub use error::{ParamError, ParamErrors, Source};
pub use resolve::{
    BAD_RECORDS, BNB_4BIT_COMPUTE_DTYPES, BNB_4BIT_QUANT_TYPES, DATASET_TYPES, DEFAULT_SEED, DEVICES, GRADIENT_CHECKPOINTING, LONG_SAMPLE_POLICIES, RESUME, RUNTIMES,
    ResolvedParams, SCHEDULERS, launched_world_size, resolve, resolve_for_trainjob_launcher, resolve_for_world,
};
pub use schema::{json_schema, markdown_table};
pub use sources::{Loader, edit_distance, suggest};
pub use syntax::PluginSpec;
pub use value::{Kind, ParamValue};
