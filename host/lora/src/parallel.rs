//! The data-parallel world of this process: alone (every ordinary run), or one of the ranks
//! `mpirun` started (cargo feature `mpi`). The run trains the same way in both; what differs is
//! who writes: rank 0 holds the workspace lock and writes checkpoints, metrics, trackers and
//! outputs, the other ranks only train.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use lora_engine::collective::{self, Collective, Single};

/// Set when this process is a rank other than 0 of a data-parallel run: it writes no outputs
/// (the KFP executor output included).
static SECONDARY: AtomicBool = AtomicBool::new(false);

/// Whether this process is a data-parallel rank other than 0.
pub fn secondary_rank() -> bool {
    SECONDARY.load(Ordering::SeqCst)
}

/// Joins the world this process was started in, which the parameters were resolved for.
pub fn join(params: &lora_params::ResolvedParams) -> Result<Box<dyn Collective>> {
    let c: Box<dyn Collective> = world()?;
    if c.world() as u64 != params.world_size {
        anyhow::bail!("the parameters were resolved for {} data-parallel processes, this run has {}", params.world_size, c.world());
    }
    SECONDARY.store(c.rank() != 0, Ordering::SeqCst);
    Ok(c)
}

#[cfg(feature = "mpi")]
fn world() -> Result<Box<dyn Collective>> {
    Ok(match lora_params::launched_world_size() {
        Some(_) => Box::new(collective::mpi::Mpi::init()?),
        None => Box::new(Single),
    })
}

#[cfg(not(feature = "mpi"))]
fn world() -> Result<Box<dyn Collective>> {
    match lora_params::launched_world_size() {
        Some(n) if n > 1 => anyhow::bail!(
            "this process was started by mpirun as one of {n} data-parallel processes, but this lora binary was built without the `mpi` cargo feature (cargo build -p lora --features mpi): every process would train alone"
        ),
        _ => Ok(Box::new(Single)),
    }
}
