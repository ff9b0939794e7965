//! `wasi:nn` for preprocessors (feature `wasi-nn`): wasmtime-wasi-nn supplies the WIT bindings,
//! the resource table entries and the guest-visible errors; the backend is ours, on ONNX Runtime
//! through `ort` (loaded at run time from `ORT_DYLIB_PATH`, else `libonnxruntime.so` on the
//! library search path).
//!
//! What a guest gets: only the graphs its run grants (`grants.models`: name → directory holding
//! `model.onnx`), preloaded by the host, through `load-by-name`. `load` of model bytes traps
//! with a message naming the plugin (there is no way to hand a guest a wasi-nn `error` for it
//! from outside wasmtime-wasi-nn). Every input tensor is checked against the graph's declared
//! inputs (names, type, rank, fixed dimensions, byte length) and against the plugin's
//! `max_tensor_mib` before ONNX Runtime sees it; outputs are checked against the same limit.
//! Sessions run on one thread with deterministic kernels. Model time counts against the call's
//! deadline: a watchdog ends a run that outlives it, and the call fails naming plugin and graph.
//!
//! wasmtime-wasi-nn shows a guest only the top line of a backend error, so tensor errors are
//! raised as `UnsupportedTensorType(message)` (whose text reaches the guest); every error is
//! also logged under the plugin's name and kept for the host's own error message.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::{RunOptions, Session};
use ort::value::{DynTensor, TensorElementType, ValueType};
use sha2::{Digest, Sha256};
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, BackendGraph, Id, NamedTensor};
use wasmtime_wasi_nn::wit::{TensorType, WasiNnCtx};
use wasmtime_wasi_nn::{ExecutionContext, Graph, GraphRegistry, Registry, Tensor};

use crate::PluginError;
use crate::sandbox::{LogLevel, LogSink};

/// The `wasi:nn` WIT package version this host links (wasmtime-wasi-nn 48's).
pub const WASI_NN_VERSION: &str = "0.2.0-rc-2024-10-28";
/// Where a plugin sees its granted models' directories, read-only (`/models/<name>`).
pub const GUEST_MODELS_DIR: &str = "/models";
/// The `wasi:nn` interfaces a preprocessor may import.
pub(crate) const WASI_NN_INTERFACES: &[&str] =
    &["wasi:nn/tensor", "wasi:nn/graph", "wasi:nn/inference", "wasi:nn/errors"];

/// What the current call of a plugin allows its models: shared by the sandbox (which starts each
/// call) and the graphs (which run inside it).
pub(crate) struct CallWatch {
    deadline: Duration,
    started: Mutex<Instant>,
    /// Why a model ended the current call (its deadline), naming plugin and graph.
    pub(crate) hit: Mutex<Option<String>>,
    /// The last wasi-nn error of the current call, for the host's message.
    pub(crate) last_error: Mutex<Option<String>>,
    log: LogSink,
}

impl CallWatch {
    pub(crate) fn new(deadline: Duration, log: LogSink) -> Arc<CallWatch> {
        Arc::new(CallWatch {
            deadline,
            started: Mutex::new(Instant::now()),
            hit: Mutex::new(None),
            last_error: Mutex::new(None),
            log,
        })
    }

    pub(crate) fn begin_call(&self) {
        *lock(&self.started) = Instant::now();
        *lock(&self.hit) = None;
        *lock(&self.last_error) = None;
    }

    fn remaining(&self) -> Option<Duration> {
        self.deadline.checked_sub(lock(&self.started).elapsed())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A granted model, loaded: its name, file and hash (for the run manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// The process's ONNX Runtime environment. A failure to load the library is not kept, so a later
/// call (after the library is installed) may succeed.
fn environment() -> Result<ort::environment::Environment, String> {
    static ENV: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);
    let mut env = lock(&ENV);
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let path = ort_library_path();
    let built = ort::init_from(&path)
        .map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {} ({e}); install the `onnxruntime` wheel from PyPI (1.31.x) and set ORT_DYLIB_PATH to its onnxruntime/capi/libonnxruntime.so.<version>",
                path.display()
            )
        })?
        .with_name("lora")
        .build()
        .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
    *env = Some(built.clone());
    Ok(built)
}

/// `ORT_DYLIB_PATH`, else `libonnxruntime.so` found on the library search path.
pub fn ort_library_path() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// One declared input or output of a graph.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    ty: TensorType,
    /// -1 where the model leaves the dimension open.
    dims: Vec<i64>,
}

struct GraphInner {
    plugin: String,
    graph: String,
    session: Mutex<Session>,
    inputs: Vec<Spec>,
    outputs: Vec<Spec>,
    max_bytes: u64,
    watch: Arc<CallWatch>,
}

struct OrtGraph(Arc<GraphInner>);

impl BackendGraph for OrtGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let ctx: Box<dyn BackendExecutionContext> = Box::new(OrtContext(self.0.clone()));
        Ok(ctx.into())
    }
}

struct OrtContext(Arc<GraphInner>);

fn type_name(t: TensorType) -> &'static str {
    match t {
        TensorType::Fp16 => "f16",
        TensorType::Fp32 => "f32",
        TensorType::Fp64 => "f64",
        TensorType::Bf16 => "bf16",
        TensorType::U8 => "u8",
        TensorType::I32 => "i32",
        TensorType::I64 => "i64",
    }
}

fn elem_bytes(t: TensorType) -> u64 {
    match t {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

fn to_ort(t: TensorType) -> TensorElementType {
    match t {
        TensorType::Fp16 => TensorElementType::Float16,
        TensorType::Fp32 => TensorElementType::Float32,
        TensorType::Fp64 => TensorElementType::Float64,
        TensorType::Bf16 => TensorElementType::Bfloat16,
        TensorType::U8 => TensorElementType::Uint8,
        TensorType::I32 => TensorElementType::Int32,
        TensorType::I64 => TensorElementType::Int64,
    }
}

fn from_ort(t: TensorElementType) -> Option<TensorType> {
    Some(match t {
        TensorElementType::Float16 => TensorType::Fp16,
        TensorElementType::Float32 => TensorType::Fp32,
        TensorElementType::Float64 => TensorType::Fp64,
        TensorElementType::Bfloat16 => TensorType::Bf16,
        TensorElementType::Uint8 => TensorType::U8,
        TensorElementType::Int32 => TensorType::I32,
        TensorElementType::Int64 => TensorType::I64,
        _ => return None,
    })
}

fn dims_text(d: &[i64]) -> String {
    let parts: Vec<String> = d
        .iter()
        .map(|&x| if x < 0 { "?".into() } else { x.to_string() })
        .collect();
    format!("[{}]", parts.join(", "))
}

impl GraphInner {
    fn fail(&self, tensor_problem: bool, message: String) -> BackendError {
        let message = format!("{}: wasi-nn graph `{}`: {message}", self.plugin, self.graph);
        (self.watch.log)(&self.plugin, LogLevel::Warn, &message);
        *lock(&self.watch.last_error) = Some(message.clone());
        if tensor_problem {
            BackendError::UnsupportedTensorType(message)
        } else {
            BackendError::BackendAccess(wasmtime::Error::msg(message))
        }
    }

    /// Checks the inputs against the graph's declaration and the byte limit; returns them in
    /// the graph's input order.
    fn validate<'a>(&self, inputs: &'a [NamedTensor]) -> Result<Vec<&'a Tensor>, BackendError> {
        let mut by_name: HashMap<&str, &Tensor> = HashMap::new();
        for t in inputs {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                let names: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(self.fail(
                    true,
                    format!("has no input `{}` (its inputs: {})", t.name, names.join(", ")),
                ));
            }
            if by_name.insert(&t.name, &t.tensor).is_some() {
                return Err(self.fail(true, format!("input `{}` given twice", t.name)));
            }
        }
        let mut total: u64 = 0;
        let mut ordered = Vec::new();
        for spec in &self.inputs {
            let Some(t) = by_name.get(spec.name.as_str()) else {
                return Err(self.fail(true, format!("input `{}` is missing", spec.name)));
            };
            let what = format!("input `{}`", spec.name);
            if t.ty != spec.ty {
                return Err(self.fail(
                    true,
                    format!(
                        "{what} must be {} {}, got {}",
                        type_name(spec.ty),
                        dims_text(&spec.dims),
                        type_name(t.ty)
                    ),
                ));
            }
            if t.dimensions.len() != spec.dims.len() {
                return Err(self.fail(
                    true,
                    format!(
                        "{what} must have rank {} ({}), got rank {} {:?}",
                        spec.dims.len(),
                        dims_text(&spec.dims),
                        t.dimensions.len(),
                        t.dimensions
                    ),
                ));
            }
            for (i, (&want, &got)) in spec.dims.iter().zip(&t.dimensions).enumerate() {
                if want >= 0 && want != got as i64 {
                    return Err(self.fail(
                        true,
                        format!(
                            "{what} dimension {i} must be {want} ({}), got {got}",
                            dims_text(&spec.dims)
                        ),
                    ));
                }
            }
            let bytes = t
                .dimensions
                .iter()
                .try_fold(elem_bytes(t.ty), |acc, &d| acc.checked_mul(d as u64));
            let limit = self.max_bytes;
            let too_large = |b: String| {
                self.fail(
                    true,
                    format!(
                        "{what} {:?} {} is {b}, more than the limit of {limit} bytes (`max_tensor_mib`)",
                        t.dimensions,
                        type_name(t.ty)
                    ),
                )
            };
            let Some(bytes) = bytes else {
                return Err(too_large("beyond 2^64 bytes".into()));
            };
            total = total.saturating_add(bytes);
            if bytes > limit || total > limit {
                return Err(too_large(format!("{bytes} bytes (all inputs: {total})")));
            }
            if bytes != t.data.len() as u64 {
                return Err(self.fail(
                    true,
                    format!(
                        "{what} {:?} {} needs {bytes} bytes of data, got {}",
                        t.dimensions,
                        type_name(t.ty),
                        t.data.len()
                    ),
                ));
            }
            ordered.push(*t);
        }
        Ok(ordered)
    }

    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let ordered = self.validate(&inputs)?;
        let ort_err = |e: ort::Error| self.fail(false, format!("ONNX Runtime: {e}"));
        let allocator = Allocator::default();
        let mut values = Vec::with_capacity(ordered.len());
        for (spec, t) in self.inputs.iter().zip(&ordered) {
            let shape: Vec<i64> = t.dimensions.iter().map(|&d| d as i64).collect();
            let mut v = DynTensor::new(&allocator, to_ort(t.ty), shape).map_err(ort_err)?;
            if !t.data.is_empty() {
                let ptr = v.data_ptr_mut().cast::<u8>();
                // SAFETY: the tensor was just allocated on the CPU for exactly these dimensions
                // and type, which `validate` checked to be `t.data.len()` bytes.
                unsafe { std::ptr::copy_nonoverlapping(t.data.as_ptr(), ptr, t.data.len()) };
            }
            values.push((spec.name.clone(), v));
        }
        let Some(remaining) = self.watch.remaining() else {
            return Err(self.past_deadline());
        };
        let options = Arc::new(RunOptions::new().map_err(ort_err)?);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = {
            let options = options.clone();
            std::thread::spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(remaining) {
                    let _ = options.terminate();
                    return true;
                }
                false
            })
        };
        let mut session = lock(&self.session);
        let result = session.run_with_options(values, &*options);
        let _ = done_tx.send(());
        let terminated = watchdog.join().unwrap_or(true);
        if terminated || self.watch.remaining().is_none() {
            drop(result);
            return Err(self.past_deadline());
        }
        let outputs = result.map_err(ort_err)?;
        let mut out = Vec::new();
        let mut total: u64 = 0;
        for spec in &self.outputs {
            let Some(v) = outputs.get(spec.name.as_str()) else {
                return Err(self.fail(false, format!("ONNX Runtime returned no output `{}`", spec.name)));
            };
            let ValueType::Tensor { ty, shape, .. } = v.dtype() else {
                return Err(self.fail(false, format!("output `{}` is not a tensor", spec.name)));
            };
            let Some(wty) = from_ort(*ty) else {
                return Err(self.fail(false, format!("output `{}` has type {ty:?}, which wasi-nn cannot carry", spec.name)));
            };
            let n: u64 = shape.iter().map(|&d| d.max(0) as u64).product();
            let bytes = n * elem_bytes(wty);
            total += bytes;
            if total > self.max_bytes {
                return Err(self.fail(
                    true,
                    format!(
                        "outputs reach {total} bytes, more than the limit of {} bytes (`max_tensor_mib`)",
                        self.max_bytes
                    ),
                ));
            }
            let tensor = v
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(ort_err)?;
            let ptr = tensor.data_ptr().cast::<u8>();
            let data = if bytes == 0 || ptr.is_null() {
                Vec::new()
            } else {
                // SAFETY: a CPU tensor of `n` elements of `wty` holds `bytes` bytes at `ptr`.
                unsafe { std::slice::from_raw_parts(ptr, bytes as usize) }.to_vec()
            };
            let dims = shape
                .iter()
                .map(|&d| u32::try_from(d))
                .collect::<Result<Vec<u32>, _>>()
                .map_err(|_| self.fail(false, format!("output `{}` has a dimension beyond u32", spec.name)))?;
            out.push(NamedTensor {
                name: spec.name.clone(),
                tensor: Tensor::new(dims, wty, data),
            });
        }
        Ok(out)
    }

    fn past_deadline(&self) -> BackendError {
        let message = format!(
            "{}: wasi-nn graph `{}` did not finish within the per-call deadline of {} ms (`deadline_ms`)",
            self.plugin,
            self.graph,
            self.watch.deadline.as_millis()
        );
        *lock(&self.watch.hit) = Some(message.clone());
        (self.watch.log)(&self.plugin, LogLevel::Warn, &message);
        BackendError::BackendAccess(wasmtime::Error::msg(message))
    }
}

impl BackendExecutionContext for OrtContext {
    fn set_input(&mut self, _id: Id, _tensor: &Tensor) -> Result<(), BackendError> {
        Err(self.0.fail(false, "set-input (the witx API) is not offered; use compute with named tensors".into()))
    }

    fn get_output(&mut self, _id: Id) -> Result<Tensor, BackendError> {
        Err(self.0.fail(false, "get-output (the witx API) is not offered; use compute with named tensors".into()))
    }

    fn compute(&mut self, inputs: Option<Vec<NamedTensor>>) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        match inputs {
            Some(inputs) => self.0.run(inputs).map(Some),
            None => Err(self.0.fail(false, "compute without inputs (the witx API) is not offered".into())),
        }
    }
}

struct Granted(HashMap<String, Graph>);

impl GraphRegistry for Granted {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }
    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.0.get_mut(name)
    }
}

fn spec_of(o: &ort::value::Outlet) -> Result<Spec, String> {
    match o.dtype() {
        ValueType::Tensor { ty, shape, .. } => Ok(Spec {
            name: o.name().to_string(),
            ty: from_ort(*ty).ok_or_else(|| format!("`{}` has type {ty:?}, which wasi-nn cannot carry", o.name()))?,
            dims: shape.iter().copied().collect(),
        }),
        other => Err(format!("`{}` is not a tensor ({other:?})", o.name())),
    }
}

/// Loads the granted models of one plugin (each `<dir>/model.onnx`) into a wasi-nn context whose
/// only graphs are those, by name.
pub(crate) fn granted_context(
    plugin: &str,
    models: &BTreeMap<String, PathBuf>,
    max_bytes: u64,
    watch: &Arc<CallWatch>,
) -> Result<(WasiNnCtx, Vec<ModelInfo>), PluginError> {
    let grant_err = |message: String| PluginError::Grant {
        plugin: plugin.to_string(),
        grant: "models",
        message,
    };
    let mut graphs = HashMap::new();
    let mut infos = Vec::new();
    if !models.is_empty() {
        let env = environment().map_err(grant_err)?;
        for (name, dir) in models {
            // The name is also a directory name in the guest (`/models/<name>`).
            if name.is_empty() || name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(grant_err(format!("`{name}` is not a model name: use letters, digits, `-`, `_` and `.` (not first): it is the guest's directory `/models/<name>`")));
            }
            let path = dir.join("model.onnx");
            let bytes = std::fs::read(&path)
                .map_err(|e| grant_err(format!("`{name}`: cannot read {}: {e}", path.display())))?;
            let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            let session = build_session(&env, &bytes)
                .map_err(|e| grant_err(format!("`{name}`: {} is not a model ONNX Runtime loads: {e}", path.display())))?;
            let specs = |outlets: &[ort::value::Outlet]| {
                outlets.iter().map(spec_of).collect::<Result<Vec<_>, _>>()
            };
            let inputs = specs(session.inputs()).map_err(|m| grant_err(format!("`{name}`: input {m}")))?;
            let outputs = specs(session.outputs()).map_err(|m| grant_err(format!("`{name}`: output {m}")))?;
            let inner = GraphInner {
                plugin: plugin.to_string(),
                graph: name.clone(),
                session: Mutex::new(session),
                inputs,
                outputs,
                max_bytes,
                watch: watch.clone(),
            };
            let graph: Box<dyn BackendGraph> = Box::new(OrtGraph(Arc::new(inner)));
            graphs.insert(name.clone(), Graph::from(graph));
            infos.push(ModelInfo { name: name.clone(), path, sha256 });
        }
    }
    Ok((WasiNnCtx::new([], Registry::from(Granted(graphs))), infos))
}

/// An ONNX Runtime session of the model file at `path`, in the same environment and with the
/// same settings (one thread, deterministic kernels) as a plugin's granted graphs: for native
/// comparisons and benchmarks.
pub fn native_session(path: &std::path::Path) -> Result<Session, String> {
    let env = environment()?;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    build_session(&env, &bytes)
}

fn build_session(env: &ort::environment::Environment, bytes: &[u8]) -> Result<Session, String> {
    let b = Session::builder(env).map_err(|e| e.to_string())?;
    let b = b.with_intra_threads(1).map_err(|e| e.to_string())?;
    let b = b.with_inter_threads(1).map_err(|e| e.to_string())?;
    let b = b.with_parallel_execution(false).map_err(|e| e.to_string())?;
    let mut b = b.with_deterministic_compute(true).map_err(|e| e.to_string())?;
    b.commit_from_memory(bytes).map_err(|e| e.to_string())
}

/// Replaces wasi-nn's `graph.load` (model bytes from the guest) with a trap naming the plugin.
pub(crate) fn refuse_load<T: 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    plugin_name: fn(&T) -> &str,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut graph = linker.instance(&format!("wasi:nn/graph@{WASI_NN_VERSION}"))?;
    graph.func_new("load", move |store, _ty, _params, _results| {
        Err(wasmtime::Error::msg(format!(
            "{}: wasi-nn `load` of model bytes is refused: a plugin gets only the models its run grants (`grants.models` of training_plugin_config), through `load-by-name`",
            plugin_name(store.data())
        )))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}
