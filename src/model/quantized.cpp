// Frozen linear weights kept quantized (a GGUF file's blocks, or bitsandbytes' NF4) and dequantized where they are
// used, for model/quantized.rs. The dequantization is tensor ops, so it runs on any device; each format computes
// in f32 exactly as its reference does (ggml's dequantize_row_* and model/gguf/dequant.rs; bitsandbytes'
// dequantize_4bit), then casts to the compute dtype.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "ffi.h"

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace {

// ggml type ids (GGUF's tensor types) and prefalign's own code for NF4.
enum Format : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
                        NF4 = 1000 };

// bytes [at, at + n) of every block as int32, [blocks, n]
at::Tensor bytes(const at::Tensor &blocks, int64_t at, int64_t n) { return blocks.narrow(1, at, n).to(at::kInt); }

// the little-endian f16 at byte `at` of every block, as f32 [blocks, 1]
at::Tensor half_at(const at::Tensor &blocks, int64_t at) {
    return blocks.narrow(1, at, 2).contiguous().view(at::kHalf).to(at::kFloat);
}

at::Tensor low4(const at::Tensor &t) { return at::bitwise_and(t, 15); }
at::Tensor high4(const at::Tensor &t) { return at::bitwise_right_shift(t, 4); }
at::Tensor shl(const at::Tensor &t, int64_t n) { return at::bitwise_left_shift(t, n); }

// blocks [n_blocks, block_bytes] u8 of one ggml type -> f32 [n_blocks, block_elements]
at::Tensor dequantize_ggml(int64_t type, const at::Tensor &blocks) {
    const auto &b = blocks;
    switch (type) {
        case F32: return b.contiguous().view(at::kFloat);
        case F16: return b.contiguous().view(at::kHalf).to(at::kFloat);
        case BF16: return b.contiguous().view(at::kBFloat16).to(at::kFloat);
        case Q8_0: return half_at(b, 0) * b.narrow(1, 2, 32).contiguous().view(at::kChar).to(at::kFloat);
        case Q4_0: {
            auto qs = bytes(b, 2, 16);
            return (at::cat({low4(qs), high4(qs)}, 1) - 8).to(at::kFloat) * half_at(b, 0);
        }
        case Q4_1: {
            auto qs = bytes(b, 4, 16);
            return at::cat({low4(qs), high4(qs)}, 1).to(at::kFloat) * half_at(b, 0) + half_at(b, 2);
        }
        case Q4_K:
        case Q5_K: {
            // 8 sub-blocks of 32 with 6-bit scales and mins (ggml's get_scale_min_k4)
            auto s = bytes(b, 4, 12);
            auto s0 = s.narrow(1, 0, 4), s1 = s.narrow(1, 4, 4), s2 = s.narrow(1, 8, 4);
            auto scales = at::cat({at::bitwise_and(s0, 63), at::bitwise_or(low4(s2), shl(at::bitwise_right_shift(s0, 6), 4))}, 1);
            auto mins = at::cat({at::bitwise_and(s1, 63), at::bitwise_or(high4(s2), shl(at::bitwise_right_shift(s1, 6), 4))}, 1);
            auto d = (half_at(b, 0) * scales.to(at::kFloat)).unsqueeze(-1);     // [blocks, 8, 1]
            auto m = (half_at(b, 2) * mins.to(at::kFloat)).unsqueeze(-1);
            auto qs = bytes(b, type == Q4_K ? 16 : 48, 128).view({-1, 4, 32});  // sub-block pairs: low, high nibbles
            auto q = at::stack({low4(qs), high4(qs)}, 2).view({-1, 8, 32});
            if (type == Q5_K) {
                // the fifth bit of sub-block k is bit k of qh
                auto qh = bytes(b, 16, 32).unsqueeze(1);
                auto shifts = at::arange(8, qh.options()).view({1, 8, 1});
                q = q + shl(at::bitwise_and(at::bitwise_right_shift(qh, shifts), 1), 4);
            }
            return (d * q.to(at::kFloat) - m).view({-1, 256});
        }
        case Q6_K: {
            // two halves of 128: ql holds 4 low bits (q1, q2 low nibbles; q3, q4 high), qh 2 high bits of each
            auto ql = bytes(b, 0, 128).view({-1, 2, 64});
            auto qh = bytes(b, 128, 64).view({-1, 2, 1, 32});
            auto low = at::cat({low4(ql), high4(ql)}, 2).view({-1, 2, 4, 32});
            auto shifts = at::arange(0, 8, 2, qh.options()).view({1, 1, 4, 1});
            auto high = at::bitwise_and(at::bitwise_right_shift(qh, shifts), 3);
            auto q = (at::bitwise_or(low, shl(high, 4)) - 32).to(at::kFloat);
            // scale 2i + l / 16 of the half for quarter i
            auto sc = b.narrow(1, 192, 16).contiguous().view(at::kChar).to(at::kFloat).view({-1, 2, 4, 2, 1});
            auto scale = (half_at(b, 208).view({-1, 1, 1, 1, 1}) * sc).expand({-1, 2, 4, 2, 16}).reshape({-1, 2, 4, 32});
            return (scale * q).view({-1, 256});
        }
        default: TORCH_CHECK(false, "no dequantization for ggml type ", type);
    }
}

// values [n] f32 scaled by absmax [ceil(n / block)], one per block of `block` (the last may be shorter), as
// bitsandbytes' dequantize_blockwise / dequantize_4bit compute it
at::Tensor scale_blocks(const at::Tensor &values, const at::Tensor &absmax, int64_t block) {
    auto n = values.numel(), full = n - n % block;
    auto head = (values.narrow(0, 0, full).view({-1, block}) * absmax.narrow(0, 0, full / block).view({-1, 1}));
    if (full == n) return head.reshape({n});
    return at::cat({head.reshape({full}), values.narrow(0, full, n - full) * absmax[full / block]});
}

// NF4 (bitsandbytes' dequantize_4bit): parts = packed codes (two per byte, the first in the high nibble), the code
// table, then either absmax [blocks of 64] or, double-quantized, (absmax as u8 codes, their code table, absmax of
// blocks of 256 of them, offset)
at::Tensor dequantize_nf4(at::TensorList parts, int64_t n) {
    auto packed = parts[0].to(at::kLong);
    auto codes = at::stack({high4(packed), low4(packed)}, 1).view({-1}).narrow(0, 0, n);
    auto values = parts[1].index({codes});
    at::Tensor absmax;
    if (parts.size() == 3) {
        absmax = parts[2];
    } else {
        absmax = scale_blocks(parts[3].index({parts[2].to(at::kLong)}), parts[4], 256);
        absmax += parts[5];
    }
    return scale_blocks(values, absmax, 64);
}

at::Tensor dequantize(int64_t format, at::TensorList parts, int64_t rows, int64_t cols, at::ScalarType kind) {
    at::Tensor w;
    if (format == NF4) {
        w = dequantize_nf4(parts, rows * cols);
    } else {
        TORCH_CHECK(parts.size() == 1, "a ggml weight is one tensor of blocks");
        w = dequantize_ggml(format, parts[0]);  // [blocks, block bytes]
    }
    return w.reshape({rows, cols}).to(kind);
}

}  // namespace

// x [..., cols] times the dequantized weight [rows, cols] in `kind`. The weight is frozen; for the backward pass
// only its quantized parts are kept and it is dequantized again there, so no layer's dequantized weight outlives
// its use (autograd would keep each one until the backward pass: the whole model in `kind`).
struct QuantizedLinear : public Function<QuantizedLinear> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, at::TensorList parts, int64_t format,
                              int64_t rows, int64_t cols, int64_t kind) {
        ctx->save_for_backward(parts.vec());
        ctx->saved_data["format"] = format;
        ctx->saved_data["rows"] = rows;
        ctx->saved_data["cols"] = cols;
        ctx->saved_data["kind"] = kind;
        ctx->saved_data["x_kind"] = static_cast<int64_t>(x.scalar_type());
        auto w = dequantize(format, parts, rows, cols, static_cast<at::ScalarType>(kind));
        return at::linear(x.to(w.scalar_type()), w);
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto parts = ctx->get_saved_variables();
        auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
        auto w = dequantize(ctx->saved_data["format"].toInt(), parts, ctx->saved_data["rows"].toInt(),
                            ctx->saved_data["cols"].toInt(), kind);
        auto x_kind = static_cast<at::ScalarType>(ctx->saved_data["x_kind"].toInt());
        variable_list result{grads[0].to(kind).matmul(w).to(x_kind)};
        result.resize(1 + parts.size() + 4);  // the parts, format, rows, cols and kind get none
        return result;
    }
};

// `kind` is a c10::ScalarType code.
extern "C" char *prefalign_dequantize(int64_t format, at::Tensor **parts, size_t count, int64_t rows, int64_t cols,
                                      int64_t kind, at::Tensor **out) {
    return guarded([&] {
        auto list = tensor_list(parts, count);
        *out = new at::Tensor(dequantize(format, list, rows, cols, static_cast<at::ScalarType>(kind)));
    });
}

extern "C" char *prefalign_quantized_linear(at::Tensor *x, int64_t format, at::Tensor **parts, size_t count,
                                            int64_t rows, int64_t cols, int64_t kind, at::Tensor **out) {
    return guarded([&] {
        auto list = tensor_list(parts, count);
        *out = new at::Tensor(QuantizedLinear::apply(*x, at::TensorList(list), format, rows, cols, kind));
    });
}
