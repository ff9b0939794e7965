//! `lora train` as a worker of a Kubeflow Trainer TrainJob: the `PET_*` variables of the torch
//! runtime, exactly as it sets them. Several ranks need GPUs (NCCL): here the CPU refuses them
//! clearly, and a world of one trains as an ordinary run. The rendezvous itself is tested on
//! 127.0.0.1 in `host/lora/src/rendezvous.rs`.

use super::common::*;
use lora_engine::DType;

fn pet(c: &mut std::process::Command, nnodes: &str, nproc: &str, node_rank: &str) {
    c.env("PET_NNODES", nnodes)
        .env("PET_NPROC_PER_NODE", nproc)
        .env("PET_NODE_RANK", node_rank)
        .env("PET_MASTER_ADDR", "127.0.0.1")
        .env("PET_MASTER_PORT", "29500")
        .env_remove("LOCAL_RANK");
}

#[test]
fn a_trainjob_worker_of_several_ranks_on_the_cpu_is_refused_naming_its_rank() {
    let work = temp_dir("pet-cpu");
    let model = tiny_model(&work.join("base"), DType::F32);
    let mut c = train_cmd(&work, &model, &capitals(), &["--training-effective-batch-size", "8"]);
    pet(&mut c, "2", "1", "1");
    let out = c.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("rank 1 of a TrainJob of 2 processes") && log.contains("training_device is cpu"), "{log}");
    assert!(!work.join("out/model").exists(), "nothing is written");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_trainjob_worker_alone_trains_as_an_ordinary_run() {
    let work = temp_dir("pet-one");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = ["--training-effective-batch-size", "8", "--training-max-steps", "1"];
    let mut c = train_cmd(&work, &model, &capitals(), &args);
    pet(&mut c, "1", "1", "0");
    run_ok(c);
    let plain = temp_dir("pet-one-plain");
    run_ok(train_cmd(&plain, &model, &capitals(), &args));
    assert!(adapter_bytes(&work) == adapter_bytes(&plain));
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&plain);
}

#[test]
fn num_workers_is_accepted_only_in_a_worker_of_a_trainjob_of_that_many_pods() {
    let work = temp_dir("pet-workers");
    let model = tiny_model(&work.join("base"), DType::F32);
    let args = ["--training-effective-batch-size", "8", "--training-resource-num-workers", "2"];
    // PET_NNODES agrees: past the parameter check, to the worker's own (CPU: no NCCL) refusal.
    let mut c = train_cmd(&work, &model, &capitals(), &args);
    pet(&mut c, "2", "1", "1");
    let out = c.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(!log.contains("training_resource_num_workers"), "{log}");
    assert!(log.contains("rank 1 of a TrainJob of 2 processes"), "{log}");
    // Another count of pods, or no TrainJob at all: refused by name.
    for nnodes in [Some("3"), None] {
        let mut c = train_cmd(&work, &model, &capitals(), &args);
        match nnodes {
            Some(n) => pet(&mut c, n, "1", "1"),
            None => {
                c.env_remove("PET_NNODES");
            }
        }
        let out = c.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{log}");
        assert!(log.contains("training_resource_num_workers") && log.contains("a TrainJob that `lora kfp` launches"), "{nnodes:?}: {log}");
    }
    assert!(!work.join("out/model").exists(), "nothing is written");
    let _ = std::fs::remove_dir_all(&work);
}
