//! Data-parallel training on libtorch's c10d: the process group that torchrun, `srun` or `prefalign launch` set
//! up through the environment (torchrun's variable names), Gloo or NCCL over a TCPStore rendezvous that rank 0
//! serves, and the collectives a step needs (the C++ half is distributed.cpp).

use crate::model::fused::{error_message, handle};
use anyhow::{bail, Context, Result};
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

#[repr(C)]
struct RawOverlap {
    _private: [u8; 0],
}

extern "C" {
    fn prefalign_has_nccl() -> bool;
    fn prefalign_group_new(
        host: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        nccl: bool,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn prefalign_group_free(group: *mut RawGroup);
    fn prefalign_group_all_reduce_sum(group: *mut RawGroup, tensor: *mut C_tensor) -> *mut c_char;
    fn prefalign_group_broadcast(group: *mut RawGroup, tensor: *mut C_tensor, root: i32) -> *mut c_char;
    fn prefalign_group_all_gather(group: *mut RawGroup, input: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn prefalign_group_send(group: *mut RawGroup, tensor: *mut C_tensor, dst: i32, tag: i32) -> *mut c_char;
    fn prefalign_group_recv(group: *mut RawGroup, tensor: *mut C_tensor, src: i32, tag: i32) -> *mut c_char;
    fn prefalign_overlap_new(
        group: *mut RawGroup,
        params: *const *mut C_tensor,
        uses: *const i32,
        count: usize,
        bucket_bytes: usize,
        out: *mut *mut RawOverlap,
    ) -> *mut c_char;
    fn prefalign_overlap_arm(overlap: *mut RawOverlap);
    fn prefalign_overlap_finish(overlap: *mut RawOverlap, world: i32, bytes: *mut u64) -> *mut c_char;
    fn prefalign_overlap_free(overlap: *mut RawOverlap);
    fn prefalign_store_set(group: *mut RawGroup, key: *const c_char, value: *const u8, len: usize) -> *mut c_char;
    fn prefalign_store_check(group: *mut RawGroup, key: *const c_char, present: *mut bool) -> *mut c_char;
    fn prefalign_store_get(group: *mut RawGroup, key: *const c_char, out: *mut *mut u8, len: *mut usize)
        -> *mut c_char;
}

/// A C++ function's outcome: its message when it failed (freed).
fn result(error: *mut c_char) -> Result<(), String> {
    error_message(error).map_or(Ok(()), Err)
}

/// Where this process stands in a launch: torchrun's variables, else SLURM's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// The launch the environment describes; `None` for a single process (no `WORLD_SIZE`/`SLURM_NTASKS`, or 1).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .filter(|v| !v.is_empty())
                .map(|v| v.trim().parse::<usize>().with_context(|| format!("{name} is \"{v}\": not a count")))
                .transpose()
        };
        // torchrun's names first; SLURM's (srun without torchrun) as the fallback
        let pick = |torchrun: &str, slurm: &str| -> Result<Option<usize>> {
            Ok(match number(torchrun)? {
                Some(n) => Some(n),
                None => number(slurm)?,
            })
        };
        let Some(world_size) = pick("WORLD_SIZE", "SLURM_NTASKS")? else { return Ok(None) };
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = pick("RANK", "SLURM_PROCID")?
            .with_context(|| format!("WORLD_SIZE is {world_size} but RANK (or SLURM_PROCID) is not set"))?;
        if rank >= world_size {
            bail!("RANK is {rank}, not below WORLD_SIZE {world_size}");
        }
        let local_rank = pick("LOCAL_RANK", "SLURM_LOCALID")?.unwrap_or(0);
        // SLURM writes e.g. "8(x2)" for 8 tasks on each of 2 nodes
        let slurm_per_node = var("SLURM_NTASKS_PER_NODE").and_then(|v| v.split('(').next()?.trim().parse().ok());
        let local_world_size = number("LOCAL_WORLD_SIZE")?.or(slurm_per_node).unwrap_or(world_size);
        let master_addr = var("MASTER_ADDR").filter(|a| !a.is_empty()).with_context(|| {
            format!("WORLD_SIZE is {world_size} but MASTER_ADDR is not set (rank 0's host name or address)")
        })?;
        let master_port = match var("MASTER_PORT").filter(|p| !p.is_empty()) {
            Some(p) => p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT is \"{p}\": not a port"))?,
            None => 29500, // torchrun's default
        };
        Ok(Some(Launch { rank, world_size, local_rank, local_world_size, master_addr, master_port }))
    }
}

/// c10d's backend: Gloo (CPU tensors, and CUDA ones through host memory) or NCCL (CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// `--ddp-backend` as transformers takes it; by default NCCL on CUDA and Gloo on the CPU, as torch.distributed
    /// picks them.
    pub fn choose(name: Option<&str>, cuda: bool) -> Result<Self> {
        let backend = match name {
            None => return Ok(if cuda && Self::nccl_built() { Backend::Nccl } else { Backend::Gloo }),
            Some("gloo") => Backend::Gloo,
            Some("nccl") => Backend::Nccl,
            Some(other) => bail!("--ddp-backend {other}: expected gloo or nccl"),
        };
        if backend == Backend::Nccl && !cuda {
            bail!("--ddp-backend nccl runs on CUDA devices: pass --device cuda, or --ddp-backend gloo on the CPU");
        }
        if backend == Backend::Nccl && !Self::nccl_built() {
            bail!(
                "this prefalign build has no NCCL backend (it was built against torch without its CUDA libraries: \
                 PREFALIGN_CUDA=1 bash scripts/setup.sh); --ddp-backend gloo also takes CUDA tensors"
            );
        }
        Ok(backend)
    }

    pub fn nccl_built() -> bool {
        unsafe { prefalign_has_nccl() }
    }
}

/// A joined process group (Gloo or NCCL). Collectives wait for their result; one that a dead or stalled rank keeps from
/// completing fails (at the latest after the group's timeout) with an error that names the rank(s) responsible:
/// each rank keeps a heartbeat and its step in the rendezvous store, which the others read when a collective fails.
pub struct ProcessGroup {
    raw: *mut RawGroup,
    pub rank: usize,
    pub world_size: usize,
    /// where the tensors of its collectives live: the CPU for Gloo, this rank's GPU for NCCL
    pub device: tch::Device,
    timeout: Duration,
    step: AtomicUsize,
    heartbeat: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

/// The group's handle, for the heartbeat thread (c10d's TCPStore client serializes its requests).
struct SharedRaw(*mut RawGroup);
unsafe impl Send for SharedRaw {}

const HEARTBEAT: Duration = Duration::from_secs(1);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.heartbeat.take() {
            drop(stop);
            let _ = thread.join();
        }
        unsafe { prefalign_group_free(self.raw) };
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn store_set(raw: *mut RawGroup, key: &str, value: &str) -> Result<(), String> {
    let key = CString::new(key).expect("no NUL in keys");
    result(unsafe { prefalign_store_set(raw, key.as_ptr(), value.as_ptr(), value.len()) })
}

/// The value of `key`, `None` when it is not set.
fn store_get(raw: *mut RawGroup, key: &str) -> Result<Option<String>, String> {
    let key = CString::new(key).expect("no NUL in keys");
    let mut present = false;
    result(unsafe { prefalign_store_check(raw, key.as_ptr(), &mut present) })?;
    if !present {
        return Ok(None);
    }
    let (mut out, mut len) = (std::ptr::null_mut(), 0usize);
    result(unsafe { prefalign_store_get(raw, key.as_ptr(), &mut out, &mut len) })?;
    let value = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(out, len) }).into_owned();
    unsafe { libc::free(out.cast()) };
    Ok(Some(value))
}

impl ProcessGroup {
    /// Joins the group `launch` describes, waiting up to `timeout` for every rank.
    pub fn join(launch: &Launch, timeout: Duration, backend: Backend) -> Result<Self> {
        let host = CString::new(launch.master_addr.clone()).context("MASTER_ADDR holds a NUL byte")?;
        let mut raw = std::ptr::null_mut();
        let error = unsafe {
            prefalign_group_new(
                host.as_ptr(),
                i32::from(launch.master_port),
                launch.rank as i32,
                launch.world_size as i32,
                timeout.as_millis() as i64,
                backend == Backend::Nccl,
                &mut raw,
            )
        };
        result(error).map_err(|message| {
            anyhow::anyhow!(
                "rank {} could not join the {} processes at {}:{} within {} s (--ddp-timeout): {message}",
                launch.rank,
                launch.world_size,
                launch.master_addr,
                launch.master_port,
                timeout.as_secs()
            )
        })?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let shared = SharedRaw(raw);
        let key = format!("prefalign/rank{}/heartbeat", launch.rank);
        let thread = std::thread::spawn(move || {
            let shared = shared;
            loop {
                if store_set(shared.0, &key, &now_ms().to_string()).is_err() {
                    return; // the store is gone: the next collective reports it
                }
                if !matches!(stopped.recv_timeout(HEARTBEAT), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
                    return;
                }
            }
        });
        Ok(ProcessGroup {
            raw,
            rank: launch.rank,
            world_size: launch.world_size,
            device: match backend {
                Backend::Gloo => tch::Device::Cpu,
                Backend::Nccl => tch::Device::Cuda(launch.local_rank),
            },
            timeout,
            step: AtomicUsize::new(usize::MAX),
            heartbeat: Some((stop, thread)),
        })
    }

    /// Records that this rank reached optimizer step `step`, for the error of a collective that fails.
    pub fn mark_step(&self, step: usize) {
        self.step.store(step, Ordering::Relaxed);
        let _ = store_set(self.raw, &format!("prefalign/rank{}/step", self.rank), &step.to_string());
    }

    /// Sums `tensor` (contiguous) in place across the ranks.
    pub fn all_reduce_sum(&self, tensor: &Tensor, what: &str) -> Result<()> {
        self.check(unsafe { prefalign_group_all_reduce_sum(self.raw, handle(tensor)) }, what)
    }

    /// Copies rank `root`'s `tensor` (contiguous) into every rank's.
    pub fn broadcast(&self, tensor: &Tensor, root: usize, what: &str) -> Result<()> {
        self.check(unsafe { prefalign_group_broadcast(self.raw, handle(tensor), root as i32) }, what)
    }

    /// Every rank's `tensor` (the same shape on all), stacked in rank order: [world, ...].
    pub fn all_gather(&self, tensor: &Tensor, what: &str) -> Result<Tensor> {
        let input = tensor.contiguous();
        let mut out = std::ptr::null_mut();
        self.check(unsafe { prefalign_group_all_gather(self.raw, handle(&input), &mut out) }, what)?;
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Sends `tensor` (contiguous) to rank `dst`, which receives it with the same `tag`.
    pub fn send(&self, tensor: &Tensor, dst: usize, tag: i32, what: &str) -> Result<()> {
        self.check(unsafe { prefalign_group_send(self.raw, handle(tensor), dst as i32, tag) }, what)
    }

    /// Receives into `tensor` (contiguous, of the sent shape) what rank `src` sent with `tag`.
    pub fn recv(&self, tensor: &Tensor, src: usize, tag: i32, what: &str) -> Result<()> {
        self.check(unsafe { prefalign_group_recv(self.raw, handle(tensor), src as i32, tag) }, what)
    }

    /// A collective's error, naming what failed and the rank(s) that the store shows dead, stopped or behind.
    pub(crate) fn check(&self, error: *mut c_char, what: &str) -> Result<()> {
        let Err(message) = result(error) else { return Ok(()) };
        let at = match self.step.load(Ordering::Relaxed) {
            usize::MAX => String::new(),
            step => format!(" at step {}", step + 1),
        };
        bail!("rank {}: {what} failed{at} ({}): {message}", self.rank, self.blame())
    }

    /// Which other ranks are to blame, as far as the store can tell after a few heartbeats.
    fn blame(&self) -> String {
        std::thread::sleep(HEARTBEAT * 3);
        let (now, step) = (now_ms(), self.step.load(Ordering::Relaxed).wrapping_add(1));
        let mut found = Vec::new();
        for rank in (0..self.world_size).filter(|&r| r != self.rank) {
            let beat = store_get(self.raw, &format!("prefalign/rank{rank}/heartbeat"));
            let reached = store_get(self.raw, &format!("prefalign/rank{rank}/step"));
            match (beat, reached) {
                (Err(_), _) | (_, Err(_)) => {
                    return "rank 0, which serves the rendezvous store, is gone".to_string();
                }
                (Ok(beat), Ok(reached)) => {
                    let beat_ms = beat.and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
                    let reached = reached.and_then(|r| r.parse::<usize>().ok()).map_or(0, |r| r + 1);
                    if now.saturating_sub(beat_ms) > 2 * HEARTBEAT.as_millis() as u64 {
                        found.push(format!("rank {rank} stopped responding (dead or suspended)"));
                    } else if reached < step {
                        found.push(format!("rank {rank} is still at step {reached}"));
                    }
                }
            }
        }
        if found.is_empty() {
            format!("every other rank is alive; timeout {} s (--ddp-timeout)", self.timeout.as_secs())
        } else {
            found.join(", ")
        }
    }
}

/// Gradient averaging overlapped with the backward pass (DDP's Reducer, in distributed.cpp): buckets of parameters
/// whose all-reduce starts, from a hook after gradient accumulation, as soon as the bucket's gradients are final.
pub struct OverlappedAverage<'g> {
    raw: *mut RawOverlap,
    group: &'g ProcessGroup,
}

impl Drop for OverlappedAverage<'_> {
    fn drop(&mut self) {
        unsafe { prefalign_overlap_free(self.raw) };
    }
}

impl<'g> OverlappedAverage<'g> {
    /// `params` with the times the backward pass accumulates into each, in the order their gradients become final.
    pub fn new(group: &'g ProcessGroup, params: &[(Tensor, i32)], bucket_bytes: usize) -> Result<Self> {
        let handles: Vec<*mut C_tensor> = params.iter().map(|(p, _)| handle(p)).collect();
        let uses: Vec<i32> = params.iter().map(|&(_, n)| n).collect();
        let mut raw = std::ptr::null_mut();
        let error = unsafe {
            prefalign_overlap_new(group.raw, handles.as_ptr(), uses.as_ptr(), handles.len(), bucket_bytes, &mut raw)
        };
        result(error).map_err(|message| anyhow::anyhow!("cannot set up the gradient buckets: {message}"))?;
        Ok(OverlappedAverage { raw, group })
    }

    /// From now on the backward pass starts each bucket's all-reduce as its gradients are final.
    pub fn arm(&self) {
        unsafe { prefalign_overlap_arm(self.raw) };
    }

    /// Starts the buckets not started yet, waits for all and leaves the averages in the gradients; returns the
    /// bytes all-reduced.
    pub fn finish(&self) -> Result<u64> {
        let mut bytes = 0u64;
        let error = unsafe { prefalign_overlap_finish(self.raw, self.group.world_size as i32, &mut bytes) };
        self.group.check(error, "the gradient all-reduce")?;
        Ok(bytes)
    }
}

/// Applies `collective` to `tensors` in flat buckets of about `bucket_bytes` (one dtype each; Gloo takes a list
/// of tensors only when they have one size), copying the results back.
fn in_buckets(tensors: &[Tensor], bucket_bytes: usize, collective: impl Fn(&Tensor) -> Result<()>) -> Result<()> {
    let mut start = 0;
    while start < tensors.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < tensors.len()
            && (end == start
                || (bytes + byte_size(&tensors[end]) <= bucket_bytes && tensors[end].kind() == tensors[start].kind()))
        {
            bytes += byte_size(&tensors[end]);
            end += 1;
        }
        let bucket = &tensors[start..end];
        tch::no_grad(|| -> Result<()> {
            let flat = Tensor::cat(&bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
            collective(&flat)?;
            let mut offset = 0;
            for tensor in bucket {
                let n = tensor.numel() as i64;
                tensor.view([-1]).copy_(&flat.narrow(0, offset, n));
                offset += n;
            }
            Ok(())
        })?;
        start = end;
    }
    Ok(())
}

/// Copies rank `root`'s `tensors` into every rank's, in buckets.
pub fn broadcast_all(group: &ProcessGroup, tensors: &[Tensor], root: usize, what: &str) -> Result<()> {
    in_buckets(tensors, 25 << 20, |flat| group.broadcast(flat, root, what))
}

fn byte_size(tensor: &Tensor) -> usize {
    tensor.numel() * tensor.kind().elt_size_in_bytes()
}

/// The sum across the ranks of each of `values` (the same count on every rank).
pub fn sum_across(group: &ProcessGroup, values: &[f64], what: &str) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let tensor = Tensor::from_slice(values).to_kind(Kind::Double).to_device(group.device);
    group.all_reduce_sum(&tensor, what)?;
    Ok(Vec::<f64>::try_from(tensor.to_device(tch::Device::Cpu)).expect("1-d"))
}

/// The mean across the ranks of each of `values` (the same count on every rank).
pub fn mean_across(group: &ProcessGroup, values: &[f64], what: &str) -> Result<Vec<f64>> {
    Ok(sum_across(group, values, what)?.into_iter().map(|v| v / group.world_size as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nobody listens on now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Two ranks (threads of this process, as c10d allows) join over a TCPStore and run each collective.
    #[test]
    fn two_ranks_reduce_gather_and_broadcast_through_gloo() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let launch = Launch {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                        local_world_size: 2,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let group = ProcessGroup::join(&launch, Duration::from_secs(30), Backend::Gloo).unwrap();
                    let x = Tensor::from_slice(&[1.0f32 + rank as f32, 10.0]);
                    group.all_reduce_sum(&x, "test").unwrap();
                    let gathered = group.all_gather(&Tensor::from_slice(&[rank as i64 * 7]), "test").unwrap();
                    let b = Tensor::from_slice(&[rank as f64 + 0.5]);
                    group.broadcast(&b, 1, "test").unwrap();
                    let cpu = (Kind::Float, tch::Device::Cpu);
                    let weights = [Tensor::full([3], rank as f64, cpu), Tensor::full([2, 2], rank as f64 + 1.0, cpu)];
                    broadcast_all(&group, &weights, 1, "test").unwrap();
                    (
                        Vec::<f32>::try_from(x).unwrap(),
                        Vec::<i64>::try_from(gathered.view([-1])).unwrap(),
                        Vec::<f64>::try_from(&b).unwrap(),
                        Vec::<f32>::try_from(&weights[0]).unwrap(),
                        Vec::<f32>::try_from(weights[1].view([-1])).unwrap(),
                    )
                })
            })
            .collect();
        for rank in ranks {
            let (x, gathered, b, w0, w1) = rank.join().unwrap();
            assert_eq!(x, [3.0, 20.0]);
            assert_eq!(gathered, [0, 7]);
            assert_eq!(b, [1.5]);
            assert_eq!((w0, w1), (vec![1.0; 3], vec![2.0; 4]));
        }
    }

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let vars: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_backend_is_gloo_on_the_cpu_and_nccl_only_on_cuda() {
        assert_eq!(Backend::choose(None, false).unwrap(), Backend::Gloo);
        assert_eq!(Backend::choose(Some("gloo"), true).unwrap(), Backend::Gloo);
        let want_on_cuda = if Backend::nccl_built() { Backend::Nccl } else { Backend::Gloo };
        assert_eq!(Backend::choose(None, true).unwrap(), want_on_cuda);
        assert!(Backend::choose(Some("nccl"), false).unwrap_err().to_string().contains("CUDA devices"));
        assert!(Backend::choose(Some("mpi"), false).unwrap_err().to_string().contains("expected gloo or nccl"));
    }

    #[test]
    fn the_launch_comes_from_torchruns_variables_else_slurms() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let torchrun = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ];
        let want = Launch {
            rank: 3,
            world_size: 4,
            local_rank: 1,
            local_world_size: 2,
            master_addr: "node0".into(),
            master_port: 29400,
        };
        assert_eq!(launch(&torchrun).unwrap(), Some(want.clone()));
        let slurm = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2(x2)"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ];
        assert_eq!(launch(&slurm).unwrap(), Some(want));
        let error = |vars: &[(&str, &str)]| launch(vars).unwrap_err().to_string();
        assert!(error(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).contains("RANK"));
        assert!(error(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")]).contains("not below WORLD_SIZE"));
        assert!(error(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR"));
        assert!(error(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE is \"two\""));
    }
}
