//! Links libtorch so that CUDA registers and the binary runs without LD_LIBRARY_PATH.
//!
//! The Rust linker passes `--as-needed`, and since no symbol of `libtorch_cuda.so` is referenced directly the
//! library is dropped (tch-rs #980): CUDA then never registers. We force it in with `--no-as-needed`, but only
//! when the torch install carries the CUDA libraries it needs (the lean CPU install in scripts/setup.sh does not:
//! there the binary links libtorch_cpu and c10 only).
//! The rpath lets `prefalign` find libtorch from any directory.
//!
//! It also compiles the one C++ function prefalign calls, torch's fused AdamW (src/train/fused_adamw.cpp), against
//! the same libtorch's headers and C++ ABI as torch-sys's own C++ wrapper.
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
    compile_fused_adamw(lib);
}

fn compile_fused_adamw(torch_lib: &Path) {
    println!("cargo:rerun-if-changed=src/train/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = torch_lib.parent().expect("libtorch's lib folder has a parent").join("include");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file("src/train/fused_adamw.cpp")
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("prefalign_fused_adamw");
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
