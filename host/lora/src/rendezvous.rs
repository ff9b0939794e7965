//! The one home-made piece of scale-out: how the ranks of a Kubeflow Trainer TrainJob (or any
//! torchrun-style launch) find each other before NCCL takes over. Rank 0 listens on
//! `PET_MASTER_PORT`; every other rank connects (retrying until the deadline: pods start in any
//! order) and sends its rank, the world size and its run-manifest hash; once every rank has
//! joined with the same world and manifest, rank 0 answers each with the 128-byte NCCL id. A rank
//! that disagrees is refused by name, and every rank stops with that message.
//!
//! The wire format is one JSON line each way; it never carries anything but these fields.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Where and who: the `PET_*` variables of Kubeflow Trainer's torch runtime, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world: usize,
    /// This process's GPU on its node.
    pub local_rank: usize,
}

impl WorkerEnv {
    /// From `PET_NNODES`, `PET_NPROC_PER_NODE` (a number, or `auto`: `visible_gpus`, which must
    /// be at least 1), `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` and `LOCAL_RANK`
    /// (default 0) as `var` gives them. None when `PET_NNODES` is unset (not a TrainJob worker).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, visible_gpus: impl FnOnce() -> usize) -> Result<Option<WorkerEnv>> {
        let Some(nnodes) = var("PET_NNODES") else { return Ok(None) };
        let need = |k: &str| var(k).with_context(|| format!("{k} is not set, but PET_NNODES is: a TrainJob worker needs PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT"));
        let number = |k: &str, v: &str| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a non-negative integer"));
        let nnodes = number("PET_NNODES", &nnodes)?;
        let nproc = match need("PET_NPROC_PER_NODE")?.trim() {
            // torchrun's meaning (the torch runtime sets it when GPUs are requested): one per GPU.
            "auto" => match visible_gpus() {
                0 => bail!("PET_NPROC_PER_NODE=auto means one process per visible GPU, and this node has none visible (CUDA_VISIBLE_DEVICES, driver)"),
                n => n,
            },
            v => number("PET_NPROC_PER_NODE", v)?,
        };
        let node_rank = number("PET_NODE_RANK", &need("PET_NODE_RANK")?)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v)?,
            None if nproc == 1 => 0,
            // Else the other local ranks would never come, and rank 0 would wait out its deadline.
            None => bail!(
                "PET_NPROC_PER_NODE={nproc} asks for {nproc} processes on this node, one per GPU, and lora does not start them itself: start it under torchrun (which sets LOCAL_RANK), or give the TrainJob numProcPerNode 1"
            ),
        };
        let master_addr = need("PET_MASTER_ADDR")?;
        let port = need("PET_MASTER_PORT")?;
        let master_port = port.trim().parse::<u16>().with_context(|| format!("PET_MASTER_PORT={port:?} is not a port number"))?;
        if nnodes == 0 || nproc == 0 {
            bail!("PET_NNODES={nnodes} and PET_NPROC_PER_NODE={nproc} must both be at least 1");
        }
        if node_rank >= nnodes || local_rank >= nproc {
            bail!("PET_NODE_RANK={node_rank} must be below PET_NNODES={nnodes}, LOCAL_RANK={local_rank} below PET_NPROC_PER_NODE={nproc}");
        }
        Ok(Some(WorkerEnv { master_addr, master_port, rank: node_rank * nproc + local_rank, world: nnodes * nproc, local_rank }))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    rank: usize,
    world: usize,
    manifest: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    /// The 128-byte id, hex; absent with `error`.
    id: Option<String>,
    error: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Rank 0's side: waits for ranks `1..world` on `listener` until `deadline`, checks them, and
/// sends each `id`. Errors name the ranks that were missing or disagreed.
pub fn serve(listener: TcpListener, world: usize, manifest: &str, id: &[u8; 128], deadline: Duration) -> Result<()> {
    let until = Instant::now() + deadline;
    listener.set_nonblocking(true)?;
    let mut joined: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut refused: Vec<String> = Vec::new();
    while joined.iter().skip(1).any(Option::is_none) && refused.is_empty() {
        if Instant::now() >= until {
            let missing: Vec<String> = (1..world).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
            let why = format!(
                "rank 0 waited {:.0}s for every rank to join, and rank(s) {} did not (their pods failed, or cannot reach PET_MASTER_ADDR:PET_MASTER_PORT)",
                deadline.as_secs_f64(),
                missing.join(", ")
            );
            for s in joined.iter().flatten() {
                send(s, &Reply { id: None, error: Some(why.clone()) });
            }
            bail!("{why}");
        }
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rank 0 accepting a rank's connection"),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
        let mut line = String::new();
        let read = BufReader::new(&stream).read_line(&mut line);
        let hello: Hello = match read.ok().and_then(|_| serde_json::from_str(line.trim()).ok()) {
            Some(h) => h,
            // Not one of ours (a port scanner, a health check): ignore it.
            None => continue,
        };
        let why = if hello.world != world {
            Some(format!("rank {} ({peer}) counts {} ranks, rank 0 counts {world} (PET_NNODES × PET_NPROC_PER_NODE differ)", hello.rank, hello.world))
        } else if hello.rank == 0 || hello.rank >= world {
            Some(format!("a process at {peer} says it is rank {}, outside 1..{world}", hello.rank))
        } else if joined[hello.rank].is_some() {
            Some(format!("rank {} joined twice (the second from {peer})", hello.rank))
        } else if hello.manifest != manifest {
            Some(format!("rank {} ({peer}) has another run manifest than rank 0 ({} vs {manifest}): every rank must see the same model, dataset and parameters", hello.rank, hello.manifest))
        } else {
            None
        };
        match why {
            Some(why) => {
                send(&stream, &Reply { id: None, error: Some(why.clone()) });
                refused.push(why);
            }
            None => joined[hello.rank] = Some(stream),
        }
    }
    if !refused.is_empty() {
        let why = refused.join("; ");
        for s in joined.iter().flatten() {
            send(s, &Reply { id: None, error: Some(why.clone()) });
        }
        bail!("rendezvous refused: {why}");
    }
    for s in joined.iter().flatten() {
        send(s, &Reply { id: Some(hex(id)), error: None });
    }
    Ok(())
}

fn send(mut s: &TcpStream, r: &Reply) {
    // A rank that went away misses its answer; it has failed already.
    let _ = writeln!(s, "{}", serde_json::to_string(r).unwrap_or_default());
}

/// Rank 1..world's side: connects to rank 0 at `addr` (retrying until `deadline`), says who it is
/// and returns the id rank 0 sends, or rank 0's refusal.
pub fn join(addr: &str, rank: usize, world: usize, manifest: &str, deadline: Duration) -> Result<[u8; 128]> {
    let until = Instant::now() + deadline;
    let stream = loop {
        let last = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) => e.to_string(),
                },
                None => format!("{addr} resolves to no address"),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= until {
            bail!("rank {rank} could not reach rank 0 at {addr} (PET_MASTER_ADDR:PET_MASTER_PORT) within {:.0}s: {last}", deadline.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let hello = serde_json::to_string(&Hello { rank, world, manifest: manifest.to_string() })?;
    writeln!(&stream, "{hello}").with_context(|| format!("rank {rank} sending its rank to rank 0 at {addr}"))?;
    stream.set_read_timeout(Some(until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("rank {rank} waiting for rank 0 at {addr} to hand out the NCCL id (every rank must join within the deadline)"))?;
    let reply: Reply = serde_json::from_str(line.trim()).with_context(|| format!("rank {rank}: rank 0 at {addr} closed the rendezvous without an answer"))?;
    if let Some(e) = reply.error {
        bail!("rank 0 refused the rendezvous: {e}");
    }
    let id = reply.id.as_deref().and_then(unhex).filter(|b| b.len() == 128).context("rank 0 sent an id that is not 128 bytes")?;
    let mut out = [0u8; 128];
    out.copy_from_slice(&id);
    Ok(out)
}

/// Rank 0 binds before it makes the id, so that "port in use" is its first and clear error.
pub fn listen(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("rank 0 cannot listen on port {port} (PET_MASTER_PORT): is another run or process using it?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    const PET: &[(&str, &str)] = &[("PET_NNODES", "2"), ("PET_NPROC_PER_NODE", "auto"), ("PET_NODE_RANK", "1"), ("PET_MASTER_ADDR", "job-node-0-0.job"), ("PET_MASTER_PORT", "29500"), ("LOCAL_RANK", "3")];

    #[test]
    fn the_torch_runtimes_variables_give_rank_and_world_with_auto_as_the_gpu_count() {
        let w = WorkerEnv::from_vars(env(PET), || 4).unwrap().unwrap();
        assert_eq!(w, WorkerEnv { master_addr: "job-node-0-0.job".into(), master_port: 29500, rank: 7, world: 8, local_rank: 3 });
        assert!(WorkerEnv::from_vars(env(&[]), || 4).unwrap().is_none());
        let e = WorkerEnv::from_vars(env(PET), || 0).unwrap_err().to_string();
        assert!(e.contains("PET_NPROC_PER_NODE=auto") && e.contains("none visible"), "{e}");
        let e = WorkerEnv::from_vars(env(&[PET[0], PET[1], PET[2], PET[5]]), || 4).unwrap_err().to_string();
        assert!(e.contains("PET_MASTER_ADDR is not set"), "{e}");
        let e = WorkerEnv::from_vars(env(&[PET[0], ("PET_NPROC_PER_NODE", "two")]), || 4).unwrap_err().to_string();
        assert!(e.contains("PET_NPROC_PER_NODE=\"two\""), "{e}");
        // Several processes per node but nobody started them (no LOCAL_RANK): refused, not a hang.
        let e = WorkerEnv::from_vars(env(&PET[..5]), || 4).unwrap_err().to_string();
        assert!(e.contains("PET_NPROC_PER_NODE=4") && e.contains("torchrun"), "{e}");
    }

    fn start(world: usize, manifest: &'static str, deadline: Duration) -> (u16, std::thread::JoinHandle<Result<()>>) {
        let l = listen(0).unwrap();
        let port = l.local_addr().unwrap().port();
        (port, std::thread::spawn(move || serve(l, world, manifest, &[7u8; 128], deadline)))
    }

    #[test]
    fn every_rank_gets_rank_0s_id_even_when_it_comes_late() {
        let (port, server) = start(3, "m", Duration::from_secs(20));
        let addr = format!("127.0.0.1:{port}");
        let a = addr.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            join(&a, 2, 3, "m", Duration::from_secs(20))
        });
        assert_eq!(join(&addr, 1, 3, "m", Duration::from_secs(20)).unwrap(), [7u8; 128]);
        assert_eq!(late.join().unwrap().unwrap(), [7u8; 128]);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_rank_with_another_manifest_is_refused_by_name_and_everyone_stops() {
        let (port, server) = start(3, "m", Duration::from_secs(20));
        let addr = format!("127.0.0.1:{port}");
        let a = addr.clone();
        let good = std::thread::spawn(move || join(&a, 1, 3, "m", Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(300));
        let e = join(&addr, 2, 3, "other", Duration::from_secs(20)).unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("another run manifest"), "{e}");
        let e = good.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("another run manifest"), "{e}");
        let e = server.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 2"), "{e}");
    }

    #[test]
    fn missing_ranks_and_an_unreachable_rank_0_time_out_with_a_clear_error() {
        let (port, server) = start(3, "m", Duration::from_millis(800));
        let addr = format!("127.0.0.1:{port}");
        // Rank 1 joins, rank 2 never does: rank 0 names rank 2, rank 1 is told why.
        let e1 = join(&addr, 1, 3, "m", Duration::from_secs(5)).unwrap_err().to_string();
        let e0 = server.join().unwrap().unwrap_err().to_string();
        assert!(e0.contains("rank(s) 2 did not"), "{e0}");
        assert!(e1.contains("rank 0 refused") && e1.contains("rank(s) 2 did not"), "{e1}");
        // Nobody listens any more.
        let e = join(&addr, 1, 3, "m", Duration::from_millis(500)).unwrap_err().to_string();
        assert!(e.contains("could not reach rank 0") && e.contains("PET_MASTER_ADDR:PET_MASTER_PORT"), "{e}");
    }

    #[test]
    fn a_port_in_use_is_rank_0s_first_error() {
        let taken = listen(0).unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = format!("{:#}", listen(port).unwrap_err());
        assert!(e.contains(&format!("cannot listen on port {port} (PET_MASTER_PORT)")), "{e}");
    }
}
