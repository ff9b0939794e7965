use std::path::PathBuf;

use lora_api::ExtError;

/// Why a plugin could not be configured, loaded or started. Errors during calls into a running
/// plugin are [`ExtError`]s (the `lora-api` traits' error).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A problem in `training_plugins` or `training_plugin_config`.
    #[error("{parameter}: {message}")]
    Config {
        parameter: &'static str,
        message: String,
    },

    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path} is not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },

    #[error(
        "{path} is not a lora plugin: it exports none of lora:plugin/{{preprocess,schedule,report}} (exports: {exports})"
    )]
    NotAPlugin { path: PathBuf, exports: String },

    #[error(
        "{path} was built for lora plugin API {found}, {relation} this lora supports ({supported}); {hint}"
    )]
    ApiVersion {
        path: PathBuf,
        found: String,
        relation: &'static str,
        supported: String,
        hint: &'static str,
    },

    #[error("{path} is a {found} plugin, but it was named as the run's {expected}")]
    WrongKind {
        path: PathBuf,
        expected: &'static str,
        found: &'static str,
    },

    #[error("{path} imports `{import}`, which lora does not offer to a {kind} ({hint})")]
    UnsupportedImport {
        path: PathBuf,
        import: String,
        kind: &'static str,
        hint: &'static str,
    },

    #[error("plugin {plugin}: grant {grant}: {message}")]
    Grant {
        plugin: String,
        grant: &'static str,
        message: String,
    },

    /// The component's imports or exports do not match the contract of its kind.
    #[error("plugin {plugin} ({path}) does not match the lora plugin contract: {message}")]
    Mismatch {
        plugin: String,
        path: PathBuf,
        message: String,
    },

    #[error("plugin {plugin} ({path}) could not be started: {message}")]
    Instantiate {
        plugin: String,
        path: PathBuf,
        message: String,
    },

    /// The plugin's own setup (`configure`, `create`) failed, trapped or hit a limit.
    #[error(transparent)]
    Setup(#[from] ExtError),

    #[error("the WebAssembly engine could not be created: {0}")]
    Engine(String),

    #[error("{0}")]
    Input(String),
}
