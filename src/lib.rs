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

/// With glibc's malloc (a build without tcmalloc, see build.rs): keeps freed memory in the process instead of
/// handing it back to the kernel. A training step frees and reallocates the same large activation buffers; with
/// glibc's defaults each one is unmapped and faulted in (and zeroed) again on the next step, which cost 15% of a
/// CPU step here (docs/PERFORMANCE.md). Blocks up to 32 MiB, glibc's ceiling for this threshold, now come from the
/// heap, and the heap is never trimmed. tcmalloc needs neither this nor `release_free_memory`: it keeps freed
/// spans for reuse and returns idle ones to the kernel gradually on its own.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(prefalign_tcmalloc)))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

/// Hands free heap memory back to the kernel whenever the heap grew by more than an eighth over its largest size
/// so far. `tune_allocator` keeps freed memory for the next step, which costs nothing while steps repeat the same
/// shapes (the heap settles after the first steps, and this stops trimming) but fragments the heap when they
/// vary: by step 60 of an HH-RLHF DPO run the heap held 3.6 GB free beside 2.9 GB in use, all of it resident,
/// and kept growing. Called between training steps.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(prefalign_tcmalloc)))]
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static LARGEST_HEAP: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: mallinfo2 reads allocator statistics; malloc_trim only releases free pages.
        unsafe {
            let info = libc::mallinfo2();
            let largest = LARGEST_HEAP.load(Ordering::Relaxed);
            if info.arena > largest + largest / 8 {
                LARGEST_HEAP.store(info.arena, Ordering::Relaxed);
                libc::malloc_trim(0);
                tracing::debug!("heap grew to {} MiB ({} MiB in use): free pages released", info.arena >> 20, info.uordblks >> 20);
            }
        }
    }
}
