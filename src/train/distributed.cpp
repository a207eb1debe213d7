// libtorch's c10d for distributed.rs (tch binds none of it): the rendezvous through a TCPStore (rank 0 serves it, as
// torchrun's MASTER_ADDR/MASTER_PORT name it) and a process group over it, Gloo's (which PyTorch uses on CPU).
// The collectives run in place and wait for their result; a peer that dies or stalls surfaces as an error after
// the group's timeout at most. Shares ffi.h's conventions: tensors as tch's `at::Tensor *` handles, null or a
// message to free() returned.
#include "../model/ffi.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <string>

struct PrefalignGroup {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
};

// Joins the group of `world` processes whose store rank 0 serves at host:port. Every call blocks until all ranks
// have joined, or fails after `timeout_ms`.
extern "C" char *prefalign_group_new(const char *host, int port, int rank, int world, int64_t timeout_ms,
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
        auto gloo = c10d::ProcessGroupGloo::Options::create_default(timeout);
        auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group_store, rank, world, gloo);
        *out = new PrefalignGroup{store, backend};
    });
}

extern "C" void prefalign_group_free(PrefalignGroup *group) { delete group; }

// Sums `count` tensors in place across the ranks (one coalesced collective when they share a device and dtype).
extern "C" char *prefalign_group_all_reduce_sum(PrefalignGroup *group, at::Tensor **tensors, size_t count) {
    return guarded([&] {
        auto list = tensor_list(tensors, count);
        c10d::AllreduceOptions options;
        options.reduceOp = c10d::ReduceOp::SUM;
        group->backend->allreduce(list, options)->wait();
    });
}

// Copies rank `root`'s tensors into every rank's.
extern "C" char *prefalign_group_broadcast(PrefalignGroup *group, at::Tensor **tensors, size_t count, int root) {
    return guarded([&] {
        auto list = tensor_list(tensors, count);
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

extern "C" char *prefalign_group_barrier(PrefalignGroup *group) {
    return guarded([&] { group->backend->barrier()->wait(); });
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
