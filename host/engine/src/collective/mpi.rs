//! [`Collective`] over Open MPI (the `mpi` crate), for processes started by `mpirun`.
//!
//! Reductions are `MPI_Reduce` to rank 0 followed by `MPI_Bcast`, not `MPI_Allreduce`: the MPI
//! standard only recommends that every rank of an all-reduce get the same bits (recursive
//! doubling on 3 ranks sums in a different order per rank), and data parallel needs them equal,
//! or the ranks' adapters drift apart. For a fixed world size and length Open MPI picks the same
//! algorithm every time, so a rerun gives the same bits.

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::Collective;
use crate::error::{EngineError, Result};

/// The MPI world of this process. Dropping it finalizes MPI (keep it for the whole run).
pub struct Mpi {
    world: SimpleCommunicator,
    _universe: Universe,
}

impl Mpi {
    /// Joins the MPI world (of one process, when `mpirun` did not start this one).
    pub fn init() -> Result<Mpi> {
        let universe = mpi::initialize()
            .ok_or_else(|| EngineError::Collective("MPI was already initialized in this process".into()))?;
        let world = universe.world();
        Ok(Mpi { world, _universe: universe })
    }

    fn reduce_then_broadcast<T>(&self, buf: &mut [T]) -> Result<()>
    where
        T: mpi::datatype::Equivalence + Copy,
        [T]: mpi::datatype::BufferMut,
    {
        let root = self.world.process_at_rank(0);
        if self.world.rank() == 0 {
            let send = buf.to_vec();
            root.reduce_into_root(&send[..], buf, SystemOperation::sum());
        } else {
            root.reduce_into(&buf[..], SystemOperation::sum());
        }
        root.broadcast_into(buf);
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce_then_broadcast(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce_then_broadcast(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(EngineError::Collective(format!("broadcast from rank {root} in a world of {}", self.world())));
        }
        let r = self.world.process_at_rank(root as i32);
        let mut len = [buf.len() as u64];
        r.broadcast_into(&mut len[..]);
        buf.resize(len[0] as usize, 0);
        // Open MPI refuses the dangling pointer of an empty Vec (MPI_ERR_ARG).
        if !buf.is_empty() {
            r.broadcast_into(&mut buf[..]);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
}
