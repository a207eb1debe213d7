//! Frozen projection weights kept quantized in memory, for LoRA on a base that does not fit in full precision
//! (QLoRA): a GGUF file's blocks as they are (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, or plain F32/F16/BF16), or
//! bitsandbytes' NF4 (`--load-in-4bit`, blocks of 64, optionally with its scales quantized again). A weight is
//! dequantized where it is used, in the forward and again in the backward pass (src/model/quantized.cpp), so
//! at most one layer's weights exist in full precision at a time.

use crate::model::fused::{cast_code, finish, handle};
use crate::model::gguf::dequant::GgmlType;
use std::ffi::c_char;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn prefalign_dequantize(
        format: i64,
        parts: *const *mut C_tensor,
        count: usize,
        rows: i64,
        cols: i64,
        kind: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn prefalign_quantized_linear(
        x: *mut C_tensor,
        format: i64,
        parts: *const *mut C_tensor,
        count: usize,
        rows: i64,
        cols: i64,
        kind: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// bitsandbytes' NF4 code table (`get_4bit_type("nf4")`): the 16 quantiles of a standard normal, scaled to [-1, 1].
/// Its literals as bitsandbytes writes them, rounded to f32 as its `torch.tensor` rounds them.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_5,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// NF4's block: one absmax per 64 weights (bitsandbytes' and transformers' default `blocksize`).
pub const NF4_BLOCK: i64 = 64;
/// Double quantization's block: one f32 scale per 256 absmax codes.
const NF4_NESTED_BLOCK: i64 = 256;

/// How a weight's bytes encode it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuantFormat {
    /// A GGUF tensor type, its blocks unchanged.
    Ggml(GgmlType),
    /// bitsandbytes' NF4; `double_quant`: the absmax values quantized again (`bnb_4bit_use_double_quant`).
    Nf4 { double_quant: bool },
}

impl QuantFormat {
    /// The code quantized.cpp knows the format by: the ggml type id, or 1000 for NF4.
    fn code(self) -> i64 {
        match self {
            QuantFormat::Ggml(ty) => ty.id() as i64,
            QuantFormat::Nf4 { .. } => 1000,
        }
    }

    pub fn name(self) -> String {
        match self {
            QuantFormat::Ggml(ty) => ty.name().to_string(),
            QuantFormat::Nf4 { double_quant: false } => "NF4".into(),
            QuantFormat::Nf4 { double_quant: true } => "NF4 (double-quantized)".into(),
        }
    }
}

/// A frozen weight [rows, cols] in a quantized format, computed with in `kind` (the model's dtype; autocast's when
/// a pass runs under it).
pub struct QuantizedWeight {
    pub format: QuantFormat,
    /// GGUF: the blocks, u8 [blocks, block bytes]. NF4: packed codes u8 [rows·cols/2], the code table f32 [16], and
    /// absmax f32 [blocks] or (absmax codes u8 [blocks], their code table f32 [256], scales f32 [⌈blocks/256⌉],
    /// offset f32 []).
    pub parts: Vec<Tensor>,
    pub rows: i64,
    pub cols: i64,
    pub kind: Kind,
}

impl QuantizedWeight {
    /// A GGUF tensor's bytes, u8 [rows, bytes per row], as a weight [rows, cols].
    pub fn from_ggml(ty: GgmlType, bytes: &Tensor, rows: i64, cols: i64, kind: Kind) -> Self {
        let (_, block_bytes) = ty.block();
        let blocks = bytes.reshape([-1, block_bytes as i64]);
        QuantizedWeight { format: QuantFormat::Ggml(ty), parts: vec![blocks], rows, cols, kind }
    }

    /// Quantizes `weight` [rows, cols] to NF4 as bitsandbytes' `quantize_4bit` does (its reference implementation in
    /// torch ops): per block of 64 the absmax, the weights scaled by its reciprocal and clamped to [-1, 1], the
    /// nearest code (`bucketize` on the midpoints), two codes per byte with the first in the high nibble. With
    /// `double_quant` the absmax values, less their mean, are quantized in blocks of 256 to the 8-bit dynamic code
    /// (`quantize_blockwise`).
    pub fn nf4(weight: &Tensor, double_quant: bool, kind: Kind) -> Self {
        let (rows, cols) = (weight.size()[0], weight.size()[1]);
        let code = Tensor::from_slice(&NF4_CODE).to_device(weight.device());
        let (codes, absmax) = quantize_blocks(&weight.reshape([-1]).to_kind(Kind::Float), &code, NF4_BLOCK);
        let codes = match codes.size()[0] % 2 {
            0 => codes,
            _ => Tensor::cat(&[codes.shallow_clone(), codes.zeros_like().narrow(0, 0, 1)], 0),
        };
        let packed = codes
            .slice(0, 0, None, 2)
            .bitwise_left_shift_tensor_scalar(4)
            .bitwise_or_tensor(&codes.slice(0, 1, None, 2));
        let mut parts = vec![packed.to_kind(Kind::Uint8), code];
        if double_quant {
            let offset = absmax.mean(Kind::Float);
            let dynamic = dynamic_map().to_device(weight.device());
            let (absmax_codes, scales) = quantize_blocks(&(&absmax - &offset), &dynamic, NF4_NESTED_BLOCK);
            parts.extend([absmax_codes.to_kind(Kind::Uint8), dynamic, scales, offset]);
        } else {
            parts.push(absmax);
        }
        QuantizedWeight { format: QuantFormat::Nf4 { double_quant }, parts, rows, cols, kind }
    }

    /// The weight [rows, cols] in `kind`.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let parts: Vec<*mut C_tensor> = self.parts.iter().map(handle).collect();
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // Safety: valid tensor handles for the call; the function stores a new handle in `out` on success.
        let error = unsafe {
            prefalign_dequantize(
                self.format.code(),
                parts.as_ptr(),
                parts.len(),
                self.rows,
                self.cols,
                cast_code(kind),
                &mut out,
            )
        };
        finish("dequantize", error, out)
    }

    /// x [..., cols] times the weight, in `cast` or the weight's own compute dtype: [..., rows] in that dtype.
    pub fn linear(&self, x: &Tensor, cast: Option<Kind>) -> Tensor {
        let parts: Vec<*mut C_tensor> = self.parts.iter().map(handle).collect();
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // Safety: as in `dequantize`.
        let error = unsafe {
            prefalign_quantized_linear(
                handle(x),
                self.format.code(),
                parts.as_ptr(),
                parts.len(),
                self.rows,
                self.cols,
                cast_code(cast.unwrap_or(self.kind)),
                &mut out,
            )
        };
        finish("quantized linear", error, out)
    }

    pub fn to_device(&self, device: Device) -> Self {
        QuantizedWeight { parts: self.parts.iter().map(|p| p.to_device(device)).collect(), ..*self }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.numel() * p.kind().elt_size_in_bytes()).sum()
    }
}

impl Clone for QuantizedWeight {
    fn clone(&self) -> Self {
        QuantizedWeight { parts: self.parts.iter().map(|p| p.shallow_clone()).collect(), ..*self }
    }
}

/// bitsandbytes' blockwise quantization of `values` [n] f32 to the nearest entry of the sorted `code`, per block
/// of `block` scaled by its absmax (the last block may be shorter): (codes int32 [n], absmax f32 [blocks]).
fn quantize_blocks(values: &Tensor, code: &Tensor, block: i64) -> (Tensor, Tensor) {
    let n = values.size()[0];
    let full = n - n % block;
    let blocks = values.narrow(0, 0, full).view([-1, block]);
    let mut absmax = blocks.abs().amax([-1].as_slice(), false);
    let reciprocal = absmax.clamp_min(1e-38).reciprocal().view([-1, 1]);
    let mut scaled = (blocks * reciprocal).clamp(-1.0, 1.0).reshape([-1]);
    if full < n {
        let tail = values.narrow(0, full, n - full);
        let tail_max = tail.abs().max().clamp_min(1e-38);
        scaled = Tensor::cat(&[scaled, (tail / &tail_max).clamp(-1.0, 1.0)], 0);
        absmax = Tensor::cat(&[absmax, tail_max.unsqueeze(0)], 0);
    }
    let count = code.size()[0];
    let bounds = (code.narrow(0, 0, count - 1) + code.narrow(0, 1, count - 1)) / 2.0;
    (scaled.bucketize(&bounds, true, false), absmax)
}

/// bitsandbytes' 8-bit dynamic code (`create_dynamic_map(signed=True)`): for each of 7 decades 10^(i-6), the
/// midpoints of 2^i + 1 points evenly spaced over [0.1, 1], scaled, with both signs; then 0 and 1, sorted.
pub fn dynamic_map() -> Tensor {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let points = Tensor::linspace(0.1, 1.0, (1i64 << i) + 1, (Kind::Float, Device::Cpu));
        let n = points.size()[0];
        let means = (points.narrow(0, 0, n - 1) + points.narrow(0, 1, n - 1)) / 2.0;
        let scale = 10f64.powi(i - 6);
        for sign in [1.0, -1.0] {
            data.extend(Vec::<f32>::try_from(&means * (sign * scale)).expect("f32 values"));
        }
    }
    data.extend([0.0, 1.0]);
    data.sort_by(f32::total_cmp);
    Tensor::from_slice(&data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::dequant::dequantize;

    /// Random bytes for `blocks` blocks of `ty` whose f16 scales are finite (as any real file's are).
    fn random_blocks(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        let (_, block_bytes) = ty.block();
        let mut state = seed;
        let mut bytes: Vec<u8> = (0..blocks * block_bytes)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let scale_offsets: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            _ => &[],
        };
        for block in bytes.chunks_exact_mut(block_bytes) {
            for &at in scale_offsets {
                // a small positive f16: exponent bits 0b00110..0b01101 (about 2^-9 … 2^-2)
                block[at + 1] = 0x18 + (block[at + 1] % 0x1C);
            }
        }
        bytes
    }

    #[test]
    fn ggml_dequantization_in_tensor_ops_equals_the_reference_loops() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let (block_elements, _) = ty.block();
            let (rows, cols) = (4i64, 2 * block_elements as i64);
            let bytes = random_blocks(ty, 8, ty.id() as u64);
            let want = Tensor::from_slice(&dequantize(ty, &bytes)).view([rows, cols]);
            let weight = QuantizedWeight::from_ggml(ty, &Tensor::from_slice(&bytes), rows, cols, Kind::Float);
            let got = weight.dequantize(Kind::Float);
            assert!(got.equal(&want), "{ty:?}: max difference {}", f64::try_from((got - want).abs().max()).unwrap());
        }
    }

    #[test]
    fn quantized_linear_matches_a_frozen_dense_linear_forward_and_backward() {
        let bytes = random_blocks(GgmlType::Q4K, 6, 7);
        let weight = QuantizedWeight::from_ggml(GgmlType::Q4K, &Tensor::from_slice(&bytes), 3, 512, Kind::Float);
        let dense = weight.dequantize(Kind::Float);
        for cast in [None, Some(Kind::BFloat16)] {
            let x = Tensor::randn([2, 5, 512], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let probe = Tensor::randn([2, 5, 3], (Kind::Float, Device::Cpu));
            let got = weight.linear(&x, cast);
            let want = match cast {
                Some(kind) => x.to_kind(kind).linear(&dense.to_kind(kind), None::<Tensor>),
                None => x.linear(&dense, None::<Tensor>),
            };
            assert!(got.equal(&want), "{cast:?} forward");
            let grad = |y: &Tensor| {
                Tensor::run_backward(&[(y.to_kind(Kind::Float) * &probe).sum(Kind::Float)], &[&x], false, false)
            };
            let (g, w) = (grad(&got).remove(0), grad(&want).remove(0));
            assert!(g.allclose(&w, 1e-6, 1e-6, false), "{cast:?} backward");
        }
    }

    #[test]
    fn nf4_roundtrip_is_within_half_a_code_step_of_the_weights() {
        let w = Tensor::randn([8, 100], (Kind::Float, Device::Cpu));
        for double_quant in [false, true] {
            let q = QuantizedWeight::nf4(&w, double_quant, Kind::Float);
            let error = (q.dequantize(Kind::Float) - &w).abs().max();
            // the widest gap of the code is 0.30 (between -1 and -0.70) of an absmax of at most ~4
            assert!(f64::try_from(error).unwrap() < 0.65, "double_quant {double_quant}");
        }
        assert_eq!(dynamic_map().size(), [256]);
    }
}
