//! `lora-plugins`: the wasmtime runtime that turns WebAssembly components into `lora-api` traits.
