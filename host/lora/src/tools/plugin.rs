//! `lora plugin inspect FILE.wasm` and `lora plugin check FILE.wasm [--input FILE]`: what a
//! WebAssembly plugin is and asks for, and what it does on sample input under a run's sandbox.
//! The work is `lora_plugins::{inspect, check}`; this file is their command line.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command};

use super::ToolError;

pub(super) fn command() -> Command {
    let file = || {
        Arg::new("file")
            .value_name("FILE.wasm")
            .required(true)
            .value_parser(clap::value_parser!(PathBuf))
            .help("The plugin: a WebAssembly component built against the lora:plugin WIT")
    };
    let config = || {
        Arg::new("plugin_config")
            .long("plugin-config")
            .value_name("JSON|@FILE")
            .help("A training_plugin_config value (JSON object keyed by plugin kind or file stem: settings, grants, limits), or @FILE to read it from a file; shows or applies what this plugin would get in a run")
    };
    Command::new("plugin")
        .about("Inspect or check a WebAssembly plugin")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("inspect")
                .about("Print a plugin's kind, API version, imports, exports, and the grants and limits it would run with")
                .arg(file())
                .arg(config()),
        )
        .subcommand(
            Command::new("check")
                .about("Run a plugin on sample input in the run's sandbox: a preprocessor on JSONL records, a scheduler over 100 steps (or one step per loss in --input), a reporter through a synthetic 5-step run")
                .arg(file())
                .arg(
                    Arg::new("input")
                        .long("input")
                        .value_name("FILE")
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("Sample input: JSONL records (preprocessor, required); one loss per line as a number or {\"loss\": x} (scheduler)"),
                )
                .arg(config())
                .arg(
                    Arg::new("model")
                        .long("model")
                        .value_name("DIR")
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("A model folder whose tokenizer.json and chat template a preprocessor may call (without it, those calls return an error to the plugin)"),
                ),
        )
}

#[cfg(feature = "plugins")]
pub(super) fn run(m: &ArgMatches) -> Result<(), ToolError> {
    match m.subcommand() {
        Some(("inspect", m)) => {
            let file = file(m)?;
            let config = config(m)?;
            let mut inspection = lora_plugins::inspect(&file, &config).map_err(plugin_error)?;
            // Shown as everything else shows parameters: secret-looking values hidden.
            for (k, v) in inspection.options.settings.iter_mut() {
                *v = crate::redact::shown(k, v);
            }
            print!("{inspection}");
            Ok(())
        }
        Some(("check", m)) => {
            let file = file(m)?;
            let config = config(m)?;
            let tools = match m.get_one::<PathBuf>("model") {
                Some(dir) => {
                    let tools = lora_data::HfTextTools::from_dir(dir).map_err(|e| {
                        ToolError::input(
                            anyhow::Error::new(e).context(format!(
                                "--model {}: cannot load its tokenizer",
                                dir.display()
                            )),
                            "hint: --model takes a Hugging Face model folder with tokenizer.json",
                        )
                    })?;
                    Some(std::sync::Arc::new(tools) as std::sync::Arc<dyn lora_api::TextTools>)
                }
                None => None,
            };
            let input = m.get_one::<PathBuf>("input");
            if let Some(path) = input {
                std::fs::File::open(path).map_err(|e| {
                    ToolError::input(
                        anyhow::Error::new(e)
                            .context(format!("--input {}: cannot read it", path.display())),
                        HINT,
                    )
                })?;
            }
            let report = lora_plugins::check(&file, input.map(PathBuf::as_path), &config, tools)
                .map_err(plugin_error)?;
            println!("{} plugin {}:", report.kind.as_str(), file.display());
            print!("{report}");
            Ok(())
        }
        _ => Err(ToolError::input(
            anyhow::anyhow!("plugin: expected `inspect` or `check`"),
            HINT,
        )),
    }
}

#[cfg(not(feature = "plugins"))]
pub(super) fn run(_: &ArgMatches) -> Result<(), ToolError> {
    Err(ToolError::failed(
        anyhow::anyhow!(
            "this lora binary was built without WebAssembly plugin support (cargo feature `plugins`)"
        ),
        "hint: build with default features to inspect and check plugins",
    ))
}

#[cfg(feature = "plugins")]
const HINT: &str = "hint: `lora plugin inspect FILE.wasm` shows what a plugin is; plugins/ and examples/ show how to build one";

#[cfg(feature = "plugins")]
fn file(m: &ArgMatches) -> Result<PathBuf, ToolError> {
    let file = m.get_one::<PathBuf>("file").cloned().unwrap_or_default();
    // The runtime names an unreadable file too; checking here gives the clearer "no such file".
    match std::fs::metadata(&file) {
        Ok(meta) if meta.is_file() => Ok(file),
        Ok(_) => Err(ToolError::input(
            anyhow::anyhow!("plugin file {} is not a file", file.display()),
            HINT,
        )),
        Err(e) => Err(ToolError::input(
            anyhow::Error::new(e).context(format!("cannot read plugin file {}", file.display())),
            HINT,
        )),
    }
}

/// The `--plugin-config` value, read from a file when it starts with `@`.
#[cfg(feature = "plugins")]
fn config(m: &ArgMatches) -> Result<String, ToolError> {
    match m.get_one::<String>("plugin_config") {
        None => Ok(String::new()),
        Some(v) => match v.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ToolError::input(
                    anyhow::Error::new(e)
                        .context(format!("--plugin-config @{path}: cannot read it")),
                    HINT,
                )
            }),
            None => Ok(v.clone()),
        },
    }
}

/// Bad input (a corrupt file, a non-plugin, a wrong API version, a bad config): exit 2; the
/// plugin failing when run, or the runtime failing: exit 1.
#[cfg(feature = "plugins")]
fn plugin_error(e: lora_plugins::PluginError) -> ToolError {
    use lora_plugins::PluginError as E;
    match e {
        E::Setup(_) | E::Instantiate { .. } | E::Engine(_) => ToolError::failed(
            e,
            "hint: the plugin trapped, hit a limit or returned an error; its log lines (above) and the call named in the error say where",
        ),
        E::ApiVersion { .. } | E::Mismatch { .. } => ToolError::input(
            e,
            "hint: rebuild the plugin against a lora-plugin SDK version this lora supports",
        ),
        E::Config { .. } | E::Grant { .. } => ToolError::input(
            e,
            "hint: --plugin-config takes a JSON object keyed by plugin kind or file stem",
        ),
        _ => ToolError::input(e, HINT),
    }
}
