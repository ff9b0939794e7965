//! Benchmark: 100k support tickets through the WASM `ticket-redactor` preprocessor vs the same
//! work done natively (the very same redaction source, compiled for the host), plus plugin
//! instantiation from the on-disk cache vs a cold compile.
//!
//! Build the guest first, then run with the host crate optimised like the guest:
//! ```sh
//! (cd plugins && cargo build --release --target wasm32-wasip2 -p ticket-redactor)
//! CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo run -p lora-plugins --example bench_preprocess -- \
//!     plugins/target/wasm32-wasip2/release/ticket_redactor.wasm [records] [batch]
//! ```

#[path = "../../../plugins/ticket-redactor/src/redact.rs"]
mod redact;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use lora_api::{Message, RawRecord, RecordOutcome, Sample, TextTools};
use lora_plugins::{PluginOptions, precompile};
use serde_json::{Value, json};

/// The native twin of the plugin's `process_record` (no settings: default tokens, no limit).
fn native(record: &RawRecord) -> Result<Vec<Sample>, String> {
    let turns = record
        .value
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("field `messages` is missing or not a list")?;
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let from = turn
            .get("from")
            .and_then(Value::as_str)
            .ok_or(format!("messages[{i}].from is missing"))?;
        let body = turn
            .get("body")
            .and_then(Value::as_str)
            .ok_or(format!("messages[{i}].body is missing"))?;
        let role = match from {
            "customer" => "user",
            "agent" => "assistant",
            other => return Err(format!("messages[{i}].from is `{other}`")),
        };
        messages.push(Message {
            role: role.into(),
            content: redact::redact(body, "[EMAIL]", "[PHONE]"),
        });
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Ok(Vec::new());
    }
    Ok(vec![Sample::Chat { messages }])
}

struct NoTools;
impl TextTools for NoTools {
    fn encode(&self, _: &str, _: bool) -> Result<Vec<u32>, String> {
        Err("unused".into())
    }
    fn decode(&self, _: &[u32], _: bool) -> Result<String, String> {
        Err("unused".into())
    }
    fn apply_chat_template(&self, _: &[Message], _: bool) -> Result<String, String> {
        Err("unused".into())
    }
}

fn tickets(n: u64) -> Vec<RawRecord> {
    (1..=n)
        .map(|i| RawRecord {
            index: i,
            source: "tickets.jsonl".into(),
            value: json!({"id": format!("T-{i}"), "messages": [
                {"from": "customer", "body": format!("Order {i} arrived broken. Please mail me at user{i}@example.com or call +1 (555) {:03}-{:04}.", i % 1000, i % 10000)},
                {"from": "agent", "body": format!("Sorry about order {i}! A replacement ships today; the label goes to user{i}@example.com.")},
                {"from": "customer", "body": "Thanks, that was quick. Have a good day!"}
            ]}),
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = PathBuf::from(
        args.get(1)
            .ok_or("usage: bench_preprocess PLUGIN.wasm [records] [batch]")?,
    );
    let n: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let batch: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let records = tickets(n);

    // Instantiation: cold compile vs the on-disk cache.
    let cache = std::env::temp_dir().join(format!("lora-bench-cache-{}", std::process::id()));
    let t = Instant::now();
    let first = precompile(&path, &cache)?;
    let cold = t.elapsed();
    let t = Instant::now();
    let second = precompile(&path, &cache)?;
    let warm = t.elapsed();
    std::fs::remove_dir_all(&cache).ok();
    let options = PluginOptions {
        cache_dir: None,
        ..Default::default()
    };
    let t = Instant::now();
    let mut wasm = lora_plugins::load_preprocessor(&path, &options, Arc::new(NoTools))?;
    let instantiate = t.elapsed();

    // Native and WASM alternate, 3 rounds, best of each: the build machine is shared and noisy.
    let (mut native_s, mut wasm_s) = (f64::INFINITY, f64::INFINITY);
    for _round in 0..3 {
        let t = Instant::now();
        let mut native_out: Vec<RecordOutcome> = Vec::with_capacity(records.len());
        for chunk in records.chunks(batch) {
            native_out.extend(chunk.iter().map(|r| RecordOutcome {
                index: r.index,
                result: native(r),
            }));
        }
        native_s = native_s.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut wasm_out: Vec<RecordOutcome> = Vec::with_capacity(records.len());
        for (b, chunk) in records.chunks(batch).enumerate() {
            wasm_out.extend(wasm.process_batch(b as u64, chunk)?);
        }
        wasm_s = wasm_s.min(t.elapsed().as_secs_f64());
        assert_eq!(native_out, wasm_out, "native and WASM outputs differ");
    }

    // What crossing the boundary costs before the guest does any work: records to JSON text.
    let t = Instant::now();
    let json_bytes: usize = records.iter().map(|r| r.value.to_string().len()).sum();
    let serialize_s = t.elapsed().as_secs_f64();

    let (nr, wr) = (n as f64 / native_s, n as f64 / wasm_s);
    println!(
        "preprocess {n} tickets, batches of {batch}, best of 3 alternating rounds (outputs identical)"
    );
    println!("  native: {nr:>12.0} records/s ({native_s:.3} s)");
    println!("  wasm:   {wr:>12.0} records/s ({wasm_s:.3} s)");
    println!("  ratio:  wasm is {:.2}x slower than native", nr / wr);
    println!(
        "  (of the wasm time, {serialize_s:.3} s is the host writing {} MB of records as JSON text for the guest)",
        json_bytes / 1_000_000
    );
    println!("instantiation of {}", path.display());
    println!(
        "  cold compile ({first:?}):      {:>8.1} ms",
        cold.as_secs_f64() * 1e3
    );
    println!(
        "  from disk cache ({second:?}):     {:>8.1} ms  ({:.0}x faster)",
        warm.as_secs_f64() * 1e3,
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    println!(
        "  instantiate + configure (compiled): {:>8.1} ms",
        instantiate.as_secs_f64() * 1e3
    );
    Ok(())
}
