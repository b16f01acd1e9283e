"""`make bench-memory`: memory and speed of a training step at the papers' shapes, on CPU.

d = 2304 (Gemma-2-2b's residual stream) and widths 16384 and 65536; relu and topk (k 64).
Each configuration runs a few steps (forward, MSE + L1 or MSE, backward, Adam, decoder
normalisation: what posae's trainer does per step) in its own process, at two batch
sizes, and reports peak RSS and tokens/s. Peak memory is fitted as a + b·B: `a` is what
does not grow with the batch (weights, gradients, two Adam moments: 16 bytes a parameter),
`b` the per-token activations. The GPU estimate at B = 4096 in bf16 keeps `a` (fp32
master weights and optimiser) and halves `b` (autocast's bf16 activations): an estimate,
not a measurement. Printed: what limits the width, and the widest SAE that fits 139 GiB
(one H200) at B = 4096 by the same fit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
D = 2304
GIB = 2 ** 30


def one_run(variant: str, width: int, batch: int, steps: int) -> dict:
    """Train `steps` steps of `variant` at `width` on random activations of norm √d."""
    from posae.sae import build_sae
    from posae.sae.base import SAEConfig
    from posae.sae.topk import TopKConfig

    torch.manual_seed(0)
    cfg = (TopKConfig("topk", d_in=D, width=width, k=64) if variant == "topk"
           else SAEConfig("relu", d_in=D, width=width))
    sae = build_sae(cfg)
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, D)
    start = None
    for step in range(steps + 1):
        if step == 1:  # the first step allocates Adam's moments; time the rest
            start = time.perf_counter()
        out = sae(x)
        loss = (out.x_hat - x).pow(2).sum(-1).mean()
        if variant == "relu":
            loss = loss + 0.04 * out.f.abs().sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        optimiser.step()
        sae.normalize_decoder_()
    seconds = time.perf_counter() - start
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_second": steps * batch / seconds,
            "parameters": sum(p.numel() for p in sae.parameters())}


def measure(variant: str, width: int, batch: int, steps: int) -> dict:
    """`one_run` in a fresh process, so that its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--one", variant, str(width), str(batch),
                          str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, metavar=("VARIANT", "WIDTH", "BATCH", "STEPS"))
    parser.add_argument("--widths", default="16384,65536")
    parser.add_argument("--batches", default="256,1024", help="two batch sizes for the fit")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    if args.one:
        variant, width, batch, steps = args.one
        print(json.dumps(one_run(variant, int(width), int(batch), int(steps))))
        return
    small, large = (int(b) for b in args.batches.split(","))
    print(f"d = {D}, {args.steps} timed steps after one, {torch.get_num_threads()} torch "
          f"threads; peak RSS at B = {small} and {large} fitted as a + b·B")
    print(f"{'variant':8s} {'width':>6s} {'params':>12s} {'tok/s':>7s} {'RSS GiB':>8s} "
          f"{'a GiB':>6s} {'b MiB/token':>11s} {'16·P GiB':>9s} {'GPU bf16 B=4096 GiB':>20s}")
    for width in (int(w) for w in args.widths.split(",")):
        for variant in ("relu", "topk"):
            lo, hi = (measure(variant, width, b, args.steps) for b in (small, large))
            per_token = (hi["peak_rss"] - lo["peak_rss"]) / (large - small)
            fixed = hi["peak_rss"] - per_token * large
            gpu = fixed + per_token * 4096 / 2
            print(f"{variant:8s} {width:6d} {hi['parameters']:12,d} "
                  f"{hi['tokens_per_second']:7,.0f} {hi['peak_rss'] / GIB:8.2f} "
                  f"{fixed / GIB:6.2f} {per_token / 2**20:11.2f} "
                  f"{16 * hi['parameters'] / GIB:9.2f} {gpu / GIB:20.1f}")
            if variant == "relu":
                widest = int(width * 139 * GIB / gpu)
                print(f"{'':8s} relu at B = 4096 in bf16 fits 139 GiB up to width ~{widest:,} "
                      f"(a and b both grow with the width)")
    print("What limits the width: the fixed part a, 16 bytes a parameter (2·d·m weights with "
          "their gradients and Adam moments), and the per-token [B, m] pre-activations, codes "
          "and their gradients, both linear in m.")


if __name__ == "__main__":
    main()
