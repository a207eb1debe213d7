//! `prefalign launch`: torchrun's job for users without Python. Starts `--nproc-per-node` processes of a training
//! command with torchrun's environment, waits for them, and stops the rest when one fails.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
#[command(after_help = "\
Each process gets torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, \
and OMP_NUM_THREADS (this machine's cores over --nproc-per-node) unless it is set. Rank 0 serves the rendezvous and \
writes the output. The same run under torchrun: `torchrun --nproc-per-node 2 --no-python prefalign dpo ...`.

Examples:
  prefalign launch --nproc-per-node 2 -- dpo --config recipe.yaml
  prefalign launch --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr node0 -- dpo ...   # on node0
  prefalign launch --nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr node0 -- dpo ...   # on node1")]
pub struct LaunchArgs {
    /// Processes on this machine (one per GPU on CUDA)
    #[arg(long)]
    nproc_per_node: usize,
    /// Machines taking part
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index among them
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host name or address of the machine of rank 0 (node rank 0)
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// The training command (dpo, orpo or cpo) and its flags, after `--`
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// How long the other processes get to stop by themselves (naming the failed rank) once one has failed, before
/// they are sent SIGTERM, and SIGKILL after as long again.
const GRACE: Duration = Duration::from_secs(30);

pub fn run(args: LaunchArgs) -> Result<()> {
    let LaunchArgs { nproc_per_node, nnodes, node_rank, master_addr, master_port, command } = args;
    if nproc_per_node == 0 || nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if node_rank >= nnodes {
        bail!("--node-rank {node_rank} is not below --nnodes {nnodes}");
    }
    if !matches!(command.first().map(String::as_str), Some("dpo" | "orpo" | "cpo")) {
        bail!("launch starts a training command on several processes: dpo, orpo or cpo (got `{}`)", command.join(" "));
    }
    let exe = std::env::current_exe().context("cannot find prefalign's own executable")?;
    let world_size = nproc_per_node * nnodes;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / nproc_per_node).max(1).to_string());
    // a stop signal is passed on to the ranks, which stop after a step and a checkpoint, instead of ending the launch
    let _pass_on = crate::runtime::StopAtStepEnd::new();
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local_rank in 0..nproc_per_node {
        let rank = node_rank * nproc_per_node + local_rank;
        let child = Command::new(&exe)
            .args(&command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc_per_node.to_string())
            .env("GROUP_RANK", node_rank.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push((rank, child));
    }
    wait_all(children)
}

/// Waits for every process. The first that fails is the launch's error; the others are given `GRACE` to stop on
/// their own, then SIGTERM, then SIGKILL. A stop signal to the launcher is passed on to them.
fn wait_all(mut running: Vec<(usize, Child)>) -> Result<()> {
    let mut failure: Option<(usize, String, Instant)> = None;
    let mut signalled = 0;
    while !running.is_empty() {
        let mut still = Vec::new();
        for (rank, mut child) in running {
            match child.try_wait().with_context(|| format!("cannot watch rank {rank}"))? {
                Some(status) if !status.success() && failure.is_none() => {
                    failure = Some((rank, describe(status), Instant::now()));
                }
                Some(_) => {}
                None => still.push((rank, child)),
            }
        }
        running = still;
        let stop = crate::runtime::stop_requested().map(|_| libc::SIGTERM);
        let since_failure = failure.as_ref().map(|(_, _, at)| at.elapsed());
        let signal = match since_failure {
            Some(t) if t > GRACE * 2 => Some(libc::SIGKILL),
            Some(t) if t > GRACE => Some(libc::SIGTERM),
            _ => stop,
        };
        if let Some(signal) = signal.filter(|&s| s != signalled) {
            for (_, child) in &running {
                unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            }
            signalled = signal;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match (failure, crate::runtime::stop_requested()) {
        // the ranks stopped as asked, after a checkpoint (each printed where to continue from)
        (Some(_), Some(signal)) => {
            let message = format!("the ranks stopped on {}", crate::runtime::signal_name(signal));
            Err(crate::train::run::Stopped { signal, message }.into())
        }
        (Some((rank, status, _)), None) => bail!("rank {rank} {status}; the launch failed"),
        (None, _) => Ok(()),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "failed".to_string(),
    }
}
