//! `cargo run --release -p lora-engine --example bench -- --shape smollm2-135m --rows 4 --seq 512`
//! Prints one JSON object (see `lora_engine::bench::BenchResult`). `--threads N` sets rayon's pool.

use std::sync::Arc;

use lora_engine::bench::{BenchOptions, preset, run};
use lora_engine::cpu::CpuBackend;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let num = |k: &str, d: usize| get(k).map(|v| v.parse::<usize>().unwrap_or_else(|_| fail(&format!("{k} wants a number, got {v}")))).unwrap_or(d);
    let shape = get("--shape").unwrap_or_else(|| "smollm2-135m".into());
    let cfg = preset(&shape).unwrap_or_else(|e| fail(&e.to_string()));
    let mut o = BenchOptions::new(cfg);
    o.rows = num("--rows", 4);
    o.row_len = num("--seq", 512);
    o.docs_per_row = num("--docs-per-row", 1);
    o.steps = num("--steps", 3);
    o.warmup = num("--warmup", 1);
    o.adapter.r = num("--r", 16);
    o.adapter.lora_alpha = 2.0 * o.adapter.r as f64;
    o.recompute = args.iter().any(|a| a == "--recompute");
    if let Some(t) = get("--threads") {
        let n = t.parse().unwrap_or_else(|_| fail("--threads wants a number"));
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().unwrap_or_else(|e| fail(&e.to_string()));
    }
    match run(&o, Arc::new(CpuBackend::new())) {
        Ok(r) => println!("{}", serde_json::to_string(&r).unwrap_or_default()),
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(2)
}
