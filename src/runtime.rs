//! Process-wide settings of the CPU runtime: the allocator (glibc's, when the build has no tcmalloc) and which
//! kernels MKL picks for matrix products.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// With glibc's malloc (a build without tcmalloc, see build.rs): keeps freed memory in the process instead of
/// handing it back to the kernel. A training step frees and reallocates the same large activation buffers; with
/// glibc's defaults each one is unmapped and faulted in (and zeroed) again on the next step, a sizeable part of a
/// CPU step (docs/PERFORMANCE.md). Blocks up to 32 MiB, glibc's ceiling for this threshold, now come from the
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
/// vary (on HH-RLHF batches the free part of the heap outgrew the part in use, all of it resident, and kept
/// growing). Called between training steps.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(prefalign_tcmalloc)))]
    {
        use std::sync::atomic::AtomicUsize;
        static LARGEST_HEAP: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: mallinfo2 reads allocator statistics; malloc_trim only releases free pages.
        unsafe {
            let info = libc::mallinfo2();
            let largest = LARGEST_HEAP.load(Ordering::Relaxed);
            if info.arena > largest + largest / 8 {
                LARGEST_HEAP.store(info.arena, Ordering::Relaxed);
                libc::malloc_trim(0);
                tracing::debug!(
                    "heap grew to {} MiB ({} MiB in use): free pages released",
                    info.arena >> 20,
                    info.uordblks >> 20
                );
            }
        }
    }
}

/// MKL asks this function whether the CPU is Intel's and, on any other vendor's, runs generic or "zen" kernels
/// instead of the ones the CPU's instruction set allows. libtorch links MKL statically but exports its symbols, so
/// this definition in the executable (exported by build.rs) wins the dynamic lookup. On an AMD CPU with AVX-512,
/// f32 matrix products then run MKL's AVX-512 kernels and bf16 products inside attention its AVX512-BF16 kernel
/// instead of an f32 fallback (the speed-up: docs/PERFORMANCE.md). MKL still checks the instruction set itself, so
/// it runs only kernels the CPU has. `PREFALIGN_MKL_VENDOR_CHECK=1` keeps MKL's own answer.
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu_true() -> c_int {
    static ANSWER: std::sync::OnceLock<c_int> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        if std::env::var("PREFALIGN_MKL_VENDOR_CHECK").as_deref() != Ok("1") {
            return 1;
        }
        // SAFETY: RTLD_NEXT finds the definition after this one in lookup order (libtorch's MKL), whose type is
        // `int (void)`; a null result means no MKL is loaded.
        unsafe {
            let mkl_own = libc::dlsym(libc::RTLD_NEXT, c"mkl_serv_intel_cpu_true".as_ptr());
            if mkl_own.is_null() {
                return 0;
            }
            let mkl_own: extern "C" fn() -> c_int = std::mem::transmute(mkl_own);
            mkl_own()
        }
    })
}

/// The process's peak resident memory (VmHWM), where /proc provides it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The signal (SIGINT or SIGTERM) that asked a run to stop at the end of its step; 0: none.
static STOP_REQUESTED: AtomicI32 = AtomicI32::new(0);
/// Whether the process is in a part that can stop cleanly at the end of a step (a training run and its final
/// save): there the first signal only asks it to stop, elsewhere any signal ends the process at once.
static STOPPABLE: AtomicBool = AtomicBool::new(false);

/// SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before a kill): inside a `StopAtStepEnd` scope the
/// first one asks the run to stop after its current step (`stop_requested`), and a second one ends the process at
/// once; outside such a scope the first one does. Exit status 128 + the signal's number (130, 143), as a shell
/// reports a process killed by it.
pub fn handle_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler is async-signal-safe (atomics, write(2), _exit(2)); sigaction is given a zeroed,
        // then filled, struct.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_stop_signal(signal: c_int) {
    let say = |text: &[u8]| {
        // SAFETY: write(2) to stderr is async-signal-safe.
        unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    };
    if STOPPABLE.load(Ordering::SeqCst)
        && STOP_REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    {
        say(b"\nprefalign: stopping after this step, with a checkpoint (signal again to stop at once)\n");
        return;
    }
    say(b"\nprefalign: stopped\n");
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

/// The signal that asked the run to stop at the end of its step, if one did.
pub fn stop_requested() -> Option<i32> {
    Some(STOP_REQUESTED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// While alive, the first SIGINT/SIGTERM asks the run to stop at the end of its step instead of ending it.
pub struct StopAtStepEnd(());

impl StopAtStepEnd {
    pub fn new() -> Self {
        STOPPABLE.store(true, Ordering::SeqCst);
        StopAtStepEnd(())
    }
}

impl Default for StopAtStepEnd {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StopAtStepEnd {
    fn drop(&mut self) {
        STOPPABLE.store(false, Ordering::SeqCst);
    }
}

/// The name of a stop signal, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
