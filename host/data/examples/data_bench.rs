//! Benchmark half of tests/bench/data_bench.py: template + tokenize + mask + pack a chat JSONL
//! file with lora-data and print one JSON line (records, seconds, records/s, peak RSS).
//!
//!   cargo run -p lora-data --example data_bench -- <data.jsonl> <tokenizer.json> <tokenizer_config.json> [chat_template.jinja]

use std::path::PathBuf;
use std::time::Instant;

use lora_data::{DataConfig, DatasetSource, HfTextTools, builtin_preprocessor, prepare};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.len() < 3 {
        return Err("usage: data_bench <data.jsonl> <tokenizer.json> <tokenizer_config.json> [chat_template.jinja]".into());
    }
    let start = Instant::now();
    let tools =
        HfTextTools::from_files(&args[1], Some(&args[2]), args.get(3).map(|p| p.as_path()))?;
    let cfg = DataConfig {
        max_seq_len: 4096,
        max_tokens_per_gpu: 32000,
        effective_batch_size: 128,
        num_epochs: 1,
        ..DataConfig::default()
    };
    let src = DatasetSource::from_path(&args[0])?;
    let mut pre = builtin_preprocessor(&cfg);
    let data = prepare(&cfg, &src, &mut *pre, &tools)?;
    let plan = data.epoch_plan(0);
    let secs = start.elapsed().as_secs_f64();
    if std::env::var_os("DATA_BENCH_BREAKDOWN").is_some() {
        // Single-threaded cost of each stage, to see where time goes.
        let text = std::fs::read_to_string(&args[0])?;
        let convs: Vec<Vec<lora_api::Message>> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| serde_json::from_value(v["messages"].clone()).unwrap_or_default())
            })
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        let mut rendered = Vec::with_capacity(convs.len());
        for c in &convs {
            rendered.push(tools.render(c, false)?);
            for i in 0..c.len() {
                if c[i].role == "assistant" {
                    tools.render(&c[..i], true)?;
                }
            }
        }
        let render_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut n = 0;
        for r in &rendered {
            n += tools.encode_with_offsets(r, false)?.0.len();
        }
        let encode_s = t.elapsed().as_secs_f64();
        eprintln!(
            "single thread: render (full + prefixes) {render_s:.2}s, encode {encode_s:.2}s for {n} tokens ({:.0} tokens/s)",
            n as f64 / encode_s
        );
    }
    let rows: usize = plan
        .steps
        .iter()
        .flat_map(|s| &s.micro_batches)
        .map(|m| m.rows.len())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "impl": "lora-data (Rust)",
            "records": data.report.records,
            "samples": data.train.len(),
            "tokens": data.report.train_tokens,
            "trained_tokens": data.report.train_trained_tokens,
            "rows": rows,
            "seconds": secs,
            "records_per_s": data.report.records as f64 / secs,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
