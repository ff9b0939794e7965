//! `lora`: the commands, run orchestration and outputs of the lora pipeline step.
pub mod schedule;
pub mod hub;
