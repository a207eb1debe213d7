// libtorch's c10d for distributed.rs (tch binds none of it): the rendezvous through a TCPStore (rank 0 serves it, as
// torchrun's MASTER_ADDR/MASTER_PORT name it) and a process group over it, Gloo's (which PyTorch uses on CPU).
// The collectives run in place and wait for their result; a peer that dies or stalls surfaces as an error after
// the group's timeout at most. Shares ffi.h's conventions: tensors as tch's `at::Tensor *` handles, null or a
// message to free() returned.
#include "../model/ffi.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef PREFALIGN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <string>

struct PrefalignGroup {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
};

// Whether this build has the NCCL backend (built against a torch with its CUDA libraries).
extern "C" bool prefalign_has_nccl() {
#ifdef PREFALIGN_NCCL
    return true;
#else
    return false;
#endif
}

// Joins the group of `world` processes whose store rank 0 serves at host:port, on Gloo or (`nccl`) NCCL. Every
// call blocks until all ranks have joined, or fails after `timeout_ms`.
extern "C" char *prefalign_group_new(const char *host, int port, int rank, int world, int64_t timeout_ms, bool nccl,
                                     PrefalignGroup **out) {
    return guarded([&] {
        auto timeout = std::chrono::milliseconds(timeout_ms);
        c10d::TCPStoreOptions options;
        options.port = static_cast<std::uint16_t>(port);
        options.isServer = rank == 0;
        options.numWorkers = world;
        options.waitWorkers = true;
        options.timeout = timeout;
        auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
        // the prefix torch.distributed gives its default group's keys
        auto group_store = c10::make_intrusive<c10d::PrefixStore>("default_pg/0/", store);
        c10::intrusive_ptr<c10d::Backend> backend;
        if (nccl) {
#ifdef PREFALIGN_NCCL
            auto options = c10d::ProcessGroupNCCL::Options::create();
            options->timeout = timeout;
            backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group_store, rank, world, options);
#else
            throw std::runtime_error("this build has no NCCL backend (built against torch without its CUDA libraries)");
#endif
        } else {
            auto gloo = c10d::ProcessGroupGloo::Options::create_default(timeout);
            backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group_store, rank, world, gloo);
        }
        *out = new PrefalignGroup{store, backend};
    });
}

extern "C" void prefalign_group_free(PrefalignGroup *group) { delete group; }

// Sums `tensor` in place across the ranks.
extern "C" char *prefalign_group_all_reduce_sum(PrefalignGroup *group, at::Tensor *tensor) {
    return guarded([&] {
        std::vector<at::Tensor> list{*tensor};
        c10d::AllreduceOptions options;
        options.reduceOp = c10d::ReduceOp::SUM;
        group->backend->allreduce(list, options)->wait();
    });
}

// Copies rank `root`'s `tensor` into every rank's.
extern "C" char *prefalign_group_broadcast(PrefalignGroup *group, at::Tensor *tensor, int root) {
    return guarded([&] {
        std::vector<at::Tensor> list{*tensor};
        c10d::BroadcastOptions options;
        options.rootRank = root;
        group->backend->broadcast(list, options)->wait();
    });
}

// Every rank's `input` (the same shape on all), stacked in rank order: [world, ...] in `*out`.
extern "C" char *prefalign_group_all_gather(PrefalignGroup *group, at::Tensor *input, at::Tensor **out) {
    return guarded([&] {
        int world = group->backend->getSize();
        std::vector<at::Tensor> outputs;
        for (int i = 0; i < world; i++) outputs.push_back(at::empty_like(*input));
        std::vector<std::vector<at::Tensor>> output_lists{outputs};
        std::vector<at::Tensor> inputs{*input};
        group->backend->allgather(output_lists, inputs)->wait();
        *out = new at::Tensor(at::stack(output_lists[0]));
    });
}

// The store's key-value operations, for what is not a tensor (a failed rank's message, a run's settings).
extern "C" char *prefalign_store_set(PrefalignGroup *group, const char *key, const uint8_t *value, size_t len) {
    return guarded([&] { group->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

// Waits up to the store's timeout for `key`; its value in `*out` (malloc'd, `*len` bytes; the caller frees it).
extern "C" char *prefalign_store_get(PrefalignGroup *group, const char *key, uint8_t **out, size_t *len) {
    return guarded([&] {
        auto value = group->store->get(key);
        *out = static_cast<uint8_t *>(malloc(value.size() > 0 ? value.size() : 1));
        memcpy(*out, value.data(), value.size());
        *len = value.size();
    });
}

extern "C" char *prefalign_store_check(PrefalignGroup *group, const char *key, bool *present) {
    return guarded([&] { *present = group->store->check({key}); });
}

// Gradient averaging overlapped with the backward pass, as DDP's Reducer does it: the parameters in buckets, a hook
// after each parameter's gradient accumulation; once every gradient of a bucket (and of the buckets before it: every
// rank must issue the same collectives in the same order) is final, the bucket is flattened and its all-reduce starts
// while the backward pass goes on. `finish` starts what is left, waits, and writes the averages back.
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>

struct PrefalignOverlap {
    PrefalignGroup *group;
    std::vector<std::vector<at::Tensor>> buckets;
    std::vector<size_t> bucket_of;   // per parameter
    std::vector<int> remaining;      // accumulations a bucket still waits for in this backward pass
    std::vector<int> expected;       // per bucket
    std::vector<at::Tensor> flats;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    size_t launched = 0;             // buckets started, in order
    bool armed = false;
    std::string error;
    std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // kept alive: the hooks live on them
    std::vector<uintptr_t> hooks;
    std::mutex mutex;

    void launch_ready() {
        while (launched < buckets.size() && remaining[launched] <= 0) launch(launched++);
    }

    void launch(size_t b) {
        std::vector<at::Tensor> parts;
        for (auto &param : buckets[b]) {
            auto grad = param.grad();
            parts.push_back(grad.defined() ? grad.reshape({-1}) : at::zeros({param.numel()}, param.options()));
        }
        flats[b] = at::cat(parts);
        std::vector<at::Tensor> list{flats[b]};
        c10d::AllreduceOptions options;
        options.reduceOp = c10d::ReduceOp::SUM;
        works[b] = group->backend->allreduce(list, options);
    }
};

// `params` in the order their gradients become final (the last layers first); `uses[i]`: how many times the
// backward pass accumulates into params[i] (2 for an embedding tied to the LM head).
extern "C" char *prefalign_overlap_new(PrefalignGroup *group, at::Tensor **params, const int *uses, size_t count,
                                       size_t bucket_bytes, PrefalignOverlap **out) {
    return guarded([&] {
        auto overlap = new PrefalignOverlap();
        overlap->group = group;
        size_t bytes = 0;
        for (size_t i = 0; i < count; i++) {
            const auto &param = *params[i];
            size_t size = param.numel() * param.element_size();
            bool fits = !overlap->buckets.empty() && bytes + size <= bucket_bytes &&
                        overlap->buckets.back().front().scalar_type() == param.scalar_type();
            if (!fits) {
                overlap->buckets.emplace_back();
                bytes = 0;
            }
            overlap->buckets.back().push_back(param);
            overlap->bucket_of.push_back(overlap->buckets.size() - 1);
            bytes += size;
        }
        size_t n = overlap->buckets.size();
        overlap->remaining.assign(n, 0);
        overlap->expected.assign(n, 0);
        for (size_t i = 0; i < count; i++) overlap->expected[overlap->bucket_of[i]] += uses[i];
        overlap->flats.assign(n, at::Tensor());
        overlap->works.assign(n, nullptr);
        for (size_t i = 0; i < count; i++) {
            auto accumulator = torch::autograd::impl::grad_accumulator(*params[i]);
            size_t b = overlap->bucket_of[i];
            auto key = accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
                [overlap, b](const torch::autograd::variable_list &outputs, const torch::autograd::variable_list &) {
                    std::lock_guard<std::mutex> lock(overlap->mutex);
                    if (overlap->armed && overlap->error.empty()) {
                        try {
                            overlap->remaining[b]--;
                            overlap->launch_ready();
                        } catch (const c10::Error &e) {
                            overlap->error = e.what_without_backtrace();
                        } catch (const std::exception &e) {
                            overlap->error = e.what();
                        }
                    }
                    return outputs;
                }));
            overlap->accumulators.push_back(accumulator);
            overlap->hooks.push_back(key);
        }
        *out = overlap;
    });
}

// Before the backward pass whose gradients are the step's (the last micro-batch's): from here the hooks start buckets.
extern "C" void prefalign_overlap_arm(PrefalignOverlap *overlap) {
    std::lock_guard<std::mutex> lock(overlap->mutex);
    overlap->armed = true;
    overlap->launched = 0;
    overlap->error.clear();
    overlap->remaining = overlap->expected;
}

// Starts the buckets not yet started, waits for all, and sets each gradient to its average over `world` ranks.
// `bytes` gets the bytes all-reduced.
extern "C" char *prefalign_overlap_finish(PrefalignOverlap *overlap, int world, uint64_t *bytes) {
    return guarded([&] {
        std::lock_guard<std::mutex> lock(overlap->mutex);
        overlap->armed = false;
        if (!overlap->error.empty()) throw std::runtime_error(overlap->error);
        while (overlap->launched < overlap->buckets.size()) overlap->launch(overlap->launched++);
        *bytes = 0;
        for (size_t b = 0; b < overlap->buckets.size(); b++) {
            overlap->works[b]->wait();
            auto flat = overlap->flats[b].div_(world);
            int64_t offset = 0;
            for (auto &param : overlap->buckets[b]) {
                auto n = param.numel();
                auto grad = param.grad();
                auto average = flat.narrow(0, offset, n).view(param.sizes());
                if (grad.defined()) {
                    grad.copy_(average);
                } else {
                    param.mutable_grad() = average.clone();
                }
                offset += n;
            }
            *bytes += flat.numel() * flat.element_size();
            overlap->works[b] = nullptr;
            overlap->flats[b] = at::Tensor();
        }
    });
}

// Removes the hooks and frees the bookkeeping.
extern "C" void prefalign_overlap_free(PrefalignOverlap *overlap) {
    for (size_t i = 0; i < overlap->accumulators.size(); i++) overlap->accumulators[i]->del_post_hook(overlap->hooks[i]);
    delete overlap;
}

// Point to point, for what one rank gathers (a sharded optimizer's moments for a checkpoint): `tensor` to rank
// `dst`, or into `tensor` from rank `src`, with a tag that pairs them.
extern "C" char *prefalign_group_send(PrefalignGroup *group, at::Tensor *tensor, int dst, int tag) {
    return guarded([&] {
        std::vector<at::Tensor> list{*tensor};
        group->backend->send(list, dst, tag)->wait();
    });
}

extern "C" char *prefalign_group_recv(PrefalignGroup *group, at::Tensor *tensor, int src, int tag) {
    return guarded([&] {
        std::vector<at::Tensor> list{*tensor};
        group->backend->recv(list, src, tag)->wait();
    });
}
