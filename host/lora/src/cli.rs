//! The command line: `lora train`, `lora kfp`, `lora component`, `lora params`. Parameter flags
//! are generated from the parameter definition (`lora_params::PARAMS`), never listed by hand.
//! The tool commands (`selftest`, `bench`, `plugin`) live in [`crate::tools`].

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use lora_params::{Loader, Origin, PARAMS, ParamErrors};

use crate::dry_run;
use crate::kfp::{ExecutorInput, KfpError};
use crate::request::{DatasetInput, OutputPaths, RunOutcome, RunRequest};

/// Local defaults of the artifact flags.
pub const DEFAULT_OUTPUT_MODEL: &str = "./lora-output/model";
pub const DEFAULT_OUTPUT_METRICS: &str = "./lora-output/metrics.json";
pub const DEFAULT_OUTPUT_LOSS_CHART: &str = "./lora-output/loss_chart.html";
pub const DEFAULT_PVC_PATH: &str = "./lora-output/workspace";

/// Why a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad parameters (exit 2).
    #[error("{0}")]
    Params(ParamErrors),
    /// Bad input: a missing file, a malformed executor input (exit 2).
    #[error(transparent)]
    Input(anyhow::Error),
    /// The run failed (exit 1) with no checkpoint a rerun would resume from.
    #[error(transparent)]
    Run(anyhow::Error),
    /// The run failed (exit 1) after writing a checkpoint that running the same command again
    /// resumes from.
    #[error(transparent)]
    Stopped(Stopped),
    /// `--dry-run` found what the run would fail on (exit 2 for bad input, 1 otherwise, such as
    /// an unreachable hub); nothing ran, so no hint about resuming.
    #[error(transparent)]
    DryRun(anyhow::Error),
    /// `--help`, `--version` or a usage error: clap prints it and picks the exit code
    /// (`main` calls [`clap::Error::exit`]).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// A tool command (`selftest`, `bench`, `plugin`) failed; it picks its exit code and hint.
    #[error(transparent)]
    Tool(#[from] crate::tools::ToolError),
}

/// A failed run and the newest complete checkpoint it left (what a rerun resumes from).
#[derive(Debug)]
pub struct Stopped {
    pub error: anyhow::Error,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for Stopped {
    /// The rest of the chain (this error's own text is the outermost context's).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<ParamErrors> for CliError {
    fn from(e: ParamErrors) -> Self {
        CliError::Params(e)
    }
}

impl From<KfpError> for CliError {
    fn from(e: KfpError) -> Self {
        match e {
            KfpError::Write { .. } => CliError::Run(e.into()),
            _ => CliError::Input(e.into()),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Params(_) | CliError::Input(_) => 2,
            CliError::Run(_) | CliError::Stopped(_) => 1,
            CliError::DryRun(e) => if input_failed(e) { 2 } else { 1 },
            CliError::Clap(e) => u8::try_from(e.exit_code()).unwrap_or(2),
            CliError::Tool(e) => e.exit_code(),
        }
    }

    /// A hint for the user, printed after the error. It promises a resume only when a checkpoint
    /// to resume from exists ([`CliError::Stopped`]).
    pub fn hint(&self) -> String {
        match self {
            CliError::Params(_) => {
                "hint: `lora train --help` lists every parameter with its form and default; `lora train --dry-run ...` checks a set without training".into()
            }
            CliError::Input(_) => {
                "hint: `--dry-run` shows how every input path and parameter was resolved".into()
            }
            // An extension (a plugin or a built-in preprocessor/scheduler/reporter) failing is not
            // fixed by running again: say what is.
            CliError::Run(e) if extension_failed(e) => {
                "hint: an extension failed (named above); fix its input or settings, or remove it from training_plugins; outputs of earlier runs are kept, and no checkpoint was written, so once fixed the run starts from the beginning".into()
            }
            CliError::Stopped(s) if extension_failed(&s.error) => format!(
                "hint: an extension failed (named above); fix its input or settings, or remove it from training_plugins; outputs of earlier runs are kept, and once fixed, running the same command again resumes from {}",
                s.checkpoint.display()
            ),
            CliError::Run(e) if other_run(e) => {
                "hint: the workspace's checkpoints belong to another run; the error above says how to start fresh or how to resume".into()
            }
            CliError::Run(_) if !crate::run::training_started() => {
                "hint: the run stopped before training started; once what is named above is fixed, run the same command again".into()
            }
            CliError::Run(_) => {
                "hint: the run stopped with no checkpoint of it to resume from; once what is named above is fixed, running the same command again starts from the beginning".into()
            }
            CliError::Stopped(s) => format!(
                "hint: the run stopped; running the same command again resumes from {} (training_resume=auto)",
                s.checkpoint.display()
            ),
            CliError::DryRun(_) => "hint: the dry run stopped where the run would stop; nothing was trained or written".into(),
            CliError::Clap(_) => String::new(),
            CliError::Tool(e) => e.hint().into(),
        }
    }
}

/// Whether a run failed on its input rather than while running: the model named is not a model
/// (missing folder, no config, unsupported or corrupt weights), the dataset is unreadable as data
/// (format, a bad record under the `error` policy, nothing left), or a plugin named cannot be
/// loaded as configured. Those exit 2 with the input hint; running again would not help.
fn input_failed(e: &anyhow::Error) -> bool {
    use crate::hub::HubError as H;
    use lora_data::DataError as D;
    use lora_engine::EngineError as E;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<H>(),
            Some(H::NotAModel(_) | H::NoConfig(_) | H::OfflineNotCached { .. } | H::NoSafetensors { .. })
        ) || matches!(c.downcast_ref::<H>(), Some(H::Oci(o)) if o.is_input_problem())
            || matches!(
            c.downcast_ref::<D>(),
            Some(D::Param { .. } | D::Source { .. } | D::Format { .. } | D::Record { .. } | D::Empty { .. } | D::Tokenizer { .. })
        ) || matches!(
            c.downcast_ref::<E>(),
            Some(E::Config { .. } | E::Unsupported(_) | E::Weights { .. } | E::WeightsFile { .. } | E::Adapter(_))
        ) || c.downcast_ref::<crate::request::ModelInputError>().is_some()
            || c.downcast_ref::<crate::run::outputs::OutputPathErrors>().is_some()
            || matches!(c.downcast_ref::<crate::run::outputs::LockError>(), Some(crate::run::outputs::LockError::Held { .. }))
            || plugin_input_failed(c)
    })
}

#[cfg(feature = "plugins")]
fn plugin_input_failed(c: &(dyn std::error::Error + 'static)) -> bool {
    use lora_plugins::PluginError as P;
    matches!(
        c.downcast_ref::<P>(),
        Some(
            P::Config { .. }
                | P::Read { .. }
                | P::Compile { .. }
                | P::NotAPlugin { .. }
                | P::ApiVersion { .. }
                | P::WrongKind { .. }
                | P::UnsupportedImport { .. }
                | P::Grant { .. }
        )
    )
}

#[cfg(not(feature = "plugins"))]
fn plugin_input_failed(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

/// Whether a run failed because an extension (plugin or built-in) did, directly or through the
/// data pipeline (whose `DataError::Extension` is transparent, so the `ExtError` is not a link of
/// its own in the chain).
fn extension_failed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<lora_api::ExtError>().is_some()
            || matches!(c.downcast_ref::<lora_data::DataError>(), Some(lora_data::DataError::Extension(_)))
    })
}

fn param_help(d: &lora_params::ParamDef) -> String {
    let unset = if d.optional { " (`none` unsets)" } else { "" };
    format!("{}{unset} [default: {}] [env: {}]", d.help, d.default_display(), d.env_var())
}

/// The parameters `lora train -h` shows (the most used); `--help` shows all of them.
pub const SHORT_HELP_PARAMS: &[&str] = &[
    "training_base_model",
    "training_num_epochs",
    "training_effective_batch_size",
    "training_learning_rate",
    "training_lr_warmup_steps",
    "training_max_seq_len",
    "training_lora_r",
    "training_lora_alpha",
    "training_dataset_type",
    "training_validation_split",
    "training_device",
    "training_resume",
];

fn param_args(cmd: Command) -> Command {
    let mut cmd = cmd;
    for d in PARAMS {
        let heading = match d.origin {
            Origin::Reference => "Parameters of the reference component",
            Origin::Addition => "Parameters added by lora",
        };
        cmd = cmd.arg(
            Arg::new(d.name)
                .long(d.flag())
                .value_name(
                    d.kind
                        .python_type()
                        .trim_start_matches("dsl.")
                        .to_ascii_uppercase(),
                )
                .help(param_help(d))
                .hide_short_help(!SHORT_HELP_PARAMS.contains(&d.name))
                .help_heading(heading)
                .allow_hyphen_values(true)
                .action(ArgAction::Set),
        );
    }
    cmd
}

fn common_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("params")
            .long("params")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("A params file (JSON if it ends in .json, else YAML) with snake_case parameter names as keys. Precedence: defaults < params file < environment (LORA_*) < command line < KFP executor input"),
    )
    .arg(
        Arg::new("dry_run")
            .long("dry-run")
            .action(ArgAction::SetTrue)
            .help("Everything but training: validate every parameter and output path, resolve the model (no weights downloaded) and every input, read the whole dataset as the run reads it, load every plugin, and print the plan (records, samples, tokens, steps, memory, outputs); exit 0 without training or writing outputs"),
    )
    .arg(
        Arg::new("json")
            .long("json")
            .action(ArgAction::SetTrue)
            .requires("dry_run")
            .help("With --dry-run: print the plan as JSON (every parameter with where it came from, inputs, data, training, memory, outputs, environment)"),
    )
}

/// The whole command-line interface.
pub fn command() -> Command {
    let train = Command::new("train")
        .about("Fine-tune a model with LoRA on a local machine (or as a TrainJob worker)")
        .arg(Arg::new("dataset").long("dataset").value_name("PATH").value_parser(clap::value_parser!(PathBuf)).help("Training dataset: a JSONL/JSON/Parquet file or a dataset folder. An existing non-empty <pvc-path>/dataset/train is used first, as in the reference").help_heading("Artifacts and files"))
        .arg(Arg::new("output_model").long("output-model").value_name("DIR").value_parser(clap::value_parser!(PathBuf)).default_value(DEFAULT_OUTPUT_MODEL).help("Where the merged model goes (the PEFT adapter in <DIR>/adapter)").help_heading("Artifacts and files"))
        .arg(Arg::new("output_metrics").long("output-metrics").value_name("FILE").value_parser(clap::value_parser!(PathBuf)).default_value(DEFAULT_OUTPUT_METRICS).help("Where the metrics JSON goes").help_heading("Artifacts and files"))
        .arg(Arg::new("output_loss_chart").long("output-loss-chart").value_name("FILE").value_parser(clap::value_parser!(PathBuf)).default_value(DEFAULT_OUTPUT_LOSS_CHART).help("Where the HTML loss chart goes").help_heading("Artifacts and files"))
        .arg(Arg::new("pvc_path").long("pvc-path").value_name("DIR").value_parser(clap::value_parser!(PathBuf)).default_value(DEFAULT_PVC_PATH).help("The workspace: dataset/train, checkpoints (resume), final_model").help_heading("Artifacts and files"));
    let train = param_args(common_args(train))
        .after_help(format!(
            "`lora train --help` lists all {} parameters, grouped, each with its default and environment variable",
            PARAMS.len()
        ))
        .after_long_help("Flags take precedence over LORA_* environment variables, which take precedence over --params files.");
    let kfp = common_args(
        Command::new("kfp")
            .about("Run as the Kubeflow Pipelines component: read the executor input, write the outputs and executor_output.json")
            .arg(Arg::new("executor_input").long("executor-input").value_name("JSON|@FILE").required(true).help("The executor input (the {{$}} placeholder), or @FILE to read it from a file")),
    );
    Command::new("lora")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Fine-tune Hugging Face causal LMs with LoRA: a drop-in for the Kubeflow Pipelines lora component")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(train)
        .subcommand(kfp)
        .subcommand(
            Command::new("component")
                .about("Print the KFP component spec (YAML) of this binary's container")
                .arg(Arg::new("output").long("output").value_name("FILE").value_parser(clap::value_parser!(PathBuf)).help("Write it to FILE instead of standard output")),
        )
        .subcommand(
            Command::new("params")
                .about("Describe the parameters")
                .arg(Arg::new("json_schema").long("json-schema").action(ArgAction::SetTrue).help("Print a JSON Schema of the parameter set (and of params files)"))
                .arg(Arg::new("markdown").long("markdown").action(ArgAction::SetTrue).conflicts_with("json_schema").help("Print the parameter table as Markdown")),
        )
        .subcommands(crate::tools::commands())
}

/// Environment variables lora (or a library it calls) reads, besides every `LORA_*` and `HF_*`
/// one: the Hugging Face cache and token (`hub::HubOptions::from_env`), the CUDA loader and the
/// TrainJob rank (engine). A non-UTF-8 value of one of these is a bad input.
pub const READ_ENV_VARS: &[&str] = &[
    "HOME",
    "XDG_CACHE_HOME",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_OFFLINE",
    "CUDA_HOME",
    "CUDA_VISIBLE_DEVICES",
    "LOCAL_RANK",
];

/// Whether lora reads environment variable `name`.
pub fn reads_env_var(name: &str) -> bool {
    name.starts_with("LORA_") || name.starts_with("HF_") || READ_ENV_VARS.contains(&name)
}

/// The environment as text. A variable lora reads ([`reads_env_var`]) must be UTF-8: every one
/// that is not is named in one error (exit 2). Any other variable that is not UTF-8 (name or
/// value) is left out: lora never reads it, and must not fail because of it.
pub fn text_env(env: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (k, v) in env {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => out.push((k, v)),
            Err(v) if reads_env_var(&k) => bad.push(format!("{k}={:?}", v.to_string_lossy())),
            Err(_) => {}
        }
    }
    if bad.is_empty() {
        return Ok(out);
    }
    Err(CliError::Input(anyhow::anyhow!(
        "lora reads these environment variables as text, and their values are not valid UTF-8 (bad bytes shown as U+FFFD): {}; set each to UTF-8 text or unset it",
        bad.join(", ")
    )))
}

/// Runs the command line `args` (including the program name) with environment `env` (as the OS
/// gives it: [`text_env`] decides what must be text). Clap's own outcomes (`--help`, unknown
/// flags) come back as [`CliError::Clap`].
pub fn run(
    args: impl IntoIterator<Item = OsString>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<(), CliError> {
    let args: Vec<OsString> = args.into_iter().collect();
    let matches = command().try_get_matches_from(&args)?;
    let env = text_env(env)?;
    match matches.subcommand() {
        Some(("train", m)) => train(m, env, &args),
        Some(("kfp", m)) => kfp(m, env),
        Some(("component", m)) => {
            let yaml = crate::component::component_yaml().map_err(|e| CliError::Run(e.into()))?;
            match m.get_one::<PathBuf>("output") {
                Some(path) => {
                    crate::kfp::write_atomic(path, yaml.as_bytes()).map_err(CliError::from)
                }
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        Some(("params", m)) => {
            if m.get_flag("markdown") {
                print!("{}", lora_params::markdown_table());
            } else {
                println!("{}", pretty(&lora_params::json_schema()));
            }
            Ok(())
        }
        Some((name, m)) if crate::tools::NAMES.contains(&name) => Ok(crate::tools::run(name, m)?),
        _ => Err(CliError::Input(anyhow::anyhow!(
            "unknown command (see `lora --help`)"
        ))),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Lower-precedence sources shared by `train` and `kfp`: params file, then environment.
fn base_loader(m: &ArgMatches, env: &[(String, String)]) -> Loader {
    let mut loader = Loader::new();
    if let Some(path) = m.get_one::<PathBuf>("params") {
        loader.apply_file(path);
    }
    loader.apply_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    loader
}

fn train(m: &ArgMatches, env: Vec<(String, String)>, args: &[OsString]) -> Result<(), CliError> {
    let mut loader = base_loader(m, &env);
    for d in PARAMS {
        if let Some(v) = m.get_one::<String>(d.name) {
            loader.apply_cli(d.name, v);
        }
    }
    if dry_run_mode(m) == DryRun::No {
        crate::parallel::launch(loader.params(), args).map_err(CliError::Run)?;
    }
    let params = loader.finish_for_world(crate::parallel::planned_world(&env).map_err(CliError::Input)?)?;
    crate::run::check_schedule(&params)?;
    let path = |k: &str| m.get_one::<PathBuf>(k).cloned().unwrap_or_default();
    let request = RunRequest {
        kubernetes_config: params
            .kubernetes_config
            .clone()
            .map(serde_json::Value::Object),
        params,
        dataset: DatasetInput {
            path: m.get_one::<PathBuf>("dataset").cloned(),
            metadata: Default::default(),
        },
        outputs: OutputPaths {
            model: path("output_model"),
            metrics: path("output_metrics"),
            loss_chart: path("output_loss_chart"),
            executor_output: None,
            output_parameter: None,
        },
        pvc_path: path("pvc_path"),
        kfp: None,
    };
    finish(request, "train", dry_run_mode(m), &env)
}

fn kfp(m: &ArgMatches, env: Vec<(String, String)>) -> Result<(), CliError> {
    let arg = m
        .get_one::<String>("executor_input")
        .map(String::as_str)
        .unwrap_or_default();
    let input = ExecutorInput::parse_arg(arg)?;
    let mut loader = base_loader(m, &env);
    loader.apply_kfp(&input.training_parameters());
    let world = crate::parallel::planned_world(&env).map_err(CliError::Input)?;
    let pvc_path = input.pvc_path();
    let outputs = (
        input.output_path("output_model"),
        input.output_path("output_metrics"),
        input.output_path("output_loss_chart"),
    );
    // More than one pod, and this is not one of them: launch a TrainJob of that many.
    let launcher = crate::trainjob::needed(loader.params()) && !env.iter().any(|(k, _)| k == "PET_NNODES");
    // Parameter problems first (all of them), then the executor input's own.
    let params = if launcher { loader.finish_for_trainjob_launcher()? } else { loader.finish_for_world(world)? };
    crate::run::check_schedule(&params)?;
    let pvc_path = pvc_path?;
    let (model, metrics, loss_chart) = (outputs.0?, outputs.1?, outputs.2?);
    let dataset = match input.input_artifact("dataset") {
        Some(a) => DatasetInput {
            path: (!a.uri.is_empty()).then(|| a.local_path(false)),
            metadata: a.metadata.clone(),
        },
        None => DatasetInput::default(),
    };
    if launcher {
        let dataset = crate::launcher::dataset_path(&dataset, &pvc_path).map_err(CliError::Input)?;
        return launch(&params, &input, pvc_path, dataset, (model, metrics, loss_chart), dry_run_mode(m), &env);
    }
    let request = RunRequest {
        kubernetes_config: params
            .kubernetes_config
            .clone()
            .map(serde_json::Value::Object),
        params,
        dataset,
        outputs: OutputPaths {
            model,
            metrics,
            loss_chart,
            executor_output: input.executor_output_file(),
            output_parameter: input.output_parameter_file(),
        },
        pvc_path,
        kfp: Some(input),
    };
    finish(request, "kfp", dry_run_mode(m), &env)
}

/// `lora kfp` launching a TrainJob ([`crate::launcher`]): `--dry-run` prints it; otherwise it
/// runs, and on Complete the outputs and `executor_output.json` are written as a single-pod run
/// writes them.
fn launch(
    params: &lora_params::ResolvedParams,
    input: &ExecutorInput,
    pvc_path: PathBuf,
    dataset: Option<PathBuf>,
    (model, metrics, loss_chart): (PathBuf, PathBuf, PathBuf),
    dry_run: DryRun,
    env: &[(String, String)],
) -> Result<(), CliError> {
    let r = crate::launcher::Request { params, pvc_path, dataset, model, metrics, loss_chart };
    if dry_run != DryRun::No {
        let job = crate::launcher::dry_run(&r, env).map_err(CliError::Input)?;
        if dry_run == DryRun::Text {
            println!("lora kfp --dry-run: nothing is created; the TrainJob this run would create:");
        }
        println!("{}", pretty(&job));
        return Ok(());
    }
    let prepared = crate::launcher::prepare(&r, env).map_err(CliError::Input)?;
    let outcome = crate::launcher::run(&r, prepared).map_err(CliError::Run)?;
    crate::kfp::write_executor_output(input, &outcome).map_err(CliError::from)?;
    eprintln!("{}", outcome.output);
    Ok(())
}

/// How `--dry-run` prints its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DryRun {
    No,
    Text,
    Json,
}

fn dry_run_mode(m: &ArgMatches) -> DryRun {
    match (m.get_flag("dry_run"), m.get_flag("json")) {
        (false, _) => DryRun::No,
        (true, false) => DryRun::Text,
        (true, true) => DryRun::Json,
    }
}

/// Dry run: print the plan. Otherwise: apply the environment, lay out the workspace, run, and
/// (under KFP) write the executor output.
fn finish(
    request: RunRequest,
    command: &str,
    dry_run: DryRun,
    env: &[(String, String)],
) -> Result<(), CliError> {
    let mut plan = dry_run::plan(&request, command, env).map_err(CliError::Input)?;
    for (k, v) in dry_run::process_env(&request, env) {
        // SAFETY: called on the main thread before the run starts any thread; nothing else
        // reads or writes the environment concurrently.
        unsafe { std::env::set_var(&k, &v) };
    }
    if dry_run != DryRun::No {
        // The model and the data, read as the run reads them: their errors are the run's.
        let (sections, lines) = dry_run::data_plan(&request).map_err(CliError::DryRun)?;
        if dry_run == DryRun::Json {
            if let Some(obj) = plan.as_object_mut() {
                obj.extend(sections);
            }
            println!("{}", pretty(&plan));
        } else {
            println!("lora {command} --dry-run: nothing is trained or written");
            for l in lines {
                println!("{l}");
            }
            println!("outputs (every path checked writable):");
            for l in dry_run::output_lines(&request) {
                println!("{l}");
            }
            println!("`--dry-run --json` prints the whole plan (every parameter and where it came from, inputs, environment)");
        }
        return Ok(());
    }
    for dir in dry_run::workspace_dirs(&request) {
        std::fs::create_dir_all(&dir).map_err(|e| {
            CliError::Run(
                anyhow::Error::new(e)
                    .context(format!("cannot create workspace folder {}", dir.display())),
            )
        })?;
    }
    let outcome = execute(&request).map_err(|e| run_failed(&request, e))?;
    if let Some(input) = request.kfp.as_ref().filter(|_| !crate::parallel::secondary_rank()) {
        // After the outputs: a failure here leaves a complete final checkpoint to rerun from.
        crate::kfp::write_executor_output(input, &outcome).map_err(|e| run_failed(&request, e.into()))?;
    }
    if !outcome.output.is_empty() {
        eprintln!("{}", outcome.output);
    }
    Ok(())
}

/// Whether a run stopped because the workspace's newest checkpoint belongs to a different run.
fn other_run(e: &anyhow::Error) -> bool {
    use crate::checkpoint::CheckpointError as C;
    e.chain().any(|c| matches!(c.downcast_ref::<C>(), Some(C::Mismatch { .. })))
}

/// What a failed run is: bad input (exit 2), or a failure that a rerun resumes after when
/// `training_resume=auto` finds a complete checkpoint of this same run, or one it does not.
fn run_failed(request: &RunRequest, e: anyhow::Error) -> CliError {
    if input_failed(&e) {
        return CliError::Input(e);
    }
    let newest = crate::checkpoint::list(&request.workspace().checkpoints).pop();
    match newest {
        // A resume is promised only by a run that got past the resume check: before it (the hub,
        // the model, a checkpoint of another run) nothing says the checkpoint is this run's.
        Some((_, checkpoint)) if request.params.resume == "auto" && !other_run(&e) && crate::run::training_started() => {
            CliError::Stopped(Stopped { error: e, checkpoint })
        }
        _ => CliError::Run(e),
    }
}

/// The hand-off to the training run. When `crate::run` lands, this body becomes
/// `crate::run::execute(request)` (its error converted to `anyhow::Error`).
fn execute(request: &RunRequest) -> anyhow::Result<RunOutcome> {
    crate::run::execute(request)
}
