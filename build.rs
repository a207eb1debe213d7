//! Links libtorch so that CUDA registers and the binary runs without LD_LIBRARY_PATH.
//!
//! The Rust linker passes `--as-needed`, and since no symbol of `libtorch_cuda.so` is referenced directly the
//! library is dropped (tch-rs #980): CUDA then never registers. We force it in with `--no-as-needed`, but only
//! when the torch install carries the CUDA libraries it needs (the lean CPU install in scripts/setup.sh does not:
//! there the binary links libtorch_cpu and c10 only).
//! The rpath lets `prefalign` find libtorch from any directory.
//!
//! The executable exports `mkl_serv_intel_cpu_true` (src/runtime.rs) so that MKL, inside libtorch, uses its
//! kernels for the CPU's instruction set on AMD CPUs too.
//!
//! It also compiles prefalign's C++ (torch's fused AdamW, src/train/optimizer.cpp; the decoder's autograd
//! functions, src/model/fused.cpp; quantized frozen weights, src/model/quantized.cpp; c10d's process groups,
//! src/train/distributed.cpp) against the same libtorch's headers and C++ ABI as torch-sys's own C++ wrapper.
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
    compile_torch_functions(lib, cuda_usable(lib).then(|| nccl_includes(lib)).flatten());
    link_tcmalloc();
    // src/runtime.rs defines MKL's vendor check; exported, it takes the place of the one inside libtorch
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=mkl_serv_intel_cpu_true");
}

/// gperftools' tcmalloc (Debian's libtcmalloc-minimal4, which scripts/setup.sh installs) in place of glibc's malloc
/// for the whole process, libtorch included: glibc's heap fragments around the fresh gradients and temporaries of
/// each backward pass, tcmalloc's does not (peak and time: docs/PERFORMANCE.md). Linked ahead of libc so its malloc
/// wins symbol lookup; without the library the build keeps glibc. `PREFALIGN_TCMALLOC=0` keeps glibc anyway.
fn link_tcmalloc() {
    println!("cargo:rerun-if-env-changed=PREFALIGN_TCMALLOC");
    println!("cargo:rustc-check-cfg=cfg(prefalign_tcmalloc)");
    if std::env::var("PREFALIGN_TCMALLOC").as_deref() == Ok("0") {
        return;
    }
    let name = "libtcmalloc_minimal.so.4";
    let Some(dir) = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"]
        .into_iter()
        .find(|dir| Path::new(dir).join(name).exists())
    else {
        println!("cargo:warning=libtcmalloc_minimal.so.4 not found: prefalign uses glibc's malloc (slower, more memory; scripts/setup.sh installs it)");
        return;
    };
    // a library (not a link argument), so that it comes before libc in the link line
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
    println!("cargo:rustc-cfg=prefalign_tcmalloc");
}

/// The headers c10d's ProcessGroupNCCL.hpp includes (NCCL's and the CUDA runtime's), from the CUDA wheels beside
/// torch (`PREFALIGN_CUDA=1 bash scripts/setup.sh` installs them); with them distributed.cpp builds the NCCL backend
/// (`PREFALIGN_NCCL`). Without them (a torch with CUDA libraries but not these headers) the build has Gloo only.
fn nccl_includes(torch_lib: &Path) -> Option<Vec<std::path::PathBuf>> {
    let site_packages = torch_lib.parent()?.parent()?;
    let nccl = site_packages.join("nvidia/nccl/include");
    // the CUDA 13 wheels put every header under nvidia/cu13/include (crt/ and nv/ from nvidia-cuda-crt and -cccl)
    let cuda = site_packages.join("nvidia/cu13/include");
    let complete = nccl.join("nccl.h").exists()
        && ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"].iter().all(|h| cuda.join(h).exists());
    complete.then(|| vec![nccl, cuda])
}

fn compile_torch_functions(torch_lib: &Path, nccl: Option<Vec<std::path::PathBuf>>) {
    let sources =
        ["src/train/optimizer.cpp", "src/model/fused.cpp", "src/model/quantized.cpp", "src/train/distributed.cpp"];
    for source in sources.iter().chain(&["src/model/ffi.h"]) {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = torch_lib.parent().expect("libtorch's lib folder has a parent").join("include");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let mut build = cc::Build::new();
    if let Some(includes) = nccl {
        build.define("PREFALIGN_NCCL", None).define("USE_C10D_NCCL", None).includes(includes);
    }
    build
        .cpp(true)
        .files(sources)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // the Gloo headers c10d's ProcessGroupGloo.hpp includes, which the wheel lacks (third_party/gloo/README.md)
        .include("third_party/gloo/include")
        .define("USE_C10D_GLOO", None)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("prefalign_torch_functions");
}

/// `libtorch_cuda.so` is present in every PyPI wheel, but it loads only when cuDNN and the other CUDA wheels
/// sit beside torch in site-packages; a libtorch archive from pytorch.org carries cuDNN in its own lib folder.
/// `PREFALIGN_CUDA=0|1` overrides the detection.
fn cuda_usable(torch_lib: &Path) -> bool {
    match std::env::var("PREFALIGN_CUDA").as_deref() {
        Ok("0") => return false,
        Ok("1") => return true,
        _ => {}
    }
    let has_torch_cuda = torch_lib.join("libtorch_cuda.so").exists();
    // torch/lib -> site-packages/nvidia/...
    let site_packages = torch_lib.parent().and_then(Path::parent);
    let has_cudnn = torch_lib.join("libcudnn.so.9").exists()
        || site_packages.is_some_and(|sp| {
            ["nvidia/cudnn/lib/libcudnn.so.9", "nvidia/cu13/lib/libcudnn.so.9"].iter().any(|p| sp.join(p).exists())
        });
    has_torch_cuda && has_cudnn
}
