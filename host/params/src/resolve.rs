//! Validation (every problem at once) and resolution of the values the reference leaves `None`
//! for training_hub to fill. The result is what a run uses: no `Option` left where training_hub
//! has a default, each resolved value recorded with its source.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::availability::UNAVAILABLE;
use crate::defs::{PARAMS, Params};
use crate::error::{ParamError, ParamErrors, Source};
use crate::syntax::{
    PluginSpec, check_env_name, check_k8s_key, check_k8s_label_value, parse_cpu, parse_json_object,
    parse_kv_list, parse_memory, parse_plugins,
};

/// Scheduler names the built-in schedulers (transformers' `get_scheduler` names) provide.
pub const SCHEDULERS: [&str; 8] = [
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "warmup_stable_decay",
];
/// Dataset formats of the reference.
pub const DATASET_TYPES: [&str; 3] = ["chat_template", "alpaca", "passthrough"];
/// Accepted `training_runtime` values.
pub const RUNTIMES: [&str; 2] = ["training-hub", "lora"];
pub const BAD_RECORDS: [&str; 2] = ["error", "skip"];
pub const LONG_SAMPLE_POLICIES: [&str; 3] = ["drop", "truncate", "error"];
pub const DEVICES: [&str; 3] = ["auto", "cpu", "cuda"];
pub const MERGED_DTYPES: [&str; 2] = ["base", "float32"];
pub const RESUME: [&str; 2] = ["auto", "never"];
pub const GRADIENT_CHECKPOINTING: [&str; 3] = ["auto", "true", "false"];
/// `training_lora_bnb_4bit_quant_type` values.
pub const BNB_4BIT_QUANT_TYPES: [&str; 2] = ["nf4", "fp4"];
/// `training_lora_bnb_4bit_compute_dtype` values (a `torch.` prefix is also accepted).
pub const BNB_4BIT_COMPUTE_DTYPES: [&str; 3] = ["bfloat16", "float16", "float32"];

/// training_hub's LoRA init seed, used when `training_seed` is unset.
pub const DEFAULT_SEED: u64 = 3407;

/// Every parameter resolved for a run. `params` keeps the values as given; the other fields are
/// what the run uses (training_hub defaults filled in, strings parsed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedParams {
    #[serde(skip)]
    pub params: Params,
    /// Where each value came from, by parameter name.
    #[serde(skip)]
    pub sources: BTreeMap<&'static str, Source>,
    pub base_model: String,
    pub effective_batch_size: u64,
    pub micro_batch_size: u64,
    pub gradient_accumulation_steps: u64,
    /// Processes training together (data-parallel ranks; see [`resolve_for_world`]).
    pub world_size: u64,
    pub max_tokens_per_gpu: u64,
    pub max_seq_len: u64,
    pub learning_rate: f64,
    pub lr_warmup_steps: u64,
    pub lr_scheduler: String,
    pub lr_scheduler_kwargs: Map<String, Value>,
    pub num_epochs: u64,
    pub max_steps: Option<u64>,
    pub checkpoint_at_epoch: bool,
    /// `None`: `<pvc_path>/checkpoints/_internal_data_processing`.
    pub data_output_dir: Option<String>,
    pub envs: Vec<(String, String)>,
    pub resource_cpu_per_worker: f64,
    pub resource_gpu_per_worker: u64,
    pub resource_memory_per_worker_bytes: f64,
    pub resource_num_workers: u64,
    pub metadata_labels: Vec<(String, String)>,
    pub metadata_annotations: Vec<(String, String)>,
    pub lora_r: u64,
    pub lora_alpha: u64,
    pub lora_dropout: f64,
    /// Empty: auto-detect (every linear layer of the decoder).
    pub lora_target_modules: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub load_in_4bit: bool,
    pub load_in_8bit: bool,
    /// With 4-bit: `nf4` or `fp4` (default `nf4`; a bitsandbytes checkpoint's own type wins
    /// over the default, see [`ResolvedParams::bnb_4bit_explicit`]). `None` without 4-bit.
    pub bnb_4bit_quant_type: Option<String>,
    pub bnb_4bit_use_double_quant: Option<bool>,
    /// `bfloat16`, `float16` or `float32` (no `torch.` prefix).
    pub bnb_4bit_compute_dtype: Option<String>,
    pub sample_packing: bool,
    pub seed: u64,
    pub use_liger: bool,
    pub flash_attention: bool,
    pub bf16: bool,
    pub tf32: bool,
    pub save_steps: u64,
    pub eval_steps: u64,
    pub logging_steps: u64,
    pub save_total_limit: u64,
    pub dataset_type: String,
    pub field_messages: String,
    pub field_instruction: String,
    pub field_input: String,
    pub field_output: String,
    pub runtime: String,
    pub train_on_inputs: bool,
    pub bad_records: String,
    pub validation_split: f64,
    pub long_sample_policy: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub device: String,
    pub resume: String,
    /// `auto`, `true` or `false`.
    pub gradient_checkpointing: String,
    /// `base` or `float32`.
    pub merged_dtype: String,
    pub plugins: Vec<PluginSpec>,
    pub plugin_config: Map<String, Value>,
    pub kubernetes_config: Option<Map<String, Value>>,
    /// What resolution decided and why, for the user (`--dry-run`, logs).
    pub notes: Vec<String>,
}

impl ResolvedParams {
    /// Every parameter by name: the value the run uses, and where it came from. The form
    /// `--dry-run` prints and the run manifest records.
    pub fn to_json(&self) -> Map<String, Value> {
        let used = self.params_as_used();
        let mut out = Map::new();
        for d in PARAMS {
            let source = self.sources.get(d.name).cloned().unwrap_or(Source::Default);
            let mut entry = Map::new();
            entry.insert(
                "value".into(),
                used.get(d.name).cloned().unwrap_or(Value::Null),
            );
            entry.insert("source".into(), Value::String(source.to_string()));
            out.insert(d.name.to_owned(), Value::Object(entry));
        }
        out
    }

    /// Which 4-bit settings were given (not defaulted): a bitsandbytes checkpoint's stored
    /// settings take the place of defaults, while given values must agree with it.
    /// `(quant_type, use_double_quant, compute_dtype)`.
    pub fn bnb_4bit_explicit(&self) -> (bool, bool, bool) {
        let p = &self.params;
        (
            p.training_lora_bnb_4bit_quant_type.is_some(),
            p.training_lora_bnb_4bit_use_double_quant.is_some(),
            p.training_lora_bnb_4bit_compute_dtype.is_some(),
        )
    }

    /// The parameter set with training_hub defaults filled in, keyed by parameter name.
    pub fn params_as_used(&self) -> Map<String, Value> {
        let mut m = self.params.to_json();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        put("training_learning_rate", self.learning_rate.into());
        put("training_lr_warmup_steps", self.lr_warmup_steps.into());
        put(
            "training_checkpoint_at_epoch",
            self.checkpoint_at_epoch.into(),
        );
        put("training_num_epochs", self.num_epochs.into());
        put("training_lora_use_rslora", self.use_rslora.into());
        put("training_lora_use_dora", self.use_dora.into());
        put("training_lora_load_in_4bit", self.load_in_4bit.into());
        put("training_lora_load_in_8bit", self.load_in_8bit.into());
        put("training_lora_bnb_4bit_quant_type", self.bnb_4bit_quant_type.clone().into());
        put("training_lora_bnb_4bit_use_double_quant", self.bnb_4bit_use_double_quant.into());
        put("training_lora_bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype.clone().into());
        put("training_lora_sample_packing", self.sample_packing.into());
        put("training_seed", self.seed.into());
        put("training_use_liger", self.use_liger.into());
        put("training_lr_scheduler", self.lr_scheduler.clone().into());
        put("training_micro_batch_size", self.micro_batch_size.into());
        put(
            "training_gradient_accumulation_steps",
            self.gradient_accumulation_steps.into(),
        );
        put("training_flash_attention", self.flash_attention.into());
        put("training_bf16", self.bf16.into());
        put("training_tf32", self.tf32.into());
        put("training_save_steps", self.save_steps.into());
        put("training_eval_steps", self.eval_steps.into());
        put("training_logging_steps", self.logging_steps.into());
        put("training_save_total_limit", self.save_total_limit.into());
        put("training_dataset_type", self.dataset_type.clone().into());
        put(
            "training_field_messages",
            self.field_messages.clone().into(),
        );
        put(
            "training_field_instruction",
            self.field_instruction.clone().into(),
        );
        put("training_field_input", self.field_input.clone().into());
        put("training_field_output", self.field_output.clone().into());
        m
    }
}

/// Collects problems while checking one parameter set.
struct Checker<'a> {
    p: &'a Params,
    sources: &'a BTreeMap<&'static str, Source>,
    errors: Vec<ParamError>,
}

impl Checker<'_> {
    fn err(&mut self, param: &str, message: impl Into<String>) {
        let value = match self.p.get(param) {
            Some(Value::String(s)) => format!("{s:?}"),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let source = self.sources.get(param).cloned().unwrap_or(Source::Default);
        self.errors.push(ParamError {
            param: param.to_owned(),
            value,
            source,
            message: message.into(),
        });
    }

    /// A size that must be >= 1.
    fn positive(&mut self, param: &str, v: i64) -> u64 {
        if v < 1 {
            self.err(param, "must be an integer >= 1");
            1
        } else {
            v as u64
        }
    }

    fn positive_opt(&mut self, param: &str, v: Option<i64>, default: u64) -> u64 {
        v.map_or(default, |v| self.positive(param, v))
    }

    fn one_of(&mut self, param: &str, v: &str, allowed: &[&str]) -> String {
        if !allowed.contains(&v) {
            self.err(param, format!("must be one of: {}", allowed.join(", ")));
        }
        v.to_owned()
    }

    fn kv(&mut self, param: &str, v: &str) -> Vec<(String, String)> {
        parse_kv_list(v).unwrap_or_else(|e| {
            self.err(param, e);
            Vec::new()
        })
    }
}

/// Validates `params` and resolves training_hub's defaults, for the processes this one was
/// started with ([`launched_world_size`]: 1 unless `mpirun` started several).
pub fn resolve(
    params: Params,
    sources: BTreeMap<&'static str, Source>,
) -> Result<ResolvedParams, ParamErrors> {
    resolve_for_world(params, sources, launched_world_size().unwrap_or(1) as u64)
}

/// The number of processes `mpirun` started this one with (Open MPI's `OMPI_COMM_WORLD_SIZE`,
/// or PMIx's / PMI's), None when no launcher started it. What the run's data-parallel world will
/// be, known before any parameter is resolved.
pub fn launched_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// `PET_NNODES` of a Kubeflow Trainer torch runtime: the pods of the TrainJob this process is a
/// worker of. None outside a TrainJob (or when it is not a number: the worker refuses it then).
fn trainjob_nodes() -> Option<i64> {
    std::env::var("PET_NNODES").ok()?.trim().parse().ok()
}

/// As [`resolve`], for a run whose `world_size` data-parallel processes are already running (under
/// `mpirun`): `training_resource_num_procs_per_worker` must be `auto` or that count, and the
/// reference's micro-batch arithmetic divides by it.
pub fn resolve_for_world(
    params: Params,
    sources: BTreeMap<&'static str, Source>,
    world_size: u64,
) -> Result<ResolvedParams, ParamErrors> {
    resolve_in(params, sources, world_size, false)
}

/// As [`resolve`], in `lora kfp` launching a TrainJob of `training_resource_num_workers` pods
/// (its workers resolve the parameters again, under their `PET_NNODES`): more than one worker is
/// what it is for, so that count is not refused here.
pub fn resolve_for_trainjob_launcher(
    params: Params,
    sources: BTreeMap<&'static str, Source>,
) -> Result<ResolvedParams, ParamErrors> {
    resolve_in(params, sources, 1, true)
}

fn resolve_in(
    params: Params,
    mut sources: BTreeMap<&'static str, Source>,
    world_size: u64,
    trainjob_launcher: bool,
) -> Result<ResolvedParams, ParamErrors> {
    let mut notes = Vec::new();
    let mut c = Checker {
        p: &params,
        sources: &sources,
        errors: Vec::new(),
    };
    let p = &params;

    for u in UNAVAILABLE {
        // The processes exist: whether their count is the one asked for is checked below.
        let launched = world_size > 1 && u.param == "training_resource_num_procs_per_worker";
        // A worker of a TrainJob of that many pods (its torch runtime's PET_NNODES).
        let trainjob_worker = u.param == "training_resource_num_workers"
            && (trainjob_launcher || trainjob_nodes() == Some(p.training_resource_num_workers));
        if (u.requested)(p) && !launched && !trainjob_worker {
            c.err(
                u.param,
                format!("not available in this build: {}", u.reason),
            );
        }
    }

    if p.training_base_model.trim().is_empty() {
        c.err(
            "training_base_model",
            "must name a Hugging Face model id or a local model folder",
        );
    }
    let effective_batch_size = c.positive(
        "training_effective_batch_size",
        p.training_effective_batch_size,
    );
    let max_tokens_per_gpu =
        c.positive("training_max_tokens_per_gpu", p.training_max_tokens_per_gpu);
    let max_seq_len = c.positive("training_max_seq_len", p.training_max_seq_len);
    if p.training_max_tokens_per_gpu >= 1
        && p.training_max_seq_len >= 1
        && max_tokens_per_gpu < max_seq_len
    {
        c.err(
            "training_max_tokens_per_gpu",
            format!("must be >= training_max_seq_len ({max_seq_len}): one full-length sample must fit in a micro-batch"),
        );
    }
    let learning_rate = match p.training_learning_rate {
        Some(lr) if !(lr > 0.0 && lr.is_finite()) => {
            c.err("training_learning_rate", "must be a finite number > 0");
            2e-4
        }
        Some(lr) => lr,
        None => 2e-4,
    };
    let lr_warmup_steps = match p.training_lr_warmup_steps {
        Some(w) if w < 0 => {
            c.err("training_lr_warmup_steps", "must be an integer >= 0");
            0
        }
        Some(w) => w as u64,
        None => 10,
    };
    let num_epochs = c.positive_opt("training_num_epochs", p.training_num_epochs, 3);
    let max_steps = p
        .training_max_steps
        .map(|v| c.positive("training_max_steps", v));
    let lr_scheduler = match &p.training_lr_scheduler {
        Some(s) => c.one_of("training_lr_scheduler", s, &SCHEDULERS),
        None => "linear".to_owned(),
    };
    let lr_scheduler_kwargs =
        parse_json_object(&p.training_lr_scheduler_kwargs).unwrap_or_else(|e| {
            c.err("training_lr_scheduler_kwargs", e);
            Map::new()
        });
    if p.training_data_output_dir
        .as_deref()
        .is_some_and(|d| d.trim().is_empty())
    {
        c.err(
            "training_data_output_dir",
            "must be a directory path when set (leave it unset for the default)",
        );
    }

    if p.training_tensorboard_log_dir
        .as_deref()
        .is_some_and(|d| d.trim().is_empty())
    {
        c.err(
            "training_tensorboard_log_dir",
            "must be a directory path when set (leave it unset for no TensorBoard events)",
        );
    }
    for (name, v) in [
        ("training_wandb_project", &p.training_wandb_project),
        ("training_wandb_entity", &p.training_wandb_entity),
    ] {
        if let Some(v) = v
            && let Err(e) = check_wandb_name(v)
        {
            c.err(name, e);
        }
    }
    if p.training_wandb_run_name
        .as_deref()
        .is_some_and(|n| n.trim().is_empty())
    {
        c.err(
            "training_wandb_run_name",
            "must be a non-empty name when set (leave it unset to let W&B pick one)",
        );
    }

    let envs = c.kv("training_envs", &p.training_envs);
    for (k, _) in &envs {
        if let Err(e) = check_env_name(k) {
            c.err("training_envs", e);
        }
    }
    let resource_cpu_per_worker =
        parse_cpu(&p.training_resource_cpu_per_worker).unwrap_or_else(|e| {
            c.err("training_resource_cpu_per_worker", e);
            0.0
        });
    let resource_memory_per_worker_bytes = parse_memory(&p.training_resource_memory_per_worker)
        .unwrap_or_else(|e| {
            c.err("training_resource_memory_per_worker", e);
            0.0
        });
    let resource_gpu_per_worker = if p.training_resource_gpu_per_worker < 0 {
        c.err(
            "training_resource_gpu_per_worker",
            "must be an integer >= 0",
        );
        0
    } else {
        p.training_resource_gpu_per_worker as u64
    };
    let resource_num_workers = c.positive(
        "training_resource_num_workers",
        p.training_resource_num_workers,
    );
    let procs = p.training_resource_num_procs_per_worker.trim();
    if procs != "auto" && !procs.parse::<i64>().is_ok_and(|n| n >= 1) {
        c.err(
            "training_resource_num_procs_per_worker",
            "must be auto or an integer >= 1",
        );
    } else if world_size > 1 && procs != "auto" && procs.parse::<u64>() != Ok(world_size) {
        c.err(
            "training_resource_num_procs_per_worker",
            format!("this run was started as {world_size} processes (mpirun -np {world_size}): set it to {world_size} or auto"),
        );
    }
    if resource_gpu_per_worker > 1 {
        notes.push(format!(
            "training_resource_gpu_per_worker = {resource_gpu_per_worker}: each lora process trains on one GPU; the pod's other GPUs stay idle unless `mpirun` starts one process per GPU (the `mpi` cargo feature)"
        ));
    }
    let metadata_labels = c.kv("training_metadata_labels", &p.training_metadata_labels);
    for (k, v) in &metadata_labels {
        if let Err(e) = check_k8s_key(k).and_then(|()| check_k8s_label_value(v)) {
            c.err("training_metadata_labels", e);
        }
    }
    let metadata_annotations = c.kv(
        "training_metadata_annotations",
        &p.training_metadata_annotations,
    );
    for (k, _) in &metadata_annotations {
        if let Err(e) = check_k8s_key(k) {
            c.err("training_metadata_annotations", e);
        }
    }

    let lora_r = c.positive("training_lora_r", p.training_lora_r);
    let lora_alpha = c.positive("training_lora_alpha", p.training_lora_alpha);
    if !(0.0..1.0).contains(&p.training_lora_dropout) {
        c.err("training_lora_dropout", "must be in [0, 1)");
    }
    let lora_target_modules: Vec<String> = p
        .training_lora_target_modules
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    for m in &lora_target_modules {
        if !m
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'))
        {
            c.err(
                "training_lora_target_modules",
                format!("{m:?} is not a module name (e.g. q_proj,v_proj or all-linear)"),
            );
        }
    }
    let load_in_4bit = yes(p.training_lora_load_in_4bit);
    let load_in_8bit = yes(p.training_lora_load_in_8bit);
    if load_in_4bit && load_in_8bit {
        c.err(
            "training_lora_load_in_4bit",
            "cannot be combined with training_lora_load_in_8bit=true: choose one",
        );
    }
    // The bnb_4bit_* settings apply to 4-bit only: set without it, they would be ignored.
    let without_4bit = if load_in_8bit {
        "applies to 4-bit quantization only (training_lora_load_in_4bit=true); 8-bit has no such setting: leave it unset"
    } else {
        "applies only with training_lora_load_in_4bit=true: set that, or leave this unset"
    };
    for (name, set) in [
        ("training_lora_bnb_4bit_quant_type", p.training_lora_bnb_4bit_quant_type.is_some()),
        ("training_lora_bnb_4bit_use_double_quant", p.training_lora_bnb_4bit_use_double_quant.is_some()),
        ("training_lora_bnb_4bit_compute_dtype", p.training_lora_bnb_4bit_compute_dtype.is_some()),
    ] {
        if set && !load_in_4bit {
            c.err(name, without_4bit);
        }
    }
    let bnb_4bit_quant_type = load_in_4bit.then(|| match &p.training_lora_bnb_4bit_quant_type {
        Some(t) => c.one_of("training_lora_bnb_4bit_quant_type", t, &BNB_4BIT_QUANT_TYPES),
        None => "nf4".to_owned(),
    });
    let bnb_4bit_compute_dtype = load_in_4bit.then(|| match &p.training_lora_bnb_4bit_compute_dtype {
        Some(d) => {
            let bare = d.strip_prefix("torch.").unwrap_or(d);
            if !BNB_4BIT_COMPUTE_DTYPES.contains(&bare) {
                c.err(
                    "training_lora_bnb_4bit_compute_dtype",
                    format!("must be one of: {} (a torch. prefix is accepted)", BNB_4BIT_COMPUTE_DTYPES.join(", ")),
                );
            }
            bare.to_owned()
        }
        None => "bfloat16".to_owned(),
    });
    let bnb_4bit_use_double_quant = load_in_4bit.then(|| p.training_lora_bnb_4bit_use_double_quant.unwrap_or(true));
    if yes(p.training_fp16) && yes(p.training_bf16) {
        c.err(
            "training_fp16",
            "cannot be combined with training_bf16=true: choose one",
        );
    }

    let micro_set = p
        .training_micro_batch_size
        .map(|v| c.positive("training_micro_batch_size", v));
    let ga_set = p
        .training_gradient_accumulation_steps
        .map(|v| c.positive("training_gradient_accumulation_steps", v));
    let (micro_batch_size, gradient_accumulation_steps) = match (micro_set, ga_set) {
        (None, ga) => {
            let ga = ga.unwrap_or(1);
            ((effective_batch_size / (ga * world_size)).max(1), ga)
        }
        (Some(m), None) => (m, (effective_batch_size / (m * world_size)).max(1)),
        (Some(m), Some(ga)) => (m, ga),
    };
    // The reference's arithmetic derives the unset one of the two; when the product still is not
    // the effective batch size, the set is contradictory and no run can honour all three.
    let product = micro_batch_size * gradient_accumulation_steps * world_size;
    let sizes_valid = p.training_effective_batch_size >= 1
        && p.training_micro_batch_size.is_none_or(|v| v >= 1)
        && p.training_gradient_accumulation_steps.is_none_or(|v| v >= 1);
    if sizes_valid && product != effective_batch_size {
        let derived = |yes: bool| if yes { " (derived)" } else { "" };
        c.err(
            if micro_set.is_some() { "training_micro_batch_size" } else { "training_gradient_accumulation_steps" },
            format!(
                "training_micro_batch_size {micro_batch_size}{} x training_gradient_accumulation_steps {gradient_accumulation_steps}{} x world size {world_size} = {product} samples per optimizer step, but training_effective_batch_size is {effective_batch_size}: give values whose product is training_effective_batch_size, or leave training_micro_batch_size and training_gradient_accumulation_steps unset",
                derived(micro_set.is_none()),
                derived(micro_set.is_some() && ga_set.is_none()),
            ),
        );
    }

    let seed = match p.training_seed {
        Some(s) if s < 0 => {
            c.err("training_seed", "must be an integer >= 0");
            DEFAULT_SEED
        }
        Some(s) => s as u64,
        None => {
            notes.push(format!("training_seed unset: using {DEFAULT_SEED}, the reference's LoRA init seed, for every random stream"));
            DEFAULT_SEED
        }
    };
    let save_steps = c.positive_opt("training_save_steps", p.training_save_steps, 500);
    let eval_steps = c.positive_opt("training_eval_steps", p.training_eval_steps, 500);
    let logging_steps = c.positive_opt("training_logging_steps", p.training_logging_steps, 1);
    let save_total_limit =
        c.positive_opt("training_save_total_limit", p.training_save_total_limit, 3);

    let dataset_type = match &p.training_dataset_type {
        Some(t) => c.one_of("training_dataset_type", t, &DATASET_TYPES),
        None => "chat_template".to_owned(),
    };
    let mut field = |name: &str, v: &Option<String>, default: &str| match v {
        Some(s) if s.trim().is_empty() => {
            c.err(name, "must be a non-empty field name when set");
            default.to_owned()
        }
        Some(s) => s.clone(),
        None => default.to_owned(),
    };
    let field_messages = field(
        "training_field_messages",
        &p.training_field_messages,
        "messages",
    );
    let field_instruction = field(
        "training_field_instruction",
        &p.training_field_instruction,
        "instruction",
    );
    let field_input = field("training_field_input", &p.training_field_input, "input");
    let field_output = field("training_field_output", &p.training_field_output, "output");
    let runtime = c.one_of("training_runtime", &p.training_runtime, &RUNTIMES);

    let bad_records = c.one_of(
        "training_bad_records",
        &p.training_bad_records,
        &BAD_RECORDS,
    );
    if !(0.0..1.0).contains(&p.training_validation_split) {
        c.err("training_validation_split", "must be in [0, 1)");
    }
    let long_sample_policy = c.one_of(
        "training_long_sample_policy",
        &p.training_long_sample_policy,
        &LONG_SAMPLE_POLICIES,
    );
    if !(p.training_weight_decay >= 0.0 && p.training_weight_decay.is_finite()) {
        c.err("training_weight_decay", "must be a finite number >= 0");
    }
    if !(p.training_max_grad_norm > 0.0 && p.training_max_grad_norm.is_finite()) {
        c.err("training_max_grad_norm", "must be a finite number > 0");
    }
    let device = c.one_of("training_device", &p.training_device, &DEVICES);
    let resume = c.one_of("training_resume", &p.training_resume, &RESUME);
    let gradient_checkpointing = c.one_of(
        "training_gradient_checkpointing",
        &p.training_gradient_checkpointing,
        &GRADIENT_CHECKPOINTING,
    );
    let merged_dtype = c.one_of("training_merged_dtype", &p.training_merged_dtype, &MERGED_DTYPES);
    let plugins = parse_plugins(&p.training_plugins).unwrap_or_else(|e| {
        c.err("training_plugins", e);
        Vec::new()
    });
    let plugin_config = parse_json_object(&p.training_plugin_config).unwrap_or_else(|e| {
        c.err("training_plugin_config", e);
        Map::new()
    });

    if !c.errors.is_empty() {
        return Err(ParamErrors(c.errors));
    }

    // Record which unset values resolution filled.
    for (name, filled) in [
        ("training_learning_rate", p.training_learning_rate.is_none()),
        (
            "training_lr_warmup_steps",
            p.training_lr_warmup_steps.is_none(),
        ),
        (
            "training_checkpoint_at_epoch",
            p.training_checkpoint_at_epoch.is_none(),
        ),
        ("training_num_epochs", p.training_num_epochs.is_none()),
        (
            "training_lora_use_rslora",
            p.training_lora_use_rslora.is_none(),
        ),
        ("training_lora_use_dora", p.training_lora_use_dora.is_none()),
        ("training_lora_load_in_4bit", p.training_lora_load_in_4bit.is_none()),
        ("training_lora_load_in_8bit", p.training_lora_load_in_8bit.is_none()),
        (
            "training_lora_bnb_4bit_quant_type",
            load_in_4bit && p.training_lora_bnb_4bit_quant_type.is_none(),
        ),
        (
            "training_lora_bnb_4bit_use_double_quant",
            load_in_4bit && p.training_lora_bnb_4bit_use_double_quant.is_none(),
        ),
        (
            "training_lora_bnb_4bit_compute_dtype",
            load_in_4bit && p.training_lora_bnb_4bit_compute_dtype.is_none(),
        ),
        (
            "training_lora_sample_packing",
            p.training_lora_sample_packing.is_none(),
        ),
        ("training_seed", p.training_seed.is_none()),
        ("training_use_liger", p.training_use_liger.is_none()),
        ("training_lr_scheduler", p.training_lr_scheduler.is_none()),
        (
            "training_micro_batch_size",
            p.training_micro_batch_size.is_none(),
        ),
        (
            "training_gradient_accumulation_steps",
            p.training_gradient_accumulation_steps.is_none(),
        ),
        (
            "training_flash_attention",
            p.training_flash_attention.is_none(),
        ),
        ("training_bf16", p.training_bf16.is_none()),
        ("training_tf32", p.training_tf32.is_none()),
        ("training_save_steps", p.training_save_steps.is_none()),
        ("training_eval_steps", p.training_eval_steps.is_none()),
        ("training_logging_steps", p.training_logging_steps.is_none()),
        (
            "training_save_total_limit",
            p.training_save_total_limit.is_none(),
        ),
        ("training_dataset_type", p.training_dataset_type.is_none()),
        (
            "training_field_messages",
            p.training_field_messages.is_none(),
        ),
        (
            "training_field_instruction",
            p.training_field_instruction.is_none(),
        ),
        ("training_field_input", p.training_field_input.is_none()),
        ("training_field_output", p.training_field_output.is_none()),
    ] {
        if filled {
            sources.insert(name, Source::Resolved);
        }
    }

    Ok(ResolvedParams {
        base_model: p.training_base_model.clone(),
        effective_batch_size,
        micro_batch_size,
        gradient_accumulation_steps,
        world_size,
        max_tokens_per_gpu,
        max_seq_len,
        learning_rate,
        lr_warmup_steps,
        lr_scheduler,
        lr_scheduler_kwargs,
        num_epochs,
        max_steps,
        checkpoint_at_epoch: p.training_checkpoint_at_epoch.unwrap_or(false),
        data_output_dir: p.training_data_output_dir.clone(),
        envs,
        resource_cpu_per_worker,
        resource_gpu_per_worker,
        resource_memory_per_worker_bytes,
        resource_num_workers,
        metadata_labels,
        metadata_annotations,
        lora_r,
        lora_alpha,
        lora_dropout: p.training_lora_dropout,
        lora_target_modules,
        use_rslora: p.training_lora_use_rslora.unwrap_or(false),
        use_dora: p.training_lora_use_dora.unwrap_or(false),
        load_in_4bit,
        load_in_8bit,
        bnb_4bit_quant_type,
        bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype,
        sample_packing: p.training_lora_sample_packing.unwrap_or(true),
        seed,
        use_liger: p.training_use_liger.unwrap_or(false),
        flash_attention: p.training_flash_attention.unwrap_or(true),
        bf16: p.training_bf16.unwrap_or(true),
        tf32: p.training_tf32.unwrap_or(false),
        save_steps,
        eval_steps,
        logging_steps,
        save_total_limit,
        dataset_type,
        field_messages,
        field_instruction,
        field_input,
        field_output,
        runtime,
        train_on_inputs: p.training_train_on_inputs,
        bad_records,
        validation_split: p.training_validation_split,
        long_sample_policy,
        weight_decay: p.training_weight_decay,
        max_grad_norm: p.training_max_grad_norm,
        device,
        resume,
        gradient_checkpointing,
        merged_dtype,
        plugins,
        plugin_config,
        kubernetes_config: p.kubernetes_config.clone(),
        notes,
        params,
        sources,
    })
}

fn yes(b: Option<bool>) -> bool {
    b == Some(true)
}

/// A W&B project or entity name as W&B accepts it: 1 to 128 characters, none of `/ \ # ? % :`.
fn check_wandb_name(v: &str) -> Result<(), String> {
    if v.trim().is_empty() {
        return Err("must be a non-empty name when set".into());
    }
    if v.chars().count() > 128 {
        return Err("must be at most 128 characters (a W&B limit)".into());
    }
    match v.chars().find(|ch| "/\\#?%:".contains(*ch) || ch.is_control()) {
        Some(ch) => Err(format!("must not contain {ch:?} (W&B names cannot hold / \\ # ? % :)")),
        None => Ok(()),
    }
}
