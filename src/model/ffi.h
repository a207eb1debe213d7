// What prefalign's C++ functions for Rust share (model/fused.cpp, model/quantized.cpp): tensors cross as tch's
// `C_tensor` handles (`at::Tensor *`); each function stores a new handle in `*out`, which the caller owns, and
// returns null, or an error message that the caller frees with free() (fused.rs `panic_on_error`).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <vector>

template <typename F>
static char *guarded(F body) {
    try {
        body();
        return nullptr;
    } catch (const c10::Error &error) {
        return strdup(error.what_without_backtrace());  // no C++ stack trace in a user's error message
    } catch (const std::exception &error) {
        return strdup(error.what());
    }
}

// `count` handles as a list of tensors.
static std::vector<at::Tensor> tensor_list(at::Tensor **tensors, size_t count) {
    std::vector<at::Tensor> list;
    for (size_t i = 0; i < count; i++) list.push_back(*tensors[i]);
    return list;
}
