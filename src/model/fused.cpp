// Pieces of the decoder layer as autograd functions that keep less for the backward pass than the same
// tensor ops would, for model/fused.rs. The forward computations are the ops decoder.rs used before (and
// transformers runs); the backward passes recompute the cheap element-wise parts from what they kept. tch 0.24
// has no custom autograd functions, hence C++.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <mutex>
#include <optional>

#include "ffi.h"

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

// transformers' LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), normalized in f32 and cast back to x's dtype
// before the weight. Autograd would keep x and the normalized x; this keeps x and one scale per row.
struct RmsNorm : public Function<RmsNorm> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight, double eps) {
        auto x32 = x.to(at::kFloat);
        auto rstd = (x32.pow(2).mean(-1, /*keepdim=*/true) + eps).rsqrt();  // [..., 1]
        ctx->save_for_backward({x, weight, rstd});
        return weight * (x32 * rstd).to(x.scalar_type());
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto &x = saved[0], &weight = saved[1], &rstd = saved[2];
        const auto &grad = grads[0];
        auto normed32 = x.to(at::kFloat) * rstd;
        auto normed = normed32.to(x.scalar_type());
        at::Tensor grad_weight;
        if (weight.requires_grad()) grad_weight = (grad * normed).sum_to_size(weight.sizes()).to(weight.scalar_type());
        auto grad_normed = (grad * weight).to(at::kFloat);
        // d/dx of x * rsqrt(mean(x^2) + eps) applied to grad_normed, per row
        auto grad_x = rstd * (grad_normed - normed32 * (grad_normed * normed32).mean(-1, /*keepdim=*/true));
        return {grad_x.to(x.scalar_type()), grad_weight, at::Tensor()};
    }
};

// The end of the SwiGLU MLP: silu(gate) * up times down_proj's weight, with the matrix product in `cast` when given
// (autocast; the weight is the f32 master). Autograd would keep gate, silu(gate), up and the product, each
// [..., intermediate]; this keeps gate and up and recomputes the other two. A bias, which few models have, is added
// by the caller: an undefined tensor cannot be an autograd function's input.
struct SwigluDown : public Function<SwigluDown> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &gate, const at::Tensor &up,
                              const at::Tensor &weight, int64_t cast) {
        ctx->save_for_backward({gate, up, weight});
        ctx->saved_data["cast"] = cast;
        auto kind = cast < 0 ? weight.scalar_type() : static_cast<at::ScalarType>(cast);
        return at::linear((at::silu(gate) * up).to(kind), weight.to(kind));
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto &gate = saved[0], &up = saved[1], &weight = saved[2];
        auto cast = ctx->saved_data["cast"].toInt();
        auto kind = cast < 0 ? weight.scalar_type() : static_cast<at::ScalarType>(cast);
        const auto &grad = grads[0];  // [..., hidden]
        auto silu = at::silu(gate);
        at::Tensor grad_weight;
        if (weight.requires_grad()) {
            auto product = (silu * up).to(kind);  // [..., intermediate]
            grad_weight = grad.reshape({-1, grad.size(-1)}).t().mm(product.reshape({-1, product.size(-1)}));
            grad_weight = grad_weight.to(weight.scalar_type());
        }
        auto grad_product = grad.matmul(weight.to(kind)).to(up.scalar_type());
        // the same two products autograd forms for silu(gate) * up, then torch's own silu backward
        auto grad_up = grad_product * silu;
        auto grad_gate = at::silu_backward(grad_product * up, gate);
        return {grad_gate, grad_up, grad_weight, at::Tensor()};
    }
};

// Linear projections of one input under autocast (q/k/v, gate/up, or one alone): x cast to `cast` once for all of
// them, and for the backward pass only that cast and the master weights kept, the weights cast again there. Autocast
// (and transformers under it) casts x once per projection, and autograd would keep every cast of x and of each
// weight. The forward computation is the same; each projection's gradient reaches x in x's dtype, summed there
// as autograd sums them (last projection first).
struct CastLinears : public Function<CastLinears> {
    static variable_list forward(AutogradContext *ctx, const at::Tensor &x, at::TensorList weights,
                                 at::TensorList biases, int64_t cast) {
        auto kind = static_cast<at::ScalarType>(cast);
        auto x_cast = x.to(kind);
        variable_list outputs, saved{x_cast};
        for (size_t i = 0; i < weights.size(); i++) {
            auto bias = biases.empty() ? std::optional<at::Tensor>() : biases[i].to(kind);
            outputs.push_back(at::linear(x_cast, weights[i].to(kind), bias));
            saved.push_back(weights[i]);
        }
        ctx->save_for_backward(saved);
        ctx->saved_data["x_kind"] = static_cast<int64_t>(x.scalar_type());
        ctx->saved_data["bias_kind"] = biases.empty() ? int64_t{-1} : static_cast<int64_t>(biases[0].scalar_type());
        return outputs;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto &x_cast = saved[0];
        auto x_kind = static_cast<at::ScalarType>(ctx->saved_data["x_kind"].toInt());
        auto count = saved.size() - 1;
        auto bias_code = ctx->saved_data["bias_kind"].toInt();  // -1: no biases
        auto bias_count = bias_code < 0 ? 0 : count;
        auto x_rows = x_cast.reshape({-1, x_cast.size(-1)});  // [N, in]
        auto needs_grad_x = ctx->needs_input_grad(0);
        at::Tensor grad_x;
        variable_list grad_weights(count), grad_biases(bias_count);
        for (size_t i = count; i-- > 0;) {
            if (!grads[i].defined()) continue;
            const auto &weight = saved[1 + i];  // [out, in], the master
            auto grad = grads[i].reshape({-1, grads[i].size(-1)});  // [N, out]
            if (needs_grad_x) {
                auto grad_x_part = grad.mm(weight.to(x_cast.scalar_type())).to(x_kind);
                grad_x = grad_x.defined() ? grad_x + grad_x_part : grad_x_part;
            }
            if (weight.requires_grad()) grad_weights[i] = grad.t().mm(x_rows).to(weight.scalar_type());
            if (bias_count > 0) grad_biases[i] = grad.sum(0).to(static_cast<at::ScalarType>(bias_code));
        }
        variable_list result{grad_x.defined() ? grad_x.view(x_cast.sizes()) : grad_x};
        result.insert(result.end(), grad_weights.begin(), grad_weights.end());
        result.insert(result.end(), grad_biases.begin(), grad_biases.end());
        result.push_back(at::Tensor());  // cast
        return result;
    }
};

extern "C" char *prefalign_rms_norm(at::Tensor *x, at::Tensor *weight, double eps, at::Tensor **out) {
    return guarded([&] { *out = new at::Tensor(RmsNorm::apply(*x, *weight, eps)); });
}

// `cast` is a c10::ScalarType code, or -1 for none.
extern "C" char *prefalign_swiglu_down(at::Tensor *gate, at::Tensor *up, at::Tensor *weight, int64_t cast,
                                       at::Tensor **out) {
    return guarded([&] { *out = new at::Tensor(SwigluDown::apply(*gate, *up, *weight, cast)); });
}

// `count` projections of x, written to outs[0..count]; `biases` is null or holds `count` biases. `cast` is a
// c10::ScalarType code.
extern "C" char *prefalign_cast_linears(at::Tensor *x, at::Tensor **weights, at::Tensor **biases, size_t count,
                                        int64_t cast, at::Tensor **outs) {
    return guarded([&] {
        auto weight_list = tensor_list(weights, count);
        auto bias_list = tensor_list(biases, biases ? count : 0);
        // as TensorLists, which autograd counts as inputs (a std::vector would count as one non-tensor argument)
        auto outputs = CastLinears::apply(*x, at::TensorList(weight_list), at::TensorList(bias_list), cast);
        for (size_t i = 0; i < count; i++) outs[i] = new at::Tensor(outputs[i]);
    });
}

// Dropout as torch's (keep with probability 1 - p, kept values times 1 / (1 - p)), the mask drawn from a generator
// of x's device seeded with `seed` alone: the same seed gives the same mask whatever ran before, so a resumed run
// and a layer recomputed under gradient checkpointing draw what the first pass drew. Autograd keeps the boolean
// mask, as torch's dropout does.
extern "C" char *prefalign_dropout(at::Tensor *x, double p, uint64_t seed, at::Tensor **out) {
    return guarded([&] {
        auto generator = [&] {
            auto global = at::globalContext().defaultGenerator(x->device());
            std::lock_guard<std::mutex> lock(global.mutex());
            return global.clone();  // a generator of the device's kind, which the seed then resets
        }();
        {
            std::lock_guard<std::mutex> lock(generator.mutex());
            generator.set_current_seed(seed);
        }
        if (p >= 1) {  // torch's dropout zeroes everything, with a gradient of zero
            *out = new at::Tensor(x->mul(0));
            return;
        }
        auto keep = at::empty_like(*x, x->options().dtype(at::kBool)).bernoulli_(1 - p, generator);
        *out = new at::Tensor(x->mul(keep).mul_(1 / (1 - p)));
    });
}
