// The optimizer's C++ half, for optimizer.rs (tch 0.24 binds neither):
// - torch's fused AdamW kernel (`torch._fused_adamw_`, the optimizer transformers' Trainer uses by default with
//   torch >= 2.8: `adamw_torch_fused`): one pass over parameter, gradient and both moments instead of the ten
//   element-wise passes (and temporaries) of the same update written with tensor ops;
// - `zero_grad(set_to_none=True)`.
#include <ATen/ops/_fused_adamw.h>

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

// torch's `zero_grad(set_to_none=True)` for one parameter.
extern "C" void prefalign_clear_grad(at::Tensor *param) { param->mutable_grad() = at::Tensor(); }
