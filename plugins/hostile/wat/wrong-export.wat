;; Core module for wrong-export.wit.
(module
  (memory (export "memory") 1)
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) unreachable)
  (func (export "lora:plugin/preprocess@0.1.0#configure") (param i32 i32) (result i32) unreachable)
  (func (export "lora:plugin/preprocess@0.1.0#process-batch") (param i64) (result i32) unreachable)
)
