//! [`Collective`] over NCCL (cudarc's `nccl` module, loaded at run time), one process per GPU.
//!
//! The buffers the trainer reduces are host copies of the adapter gradients (a few MB for LoRA),
//! so this staging is simple: host → device, `ncclAllReduce` in place on a stream of its own,
//! device → host. NCCL's ring all-reduce ends with every rank holding the same bits.
//! The 128-byte `ncclUniqueId` must reach every rank before [`Nccl::new`]: rank 0 makes it with
//! [`Nccl::unique_id`] and hands it out (over MPI, or a rendezvous).

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::Collective;
use crate::error::{EngineError, Result};

fn err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Collective(format!("NCCL {what}: {e:?}"))
}

/// cudarc panics when libnccl is missing: check first. Its loader asks for `libnccl.so` (and
/// versioned names NCCL does not use), not the `libnccl.so.2` that NCCL packages install.
pub fn ensure_nccl() -> Result<()> {
    crate::cuda::ensure_driver()?;
    // SAFETY: only tries to dlopen libnccl by its candidate names; no symbol is called.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    Err(EngineError::Collective(
        "NCCL is needed for several GPUs, and libnccl.so could not be loaded: install NCCL (Debian/Ubuntu `libnccl2`, or \
         PyPI `nvidia-nccl-cu13`), and where it only ships `libnccl.so.2`, put a `libnccl.so` link to it in a folder on \
         LD_LIBRARY_PATH (cudarc loads it by that name)"
            .into(),
    ))
}

/// This rank's NCCL communicator over GPU `ordinal`.
pub struct Nccl {
    /// Taken by [`Collective::abort`] (dropping a cudarc `Comm` aborts it).
    comm: RefCell<Option<Comm>>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl Nccl {
    /// A new `ncclUniqueId` (rank 0 makes it; every rank passes it to [`Nccl::new`]).
    pub fn unique_id() -> Result<[u8; 128]> {
        ensure_nccl()?;
        let id = Id::new().map_err(|e| err("ncclGetUniqueId", e))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Joins the communicator `id` as `rank` of `world` on GPU `ordinal` (blocks until every rank
    /// has joined).
    pub fn new(ordinal: usize, rank: usize, world: usize, id: [u8; 128]) -> Result<Self> {
        ensure_nccl()?;
        if world == 0 || rank >= world {
            return Err(EngineError::Collective(format!("rank {rank} of a world of {world}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("context", e))?;
        let stream = ctx.new_stream().map_err(|e| err("stream", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(id.map(|b| b as _))).map_err(|e| err("ncclCommInitRank", e))?;
        Ok(Nccl { comm: RefCell::new(Some(comm)), stream, rank, world })
    }

    fn all_reduce<T>(&self, buf: &mut [T]) -> Result<()>
    where
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + Copy,
    {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm.borrow();
        let comm = comm.as_ref().ok_or_else(|| EngineError::Collective("the NCCL communicator was aborted".into()))?;
        let mut dev = self.stream.clone_htod(buf).map_err(|e| err("copy to the device", e))?;
        comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(|e| err("ncclAllReduce", e))?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| err("copy to the host", e))?;
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    fn broadcast<T>(&self, buf: &mut [T], root: usize) -> Result<()>
    where
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + Copy,
    {
        let comm = self.comm.borrow();
        let comm = comm.as_ref().ok_or_else(|| EngineError::Collective("the NCCL communicator was aborted".into()))?;
        let mut dev = self.stream.clone_htod(buf).map_err(|e| err("copy to the device", e))?;
        comm.broadcast_in_place(&mut dev, root as i32).map_err(|e| err("ncclBroadcast", e))?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| err("copy to the host", e))?;
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(EngineError::Collective(format!("broadcast from rank {root} in a world of {}", self.world)));
        }
        let mut len = [buf.len() as u64];
        self.broadcast(&mut len, root)?;
        buf.resize(len[0] as usize, 0);
        if !buf.is_empty() {
            self.broadcast(buf, root)?;
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [0f32])
    }
    fn abort(&self, _: i32) {
        // ncclCommAbort: the other ranks' pending and next calls fail instead of waiting.
        drop(self.comm.borrow_mut().take());
    }
}

/// GPUs this process can see (0 without a driver): what `PET_NPROC_PER_NODE=auto` means.
pub fn visible_gpus() -> usize {
    if crate::cuda::ensure_driver().is_err() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}
