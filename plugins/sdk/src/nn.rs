//! Models through `wasi:nn` (feature `nn`, preprocessors only): typed tensors in and out, and
//! graphs by the name the run grants them under.
//!
//! The host gives a plugin only the models of its `grants.models` (name → a directory holding
//! `model.onnx`), preloaded; [`Graph::by_name`] opens one. `wasi:nn`'s `load` of model bytes
//! is refused by the host. The granted directory is also readable, read-only, at
//! [`model_dir`]`(name)` (`/models/<name>`), for what a model needs beside its graph (a
//! vocabulary, labels).
//!
//! ```ignore
//! let g = lora_plugin::nn::Graph::by_name("langid")?;
//! let out = g.run(&[("ids", Input::i64(&[3], &[5, 7, 0]))])?;
//! let logp: Vec<f32> = out.get("logp")?.f32()?;
//! ```

/// The raw `wasi:nn` bindings (wit-bindgen), for what the typed API does not cover.
pub mod raw {
    wit_bindgen::generate!({ path: "wit-nn", world: "nn-user", generate_all });
}

use raw::wasi::nn::{errors, graph, tensor};
pub use tensor::TensorType;

/// Where the host shows granted model `name`'s directory, read-only.
pub fn model_dir(name: &str) -> String {
    format!("/models/{name}")
}

fn describe(what: &str, e: errors::Error) -> String {
    format!("{what}: wasi-nn error {:?}: {}", e.code(), e.data())
}

/// One input tensor: dimensions and little-endian element bytes of one type.
pub struct Input {
    dims: Vec<u32>,
    ty: TensorType,
    bytes: Vec<u8>,
}

fn le_bytes<T: Copy, const N: usize>(data: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    data.iter().flat_map(|&x| f(x)).collect()
}

impl Input {
    /// An `i64` tensor (token ids, word ids).
    pub fn i64(dims: &[u32], data: &[i64]) -> Input {
        Input { dims: dims.to_vec(), ty: TensorType::I64, bytes: le_bytes(data, i64::to_le_bytes) }
    }
    /// An `i32` tensor.
    pub fn i32(dims: &[u32], data: &[i32]) -> Input {
        Input { dims: dims.to_vec(), ty: TensorType::I32, bytes: le_bytes(data, i32::to_le_bytes) }
    }
    /// An `f32` tensor.
    pub fn f32(dims: &[u32], data: &[f32]) -> Input {
        Input { dims: dims.to_vec(), ty: TensorType::Fp32, bytes: le_bytes(data, f32::to_le_bytes) }
    }
    /// A `u8` tensor.
    pub fn u8(dims: &[u32], data: &[u8]) -> Input {
        Input { dims: dims.to_vec(), ty: TensorType::U8, bytes: data.to_vec() }
    }
}

/// One output tensor as the graph returned it.
pub struct Output {
    pub name: String,
    pub dims: Vec<u32>,
    pub ty: TensorType,
    pub bytes: Vec<u8>,
}

fn from_le<T, const N: usize>(o: &Output, want: TensorType, f: impl Fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    if o.ty != want {
        return Err(format!("output `{}` is {:?}, not {want:?}", o.name, o.ty));
    }
    if o.bytes.len() % N != 0 {
        return Err(format!("output `{}` has {} bytes, not a whole number of {N}-byte elements", o.name, o.bytes.len()));
    }
    Ok(o.bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks of N"))).collect())
}

impl Output {
    /// The elements as `f32` (an error if the tensor is another type).
    pub fn f32(&self) -> Result<Vec<f32>, String> {
        from_le(self, TensorType::Fp32, f32::from_le_bytes)
    }
    /// The elements as `i64`.
    pub fn i64(&self) -> Result<Vec<i64>, String> {
        from_le(self, TensorType::I64, i64::from_le_bytes)
    }
    /// The elements as `i32`.
    pub fn i32(&self) -> Result<Vec<i32>, String> {
        from_le(self, TensorType::I32, i32::from_le_bytes)
    }
}

/// The outputs of one [`Graph::run`], by name.
pub struct Outputs(pub Vec<Output>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Output, String> {
        self.0.iter().find(|o| o.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.0.iter().map(|o| o.name.as_str()).collect();
            format!("the graph returned no output `{name}` (it returned {have:?})")
        })
    }
}

/// A granted graph with one execution context.
pub struct Graph {
    name: String,
    ctx: raw::wasi::nn::inference::GraphExecutionContext,
    _graph: graph::Graph,
}

impl Graph {
    /// Opens the graph the run grants as `name`.
    pub fn by_name(name: &str) -> Result<Graph, String> {
        let g = graph::load_by_name(name).map_err(|e| describe(&format!("graph `{name}`"), e))?;
        let ctx = g.init_execution_context().map_err(|e| describe(&format!("graph `{name}`"), e))?;
        Ok(Graph { name: name.to_string(), ctx, _graph: g })
    }

    /// Runs the graph on named inputs; the host checks every tensor against the graph's inputs.
    pub fn run(&self, inputs: &[(&str, Input)]) -> Result<Outputs, String> {
        let named = inputs
            .iter()
            .map(|(n, i)| (n.to_string(), tensor::Tensor::new(&i.dims, i.ty, &i.bytes)))
            .collect();
        let out = self.ctx.compute(named).map_err(|e| describe(&format!("graph `{}`", self.name), e))?;
        Ok(Outputs(
            out.into_iter()
                .map(|(name, t)| Output { name, dims: t.dimensions(), ty: t.ty(), bytes: t.data() })
                .collect(),
        ))
    }
}
