//! RMSNorm, the SwiGLU MLP's output projection and the other projections under autocast as autograd functions
//! that keep less for the backward pass (src/model/fused.cpp): the same forward computation, with the element-wise
//! intermediates and the casts recomputed in the backward pass instead of kept (what that saves:
//! docs/PERFORMANCE.md). Also dropout with masks from a seed of their own (`dropout`).

use std::ffi::c_char;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn prefalign_rms_norm(x: *mut C_tensor, weight: *mut C_tensor, eps: f64, out: *mut *mut C_tensor) -> *mut c_char;
    fn prefalign_swiglu_down(
        gate: *mut C_tensor,
        up: *mut C_tensor,
        weight: *mut C_tensor,
        cast: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn prefalign_cast_linears(
        x: *mut C_tensor,
        weights: *const *mut C_tensor,
        biases: *const *mut C_tensor,
        count: usize,
        cast: i64,
        outs: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn prefalign_dropout(x: *mut C_tensor, p: f64, seed: u64, out: *mut *mut C_tensor) -> *mut c_char;
}

/// The c10::ScalarType code of a floating dtype the C++ functions compute in (autocast's, or a weight's).
pub(crate) fn cast_code(kind: Kind) -> i64 {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        kind => panic!("no computation in {kind:?}"),
    }
}

/// A tensor as the `at::Tensor *` handle prefalign's C++ functions take.
pub(crate) fn handle(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// The message a C++ function returned instead of null (a strdup'd string, freed here), if any.
pub(crate) fn error_message(error: *mut c_char) -> Option<String> {
    if error.is_null() {
        return None;
    }
    // Safety: a NUL-terminated string from strdup, ours to free.
    let message = unsafe { std::ffi::CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { libc::free(error.cast()) };
    Some(message)
}

/// Panics with the message a C++ function returned instead of null: every failure there is a broken invariant of
/// the caller (shapes, dtypes, devices), a bug rather than a user error.
pub(crate) fn panic_on_error(what: &str, error: *mut c_char) {
    if let Some(message) = error_message(error) {
        panic!("{what} failed: {message}");
    }
}

/// Wraps the handle a C++ function stored, or panics with its error.
pub(crate) fn finish(what: &str, error: *mut c_char, out: *mut C_tensor) -> Tensor {
    panic_on_error(what, error);
    // Safety: on success the function stored a fresh `at::Tensor *` that nothing else owns.
    unsafe { Tensor::from_ptr(out) }
}

/// transformers' LlamaRMSNorm on x [..., dim] with weight [dim]: normalized in f32, cast back to x's dtype, times
/// the weight. Keeps x and one scale per row for the backward pass.
///
/// On CUDA, when x and the weight share a dtype (always in f32, and under autocast, where the residual stream
/// stays f32), torch's own fused op instead: one kernel forward and one or two backward, where the same
/// computation as separate ops launches about 6 and 12 (each a few µs on a GPU, which is most of a small model's
/// step). It keeps the same tensors for the backward pass, and rounds apart from LlamaRMSNorm only in its
/// summation order (and, for a bf16 x, by not rounding before the weight).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    if x.device().is_cuda() && x.kind() == weight.kind() {
        return torch_rms_norm(x, weight, eps);
    }
    let mut out = std::ptr::null_mut();
    // Safety: the handles point at tensors borrowed for the call.
    let error = unsafe { prefalign_rms_norm(handle(x), handle(weight), eps, &mut out) };
    finish("rms_norm", error, out)
}

/// torch's `_fused_rms_norm`: a fused kernel with its own backward on CUDA, its composite of separate ops elsewhere.
fn torch_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dim = *x.size().last().expect("rms_norm of a tensor with dimensions");
    x.internal_fused_rms_norm([dim], Some(weight), eps).0
}

/// down_proj(silu(gate) * up) for gate, up [..., intermediate], weight [hidden, intermediate], with the matrix
/// product in `cast` when given (autocast over f32 master weights). Keeps gate and up for the backward pass.
pub fn swiglu_down(gate: &Tensor, up: &Tensor, weight: &Tensor, bias: Option<&Tensor>, cast: Option<Kind>) -> Tensor {
    let cast_code = cast.map_or(-1, cast_code);
    let mut out = std::ptr::null_mut();
    // Safety: the handles point at tensors borrowed for the call.
    let error = unsafe { prefalign_swiglu_down(handle(gate), handle(up), handle(weight), cast_code, &mut out) };
    let projected = finish("swiglu_down", error, out);
    match bias {
        Some(bias) => &projected + bias.to_kind(projected.kind()),
        None => projected,
    }
}

/// x [..., in] through each weight [out_i, in] (and bias [out_i], all or none) under autocast to `cast`: the
/// projections of q/k/v or gate/up, which share their input. x is cast once for all of them, and the backward pass
/// keeps that cast and the master weights only (autocast keeps a cast of x per projection and a cast of each
/// weight). Returns [..., out_i] per weight.
pub fn cast_linears(x: &Tensor, weights: &[&Tensor], biases: Option<&[&Tensor]>, cast: Kind) -> Vec<Tensor> {
    if let Some(biases) = biases {
        assert_eq!(biases.len(), weights.len(), "cast_linears: one bias per weight");
    }
    let weight_handles: Vec<*mut C_tensor> = weights.iter().map(|w| handle(w)).collect();
    let bias_handles: Option<Vec<*mut C_tensor>> = biases.map(|b| b.iter().map(|b| handle(b)).collect());
    let mut outs = vec![std::ptr::null_mut(); weights.len()];
    // Safety: the handles point at tensors borrowed for the call; `outs` has room for one handle per weight.
    let error = unsafe {
        prefalign_cast_linears(
            handle(x),
            weight_handles.as_ptr(),
            bias_handles.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
            weights.len(),
            cast_code(cast),
            outs.as_mut_ptr(),
        )
    };
    panic_on_error("cast_linears", error);
    // Safety: on success each entry is a fresh `at::Tensor *` that nothing else owns.
    outs.into_iter().map(|out| unsafe { Tensor::from_ptr(out) }).collect()
}

/// torch's dropout of x in training (each element kept with probability 1 - p and divided by 1 - p, zeroed
/// otherwise) with the mask drawn from a generator seeded with `seed` only: the same seed, the same mask.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Tensor {
    assert!((0.0..=1.0).contains(&p), "dropout probability {p} outside [0, 1]");
    let mut out = std::ptr::null_mut();
    // Safety: the handle points at a tensor borrowed for the call.
    let error = unsafe { prefalign_dropout(handle(x), p, seed, &mut out) };
    finish("dropout", error, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward values and the gradients of every input, fused against the plain tensor ops autograd would run.
    fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f64) {
        let error = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs().max().double_value(&[]);
        let scale = want.to_kind(Kind::Float).abs().max().double_value(&[]).max(1e-6);
        assert!(error <= tolerance * scale, "{what}: max error {error} against max |value| {scale}");
    }

    fn leaf(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)
    }

    /// Gradients of sum(output * probe) with respect to `inputs`, cleared afterwards.
    fn grads(output: &Tensor, probe: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
        (output.to_kind(Kind::Float) * probe).sum(Kind::Float).backward();
        inputs
            .iter()
            .map(|t| {
                let grad = t.grad().copy();
                let _ = t.grad().zero_();
                grad
            })
            .collect()
    }

    #[test]
    fn rms_norm_matches_autograd() {
        let (x, weight) = (leaf(&[2, 5, 16], 1), leaf(&[16], 2));
        let probe = Tensor::randn([2, 5, 16], (Kind::Float, tch::Device::Cpu));
        let fused = rms_norm(&x, &weight, 1e-5);
        let fused_grads = grads(&fused, &probe, &[&x, &weight]);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let plain = &weight * (&x * (variance + 1e-5).rsqrt());
        let plain_grads = grads(&plain, &probe, &[&x, &weight]);
        assert_close("output", &fused, &plain, 1e-6);
        for (name, (got, want)) in ["x", "weight"].iter().zip(fused_grads.iter().zip(&plain_grads)) {
            assert_close(name, got, want, 1e-5);
        }
    }

    /// What rms_norm runs on CUDA computes what it runs elsewhere: torch's op, checked here through its composite
    /// on the CPU (and through its fused kernel where the tests run with a GPU).
    #[test]
    fn torch_rms_norm_matches_prefalign_rms_norm() {
        let devices = [tch::Device::Cpu].into_iter().chain(tch::Cuda::is_available().then_some(tch::Device::Cuda(0)));
        for device in devices {
            let (x_cpu, weight_cpu) = (leaf(&[2, 5, 16], 1), leaf(&[16], 2));
            let x = x_cpu.detach().to_device(device).set_requires_grad(true);
            let weight = weight_cpu.detach().to_device(device).set_requires_grad(true);
            let probe = Tensor::randn([2, 5, 16], (Kind::Float, tch::Device::Cpu));
            let torch_norm = torch_rms_norm(&x, &weight, 1e-5);
            let torch_grads = grads(&torch_norm, &probe.to_device(device), &[&x, &weight]);
            let prefalign_norm = rms_norm(&x_cpu, &weight_cpu, 1e-5);
            let prefalign_grads = grads(&prefalign_norm, &probe, &[&x_cpu, &weight_cpu]);
            assert_close("output", &torch_norm.to_device(tch::Device::Cpu), &prefalign_norm, 1e-6);
            for (name, (got, want)) in ["x", "weight"].iter().zip(torch_grads.iter().zip(&prefalign_grads)) {
                assert_close(name, &got.to_device(tch::Device::Cpu), want, 1e-5);
            }
        }
    }

    /// Kept elements are x / (1 - p), about 1 - p of them, as torch's dropout; the gradient is the mask over
    /// 1 - p; a seed gives one mask whatever else drew random numbers in between.
    #[test]
    fn dropout_keeps_and_scales_as_torch_and_its_seed_fixes_the_mask() {
        let x = leaf(&[64, 256], 3);
        let p = 0.25;
        let out = dropout(&x, p, 7);
        let kept = out.ne(0.0);
        let fraction = kept.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((fraction - 0.75).abs() < 0.01, "kept {fraction}");
        // torch's dropout multiplies by 1 / (1 - p) rounded to x's dtype
        let scaled = (&x * (1.0 / (1.0 - p))).masked_fill(&kept.logical_not(), 0.0);
        assert!(out.equal(&scaled), "kept values are not x / (1 - p)");
        let x_grad = grads(&out, &Tensor::ones_like(&x), &[&x]).remove(0);
        let want = kept.to_kind(Kind::Float) / (1.0 - p);
        assert!(x_grad.allclose(&want, 1e-7, 0.0, false));
        let _ = Tensor::rand([100], (Kind::Float, tch::Device::Cpu)); // the global generator moves on
        assert!(dropout(&x, p, 7).equal(&out), "the same seed drew another mask");
        assert!(!dropout(&x, p, 8).equal(&out), "another seed drew the same mask");
        assert!(dropout(&x, 0.0, 7).equal(&x));
        assert_eq!(dropout(&x, 1.0, 7).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn swiglu_down_matches_autograd_in_f32_and_under_bf16_autocast() {
        for cast in [None, Some(Kind::BFloat16)] {
            let (x, weight) = (leaf(&[2, 5, 24], 3), leaf(&[16, 24], 4));
            let (gate, up) = (&x * 1.5, &x * -0.5 + 0.25); // non-leaf inputs, as the projections' outputs
            let (gate, up) = match cast {
                Some(kind) => (gate.to_kind(kind), up.to_kind(kind)),
                None => (gate, up),
            };
            let probe = Tensor::randn([2, 5, 16], (Kind::Float, tch::Device::Cpu));
            let fused = swiglu_down(&gate, &up, &weight, None, cast);
            let fused_grads = grads(&fused, &probe, &[&x, &weight]);
            let product = gate.silu() * &up;
            let plain = match cast {
                Some(kind) => product.to_kind(kind).linear::<Tensor>(&weight.to_kind(kind), None),
                None => product.linear::<Tensor>(&weight, None),
            };
            let plain_grads = grads(&plain, &probe, &[&x, &weight]);
            assert_eq!(fused.kind(), plain.kind());
            // the same operations; the backward pass orders its products differently, so bf16 rounds apart
            let tolerance = if cast.is_some() { 1e-2 } else { 1e-6 };
            assert_close("output", &fused, &plain, tolerance);
            for (name, (got, want)) in ["x", "weight"].iter().zip(fused_grads.iter().zip(&plain_grads)) {
                assert_close(name, got, want, tolerance);
            }
        }
    }

    /// The same values and gradients, bit for bit, as autocast's casts and linears (the same products, in the same
    /// order; x's gradient summed in f32 as autograd sums it).
    #[test]
    fn cast_linears_match_autocast_linears() {
        for with_bias in [false, true] {
            let x_leaf = leaf(&[2, 5, 24], 5);
            let x = &x_leaf * 1.5; // a non-leaf input, as a norm's output
            let weights = [leaf(&[16, 24], 6), leaf(&[8, 24], 7), leaf(&[8, 24], 8)];
            let biases = [leaf(&[16], 9), leaf(&[8], 10), leaf(&[8], 11)];
            let probes: Vec<Tensor> =
                [16, 8, 8].iter().map(|&n| Tensor::randn([2, 5, n], (Kind::Float, tch::Device::Cpu))).collect();
            let weight_refs: Vec<&Tensor> = weights.iter().collect();
            let bias_refs: Vec<&Tensor> = biases.iter().collect();
            let fused = cast_linears(&x, &weight_refs, with_bias.then_some(bias_refs.as_slice()), Kind::BFloat16);
            // autocast's way: x cast for each projection, weights cast, everything kept by autograd
            let plain: Vec<Tensor> = weights
                .iter()
                .zip(&biases)
                .map(|(w, b)| {
                    let b = with_bias.then(|| b.to_kind(Kind::BFloat16));
                    x.to_kind(Kind::BFloat16).linear(&w.to_kind(Kind::BFloat16), b.as_ref())
                })
                .collect();
            let mut inputs: Vec<&Tensor> = vec![&x_leaf];
            inputs.extend(weights.iter());
            if with_bias {
                inputs.extend(biases.iter());
            }
            let sum = |outputs: &[Tensor]| {
                outputs
                    .iter()
                    .zip(&probes)
                    .map(|(o, p)| (o.to_kind(Kind::Float) * p).sum(Kind::Float))
                    .reduce(|a, b| a + b)
                    .unwrap()
            };
            let grads = |outputs: &[Tensor]| {
                sum(outputs).backward();
                inputs
                    .iter()
                    .map(|t| {
                        let grad = t.grad().copy();
                        let _ = t.grad().zero_();
                        grad
                    })
                    .collect::<Vec<_>>()
            };
            let (fused_grads, plain_grads) = (grads(&fused), grads(&plain));
            for (got, want) in fused.iter().zip(&plain) {
                assert_eq!(got.kind(), Kind::BFloat16);
                assert!(got.equal(want), "forward values differ");
            }
            for (i, (got, want)) in fused_grads.iter().zip(&plain_grads).enumerate() {
                assert_eq!(got.kind(), want.kind());
                assert!(got.equal(want), "gradient {i} (bias {with_bias}) differs");
            }
        }
    }
}
