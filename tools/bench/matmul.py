"""Matrix-product throughput of this machine on the shapes of a SmolLM2-135M step (f32 and bf16), with the
PyTorch that `prefalign` links: the floor docs/PERFORMANCE.md compares step times against.

    .venv-fixtures/bin/python tools/bench/matmul.py
"""
import time

import torch


def seconds(f, repeats=10):
    f()
    started = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - started) / repeats


print(f"threads: {torch.get_num_threads()}")
for m, k, n in [(768, 576, 1536), (768, 1536, 576), (768, 576, 576), (1024, 576, 1536), (341, 576, 49152), (2048, 2048, 2048)]:
    a, w = torch.randn(m, k), torch.randn(n, k)
    f32 = seconds(lambda: torch.nn.functional.linear(a, w))
    a16, w16 = a.bfloat16(), w.bfloat16()
    bf16 = seconds(lambda: torch.nn.functional.linear(a16, w16))
    print(f"{m}x{k}x{n}: f32 {2 * m * k * n / f32 / 1e9:.0f} GFLOP/s, bf16 {2 * m * k * n / bf16 / 1e9:.0f} GFLOP/s")
