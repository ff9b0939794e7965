//! THE parameter definition: one table from which the typed [`Params`] struct, the CLI flags,
//! environment names, params-file keys, the JSON Schema and the KFP component inputs all come.
//! Adding a parameter is one line here (plus its validation, if it has rules).

use serde_json::{Map, Value};

use crate::value::{Kind, ParamValue};

/// Where a parameter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A parameter of the reference Python component, same name, type and default.
    Reference,
    /// One of our additions (documented as such in help text and README).
    Addition,
}

/// One parameter's definition.
#[derive(Debug, Clone, Copy)]
pub struct ParamDef {
    /// snake_case name, exactly as the reference component spells it.
    pub name: &'static str,
    pub kind: Kind,
    /// `Optional[...]` in the reference: unset (`None`) is a distinct value.
    pub optional: bool,
    pub origin: Origin,
    pub help: &'static str,
}

impl ParamDef {
    /// `--training-lora-r`
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }
    /// `LORA_TRAINING_LORA_R`
    pub fn env_var(&self) -> String {
        format!("LORA_{}", self.name.to_ascii_uppercase())
    }
    /// The default as JSON (`null` for unset optional values).
    pub fn default_json(&self) -> Value {
        Params::default().get(self.name).unwrap_or(Value::Null)
    }
    /// The default as shown in help text and docs.
    pub fn default_display(&self) -> String {
        match self.default_json() {
            Value::Null => "None".to_owned(),
            Value::String(s) if s.is_empty() => "\"\"".to_owned(),
            Value::String(s) => s,
            v => v.to_string(),
        }
    }
}

/// Looks a parameter up by its snake_case name.
pub fn param_def(name: &str) -> Option<&'static ParamDef> {
    PARAMS.iter().find(|d| d.name == name)
}

macro_rules! define_params {
    ($( $name:ident : $ty:ty = $default:expr, $origin:ident, $help:literal; )*) => {
        /// Every parameter, as given (before training_hub defaults are resolved).
        #[derive(Debug, Clone, PartialEq)]
        pub struct Params {
            $( #[doc = $help] pub $name: $ty, )*
        }

        impl Default for Params {
            fn default() -> Self {
                Params { $( $name: $default, )* }
            }
        }

        /// Every parameter's definition, in the reference component's order, additions last.
        pub static PARAMS: &[ParamDef] = &[
            $( ParamDef {
                name: stringify!($name),
                kind: <$ty as ParamValue>::KIND,
                optional: <$ty as ParamValue>::OPTIONAL,
                origin: Origin::$origin,
                help: $help,
            }, )*
        ];

        impl Params {
            /// The value of parameter `name` as JSON; `None` for an unknown name.
            pub fn get(&self, name: &str) -> Option<Value> {
                match name {
                    $( stringify!($name) => Some(ParamValue::to_json(&self.$name)), )*
                    _ => None,
                }
            }

            /// Sets parameter `name` from JSON. `Err` is the type problem; unknown names are
            /// the caller's to check first (see [`param_def`]).
            pub fn set_json(&mut self, name: &str, v: &Value) -> Result<(), String> {
                match name {
                    $( stringify!($name) => { self.$name = <$ty as ParamValue>::from_json(v)?; Ok(()) } )*
                    _ => Err(format!("unknown parameter `{name}`")),
                }
            }

            /// Sets parameter `name` from command-line or environment text.
            pub fn set_text(&mut self, name: &str, s: &str) -> Result<(), String> {
                match name {
                    $( stringify!($name) => { self.$name = <$ty as ParamValue>::from_text(s)?; Ok(()) } )*
                    _ => Err(format!("unknown parameter `{name}`")),
                }
            }

            /// All parameters as a JSON object keyed by name, in definition order.
            pub fn to_json(&self) -> Map<String, Value> {
                let mut m = Map::new();
                $( m.insert(stringify!($name).to_owned(), ParamValue::to_json(&self.$name)); )*
                m
            }
        }
    };
}

define_params! {
    // ---- the reference component's signature (seed README), in its order ----
    training_base_model: String = "Qwen/Qwen2.5-1.5B-Instruct".into(), Reference,
        "Base model (HuggingFace ID or local path).";
    training_effective_batch_size: i64 = 128, Reference,
        "Effective batch size per optimizer step (samples).";
    training_max_tokens_per_gpu: i64 = 32000, Reference,
        "Max tokens per GPU (memory cap): micro-batches are packed up to this many tokens.";
    training_max_seq_len: i64 = 8192, Reference,
        "Max sequence length in tokens: at most the model's max_position_embeddings (x the factor of a linear or dynamic RoPE scaling).";
    training_learning_rate: Option<f64> = None, Reference,
        "Learning rate (resolved: 2e-4).";
    training_lr_warmup_steps: Option<i64> = None, Reference,
        "Learning rate warmup steps (resolved: 10).";
    training_checkpoint_at_epoch: Option<bool> = None, Reference,
        "Save a checkpoint at the end of each epoch (resolved: false).";
    training_num_epochs: Option<i64> = None, Reference,
        "Number of training epochs (resolved: 3).";
    training_data_output_dir: Option<String> = None, Reference,
        "Directory for processed training data (resolved: <pvc_path>/checkpoints/_internal_data_processing).";
    training_envs: String = String::new(), Reference,
        "Environment overrides as KEY=VAL,KEY=VAL, applied to this process before anything reads them (HF_HOME, ...).";
    training_resource_cpu_per_worker: String = "4".into(), Reference,
        "CPU cores per worker (k8s quantity: 4, 500m). Validated and recorded in the run manifest (it sizes the pod KFP runs us in).";
    training_resource_gpu_per_worker: i64 = 1, Reference,
        "GPUs per worker. Validated and recorded; one process uses one GPU.";
    training_resource_memory_per_worker: String = "32Gi".into(), Reference,
        "Memory per worker (k8s quantity, e.g. 32Gi). Validated and recorded in the run manifest.";
    training_resource_num_procs_per_worker: String = "auto".into(), Reference,
        "Processes per worker (auto or int), data parallel. More than 1 needs a lora built with the `mpi` cargo feature: `lora train` starts them under `mpirun -np N`, or N processes started by mpirun join; other builds refuse it. auto: the number mpirun started; else, training on CUDA, one per visible GPU (started under mpirun by an `mpi` build; other builds train on one GPU and say so); else 1.";
    training_resource_num_workers: i64 = 1, Reference,
        "Number of training pods. More than 1: `lora kfp` launches a Kubeflow Trainer TrainJob of that many `lora train` workers (torch-distributed runtime, one GPU process each); `lora train` accepts it only as a worker of a TrainJob of that many pods (PET_NNODES).";
    training_metadata_labels: String = String::new(), Reference,
        "Pod labels as key=value,key=value (k8s label syntax). Validated and recorded in the run manifest.";
    training_metadata_annotations: String = String::new(), Reference,
        "Pod annotations as key=value,key=value. Validated and recorded in the run manifest.";
    training_lora_r: i64 = 16, Reference,
        "LoRA rank (controls model capacity).";
    training_lora_alpha: i64 = 32, Reference,
        "LoRA scaling factor (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).";
    training_lora_dropout: f64 = 0.0, Reference,
        "Dropout rate for LoRA layers, in [0, 1).";
    training_lora_target_modules: String = String::new(), Reference,
        "Comma-separated list of modules to apply LoRA (empty = auto-detect: all linear layers of the decoder; or all-linear).";
    training_lora_use_rslora: Option<bool> = None, Reference,
        "Use Rank-Stabilized LoRA (resolved: false).";
    training_lora_use_dora: Option<bool> = None, Reference,
        "Use Weight-Decomposed LoRA, DoRA (resolved: false).";
    training_lora_load_in_4bit: Option<bool> = None, Reference,
        "4-bit quantization (QLoRA): every decoder projection held as bitsandbytes NF4/FP4 (quantized at load, or a bitsandbytes checkpoint read as stored); embeddings, norms and the head stay 16-bit (resolved: false).";
    training_lora_load_in_8bit: Option<bool> = None, Reference,
        "8-bit quantization: projections held as bitsandbytes int8 + row absmax, weight-only (activations are not quantized, unlike bitsandbytes' LLM.int8) (resolved: false).";
    training_lora_bnb_4bit_quant_type: Option<String> = None, Reference,
        "4-bit code book: nf4 or fp4 (resolved with 4-bit: nf4, or what a bitsandbytes checkpoint stores). Only with training_lora_load_in_4bit=true.";
    training_lora_bnb_4bit_compute_dtype: Option<String> = None, Reference,
        "Dtype dequantized 4-bit weights are rounded to for the matrix products: bfloat16, float16 or float32 (torch. prefix accepted; resolved: bfloat16). The CPU backend computes in fp32 with the rounded weights. Only with training_lora_load_in_4bit=true.";
    training_lora_bnb_4bit_use_double_quant: Option<bool> = None, Reference,
        "4-bit double quantization: the block absmax values themselves stored 8-bit, about 0.516 instead of 0.5625 bytes per weight (resolved with 4-bit: true). Only with training_lora_load_in_4bit=true.";
    training_lora_sample_packing: Option<bool> = None, Reference,
        "Pack several samples into each row, best-fit decreasing (resolved: true).";
    training_seed: Option<i64> = None, Reference,
        "Random seed for adapter init, dropout and shuffling (resolved: 3407, the reference's LoRA init seed).";
    training_use_liger: Option<bool> = None, Reference,
        "Liger kernels. Accepted and recorded: our kernels are always fused, true and false train the same.";
    training_lr_scheduler: Option<String> = None, Reference,
        "LR scheduler: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay (resolved: linear).";
    kubernetes_config: Option<Map<String, Value>> = None, Reference,
        "KFP TaskConfig (volumes/env/resources passthrough) as a JSON object. Recorded in the run manifest.";
    // ---- further parameters of the reference's Python signature (issue 2) ----
    training_micro_batch_size: Option<i64> = None, Reference,
        "Samples per micro-batch (resolved: effective_batch_size // (gradient_accumulation_steps * world_size), at least 1); micro_batch_size * gradient_accumulation_steps * world_size must equal effective_batch_size.";
    training_gradient_accumulation_steps: Option<i64> = None, Reference,
        "Micro-batches per optimizer step (resolved: effective_batch_size // (micro_batch_size * world_size) when micro_batch_size is set, else 1); see training_micro_batch_size.";
    training_flash_attention: Option<bool> = None, Reference,
        "Flash attention. Accepted and recorded: our attention is always memory-efficient (resolved: true).";
    training_bf16: Option<bool> = None, Reference,
        "bf16 training on GPU (resolved: true; the CPU backend always computes in fp32).";
    training_fp16: Option<bool> = None, Reference,
        "fp16 training. NOT BUILT: true is refused (we train bf16 on GPU, fp32 on CPU).";
    training_tf32: Option<bool> = None, Reference,
        "TF32 matmuls on GPU (resolved: false). Recorded; the CPU backend ignores matmul precision.";
    training_save_steps: Option<i64> = None, Reference,
        "Save a checkpoint every N optimizer steps (resolved: 500).";
    training_eval_steps: Option<i64> = None, Reference,
        "Evaluate every N optimizer steps when there is an eval split (resolved: 500).";
    training_logging_steps: Option<i64> = None, Reference,
        "Log metrics every N optimizer steps (resolved: 1).";
    training_save_total_limit: Option<i64> = None, Reference,
        "Keep at most N step checkpoints (resolved: 3).";
    training_wandb_project: Option<String> = None, Reference,
        "Weights & Biases project: the run is written as a W&B offline run under WANDB_DIR (default <pvc_path>) for `wandb sync`.";
    training_wandb_entity: Option<String> = None, Reference,
        "Weights & Biases entity (team or user) of the W&B run (default: WANDB_ENTITY, else the API key's default at sync).";
    training_wandb_run_name: Option<String> = None, Reference,
        "Weights & Biases run display name (default: WANDB_NAME, else W&B picks one at sync).";
    training_tensorboard_log_dir: Option<String> = None, Reference,
        "TensorBoard log directory: event files (scalars, HParams) go to <dir>/<start time>_<run id>/.";
    training_dataset_type: Option<String> = None, Reference,
        "Dataset format: chat_template (a messages list), alpaca (instruction, input, output), passthrough (plain text), prompt_completion (prompt, completion) or tokenized (input_ids, optional labels) (resolved: chat_template).";
    training_field_messages: Option<String> = None, Reference,
        "Field holding the messages for chat_template (resolved: messages).";
    training_field_instruction: Option<String> = None, Reference,
        "Field holding the instruction for alpaca (resolved: instruction).";
    training_field_input: Option<String> = None, Reference,
        "Field holding the input for alpaca (resolved: input).";
    training_field_output: Option<String> = None, Reference,
        "Field holding the output for alpaca (resolved: output).";
    training_enable_model_splitting: Option<bool> = None, Reference,
        "Split the model across GPUs. NOT BUILT: true is refused.";
    training_runtime: String = "training-hub".into(), Reference,
        "Training runtime: training-hub (the reference's name, accepted) or lora (this binary); both run this binary's trainer.";
    // ---- our additions ----
    training_train_on_inputs: bool = false, Addition,
        "ADDITION. false: loss on assistant turns / completions only; true: loss on every token (the reference's behaviour).";
    training_bad_records: String = "error".into(), Addition,
        "ADDITION. A malformed dataset record: error (fail naming it) or skip (count and report it).";
    training_validation_split: f64 = 0.0, Addition,
        "ADDITION. Held-out fraction in [0, 1) for eval; a dataset folder's own validation/test split wins.";
    training_long_sample_policy: String = "drop".into(), Addition,
        "ADDITION. Samples longer than max_seq_len: drop (counted and reported), truncate, or error.";
    training_max_steps: Option<i64> = None, Addition,
        "ADDITION. Stop after N optimizer steps (smoke tests).";
    training_weight_decay: f64 = 0.01, Addition,
        "ADDITION. AdamW weight decay (training_hub's value).";
    training_max_grad_norm: f64 = 0.3, Addition,
        "ADDITION. Gradient clipping norm (training_hub's value).";
    training_device: String = "auto".into(), Addition,
        "ADDITION. auto (CUDA when present, else CPU), cpu or cuda.";
    training_resume: String = "auto".into(), Addition,
        "ADDITION. auto: resume from the newest complete checkpoint with the same run manifest; never: start fresh.";
    training_gradient_checkpointing: String = "auto".into(), Addition,
        "ADDITION. Recompute each layer's activations in backward: auto (when the largest micro-batch's activations would not fit the free memory), true or false. Results are identical either way.";
    training_plugins: String = String::new(), Addition,
        "ADDITION. WASM plugins as kind=path,...: preprocessor=a.wasm,scheduler=b.wasm,reporter=c.wasm (several reporters allowed).";
    training_plugin_config: String = String::new(), Addition,
        "ADDITION. JSON object keyed by plugin kind or file stem: each plugin's settings and grants.";
    training_merged_dtype: String = "base".into(), Addition,
        "ADDITION. dtype of the merged model's weights: base (the base model's dtype) or float32 (keeps all of a small adapter's update, at twice the size of 16-bit weights). The adapter is float32 either way.";
    training_lr_scheduler_kwargs: String = String::new(), Addition,
        "ADDITION. JSON object of scheduler settings, e.g. {\"num_cycles\":2} (cosine_with_restarts), {\"power\":2} (polynomial); checked with the parameters unless a scheduler plugin takes them.";
}
