//! prefalign: align causal language models with human preferences (DPO, ORPO, SimPO) on libtorch.
//!
//! The path of data: `data/` (rows, chat templates) -> `model/` (config, architectures, weights, tokenizer)
//! -> `cli/`.

pub mod cli;
pub mod data;
pub mod model;
pub mod objective;
pub mod report;
pub mod train;

/// Keeps freed memory in the process instead of handing it back to the kernel. A training step frees and
/// reallocates the same large activation buffers; with glibc's defaults each one is unmapped and faulted in (and
/// zeroed) again on the next step, which cost 15% of a CPU step here (docs/PERFORMANCE.md). Blocks up to 32 MiB,
/// glibc's ceiling for this threshold, now come from the heap, and the heap is never trimmed.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}
