"""The matmul throughput the benchmarks' rooflines are measured against, in the run."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def matmul_flops(n: int, d: int, m: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", repeats: int = 20) -> float:
    """FLOP/s of [n, d] @ [d, m] (the encoder forward's shape) in `dtype` on `device`."""
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, m, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n * d * m * repeats / (time.perf_counter() - start)
