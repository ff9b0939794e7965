;; Core module for unknown-wasi.wit.
(module
  (import "wasi:frobnicate/thing@0.2.0" "poke" (func))
  (memory (export "memory") 1)
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) unreachable)
  (func (export "lora:plugin/preprocess@0.1.0#configure") (param i32 i32) (result i32) unreachable)
)
