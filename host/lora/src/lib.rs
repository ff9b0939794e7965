//! `lora`: the commands, run orchestration and outputs of the lora pipeline step.
pub mod schedule;
pub mod hub;
pub mod oci;
pub mod cli;
pub mod tools;
pub mod component;
pub mod dry_run;
pub mod kfp;
pub mod request;
pub mod report;
pub mod chart;
pub mod manifest;
pub mod checkpoint;
pub mod fs;
pub mod redact;
pub mod run;
pub mod trackers;
