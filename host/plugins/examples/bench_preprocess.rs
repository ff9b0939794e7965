//! Benchmark: 100k support tickets through the WASM `ticket-redactor` preprocessor vs the same
//! work done natively (the very same redaction source, compiled for the host), starting from JSONL
//! lines as a run does, plus plugin instantiation from the on-disk cache vs a cold compile.
//! Results: `tests/bench/plugins-results.md`.
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

use lora_api::{Message, Preprocessor, RawRecord, RecordOutcome, Sample, TextTools};
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

/// `n` support tickets as JSONL lines, the form a run reads them in.
fn ticket_lines(n: u64) -> Vec<String> {
    (1..=n)
        .map(|i| {
            json!({"id": format!("T-{i}"), "messages": [
                {"from": "customer", "body": format!("Order {i} arrived broken. Please mail me at user{i}@example.com or call +1 (555) {:03}-{:04}.", i % 1000, i % 10000)},
                {"from": "agent", "body": format!("Sorry about order {i}! A replacement ships today; the label goes to user{i}@example.com.")},
                {"from": "customer", "body": "Thanks, that was quick. Have a good day!"}
            ]})
            .to_string()
        })
        .collect()
}

/// What the run's JSONL reader does with each line: parse it, and keep the text when the
/// preprocessor takes text (`Preprocessor::wants_json_text`).
fn read(lines: &[String], keep_text: bool) -> Vec<RawRecord> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| RawRecord {
            index: i as u64 + 1,
            source: "tickets.jsonl".into(),
            value: serde_json::from_str(line).expect("valid JSON"),
            json: keep_text.then(|| line.clone()),
        })
        .collect()
}

/// All `records` through the plugin in batches of `batch`: the outcomes and the seconds taken.
fn through_wasm(
    wasm: &mut dyn Preprocessor,
    records: &[RawRecord],
    batch: usize,
) -> Result<(Vec<RecordOutcome>, f64), lora_api::ExtError> {
    let t = Instant::now();
    let mut out = Vec::with_capacity(records.len());
    for (b, chunk) in records.chunks(batch).enumerate() {
        out.extend(wasm.process_batch(b as u64, chunk)?);
    }
    Ok((out, t.elapsed().as_secs_f64()))
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
    let lines = ticket_lines(n);

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
    // The first load also starts what a process sets up once (the async runtime plugin calls run
    // on); a second one is what every further plugin costs.
    let t = Instant::now();
    drop(lora_plugins::load_preprocessor(&path, &options, Arc::new(NoTools))?);
    let instantiate_again = t.elapsed();

    // Native and WASM alternate, 3 rounds, best of each: the build machine is shared and noisy.
    // Each side reads the same JSONL lines as a run does (parse; the WASM side also keeps the
    // line), then preprocesses them in batches. A third variant hands the guest the parsed value
    // written out again, as lora did before readers kept the text.
    // Best times: read (native), preprocess (native), read (wasm), preprocess (wasm), wasm from values.
    let mut best = [f64::INFINITY; 5];
    let json_bytes: usize = lines.iter().map(String::len).sum();
    for _round in 0..3 {
        let t = Instant::now();
        let records = read(&lines, false);
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut native_out: Vec<RecordOutcome> = Vec::with_capacity(records.len());
        for chunk in records.chunks(batch) {
            native_out.extend(chunk.iter().map(|r| RecordOutcome {
                index: r.index,
                result: native(r),
            }));
        }
        best[1] = best[1].min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let with_text = read(&lines, wasm.wants_json_text());
        best[2] = best[2].min(t.elapsed().as_secs_f64());
        let (wasm_out, secs) = through_wasm(wasm.as_mut(), &with_text, batch)?;
        best[3] = best[3].min(secs);
        assert_eq!(native_out, wasm_out, "native and WASM outputs differ");

        let (from_values, secs) = through_wasm(wasm.as_mut(), &records, batch)?;
        best[4] = best[4].min(secs);
        assert_eq!(native_out, from_values, "native and WASM (from values) outputs differ");
    }
    let [read_native, native_s, read_wasm, wasm_s, values_s] = best;
    let rate = |s: f64| n as f64 / s;
    println!(
        "preprocess {n} tickets ({} MB of JSONL), batches of {batch}, best of 3 alternating rounds (outputs identical)",
        json_bytes / 1_000_000
    );
    println!("  as a run does it, JSONL lines read + preprocessed:");
    println!(
        "    native: {:>10.0} records/s ({:.3} s = read {read_native:.3} + preprocess {native_s:.3})",
        rate(read_native + native_s),
        read_native + native_s
    );
    println!(
        "    wasm:   {:>10.0} records/s ({:.3} s = read {read_wasm:.3} + preprocess {wasm_s:.3})",
        rate(read_wasm + wasm_s),
        read_wasm + wasm_s
    );
    println!(
        "    ratio:  wasm is {:.2}x slower than native",
        (read_wasm + wasm_s) / (read_native + native_s)
    );
    println!("  the preprocess call alone (records already read):");
    println!("    native: {:>10.0} records/s", rate(native_s));
    println!(
        "    wasm:   {:>10.0} records/s  ({:.2}x slower; the guest parses the JSON text itself, native gets it parsed)",
        rate(wasm_s),
        wasm_s / native_s
    );
    println!(
        "    wasm, value re-serialized instead of the line: {:>10.0} records/s ({:.2}x slower)",
        rate(values_s),
        values_s / native_s
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
        "  instantiate + configure (compiled): {:>8.1} ms first (with the process's one-time setup), {:.1} ms again",
        instantiate.as_secs_f64() * 1e3,
        instantiate_again.as_secs_f64() * 1e3
    );
    Ok(())
}
