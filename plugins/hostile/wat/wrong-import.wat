;; Core module for wrong-import.wit.
(module
  (import "lora:plugin/host@0.1.0" "log" (func (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) unreachable)
  (func (export "lora:plugin/preprocess@0.1.0#configure") (param i32 i32) (result i32) unreachable)
)
