//! A preprocessor that uses and misuses `wasi:nn`, for the host's tests. The setting `attack`
//! picks what `process-batch` does with the graph named by `graph` (default `tiny`); the result
//! is one text sample: `ok: <output bytes as hex>` when compute succeeded, else `Err` carrying
//! the wasi-nn error code and message the host gave.
//!
//! Attacks: `ok` (f32[1,4] ones), `i64-into-f32`, `wrong-rank`, `huge` (declares 2 GiB with no
//! data), `load-bytes` (`graph.load` of raw bytes), `slow` (a 512×512 f32 input, for the slow
//! model), `ids` (i64 ids for the ids model); on the granted directory (`/models/<graph>`):
//! `read-model`, `write-model-dir`, `overwrite-model`, `dotdot` (a `..` path out of it),
//! `symlink-out` (a link the host side planted in it, pointing outside), `other-dir` (lists `/`, which is not there).

use lora_plugin::Settings;
use lora_plugin::preprocessor::{Preprocessor, RawRecord, RecordOutcome, Sample};

use lora_plugin::nn::raw::wasi::nn::{errors, graph, tensor};

struct HostileNn {
    attack: String,
    graph: String,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn describe(e: errors::Error) -> String {
    format!("wasi-nn error {:?}: {}", e.code(), e.data())
}

fn run(attack: &str, name: &str) -> Result<String, String> {
    use tensor::TensorType as T;
    // The granted model's directory is readable at /models/<graph>, and nothing else is:
    // each of these reports what the filesystem let it do.
    let fs = |r: std::io::Result<String>| match r {
        Ok(v) => Ok(format!("fs-ok: {v}")),
        Err(e) => Ok(format!("fs-refused: {e}")),
    };
    match attack {
        "read-model" => return fs(std::fs::read(format!("/models/{name}/model.onnx")).map(|b| b.len().to_string())),
        "write-model-dir" => return fs(std::fs::write(format!("/models/{name}/planted"), b"x").map(|_| "written".into())),
        "overwrite-model" => return fs(std::fs::write(format!("/models/{name}/model.onnx"), b"x").map(|_| "written".into())),
        "dotdot" => return fs(std::fs::read_to_string(format!("/models/{name}/../../../../etc/hostname"))),
        "symlink-out" => return fs(std::fs::read_to_string(format!("/models/{name}/outside"))),
        "other-dir" => return fs(std::fs::read_dir("/").map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>().join(","))),
        _ => {}
    }
    if attack == "load-bytes" {
        let g = graph::load(&[vec![8, 1, 18, 0]], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu);
        return match g {
            Ok(_) => Err("ESCAPED: load of raw bytes gave a graph".into()),
            Err(e) => Err(describe(e)),
        };
    }
    let g = graph::load_by_name(name).map_err(describe)?;
    let ctx = g.init_execution_context().map_err(describe)?;
    let (input, t) = match attack {
        "ok" => ("x", tensor::Tensor::new(&[1, 4], T::Fp32, &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))),
        "i64-into-f32" => ("x", tensor::Tensor::new(&[1, 4], T::I64, &[0u8; 32])),
        "wrong-rank" => ("x", tensor::Tensor::new(&[4], T::Fp32, &f32_bytes(&[1.0; 4]))),
        "huge" => ("x", tensor::Tensor::new(&[1, 1 << 29], T::Fp32, &[])),
        "slow" => ("x", tensor::Tensor::new(&[512, 512], T::Fp32, &f32_bytes(&vec![0.001; 512 * 512]))),
        "ids" => {
            let ids: Vec<u8> = [3i64, 1, 4, 1, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
            ("ids", tensor::Tensor::new(&[5], T::I64, &ids))
        }
        other => return Err(format!("unknown attack `{other}`")),
    };
    let out = ctx.compute(vec![(input.to_string(), t)]).map_err(describe)?;
    let mut text = String::from("ok:");
    for (n, t) in out {
        let ty = format!("{:?}", t.ty());
        let ty = ty.rsplit(':').next().unwrap_or(&ty).to_string();
        text.push_str(&format!(" {n} {ty} {:?} ", t.dimensions()));
        for b in t.data() {
            text.push_str(&format!("{b:02x}"));
        }
    }
    Ok(text)
}

impl Preprocessor for HostileNn {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["attack", "graph"])?;
        Ok(HostileNn {
            attack: settings.get("attack").unwrap_or("ok").to_string(),
            graph: settings.get("graph").unwrap_or("tiny").to_string(),
        })
    }

    fn process_batch(&mut self, _batch: u64, records: Vec<RawRecord>) -> Result<Vec<RecordOutcome>, String> {
        let r = run(&self.attack, &self.graph)?;
        Ok(records
            .iter()
            .map(|rec| RecordOutcome { index: rec.index, result: Ok(vec![Sample::Text(r.clone())]) })
            .collect())
    }
}

lora_plugin::export_preprocessor!(HostileNn);
