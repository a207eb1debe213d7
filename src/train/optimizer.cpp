// The optimizer's C++ half, for optimizer.rs (tch 0.24 binds neither):
// - torch's fused AdamW kernel (`torch._fused_adamw_`, the optimizer transformers' Trainer uses by default with
//   torch >= 2.8: `adamw_torch_fused`): one pass over parameter, gradient and both moments instead of the ten
//   element-wise passes (and temporaries) of the same update written with tensor ops;
// - `clip_grad_norm_` as torch runs it: the foreach kernels on CUDA (a few launches instead of two per parameter),
//   one norm and one multiplication per gradient elsewhere (none where the norm is within max_norm: torch
//   multiplies by exactly 1 there);
// - `zero_grad(set_to_none=True)`.
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/stack.h>

#include <cstring>
#include <vector>

// Tensors arrive as tch's `C_tensor` handles, which are `at::Tensor *`. Returns null, or an error message that the
// caller frees with free().
extern "C" char *prefalign_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                                       at::Tensor **exp_avg_sqs, at::Tensor *step, size_t count, double lr,
                                       double beta1, double beta2, double weight_decay, double eps) {
    try {
        std::vector<at::Tensor> param_list, grad_list, exp_avg_list, exp_avg_sq_list, step_list;
        for (size_t i = 0; i < count; i++) {
            param_list.push_back(*params[i]);
            grad_list.push_back(*grads[i]);
            exp_avg_list.push_back(*exp_avgs[i]);
            exp_avg_sq_list.push_back(*exp_avg_sqs[i]);
            step_list.push_back(*step);  // the kernel only reads each parameter's step count
        }
        at::_fused_adamw_(param_list, grad_list, exp_avg_list, exp_avg_sq_list, /*max_exp_avg_sqs=*/{}, step_list, lr,
                          beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
        return nullptr;
    } catch (const std::exception &error) {
        return strdup(error.what());
    }
}

// torch.nn.utils.clip_grad_norm_(norm_type=2) over `count` gradients of one device and dtype: scales them in place
// so that their global L2 norm is at most `max_norm` and stores that norm before clipping, a 0-d tensor, in
// `*total_out`. `foreach` picks torch's foreach kernels, which torch uses for CUDA tensors (not for CPU ones).
extern "C" char *prefalign_clip_grad_norm(at::Tensor **grads, size_t count, double max_norm, bool foreach,
                                          at::Tensor **total_out) {
    try {
        std::vector<at::Tensor> grad_list(count);
        for (size_t i = 0; i < count; i++) grad_list[i] = *grads[i];
        std::vector<at::Tensor> norms;
        if (foreach) {
            norms = at::_foreach_norm(grad_list, 2);
        } else {
            for (const auto &grad : grad_list) norms.push_back(at::linalg_vector_norm(grad, 2));
        }
        auto total = at::linalg_vector_norm(at::stack(norms), 2);
        // Python's `max_norm / (total_norm + 1e-6)` on a tensor is reciprocal(...) * max_norm
        auto coef = at::clamp(at::mul(at::reciprocal(at::add(total, 1e-6)), max_norm), std::nullopt, 1.0);
        if (foreach) {
            at::_foreach_mul_(grad_list, coef);
        } else if (!(coef.item<double>() >= 1.0)) {  // on the CPU reading it costs nothing; NaN multiplies, as torch
            for (auto &grad : grad_list) grad.mul_(coef);
        }
        *total_out = new at::Tensor(total);
        return nullptr;
    } catch (const std::exception &error) {
        return strdup(error.what());
    }
}

// torch's `zero_grad(set_to_none=True)` for one parameter.
extern "C" void prefalign_clear_grad(at::Tensor *param) { param->mutable_grad() = at::Tensor(); }
