// Counts the ATen operators a process runs, for comparing how many kernels prefalign and TRL launch per step (on a
// GPU each such operator is a kernel launch; docs/PERFORMANCE.md, CUDA). Loaded with LD_PRELOAD, it counts every
// operator call ("ops") and those that call no other operator and are not views or metadata ("kernels", about one
// kernel each), and prints both to stderr at exit. Per step: run 2 steps and 1 step without warm-up, subtract.
// With OPCOUNT_BY_NAME=1 it also prints each kernel-like operator's count ("OPCOUNT <n> <name>"), most first; with
// OPCOUNT_BY_NAME=callers, keyed by up to three operators that called it ("aten::mul > aten::to > aten::_to_copy >
// aten::copy_"; an empty name is a call from outside any operator, such as autograd's backward functions).
//
//   T=<the torch package the process loads>   # .venv's for prefalign, .venv-fixtures' for TRL
//   c++ -std=c++17 -O2 -shared -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -I$T/include -I$T/include/torch/csrc/api/include \
//       tools/bench/opcount.cpp -L$T/lib -ltorch_cpu -lc10 -Wl,-rpath,$T/lib -o /tmp/opcount.so
//   LD_PRELOAD=/tmp/opcount.so prefalign bench ... --steps 2 --warmup 0
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

static std::atomic<long> ops{0}, kernels{0};
// per thread: for each operator now running, its name and whether it called another
static thread_local std::vector<std::pair<std::string, bool>> running;
static const std::set<std::string> no_kernel = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t",
    "aten::narrow", "aten::slice", "aten::select", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::_unsafe_view", "aten::lift_fresh", "aten::result_type", "aten::resize_", "aten::set_", "aten::unbind",
    "aten::split", "aten::chunk", "aten::split_with_sizes", "aten::view_as", "aten::expand_as", "aten::flatten",
    "aten::squeeze_", "aten::unsqueeze_", "aten::to", "detach"};

static std::mutex by_name_mutex;
// never destroyed: report() runs at exit, after static objects defined here would be
static auto &by_name = *new std::map<std::string, long>;
static const std::string by_name_mode = getenv("OPCOUNT_BY_NAME") ? getenv("OPCOUNT_BY_NAME") : "";
static const bool count_by_name = by_name_mode == "1" || by_name_mode == "callers";
static const bool with_callers = by_name_mode == "callers";

static void report() {
    fprintf(stderr, "OPCOUNT ops=%ld kernels=%ld\n", ops.load(), kernels.load());
    std::vector<std::pair<long, std::string>> counts;
    for (const auto &[name, count] : by_name) counts.emplace_back(count, name);
    std::sort(counts.rbegin(), counts.rend());
    for (const auto &[count, name] : counts) fprintf(stderr, "OPCOUNT %ld %s\n", count, name.c_str());
}

__attribute__((constructor)) static void install() {
    auto start = [](const at::RecordFunction &fn) -> std::unique_ptr<at::ObserverContext> {
        ops++;
        if (!running.empty()) running.back().second = true;
        auto op = fn.operator_name();
        running.emplace_back(op ? op->name : std::string(), false);
        return nullptr;
    };
    auto end = [](const at::RecordFunction &, at::ObserverContext *) {
        auto [name, called_another] = running.back();
        running.pop_back();
        if (called_another || no_kernel.count(name)) return;
        kernels++;
        if (count_by_name) {
            std::string key = name;
            for (size_t i = running.size(); with_callers && i-- > 0 && running.size() - i <= 3;)
                key = running[i].first + " > " + key;
            std::lock_guard<std::mutex> lock(by_name_mutex);
            by_name[key]++;
        }
    };
    at::addGlobalCallback(at::RecordFunctionCallback(start, end).scopes({at::RecordScope::FUNCTION}).needsInputs(false));
    atexit(report);
}
