//! Features the reference accepts that this build does not have. Each entry refuses a
//! parameter by name with the reason; when a feature lands, its entry goes (one line).

use crate::defs::Params;

/// One feature that is not built.
pub struct Unavailable {
    pub param: &'static str,
    /// True when the parameter's value asks for the missing feature.
    pub requested: fn(&Params) -> bool,
    pub reason: &'static str,
}

fn yes(b: Option<bool>) -> bool {
    b == Some(true)
}

/// The table. Order is the order of messages.
pub static UNAVAILABLE: &[Unavailable] = &[
    Unavailable {
        param: "training_resource_num_workers",
        requested: |p| p.training_resource_num_workers > 1,
        reason: "more than one worker is a TrainJob that `lora kfp` launches; `lora train` runs in one pod, so use 1 (a worker of a TrainJob of that many pods, PET_NNODES, is accepted)",
    },
    Unavailable {
        param: "training_resource_num_procs_per_worker",
        requested: |p| {
            p.training_resource_num_procs_per_worker
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n > 1)
        },
        reason: "more than one process per worker needs the multi-process launcher, which is not built: start them with `mpirun -np N lora train ...` (lora built with the `mpi` cargo feature), or use auto or 1",
    },
    Unavailable {
        param: "training_enable_model_splitting",
        requested: |p| yes(p.training_enable_model_splitting),
        reason: "splitting the model across GPUs is not built; leave it unset or false",
    },
    Unavailable {
        param: "training_fp16",
        requested: |p| yes(p.training_fp16),
        reason: "fp16 training is not built: we train in bf16 on GPU (training_bf16) and fp32 on CPU; leave it unset or false",
    },
];
