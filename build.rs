//! Links libtorch so that CUDA registers and the binary runs without LD_LIBRARY_PATH.
//!
//! The Rust linker passes `--as-needed`, and since no symbol of `libtorch_cuda.so` is referenced directly the
//! library is dropped (tch-rs #980): CUDA then never registers. We force it in with `--no-as-needed`, but only
//! when the torch install carries the CUDA libraries it needs (the lean CPU install in scripts/setup.sh does not:
//! there the binary links libtorch_cpu and c10 only).
//! The rpath lets `prefalign` find libtorch from any directory.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=PREFALIGN_CUDA");
    println!("cargo:rerun-if-changed=build.rs");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    let lib = Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
    // libtorch.so itself needs libtorch_cuda.so, so a CPU-only install must not force either of them in.
    if cuda_usable(lib) {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// `libtorch_cuda.so` is present in every PyPI wheel, but it loads only when cuDNN and the other CUDA wheels
/// sit beside torch in site-packages. `PREFALIGN_CUDA=0|1` overrides the detection.
fn cuda_usable(torch_lib: &Path) -> bool {
    match std::env::var("PREFALIGN_CUDA").as_deref() {
        Ok("0") => return false,
        Ok("1") => return true,
        _ => {}
    }
    let has_torch_cuda = torch_lib.join("libtorch_cuda.so").exists();
    // torch/lib -> site-packages/nvidia/...
    let site_packages = torch_lib.parent().and_then(Path::parent);
    let has_cudnn = site_packages.is_some_and(|sp| {
        ["nvidia/cudnn/lib/libcudnn.so.9", "nvidia/cu13/lib/libcudnn.so.9"].iter().any(|p| sp.join(p).exists())
    });
    has_torch_cuda && has_cudnn
}
