//! Data parallel's communication: the few collective operations the trainer needs between the
//! processes of one run (one per GPU, or several CPU processes under `mpirun`).
//!
//! [`Single`] is the world of one process every ordinary run uses: its operations do nothing,
//! so a run that is not data parallel pays nothing. [`mpi::Mpi`] (cargo feature `mpi`) is Open
//! MPI, which the tests use to run the real data-parallel code on several CPU processes;
//! `nccl::Nccl` (with the CUDA backend) is NCCL, one process per GPU. The
//! contract every implementation keeps: after a reduction every rank holds the same bits, so
//! the optimizer steps of all ranks stay identical without ever comparing adapters.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use crate::error::Result;

/// The operations between the ranks of one run. Every rank must call the same operations in the
/// same order with buffers of the same length (a collective call is a meeting point).
pub trait Collective {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn world(&self) -> usize;
    /// What implements it, for logs and the run manifest (`single`, `mpi`, `nccl`).
    fn name(&self) -> &'static str;
    /// Replaces `buf` on every rank with its element-wise sum over the ranks; every rank gets the
    /// same bits, and the same inputs give the same bits on every call.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_reduce_sum_f32`], for f64.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` on every rank with rank `root`'s bytes (lengths may differ before).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Stops the other ranks: a rank that fails calls this, so that they do not wait in their
    /// next collective call forever. MPI ends every rank's process with `code`; NCCL aborts the
    /// communicator, so the others' calls fail; a world of one has nothing to stop. The caller
    /// still exits with its error.
    fn abort(&self, code: i32);
}

/// The world of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: i32) {}
}
