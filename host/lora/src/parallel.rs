//! The data-parallel world of this process: alone (every ordinary run), one of the ranks
//! `mpirun` started (cargo feature `mpi`), or a worker of a Kubeflow Trainer TrainJob (the
//! `PET_*` variables of its torch runtime; GPUs only: NCCL, its id handed out by
//! [`crate::rendezvous`]). The run trains the same way in both; what differs is
//! who writes: rank 0 holds the workspace lock and writes checkpoints, metrics, trackers and
//! outputs, the other ranks only train.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use lora_engine::Device;
use lora_engine::collective::{self, Collective, Single};

/// Set when this process is a rank other than 0 of a data-parallel run: it writes no outputs
/// (the KFP executor output included).
static SECONDARY: AtomicBool = AtomicBool::new(false);

/// Whether this process is a data-parallel rank other than 0.
pub fn secondary_rank() -> bool {
    SECONDARY.load(Ordering::SeqCst)
}

/// `training_resource_num_procs_per_worker` N > 1 in a process no launcher started: becomes
/// `mpirun -np N` of this same command (this process is replaced, so mpirun owns the ranks and
/// nothing is left behind when it ends; a failing rank stops the others and mpirun names it).
/// Returns when there is nothing to launch. Without the `mpi` feature the parameter is refused
/// when it is resolved.
#[cfg(feature = "mpi")]
pub fn launch(params: &lora_params::Params, args: &[std::ffi::OsString]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if lora_params::launched_world_size().is_some() {
        return Ok(());
    }
    let procs = params.training_resource_num_procs_per_worker.trim();
    let n = match procs.parse::<u64>() {
        Ok(n) => n,
        // Like torchrun's `--nproc-per-node auto`: one process per visible GPU.
        // (A TrainJob worker's count is the runtime's PET_NPROC_PER_NODE.)
        Err(_) if procs == "auto" && std::env::var_os("PET_NNODES").is_none() => {
            auto_procs(&params.training_device, collective::nccl::visible_gpus)
        }
        Err(_) => return Ok(()), // refused by name when the parameters are resolved
    };
    if n <= 1 {
        return Ok(());
    }
    let exe = std::env::current_exe().context("training_resource_num_procs_per_worker: finding this lora binary to start its processes")?;
    let mut cmd = std::process::Command::new("mpirun");
    // Unbound: each rank's thread pool uses every core it is given (Open MPI binds 2 ranks to one
    // core each by default). Oversubscribed: more ranks than cores is slow, not an error.
    cmd.args(["--bind-to", "none", "--oversubscribe", "-np", &n.to_string()]);
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false) {
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg(exe).args(args.iter().skip(1));
    eprintln!("lora: training_resource_num_procs_per_worker={n}: starting {n} processes with mpirun");
    let e = cmd.exec();
    Err(anyhow::Error::new(e).context(format!(
        "training_resource_num_procs_per_worker={n}: the processes are started by mpirun, which could not run (Debian: apt-get install openmpi-bin)"
    )))
}

/// `training_resource_num_procs_per_worker=auto` in a process no launcher started: one process
/// per visible GPU when the run trains on CUDA (`training_device` cuda or auto), else 1 (the
/// CPU trains in one process, its threads use every core). `gpus` counts the visible GPUs.
pub fn auto_procs(device: &str, gpus: impl Fn() -> usize) -> u64 {
    match device.trim() {
        "cuda" | "auto" => gpus().max(1) as u64,
        _ => 1,
    }
}

#[cfg(not(feature = "mpi"))]
pub fn launch(params: &lora_params::Params, _: &[std::ffi::OsString]) -> Result<()> {
    if lora_params::launched_world_size().is_none()
        && std::env::var_os("PET_NNODES").is_none()
        && params.training_resource_num_procs_per_worker.trim() == "auto"
        && let n @ 2.. = auto_procs(&params.training_device, collective::nccl::visible_gpus)
    {
        eprintln!(
            "lora: training_resource_num_procs_per_worker=auto: {n} GPUs are visible, but this lora is built without the `mpi` cargo feature that starts one process per GPU: training in one process, on one GPU"
        );
    }
    Ok(())
}

/// The GPU of this process on its node: `LOCAL_RANK` (torchrun, Kubeflow Trainer), else the
/// local rank `mpirun` gave it (`OMPI_COMM_WORLD_LOCAL_RANK`), else 0.
pub fn local_gpu() -> Result<usize> {
    if std::env::var_os("LOCAL_RANK").is_some() || lora_params::launched_world_size().is_none() {
        return Ok(lora_engine::cuda::local_rank_ordinal()?);
    }
    match std::env::var("OMPI_COMM_WORLD_LOCAL_RANK") {
        Ok(v) => v.trim().parse().with_context(|| format!("OMPI_COMM_WORLD_LOCAL_RANK={v:?} is not a non-negative integer")),
        Err(_) => Ok(0),
    }
}

/// How long ranks wait for each other at the rendezvous (pods of a TrainJob start in any order,
/// each pulling its image): torchrun's default join timeout.
const RENDEZVOUS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(900);

fn worker_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<crate::rendezvous::WorkerEnv>> {
    crate::rendezvous::WorkerEnv::from_vars(var, collective::nccl::visible_gpus)
}

/// How many data-parallel processes this run has, known before its parameters are resolved:
/// mpirun's count, a TrainJob worker's `PET_NNODES` × `PET_NPROC_PER_NODE`, else 1. `env`: the
/// process environment as the CLI read it.
pub fn planned_world(env: &[(String, String)]) -> Result<u64> {
    if let Some(n) = lora_params::launched_world_size() {
        return Ok(n as u64);
    }
    let var = |k: &str| env.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Ok(worker_env(var)?.map_or(1, |w| w.world as u64))
}

/// A TrainJob worker's world: rank 0 listens, makes the NCCL id and hands it out once every rank
/// has joined with the same parameters; then NCCL. None when this is not a worker of several.
fn trainjob_world(params: &lora_params::ResolvedParams, device: Device) -> Result<Option<Box<dyn Collective>>> {
    let Some(w) = worker_env(|k| std::env::var(k).ok())? else { return Ok(None) };
    if w.world == 1 {
        return Ok(None);
    }
    let Device::Cuda(_) = device else {
        anyhow::bail!(
            "this process is rank {} of a TrainJob of {} processes (PET_NNODES × PET_NPROC_PER_NODE), which train on GPUs over NCCL, but training_device is {device}: run the TrainJob with GPUs, or several CPU processes under mpirun (a lora built with the `mpi` feature)",
            w.rank,
            w.world
        );
    };
    // What every rank must agree on before any work: the parameters as used (secrets hidden).
    let mut used = params.params_as_used();
    crate::redact::params(&mut used);
    let hash = crate::manifest::canonical_hash(&serde_json::Value::Object(used));
    let id = if w.rank == 0 {
        let listener = crate::rendezvous::listen(w.master_port)?;
        let id = collective::nccl::Nccl::unique_id()?;
        crate::rendezvous::serve(listener, w.world, &hash, &id, RENDEZVOUS_DEADLINE)?;
        id
    } else {
        crate::rendezvous::join(&format!("{}:{}", w.master_addr, w.master_port), w.rank, w.world, &hash, RENDEZVOUS_DEADLINE)?
    };
    let nccl = collective::nccl::Nccl::new(w.local_rank, w.rank, w.world, id).with_context(|| format!("rank {} joining NCCL on GPU {}", w.rank, w.local_rank))?;
    Ok(Some(Box::new(nccl)))
}

/// Joins the world this process was started in, which the parameters were resolved for, on
/// `device`: on GPUs the gradients go over NCCL.
pub fn join(params: &lora_params::ResolvedParams, device: Device) -> Result<Box<dyn Collective>> {
    let c: Box<dyn Collective> = match trainjob_world(params, device)? {
        Some(c) => c,
        None => world(device)?,
    };
    if c.world() as u64 != params.world_size {
        anyhow::bail!("the parameters were resolved for {} data-parallel processes, this run has {}", params.world_size, c.world());
    }
    SECONDARY.store(c.rank() != 0, Ordering::SeqCst);
    Ok(c)
}

#[cfg(feature = "mpi")]
fn world(device: Device) -> Result<Box<dyn Collective>> {
    if lora_params::launched_world_size().is_none() {
        return Ok(Box::new(Single));
    }
    let mpi = collective::mpi::Mpi::init()?;
    match device {
        Device::Cuda(ordinal) if mpi.world() > 1 => Ok(Box::new(NcclOverMpi::join(mpi, ordinal)?)),
        _ => Ok(Box::new(mpi)),
    }
}

/// NCCL for the reductions, with its id handed out over MPI (which stays up until the end: MPI
/// must be finalized after the last NCCL call).
#[cfg(feature = "mpi")]
struct NcclOverMpi {
    nccl: collective::nccl::Nccl,
    mpi: collective::mpi::Mpi,
}

#[cfg(feature = "mpi")]
impl NcclOverMpi {
    fn join(mpi: collective::mpi::Mpi, ordinal: usize) -> Result<Self> {
        let mut id = if mpi.rank() == 0 { collective::nccl::Nccl::unique_id()?.to_vec() } else { Vec::new() };
        mpi.broadcast_bytes(&mut id, 0)?;
        let id: [u8; 128] = id.try_into().map_err(|v: Vec<u8>| anyhow::anyhow!("rank 0 sent an NCCL id of {} bytes, not 128", v.len()))?;
        let nccl = collective::nccl::Nccl::new(ordinal, mpi.rank(), mpi.world(), id)
            .with_context(|| format!("rank {} joining NCCL on GPU {ordinal}", mpi.rank()))?;
        Ok(NcclOverMpi { nccl, mpi })
    }
}

#[cfg(feature = "mpi")]
impl Collective for NcclOverMpi {
    fn rank(&self) -> usize {
        self.nccl.rank()
    }
    fn world(&self) -> usize {
        self.nccl.world()
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> lora_engine::error::Result<()> {
        self.nccl.all_reduce_sum_f32(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> lora_engine::error::Result<()> {
        self.nccl.all_reduce_sum_f64(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> lora_engine::error::Result<()> {
        self.nccl.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> lora_engine::error::Result<()> {
        self.nccl.barrier()
    }
    fn abort(&self, code: i32) {
        self.nccl.abort(code);
        self.mpi.abort(code)
    }
}

#[cfg(not(feature = "mpi"))]
fn world(_: Device) -> Result<Box<dyn Collective>> {
    match lora_params::launched_world_size() {
        Some(n) if n > 1 => anyhow::bail!(
            "this process was started by mpirun as one of {n} data-parallel processes, but this lora binary was built without the `mpi` cargo feature (cargo build -p lora --features mpi): every process would train alone"
        ),
        _ => Ok(Box::new(Single)),
    }
}

#[cfg(test)]
mod tests {
    use super::auto_procs;

    #[test]
    fn auto_is_one_process_per_visible_gpu_when_training_on_cuda_else_one() {
        assert_eq!(auto_procs("cuda", || 4), 4);
        assert_eq!(auto_procs("auto", || 8), 8);
        // No GPU: auto trains on the CPU, in one process (cuda then fails by itself, clearly).
        assert_eq!(auto_procs("auto", || 0), 1);
        assert_eq!(auto_procs("cuda", || 0), 1);
        assert_eq!(auto_procs("cpu", || 8), 1);
    }
}
