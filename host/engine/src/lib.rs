//! `lora-engine`: Llama-family LoRA forward/backward and optimizer; CPU and CUDA backends.
