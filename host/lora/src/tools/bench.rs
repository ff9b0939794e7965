//! `lora bench`: training throughput of the engine on a random-weight model of a preset or
//! explicit shape (no files needed): forward + backward + AdamW steps on a packed batch; prints
//! tokens/s, peak memory and, on a GPU in the peak table, model FLOP utilisation.
//! `tests/gpu/run.sh` and `tests/bench/*.py` put the same shape and batch through PyTorch + PEFT.

use std::sync::Arc;

use clap::{Arg, ArgAction, ArgMatches, Command};
use lora_engine::bench::{BenchOptions, BenchResult, PRESETS, bench_batch, preset, reset_peak_rss};
use lora_engine::quant::bnb::parse_torch_dtype;
use lora_engine::{Arch, Backend, Device, ModelConfig, QuantConfig, QuantType};

use super::{DEVICE_HELP, ToolError, device_hint, parse_device};

const HINT: &str = "hint: `lora bench --help` lists the shapes and flags";

/// Explicit size flags: (flag, what it sets).
const SIZES: [(&str, &str); 6] = [
    ("layers", "num_hidden_layers"),
    ("hidden", "hidden_size"),
    ("intermediate", "intermediate_size"),
    ("heads", "num_attention_heads"),
    ("kv-heads", "num_key_value_heads"),
    ("vocab", "vocab_size"),
];

fn count(name: &'static str, value_name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .value_name(value_name)
        .value_parser(clap::value_parser!(u64).range(1..))
        .help(help)
}

pub(super) fn command() -> Command {
    let mut cmd = Command::new("bench")
        .about("Training throughput on a random-weight model (no files needed): tokens/s, peak memory, and MFU on a GPU")
        .arg(Arg::new("device").long("device").value_name("DEVICE").default_value("cpu").help(DEVICE_HELP))
        .arg(
            Arg::new("shape")
                .long("shape")
                .value_name("SHAPE")
                .value_parser(clap::builder::PossibleValuesParser::new(PRESETS))
                .help("A preset model shape with its real sizes; the size flags below change single sizes of it, or give a whole shape without it"),
        )
        .arg(
            Arg::new("arch")
                .long("arch")
                .value_name("ARCH")
                .value_parser(["llama", "qwen2"])
                .help("Architecture of an explicit shape (qwen2 adds q/k/v bias) [default: llama, or the preset's]"),
        )
        .arg(Arg::new("untied").long("untied").action(ArgAction::SetTrue).help("Untied output head (presets and explicit shapes are tied otherwise)"));
    for (flag, field) in SIZES {
        cmd = cmd
            .arg(count(flag, "N", field).help_heading("Explicit shape (all six without --shape)"));
    }
    cmd.arg(count("rows", "N", "Rows of the packed batch [default: 4]").help_heading("Batch and steps"))
        .arg(count("seq_len", "L", "Tokens per row [default: 512]").long("seq-len").alias("seq").help_heading("Batch and steps"))
        .arg(count("docs_per_row", "N", "Documents packed into each row (attention restarts at each) [default: 1]").long("docs-per-row").help_heading("Batch and steps"))
        .arg(count("steps", "S", "Timed optimizer steps [default: 3]").help_heading("Batch and steps"))
        .arg(
            Arg::new("warmup")
                .long("warmup")
                .value_name("S")
                .value_parser(clap::value_parser!(u64))
                .help("Untimed steps before the timed ones [default: 1]")
                .help_heading("Batch and steps"),
        )
        .arg(Arg::new("recompute").long("recompute").action(ArgAction::SetTrue).help("Recompute each layer's activations in backward instead of keeping them").help_heading("Batch and steps"))
        .arg(count("threads", "N", "CPU threads (rayon's pool; RAYON_NUM_THREADS otherwise) [default: all cores]").help_heading("Batch and steps"))
        .arg(count("lora_r", "R", "LoRA rank [default: 16]").long("lora-r").alias("r").help_heading("Adapter"))
        .arg(
            Arg::new("lora_alpha")
                .long("lora-alpha")
                .value_name("ALPHA")
                .value_parser(clap::value_parser!(f64))
                .help("LoRA alpha [default: 2 x rank]")
                .help_heading("Adapter"),
        )
        .arg(
            Arg::new("lora_dropout")
                .long("lora-dropout")
                .value_name("P")
                .value_parser(clap::value_parser!(f64))
                .help("Dropout on the adapter input, 0 <= P < 1 [default: 0]")
                .help_heading("Adapter"),
        )
        .arg(
            Arg::new("target_modules")
                .long("target-modules")
                .value_name("NAMES")
                .help("Comma-separated projections (q_proj,...,down_proj) or all-linear [default: all seven]")
                .help_heading("Adapter"),
        )
        .arg(Arg::new("rslora").long("rslora").action(ArgAction::SetTrue).help("rsLoRA scaling alpha/sqrt(r)").help_heading("Adapter"))
        .arg(Arg::new("dora").long("dora").action(ArgAction::SetTrue).help("DoRA (magnitude vector)").help_heading("Adapter"))
        .arg(
            Arg::new("load_in_4bit")
                .long("load-in-4bit")
                .action(ArgAction::SetTrue)
                .help("Hold the projections 4-bit (bitsandbytes NF4/FP4), and run the 16-bit model too to compare memory side by side")
                .help_heading("Quantization (training_lora_load_in_4bit / _8bit / _bnb_4bit_*)"),
        )
        .arg(
            Arg::new("load_in_8bit")
                .long("load-in-8bit")
                .action(ArgAction::SetTrue)
                .help("Hold the projections int8 (weight-only), and run the 16-bit model too")
                .help_heading("Quantization (training_lora_load_in_4bit / _8bit / _bnb_4bit_*)"),
        )
        .arg(
            Arg::new("bnb_4bit_quant_type")
                .long("bnb-4bit-quant-type")
                .value_name("TYPE")
                .value_parser(["nf4", "fp4"])
                .help("4-bit code book [default: nf4]")
                .help_heading("Quantization (training_lora_load_in_4bit / _8bit / _bnb_4bit_*)"),
        )
        .arg(
            Arg::new("bnb_4bit_use_double_quant")
                .long("bnb-4bit-use-double-quant")
                .value_name("BOOL")
                .value_parser(clap::value_parser!(bool))
                .help("Store the block absmax values 8-bit too [default: true]")
                .help_heading("Quantization (training_lora_load_in_4bit / _8bit / _bnb_4bit_*)"),
        )
        .arg(
            Arg::new("bnb_4bit_compute_dtype")
                .long("bnb-4bit-compute-dtype")
                .value_name("DTYPE")
                .help("Dtype the dequantized weights are rounded to: bfloat16, float16, float32 (torch. prefix accepted) [default: bfloat16]")
                .help_heading("Quantization (training_lora_load_in_4bit / _8bit / _bnb_4bit_*)"),
        )
        .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Print one JSON object instead of the text report"))
        .arg(Arg::new("step_json").long("step-json").action(ArgAction::SetTrue).help("Print one JSON line per step as it finishes (step, warmup, seconds, loss, step_tokens_per_sec), flushed, so a killed run keeps what it measured"))
        .arg(Arg::new("per_op").long("per-op").action(ArgAction::SetTrue).help("Time every device call of the timed steps by op (CUDA events on a GPU, host time on the emulator; cuda and emu only) and print the table"))
}

/// The quantization the flags ask for; a 4-bit setting without `--load-in-4bit` is an error
/// naming it, as the run's parameters are.
fn quant_options(m: &ArgMatches) -> Result<Option<QuantConfig>, ToolError> {
    let (four, eight) = (m.get_flag("load_in_4bit"), m.get_flag("load_in_8bit"));
    let bad = |msg: String| ToolError::input(anyhow::anyhow!("bench: {msg}"), HINT);
    if four && eight {
        return Err(bad("--load-in-4bit and --load-in-8bit: choose one".into()));
    }
    let quant_type = m.get_one::<String>("bnb_4bit_quant_type").and_then(|s| QuantType::parse(s));
    let double_quant = m.get_one::<bool>("bnb_4bit_use_double_quant").copied();
    let compute_dtype = match m.get_one::<String>("bnb_4bit_compute_dtype") {
        Some(s) => Some(parse_torch_dtype(s).ok_or_else(|| bad(format!("--bnb-4bit-compute-dtype {s:?} is not bfloat16, float16 or float32")))?),
        None => None,
    };
    if !four {
        for (flag, set) in [
            ("--bnb-4bit-quant-type", quant_type.is_some()),
            ("--bnb-4bit-use-double-quant", double_quant.is_some()),
            ("--bnb-4bit-compute-dtype", compute_dtype.is_some()),
        ] {
            if set {
                return Err(bad(format!("{flag} applies only with --load-in-4bit")));
            }
        }
    }
    Ok(match (four, eight) {
        (true, _) => Some(QuantConfig::FourBit { quant_type, double_quant, compute_dtype }),
        (_, true) => Some(QuantConfig::EightBit),
        _ => None,
    })
}

fn num(m: &ArgMatches, name: &str) -> Option<usize> {
    m.get_one::<u64>(name).map(|&v| v as usize)
}

/// The model shape from `--shape` and the explicit size flags.
fn model_config(m: &ArgMatches) -> Result<(String, ModelConfig), ToolError> {
    let preset_name = m.get_one::<String>("shape");
    let base = match preset_name {
        Some(name) => Some(preset(name).map_err(|e| ToolError::input(e, HINT))?),
        None => None,
    };
    let given: Vec<(&str, usize)> = SIZES
        .iter()
        .filter_map(|(flag, _)| num(m, flag).map(|v| (*flag, v)))
        .collect();
    let get = |flag: &str, from_base: Option<usize>| {
        given
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|&(_, v)| v)
            .or(from_base)
    };
    let b = base.as_ref();
    let sizes: Vec<Option<usize>> = vec![
        get("layers", b.map(|c| c.num_hidden_layers)),
        get("hidden", b.map(|c| c.hidden_size)),
        get("intermediate", b.map(|c| c.intermediate_size)),
        get("heads", b.map(|c| c.num_attention_heads)),
        get("kv-heads", b.map(|c| c.num_key_value_heads)),
        get("vocab", b.map(|c| c.vocab_size)),
    ];
    let missing: Vec<String> = SIZES
        .iter()
        .zip(&sizes)
        .filter(|(_, v)| v.is_none())
        .map(|((flag, _), _)| format!("--{flag}"))
        .collect();
    if !missing.is_empty() {
        return Err(ToolError::input(
            anyhow::anyhow!(
                "bench: no model shape: give --shape ({}) or all of {} (missing: {})",
                PRESETS.join(", "),
                SIZES.map(|(f, _)| format!("--{f}")).join(" "),
                missing.join(" ")
            ),
            HINT,
        ));
    }
    let [layers, hidden, mlp, heads, kv, vocab] = [0, 1, 2, 3, 4, 5].map(|i| sizes[i].unwrap_or(1));
    if hidden % heads != 0 {
        return Err(ToolError::input(
            anyhow::anyhow!("bench: --hidden {hidden} is not a multiple of --heads {heads}"),
            HINT,
        ));
    }
    if heads % kv != 0 {
        return Err(ToolError::input(
            anyhow::anyhow!("bench: --heads {heads} is not a multiple of --kv-heads {kv}"),
            HINT,
        ));
    }
    let tied = !m.get_flag("untied");
    let arch = match m.get_one::<String>("arch").map(String::as_str) {
        Some("qwen2") => Arch::Qwen2,
        Some(_) => Arch::Llama,
        None => b.map_or(Arch::Llama, |c| c.arch),
    };
    let shaped = ModelConfig::llama_shape(layers, hidden, mlp, heads, kv, vocab, tied);
    let cfg = match base {
        // A preset keeps its own rope and position settings; only sizes, arch and ties change.
        Some(p) => ModelConfig {
            arch,
            qkv_bias: arch == Arch::Qwen2,
            tie_word_embeddings: tied,
            num_hidden_layers: shaped.num_hidden_layers,
            hidden_size: shaped.hidden_size,
            intermediate_size: shaped.intermediate_size,
            num_attention_heads: shaped.num_attention_heads,
            num_key_value_heads: shaped.num_key_value_heads,
            head_dim: shaped.head_dim,
            rotary_dim: shaped.rotary_dim,
            vocab_size: shaped.vocab_size,
            attention_scale: shaped.attention_scale,
            ..p
        },
        None => ModelConfig {
            arch,
            qkv_bias: arch == Arch::Qwen2,
            ..shaped
        },
    };
    let name = match (preset_name, given.is_empty()) {
        (Some(p), true) => p.clone(),
        (Some(p), false) => format!(
            "{p} with {}",
            given
                .iter()
                .map(|(f, v)| format!("{f} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, _) => "explicit".to_string(),
    };
    Ok((name, cfg))
}

fn options(m: &ArgMatches, cfg: ModelConfig) -> Result<BenchOptions, ToolError> {
    let mut o = BenchOptions::new(cfg);
    o.rows = num(m, "rows").unwrap_or(o.rows);
    o.row_len = num(m, "seq_len").unwrap_or(o.row_len);
    o.docs_per_row = num(m, "docs_per_row").unwrap_or(o.docs_per_row);
    o.steps = num(m, "steps").unwrap_or(o.steps);
    o.warmup = m.get_one::<u64>("warmup").map_or(o.warmup, |&v| v as usize);
    o.recompute = m.get_flag("recompute");
    o.per_op = m.get_flag("per_op");
    if o.docs_per_row > o.row_len {
        return Err(ToolError::input(
            anyhow::anyhow!(
                "bench: --docs-per-row {} is more than --seq-len {} tokens",
                o.docs_per_row,
                o.row_len
            ),
            HINT,
        ));
    }
    let doc_len = o.row_len.div_ceil(o.docs_per_row);
    if doc_len > o.cfg.max_position_embeddings {
        // Positions restart per document; longer documents than the shape's context are refused
        // rather than run with positions the model never has.
        return Err(ToolError::input(
            anyhow::anyhow!(
                "bench: documents of {doc_len} tokens exceed this shape's max_position_embeddings {}; lower --seq-len or raise --docs-per-row",
                o.cfg.max_position_embeddings
            ),
            HINT,
        ));
    }
    let a = &mut o.adapter;
    a.r = num(m, "lora_r").unwrap_or(a.r);
    a.lora_alpha = m
        .get_one::<f64>("lora_alpha")
        .copied()
        .unwrap_or(2.0 * a.r as f64);
    if let Some(&p) = m.get_one::<f64>("lora_dropout") {
        if !(0.0..1.0).contains(&p) {
            return Err(ToolError::input(
                anyhow::anyhow!("bench: --lora-dropout {p} is not in [0, 1)"),
                HINT,
            ));
        }
        a.lora_dropout = p;
    }
    if let Some(t) = m.get_one::<String>("target_modules") {
        a.target_modules = t
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        a.resolve_targets().map_err(|e| {
            ToolError::input(
                anyhow::Error::new(e).context("bench: --target-modules"),
                HINT,
            )
        })?;
    }
    a.use_rslora = m.get_flag("rslora");
    a.use_dora = m.get_flag("dora");
    o.quant = quant_options(m)?;
    if o.per_op && o.quant.is_some() {
        return Err(ToolError::input(anyhow::anyhow!("bench: --per-op times one run; it cannot be combined with --load-in-4bit/--load-in-8bit (which also run a 16-bit baseline)"), HINT));
    }
    Ok(o)
}

/// Model FLOPs of one LoRA training step, the numerator of model FLOP utilisation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ModelFlops {
    /// Frozen linears (every projection and the output head): forward 2 and input gradient 2
    /// per weight per token; frozen weights get no weight gradient.
    pub base: f64,
    /// Adapter parameters: forward 2, input and weight gradients 4 per parameter per token.
    pub adapter: f64,
    /// Causal attention scores and values: forward 4·ctx·heads·head_dim per layer per token,
    /// backward twice that; ctx counts only the earlier tokens of the same document.
    pub attention: f64,
}

impl ModelFlops {
    pub fn total(&self) -> f64 {
        self.base + self.adapter + self.attention
    }
}

/// FLOPs of one step over documents of `doc_lens` tokens with `trainable_params` adapter
/// parameters. Recomputed activations are not counted (model FLOPs, not hardware FLOPs).
pub fn model_flops_per_step(
    cfg: &ModelConfig,
    doc_lens: &[u32],
    trainable_params: usize,
) -> ModelFlops {
    let (h, hd, mlp) = (
        cfg.hidden_size as f64,
        cfg.head_dim as f64,
        cfg.intermediate_size as f64,
    );
    let (heads, kv) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
    );
    let per_layer = h * heads * hd * 2.0 + h * kv * hd * 2.0 + 3.0 * h * mlp;
    let linear = cfg.num_hidden_layers as f64 * per_layer + h * cfg.vocab_size as f64;
    let tokens: f64 = doc_lens.iter().map(|&l| l as f64).sum();
    // Sum over positions i of (i + 1) keys = L (L + 1) / 2 per document.
    let ctx: f64 = doc_lens
        .iter()
        .map(|&l| l as f64 * (l as f64 + 1.0) / 2.0)
        .sum();
    ModelFlops {
        base: 4.0 * linear * tokens,
        adapter: 6.0 * trainable_params as f64 * tokens,
        attention: 3.0 * 4.0 * cfg.num_hidden_layers as f64 * heads * hd * ctx,
    }
}

/// The backend, with the GPU's name and dense bf16 peak when it is one.
/// A GPU's name and its bf16 peak (TFLOP/s), when the bench runs on one.
type GpuInfo = Option<(String, Option<f64>)>;

fn open(device: Device) -> lora_engine::Result<(Arc<dyn Backend>, GpuInfo)> {
    match device {
        Device::Cpu => Ok((Arc::new(lora_engine::cpu::CpuBackend::new()), None)),
        Device::Cuda(i) => {
            let be = lora_engine::cuda::CudaBackend::new(i)?;
            let gpu = (be.device_name().to_string(), be.peak_bf16_tflops());
            Ok((Arc::new(be), Some(gpu)))
        }
        Device::Emu => Ok((lora_engine::cuda::open_emulated()?, None)),
    }
}

/// Bytes as GiB, or MiB below 1 GiB (scripts read either unit).
fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

pub(super) fn run(m: &ArgMatches) -> Result<(), ToolError> {
    let device = parse_device(m.get_one::<String>("device").map_or("cpu", String::as_str))?;
    let (shape, cfg) = model_config(m)?;
    let opts = options(m, cfg)?;
    if let Some(n) = num(m, "threads") {
        // SAFETY: set on the main thread before the engine starts rayon's pool (which reads it
        // once); nothing else touches the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let (backend, gpu) = open(device).map_err(|e| {
        ToolError::failed(
            anyhow::Error::new(e).context(format!("bench: cannot open {device}")),
            device_hint(device),
        )
    })?;
    let failed = |what: &str, e: lora_engine::EngineError| {
        ToolError::failed(anyhow::Error::new(e).context(format!("bench: the {what}{shape} run on {device} failed")), "")
    };
    // The quantized run first: without a peak reset, the larger 16-bit peak after it still
    // measures right.
    let step_json = m.get_flag("step_json");
    let mut on_step = |s: &lora_engine::bench::StepReport| {
        if step_json {
            use std::io::Write;
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["device"] = device.to_string().into();
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        }
    };
    let r = lora_engine::bench::run_with(&opts, backend.clone(), &mut on_step).map_err(|e| failed("", e))?;
    let baseline = match opts.quant {
        Some(_) => {
            let peak_reset = reset_peak_rss();
            let base = BenchOptions { quant: None, ..opts.clone() };
            Some((lora_engine::bench::run(&base, backend).map_err(|e| failed("16-bit ", e))?, peak_reset))
        }
        None => None,
    };
    let docs = bench_batch(1, opts.rows, opts.row_len, opts.docs_per_row).seq_lens;
    let flops = model_flops_per_step(&opts.cfg, &docs, r.trainable_params);
    let achieved_tflops = flops.total() * r.tokens_per_sec / r.tokens_per_step.max(1) as f64 / 1e12;
    let mfu = gpu
        .as_ref()
        .and_then(|(_, peak)| peak.map(|p| achieved_tflops / p));
    if m.get_flag("json") {
        // The engine's BenchResult fields at the top level (what tests/gpu/run.sh reads), then
        // what this command adds.
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        let extra = serde_json::json!({
            "shape": shape,
            "device": device.to_string(),
            "gpu": gpu.as_ref().map(|g| g.0.clone()),
            "rows": opts.rows,
            "seq_len": opts.row_len,
            "docs_per_row": opts.docs_per_row,
            "lora_r": opts.adapter.r,
            "recompute": opts.recompute,
            "model_flops_per_step": flops,
            "model_tflops_per_sec": achieved_tflops,
            "mfu": mfu,
        });
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        if let Some((b, peak_reset)) = &baseline {
            v["baseline_16bit"] = serde_json::to_value(b).unwrap_or_default();
            v["peak_reset_between_runs"] = (*peak_reset).into();
        }
        println!("{v}");
    } else {
        print!(
            "{}",
            text_report(
                &shape,
                device,
                &opts,
                &r,
                gpu.as_ref(),
                achieved_tflops,
                mfu
            )
        );
        if let Some((b, peak_reset)) = &baseline {
            print!("{}", side_by_side(&r, b, *peak_reset));
        }
        if !r.per_op.is_empty() {
            print!("{}", per_op_table(&r));
        }
    }
    Ok(())
}

/// Device time per op over the timed steps.
fn per_op_table(r: &BenchResult) -> String {
    let total: f64 = r.per_op.iter().map(|o| o.seconds).sum();
    let steps = r.step_seconds.len().max(1) as f64;
    let mut s = format!(
        "per-op device time, {} tokens, per step ({}; every call waited for):\n{:<70} {:>7} {:>11} {:>7}\n",
        r.tokens_per_step,
        if r.backend == "cuda" { "CUDA events" } else { "host time" }, "op", "calls", "ms/step", "share"
    );
    for o in &r.per_op {
        s += &format!(
            "{:<70} {:>7} {:>11.3} {:>6.1}%\n",
            o.op,
            (o.calls as f64 / steps).round(),
            o.seconds * 1e3 / steps,
            100.0 * o.seconds / total.max(1e-30)
        );
    }
    s += &format!("{:<70} {:>7} {:>11.3}\n", "total", "", total * 1e3 / steps);
    s
}

/// The quantized run next to the 16-bit one: peak memory, the projections' bytes, throughput.
fn side_by_side(q: &BenchResult, base: &BenchResult, peak_reset: bool) -> String {
    let label = q.quantization.as_ref().map_or("quantized".to_string(), |v| match v["bits"].as_u64() {
        Some(4) => format!(
            "4-bit {}{}, compute {}",
            v["quant_type"].as_str().unwrap_or("?"),
            if v["double_quant"] == true { "+dq" } else { "" },
            v["compute_dtype"].as_str().unwrap_or("?")
        ),
        _ => "8-bit".to_string(),
    });
    let per = |r: &BenchResult| r.projection_bytes as f64 / r.projection_params.max(1) as f64;
    let opt = |b: Option<u64>| b.map_or("-".to_string(), gib);
    let mut s = format!("16-bit vs {label}, side by side (the 16-bit run with the same shape, batch and steps):\n");
    s += &format!("  {:<34}{:>14}{:>14}\n", "", "16-bit", label.split(',').next().unwrap_or("quantized"));
    s += &format!("  {:<34}{:>14}{:>14}\n", "peak memory (host RSS)", opt(base.peak_rss_bytes), opt(q.peak_rss_bytes));
    if let (Some(a), Some(b)) = (base.peak_device_bytes, q.peak_device_bytes) {
        s += &format!("  {:<34}{:>14}{:>14}\n", "peak device memory", gib(a), gib(b));
    }
    s += &format!("  {:<34}{:>14}{:>14}\n", "projection weights", gib(base.projection_bytes), gib(q.projection_bytes));
    s += &format!("  {:<34}{:>14.3}{:>14.3}\n", "bytes per projection parameter", per(base), per(q));
    s += &format!("  {:<34}{:>14.1}{:>14.1}\n", "throughput (tokens/s)", base.tokens_per_sec, q.tokens_per_sec);
    s += &format!("  {:<34}{:>14.4}{:>14.4}\n", "final loss", base.final_loss, q.final_loss);
    if !peak_reset {
        s += "  (the peak could not be reset between the runs: the 16-bit peak is the larger of the two)\n";
    }
    s
}

fn text_report(
    shape: &str,
    device: Device,
    o: &BenchOptions,
    r: &BenchResult,
    gpu: Option<&(String, Option<f64>)>,
    achieved_tflops: f64,
    mfu: Option<f64>,
) -> String {
    let c = &o.cfg;
    let a = &o.adapter;
    let mut s = String::new();
    let on = match gpu {
        Some((name, _)) => format!("{device} ({name})"),
        None => device.to_string(),
    };
    // Throughput first: scripts read the first "<n> tokens/s" and the first "peak ... GiB".
    s += &format!("throughput: {:.1} tokens/s\n", r.tokens_per_sec);
    match (r.peak_device_bytes, r.peak_rss_bytes) {
        (Some(d), host) => {
            s += &format!("peak device memory: {}", gib(d));
            if let Some(h) = host {
                s += &format!(" (host RSS {})", gib(h));
            }
            s += "\n";
            s += &format!("activations: estimated {} (the run's memory plan)\n", gib(r.estimated_activation_bytes));
            if let Some(c) = r.device_counts_per_step {
                s += &format!(
                    "device work per step: {} kernels, {} matrix products, {} memsets ({})\n",
                    c.kernels,
                    c.matmuls,
                    c.memsets,
                    gib(c.memset_bytes)
                );
            }
        }
        (None, Some(h)) => {
            s += &format!("peak memory (host RSS): {}", gib(h));
            if let Some(l) = r.rss_after_load_bytes {
                s += &format!(" (after building the model: {})", gib(l));
            }
            s += "\n";
            if let Some(l) = r.rss_after_load_bytes {
                s += &format!(
                    "activations: estimated {} (the run's memory plan), measured {} (peak - after building the model)\n",
                    gib(r.estimated_activation_bytes),
                    gib(h.saturating_sub(l))
                );
            }
        }
        (None, None) => s += "peak memory: not measured here (no /proc)\n",
    }
    match (gpu, mfu) {
        (Some((name, Some(peak))), Some(mfu)) => {
            s += &format!(
                "MFU: {:.1}% ({achieved_tflops:.1} model TFLOP/s of {peak} dense bf16 on {name})\n",
                mfu * 100.0
            )
        }
        (Some((name, None)), _) => {
            s += &format!(
                "MFU: not computed ({name} is not in the peak table); {achieved_tflops:.1} model TFLOP/s\n"
            )
        }
        _ => s += &format!("model TFLOP/s: {achieved_tflops:.3}\n"),
    }
    let times: Vec<String> = r.step_seconds.iter().map(|t| format!("{t:.3}")).collect();
    s += &format!(
        "step seconds: {} (after {} warmup)\n",
        times.join(", "),
        o.warmup
    );
    s += &format!(
        "shape: {shape} ({:?}, {} layers, hidden {}, mlp {}, heads {}/{} kv, vocab {}, {}) on {on}\n",
        c.arch,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    s += &format!(
        "batch: {} rows x {} tokens = {} tokens per step, {} document(s) per row{}\n",
        o.rows,
        o.row_len,
        r.tokens_per_step,
        o.docs_per_row,
        if o.recompute {
            ", activations recomputed"
        } else {
            ""
        }
    );
    let targets = if a.target_modules.is_empty() {
        "all seven projections".to_string()
    } else {
        a.target_modules.join(",")
    };
    s += &format!(
        "adapter: {} r {} alpha {} dropout {} on {targets}\n",
        if a.use_dora {
            "DoRA"
        } else if a.use_rslora {
            "rsLoRA"
        } else {
            "LoRA"
        },
        a.r,
        a.lora_alpha,
        a.lora_dropout
    );
    if let Some(q) = &r.quantization {
        s += &format!(
            "quantization: {}-bit{} ({:.3} bytes per projection parameter)\n",
            q["bits"],
            match q["quant_type"].as_str() {
                Some(t) => format!(
                    " {t}{}, blocksize {}, compute {}",
                    if q["double_quant"] == true { ", double quant" } else { "" },
                    q["blocksize"],
                    q["compute_dtype"].as_str().unwrap_or("?")
                ),
                None => " int8 weight-only (activations not quantized)".to_string(),
            },
            r.projection_bytes as f64 / r.projection_params.max(1) as f64
        );
    }
    s += &format!(
        "parameters: {:.1} M base (frozen), {:.2} M trainable\n",
        r.base_params as f64 / 1e6,
        r.trainable_params as f64 / 1e6
    );
    s += &format!("final loss: {:.4}\n", r.final_loss);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand count for one layer, one document of 4 tokens: every term of the formula.
    #[test]
    fn model_flops_by_hand() {
        let cfg = ModelConfig::llama_shape(1, 8, 16, 2, 1, 10, true);
        // head_dim 4: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x16, head 8x10.
        let linear = 64.0 + 32.0 + 32.0 + 64.0 + 3.0 * 128.0 + 80.0;
        let f = model_flops_per_step(&cfg, &[4], 100);
        assert_eq!(f.base, 4.0 * linear * 4.0);
        assert_eq!(f.adapter, 6.0 * 100.0 * 4.0);
        // keys seen: 1 + 2 + 3 + 4 = 10; 12 per key per head-dim element per head.
        assert_eq!(f.attention, 12.0 * 2.0 * 4.0 * 10.0);
        assert_eq!(f.total(), f.base + f.adapter + f.attention);
        // Packing two documents costs less attention than one of the same total length.
        let split = model_flops_per_step(&cfg, &[2, 2], 100);
        assert_eq!(split.base, f.base);
        assert!(split.attention < f.attention);
    }

    fn matches(args: &[&str]) -> ArgMatches {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        command().try_get_matches_from(v).unwrap()
    }

    #[test]
    fn explicit_sizes_override_a_preset_and_a_partial_shape_names_what_is_missing() {
        let (name, c) =
            model_config(&matches(&["--shape", "qwen2.5-0.5b", "--layers", "2"])).unwrap();
        assert_eq!(name, "qwen2.5-0.5b with layers 2");
        assert_eq!(
            (c.num_hidden_layers, c.hidden_size, c.vocab_size),
            (2, 896, 151_936)
        );
        assert!(c.qkv_bias, "a qwen preset keeps its q/k/v bias");
        assert_eq!(c.rope_theta, 1_000_000.0);

        let e = model_config(&matches(&["--layers", "2", "--hidden", "64"])).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("missing: --intermediate --heads --kv-heads --vocab"),
            "{e}"
        );

        let e = model_config(&matches(&[
            "--layers",
            "1",
            "--hidden",
            "60",
            "--intermediate",
            "8",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--vocab",
            "9",
        ]))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--hidden 60 is not a multiple of --heads 8"),
            "{e}"
        );
    }

    #[test]
    fn batch_and_adapter_flags_are_honoured_or_refused() {
        let cfg = preset("smollm2-135m").unwrap();
        let o = options(
            &matches(&[
                "--rows",
                "2",
                "--seq",
                "64",
                "--docs-per-row",
                "3",
                "--r",
                "4",
                "--rslora",
                "--target-modules",
                "q_proj,v_proj",
            ]),
            cfg.clone(),
        )
        .unwrap();
        assert_eq!(
            (o.rows, o.row_len, o.docs_per_row, o.adapter.r),
            (2, 64, 3, 4)
        );
        assert_eq!(o.adapter.lora_alpha, 8.0);
        assert!(o.adapter.use_rslora && !o.adapter.use_dora);
        assert_eq!(o.adapter.target_modules, ["q_proj", "v_proj"]);

        let e = options(
            &matches(&["--target-modules", "q_proj,lm_head"]),
            cfg.clone(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("--target-modules"), "{e:#}");
        let e = options(&matches(&["--seq-len", "9000"]), cfg.clone()).unwrap_err();
        assert!(
            e.to_string().contains("max_position_embeddings 8192"),
            "{e}"
        );
        let e = options(&matches(&["--lora-dropout", "1"]), cfg).unwrap_err();
        assert!(e.to_string().contains("--lora-dropout"), "{e}");
        assert!(
            command()
                .try_get_matches_from(["bench", "--rows", "0"])
                .is_err()
        );
    }
}
