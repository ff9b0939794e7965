//! The tool commands of the real `lora` binary, run in a temp dir: `selftest`, `bench` and
//! `plugin inspect|check` (on an example plugin built from `plugins/` source), their output and
//! their exit codes on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-tools-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `lora args...` in `dir`, with the plugin cache inside `dir` (never the home directory).
fn lora(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lora"));
    cmd.current_dir(dir)
        .args(args)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("RAYON_NUM_THREADS");
    for (k, _) in std::env::vars() {
        if k.starts_with("LORA_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Bad input and failures end with a message and an exit code, never a panic or a signal.
fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    let (out, err) = text(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        err.contains(needle),
        "expected `{needle}` in stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The first "<number> tokens/s" and "peak ... <number> GiB|MiB", read the way
/// `tests/gpu/run.sh` reads them.
fn script_numbers(out: &str) -> (f64, f64) {
    let at = out.find("tokens/s").expect("no tokens/s");
    let before = out[..at].trim_end();
    let num: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .collect();
    let tps: f64 = num
        .chars()
        .rev()
        .filter(|c| *c != ',')
        .collect::<String>()
        .parse()
        .unwrap();
    let peak = out.find("peak").expect("no peak");
    let rest = &out[peak..];
    let start = rest.find(|c: char| c.is_ascii_digit()).unwrap();
    let mem: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let unit = rest[start + mem.len()..].trim_start();
    assert!(unit.starts_with("GiB") || unit.starts_with("MiB"), "{rest}");
    (tps, mem.parse().unwrap())
}

#[test]
fn help_lists_every_subcommand() {
    let dir = temp_dir("help");
    let o = lora(&dir, &["--help"]);
    let (help, _) = text(&o);
    assert!(o.status.success());
    for cmd in [
        "train",
        "kfp",
        "component",
        "params",
        "selftest",
        "bench",
        "plugin",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd} missing:\n{help}"
        );
    }
    let (plugin_help, _) = text(&lora(&dir, &["plugin", "--help"]));
    for cmd in ["inspect", "check"] {
        assert!(
            plugin_help
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd}:\n{plugin_help}"
        );
    }
    // tests/gpu/run.sh passes --rows/--seq only when the help shows --rows.
    let (bench_help, _) = text(&lora(&dir, &["bench", "--help"]));
    for flag in [
        "--device",
        "--shape",
        "--rows",
        "--seq-len",
        "--steps",
        "--lora-r",
        "smollm2-135m",
        "qwen2.5-1.5b",
    ] {
        assert!(bench_help.contains(flag), "{flag}:\n{bench_help}");
    }
}

#[test]
fn selftest_cpu_passes_and_prints_the_table() {
    let dir = temp_dir("selftest-cpu");
    let o = lora(&dir, &["selftest", "--device", "cpu", "--seed", "7"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("selftest on cpu against float64 formulas (seed 7)")
    );
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["op", "shape", "max", "abs", "max", "rel", "secs", "pass"]
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("  ok")).collect();
    assert!(rows.len() > 40, "only {} rows:\n{out}", rows.len());
    assert!(!out.contains("FAIL"), "{out}");
    // Lines about the device start with `#`; every other line between header and summary is a row.
    let body = out.lines().count() - 3;
    let comments = out.lines().filter(|l| l.starts_with("# ")).count();
    assert!(out.contains("# backend: cpu"), "{out}");
    assert_eq!(rows.len(), body - comments, "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("{n} of {n} checks passed (", n = rows.len())) && last.ends_with(" s)"),
        "{last}"
    );
    for op in ["gemm", "rmsnorm", "rope", "attention", "swiglu", "adamw"] {
        assert!(
            rows.iter().any(|r| r.starts_with(op)),
            "no {op} row:\n{out}"
        );
    }
}

#[test]
fn selftest_cuda_fails_cleanly_without_a_gpu() {
    if lora_engine::cuda::available() {
        eprintln!(
            "a GPU is present: `lora selftest --device cuda` is exercised by tests/gpu/run.sh instead"
        );
        return;
    }
    let dir = temp_dir("selftest-cuda");
    for device in ["cuda", "cuda:0"] {
        let o = lora(&dir, &["selftest", "--device", device]);
        assert_clean_failure(&o, 1, "no CUDA driver found");
        let (out, err) = text(&o);
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("hint: a GPU needs the NVIDIA driver"), "{err}");
    }
    let o = lora(
        &dir,
        &["bench", "--device", "cuda", "--shape", "smollm2-135m"],
    );
    assert_clean_failure(&o, 1, "no CUDA driver found");
    let o = lora(&dir, &["selftest", "--device", "tpu"]);
    assert_clean_failure(&o, 2, "--device: expected cpu, cuda, cuda:N or emu, got `tpu`");
    let o = lora(&dir, &["selftest", "--stage", "gpu"]);
    assert_clean_failure(&o, 2, "--stage: expected env, ops, training or all, got `gpu`");
    let o = lora(&dir, &["selftest", "--family", "attn"]);
    assert_clean_failure(&o, 2, "--family: no family `attn` on cpu (families: env, gemm,");
}

/// The CUDA backend on the CPU device emulator, one family per child process: rows stream with
/// their wall time, a family named alone runs alone, and the exit code reflects every row.
#[test]
fn selftest_emu_runs_a_family_in_a_child_and_reports_every_row() {
    if !lora_engine::cuda::emu::BUILT {
        eprintln!("no emulator in this build: skipped");
        return;
    }
    let dir = temp_dir("selftest-emu");
    let o = lora(
        &dir,
        &["selftest", "--device", "emu", "--seed", "3", "--family", "attention", "--family", "env"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.starts_with("selftest on emu against the cpu backend with CUDA's bf16 rounding (seed 3)"),
        "{out}"
    );
    assert!(out.contains("# name: CPU device emulator"), "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.ends_with("  ok")).collect();
    assert!(rows.iter().any(|r| r.starts_with("attention_bwd.dk")), "{out}");
    assert!(rows.iter().all(|r| r.starts_with("attention") || r.starts_with("open the backend")), "{out}");

    // A family that overruns its limit is killed and recorded as a failed row naming what it was
    // running; the next family still runs, and the exit code says a row failed.
    let o = lora(
        &dir,
        &[
            "selftest", "--device", "emu", "--seed", "3", "--family", "training:rslora", "--family", "env",
            "--family-timeout", "1",
        ],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let killed = out.lines().position(|l| l.starts_with("training:rslora (child process)")).expect(&out);
    assert!(out.lines().nth(killed).unwrap().contains("FAIL  (killed after 1 s (--family-timeout) while running train rslora"), "{out}");
    let env = out.lines().position(|l| l.starts_with("open the backend")).expect(&out);
    assert!(env > killed, "{out}");
    assert!(err.contains("checks failed"), "{err}");
    // The killed child's model folder does not outlive it.
    let left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lora-selftest-model-") && n.ends_with("-rslora"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

const TINY: [&str; 12] = [
    "--layers",
    "2",
    "--hidden",
    "64",
    "--intermediate",
    "128",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--vocab",
    "256",
];

#[test]
fn bench_with_a_tiny_explicit_shape_prints_numbers() {
    let dir = temp_dir("bench");
    let mut args = vec![
        "bench",
        "--device",
        "cpu",
        "--rows",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--lora-r",
        "4",
    ];
    args.extend(TINY);
    let o = lora(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let (tps, peak) = script_numbers(&out);
    assert!(tps > 0.0 && peak > 0.0, "{out}");
    assert!(out.contains("peak memory (host RSS): "), "{out}");
    assert!(
        out.contains("batch: 2 rows x 32 tokens = 64 tokens per step"),
        "{out}"
    );
    assert!(
        out.contains("2 layers, hidden 64, mlp 128, heads 4/2 kv, vocab 256, tied) on cpu"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .find(|l| l.starts_with("step seconds:"))
            .unwrap()
            .matches(',')
            .count(),
        1,
        "{out}"
    );

    // The same run as JSON: every flag reached the engine.
    args.extend([
        "--json",
        "--docs-per-row",
        "2",
        "--target-modules",
        "q_proj,down_proj",
    ]);
    let o = lora(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v; // the engine's BenchResult fields, at the top level
    assert_eq!(r["backend"], "cpu");
    assert_eq!(r["tokens_per_step"], 64);
    assert_eq!(r["step_seconds"].as_array().unwrap().len(), 2);
    assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
    // r 4 on q_proj (64 -> 64) and down_proj (128 -> 64) in 2 layers: 2 * 4 * (128 + 192).
    assert_eq!(r["trainable_params"], 2 * 4 * (128 + 192));
    assert_eq!(v["docs_per_row"], 2);
    assert!(v["mfu"].is_null(), "no MFU on cpu");
    assert!(v["model_flops_per_step"]["attention"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_bad_shapes_and_values_by_name() {
    let dir = temp_dir("bench-bad");
    let o = lora(&dir, &["bench", "--layers", "2"]);
    assert_clean_failure(
        &o,
        2,
        "missing: --hidden --intermediate --heads --kv-heads --vocab",
    );
    let o = lora(&dir, &["bench", "--shape", "gpt-5"]);
    assert_clean_failure(&o, 2, "gpt-5");
    let o = lora(&dir, &["bench", "--shape", "smollm2-135m", "--rows", "0"]);
    assert_clean_failure(&o, 2, "--rows");
    let mut args = vec!["bench", "--target-modules", "q_proj,lm_head"];
    args.extend(TINY);
    let o = lora(&dir, &args);
    assert_clean_failure(&o, 2, "--target-modules");
    assert!(text(&o).1.contains("lm_head"));
}

/// `--load-in-4bit` runs the quantized model and the 16-bit one and prints them side by side: the
/// projection weights drop from 4 bytes (fp32 on CPU) to about half a byte per parameter.
#[test]
fn bench_compares_4bit_with_16bit_memory_side_by_side() {
    let dir = temp_dir("bench-4bit");
    let mut args = vec!["bench", "--device", "cpu", "--rows", "1", "--seq-len", "32", "--steps", "1", "--warmup", "0", "--lora-r", "4", "--load-in-4bit"];
    args.extend(TINY);
    let o = lora(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("quantization: 4-bit nf4, double quant, blocksize 64, compute bfloat16"), "{out}");
    let row = |label: &str| -> Vec<String> {
        let l = out.lines().find(|l| l.starts_with("  ") && l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no {label} row:\n{out}"));
        l[l.find(label).unwrap() + label.len()..].split_whitespace().map(str::to_string).collect()
    };
    let per = row("bytes per projection parameter");
    assert_eq!(per[0], "4.000", "{out}");
    let q: f64 = per[1].parse().unwrap();
    assert!(q > 0.5 && q < 0.75, "{out}");
    assert!(out.contains("16-bit vs 4-bit nf4+dq, compute bfloat16, side by side"), "{out}");
    assert_eq!(row("peak memory (host RSS)").len(), 4, "two values with units: {out}");

    args.extend(["--json"]);
    let v: serde_json::Value = serde_json::from_str(&text(&lora(&dir, &args)).0).unwrap();
    assert_eq!(v["quantization"]["bits"], 4);
    assert!(v["baseline_16bit"]["quantization"].is_null());
    assert_eq!(v["baseline_16bit"]["projection_params"], v["projection_params"]);
    assert!(v["projection_bytes"].as_u64().unwrap() * 5 < v["baseline_16bit"]["projection_bytes"].as_u64().unwrap());
}

#[test]
fn bench_refuses_quantization_flags_that_do_not_apply() {
    let dir = temp_dir("bench-q-bad");
    for (flags, needle) in [
        (&["--bnb-4bit-quant-type", "fp4"][..], "--bnb-4bit-quant-type applies only with --load-in-4bit"),
        (&["--load-in-8bit", "--bnb-4bit-use-double-quant", "false"][..], "--bnb-4bit-use-double-quant applies only with --load-in-4bit"),
        (&["--load-in-4bit", "--load-in-8bit"][..], "choose one"),
        (&["--load-in-4bit", "--bnb-4bit-compute-dtype", "fp8"][..], "--bnb-4bit-compute-dtype \"fp8\""),
    ] {
        let mut args = vec!["bench"];
        args.extend(flags);
        args.extend(TINY);
        assert_clean_failure(&lora(&dir, &args), 2, needle);
    }
}

/// Builds `plugins/<package>` for wasm32-wasip2 once per test binary, in the guest target dir
/// the plugin runtime's tests share (`LORA_PLUGINS_WASM_TARGET` overrides it).
#[cfg(feature = "plugins")]
fn example_plugin(package: &str, artifact: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = lora_plugins::testing::guest_target_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
    lora_plugins::testing::build_guest_plugins(&repo, &target, &[package], false)
        .unwrap_or_else(|e| panic!("{e}"))
        .join(format!("{artifact}.wasm"))
}

#[cfg(feature = "plugins")]
#[test]
fn plugin_inspect_and_check_an_example_scheduler() {
    let dir = temp_dir("plugin");
    let wasm = example_plugin("schedules", "schedules");
    let file = wasm.to_str().unwrap();

    let o = lora(&dir, &["plugin", "inspect", file]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("kind:        scheduler"), "{out}");
    assert!(out.contains("api version: 0.1.0"), "{out}");
    assert!(out.contains("filesystem: none"), "{out}");
    let o = lora(
        &dir,
        &[
            "plugin",
            "inspect",
            file,
            "--plugin-config",
            r#"{"scheduler": {"memory_mib": 64, "settings": {"schedule": "plateau"}}}"#,
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("limits:      memory 64 MiB"), "{out}");
    assert!(out.contains("schedule = plateau"), "{out}");

    // 100 steps of the plugin's default schedule: transformers' cosine with 10 warmup steps
    // from 2e-4, one line per step.
    let o = lora(&dir, &["plugin", "check", file]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        out.lines().next(),
        Some(format!("scheduler plugin {file}:").as_str())
    );
    let lrs: Vec<f64> = out
        .lines()
        .skip(1)
        .map(|l| {
            l.split("learning rate ")
                .nth(1)
                .unwrap_or_else(|| panic!("{l}"))
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(lrs.len(), 100);
    for (step, lr) in lrs.iter().enumerate() {
        let factor = if step < 10 {
            step as f64 / 10.0
        } else {
            0.5 * (1.0 + (std::f64::consts::PI * (step - 10) as f64 / 90.0).cos())
        };
        assert!((lr - 2e-4 * factor).abs() < 1e-12, "step {step}: {lr}");
    }

    // Losses from --input drive the call sequence: one line per loss.
    std::fs::write(dir.join("losses.jsonl"), "{\"loss\": 2.0}\n1.5\n1.5\n").unwrap();
    let o = lora(&dir, &["plugin", "check", file, "--input", "losses.jsonl"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("step 2: learning rate") && out.contains("loss 1.5"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 4, "{out}");

    // The plugin's own refusal of a setting: the run would fail, so check fails (exit 1).
    std::fs::write(
        dir.join("cfg.json"),
        r#"{"schedules": {"settings": {"schedule": "bogus"}}}"#,
    )
    .unwrap();
    let o = lora(
        &dir,
        &["plugin", "check", file, "--plugin-config", "@cfg.json"],
    );
    assert_clean_failure(&o, 1, "bogus");
    // A config key that names no plugin is bad input.
    let o = lora(
        &dir,
        &[
            "plugin",
            "check",
            file,
            "--plugin-config",
            r#"{"csv_reporter": {}}"#,
        ],
    );
    assert_clean_failure(&o, 2, "training_plugin_config");
}

#[test]
fn plugin_commands_name_a_missing_or_corrupt_file() {
    let dir = temp_dir("plugin-bad");
    for cmd in ["inspect", "check"] {
        let o = lora(&dir, &["plugin", cmd, "missing.wasm"]);
        assert_clean_failure(&o, 2, "cannot read plugin file missing.wasm");
        assert!(text(&o).1.contains("No such file"), "{}", text(&o).1);
    }
    // A truncated component header, and a text file.
    std::fs::write(dir.join("corrupt.wasm"), b"\0asm\x0d\0\x01\0\x07garbage").unwrap();
    std::fs::write(dir.join("notes.wasm"), b"not wasm at all").unwrap();
    for file in ["corrupt.wasm", "notes.wasm"] {
        for cmd in ["inspect", "check"] {
            let o = lora(&dir, &["plugin", cmd, file]);
            assert_clean_failure(
                &o,
                2,
                &format!("{file} is not a valid WebAssembly component"),
            );
        }
    }
    let o = lora(&dir, &["plugin", "inspect", "."]);
    assert_clean_failure(&o, 2, "plugin file . is not a file");
    let o = lora(
        &dir,
        &["plugin", "check", "corrupt.wasm", "--input", "nope.jsonl"],
    );
    assert_clean_failure(&o, 2, "--input nope.jsonl: cannot read it");
    let o = lora(&dir, &["plugin"]);
    assert_eq!(o.status.code(), Some(2));
}

#[cfg(feature = "plugins")]
#[test]
fn plugin_check_runs_an_example_preprocessor_on_sample_records() {
    let dir = temp_dir("plugin-pre");
    let wasm = example_plugin("ticket-redactor", "ticket_redactor");
    let file = wasm.to_str().unwrap();
    std::fs::write(
        dir.join("tickets.jsonl"),
        concat!(
            r#"{"id": "T-1", "messages": [{"from": "customer", "body": "mail me at ann@example.com"}, {"from": "agent", "body": "Done."}]}"#,
            "\n",
            r#"{"id": "T-2", "messages": [{"from": "customer", "body": "anyone there?"}]}"#,
            "\n",
            r#"{"id": "T-3", "subject": "no messages field"}"#,
            "\n",
        ),
    )
    .unwrap();
    let o = lora(&dir, &["plugin", "check", file, "--input", "tickets.jsonl"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("preprocessor plugin {file}:"));
    assert!(
        lines[1].starts_with("record 1: ") && lines[1].contains("[EMAIL]"),
        "{out}"
    );
    assert!(
        !out.contains("ann@example.com"),
        "the address was not redacted:\n{out}"
    );
    assert_eq!(lines[2], "record 2: dropped");
    assert!(lines[3].starts_with("record 3: error: "), "{out}");
    assert_eq!(lines[4], "3 records, 1 record errors");

    // A preprocessor without sample input is refused by name.
    let o = lora(&dir, &["plugin", "check", file]);
    assert_clean_failure(&o, 2, "--input");
}

/// `--step-json` prints one flushed JSON line per step; `--per-op` prints a per-op device-time
/// table on the emulated CUDA backend and is refused on the CPU, which cannot time device calls.
#[test]
fn bench_step_lines_and_per_op_table() {
    let dir = temp_dir("bench-per-op");
    let mut args = vec!["bench", "--device", "cpu", "--rows", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--step-json"];
    args.extend(TINY);
    let o = lora(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let steps: Vec<serde_json::Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(steps.len(), 3, "{out}");
    assert_eq!(steps[0]["warmup"], true);
    assert_eq!(steps[2]["step"], 2);
    assert!(steps.iter().all(|s| s["seconds"].as_f64().is_some_and(|x| x > 0.0) && s["loss"].is_number()), "{out}");

    let mut args = vec!["bench", "--device", "cpu", "--rows", "1", "--seq-len", "16", "--steps", "1", "--per-op"];
    args.extend(TINY);
    assert_clean_failure(&lora(&dir, &args), 1, "per-op timing needs a device backend");
    if !lora_engine::cuda::emu::BUILT {
        return;
    }
    let mut args = vec!["bench", "--device", "emu", "--rows", "1", "--seq-len", "16", "--steps", "1", "--warmup", "0", "--per-op"];
    args.extend(TINY);
    let o = lora(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("per-op device time, 16 tokens, per step"), "{out}");
    for op in ["attention_fwd (attention_fwd_f32)", "linear_cross_entropy (cross_entropy_fwd_bwd_f32)", "gemm (cublasLt Bf16", "adamw (adamw_f32)"] {
        assert!(out.lines().any(|l| l.starts_with(op)), "no `{op}` row:\n{out}");
    }
}
