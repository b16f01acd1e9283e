"""How much of a trained SAE's reconstruction error is shrinkage of its codes: EV before and
after the best rescaling of each latent's code, its support (which latents fire) and its
decoder kept (the correction of Wright & Sharkey's feature-suppression analysis, fitted in
closed form instead of by fine-tuning).

For codes f [N, m] with decoder rows W_j and the rest of the reconstruction c = x̂ − f W_dec
(b_dec, or an offset a variant adds), the scales s minimise Σ_n ‖x_n − c_n − Σ_j s_j f_nj W_j‖²:

    (FᵀF ⊙ W Wᵀ) s = Σ_n f_nj ⟨W_j, x_n − c_n⟩,

fitted on training sequences (as a fine-tuning would be) and scored on the run's held-out
sequences (a latent that never fires in the fitting tokens keeps s_j = 1); the global
scale is one s for all latents. If an L1 method's EV deficit against another at the same
L0 is its shrinkage, the deficit closes once both are rescaled.

    python experiments/analysis/shrinkage.py experiments/runs/curriculum_matched/embedded \
        --methods baseline_relu run_1_hard_masks topk topk_hard_masks --l0 32
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np
import torch

from posae.eval.inputs import RunInputs, subsample
from posae.training.batches import held_out_split

FOLDER = re.compile(r"^(?P<run>.+)@l0_(?P<l0>\d+)_seed(?P<seed>\d+)$")
RIDGE = 1e-9  # relative to the largest diagonal entry; keeps rarely firing latents solvable


class Sums:
    """float64 sums over counted tokens of the normal equations and the EV terms."""

    def __init__(self, m: int, d: int):
        f64 = dict(dtype=torch.float64)
        self.FtF = torch.zeros(m, m, **f64)
        self.rhs = torch.zeros(m, **f64)
        self.fires = torch.zeros(m, **f64)
        self.n = 0
        self.sum_x = torch.zeros(d, **f64)
        self.sq_x = torch.zeros((), **f64)

    def add(self, x, f, c, W):
        sparse = f.to_sparse()
        self.FtF += (sparse.t() @ sparse).to_dense()
        self.rhs += (f * ((x - c) @ W.T)).sum(0)
        self.fires += (f != 0).sum(0)
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sq_x += x.pow(2).sum()

    def total_variance(self) -> float:
        return float(self.sq_x - self.sum_x.pow(2).sum() / self.n)


def solve_scales(fit: Sums, W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The per-latent scales s (1 for a latent that never fired) and the one global scale
    that minimise the fitted tokens' squared error (the normal equations above)."""
    A = fit.FtF * (W @ W.T)
    global_s = float(fit.rhs.sum() / A.sum())  # (Σ rhs) / (1ᵀ A 1)
    A += torch.eye(len(A), dtype=A.dtype) * RIDGE * A.diagonal().max()
    s = torch.ones(len(A), dtype=torch.float64)
    idx = (fit.fires > 0).nonzero().squeeze(1)
    s[idx] = torch.linalg.solve(A[idx][:, idx], fit.rhs[idx])
    return s, global_s


def token_rows(sae, batch):
    """x, codes f, and the rest c = x̂ − f W_dec of the counted tokens, in float64."""
    out = sae(batch.x, batch.pos, batch.mask)
    m = batch.mask
    x, f, x_hat = batch.x[m].double(), out.f[m].double(), out.x_hat[m].double()
    W = sae.W_dec.double()
    return x, f, x_hat - f @ W, W


@torch.no_grad()
def fit_and_score(run_dir: Path, fit_sequences: int, score_sequences: int,
                  batch_sequences: int) -> dict:
    inputs = RunInputs(run_dir, torch.device("cpu"))
    sae = inputs.sae.eval()
    train_ids, _ = held_out_split(inputs.cache, inputs.req.dataset.pack,
                                  inputs.trainer.eval_fraction)
    fit_ids = subsample(train_ids, fit_sequences)
    score_ids = subsample(inputs.eval_ids, score_sequences)
    m, d = sae.W_dec.shape
    fit = Sums(m, d)
    for batch in inputs.held_out_batches(fit_ids, batch_sequences):
        fit.add(*token_rows(sae, batch))
    W = sae.W_dec.double()
    s, global_s = solve_scales(fit, W)
    fired = fit.fires > 0
    err = {"as trained": 0.0, "global scale": 0.0, "per-latent scales": 0.0}
    score = Sums(0, d)
    for batch in inputs.held_out_batches(score_ids, batch_sequences):
        x, f, c, _ = token_rows(sae, batch)
        score.n += len(x)
        score.sum_x += x.sum(0)
        score.sq_x += x.pow(2).sum()
        for name, scale in (("as trained", 1.0), ("global scale", global_s),
                            ("per-latent scales", s)):
            err[name] += float((x - c - (f * scale) @ W).pow(2).sum())
    total = score.total_variance()
    fired_s = s[fired].numpy()
    return {**{f"EV {k}": 1 - v / total for k, v in err.items()},
            "global scale": global_s, "median latent scale": float(np.median(fired_s)),
            "tokens fitted": fit.n, "tokens scored": score.n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--fit-sequences", type=int, default=500,
                        help="training sequences the scales are fitted on")
    parser.add_argument("--score-sequences", type=int, default=400,
                        help="held-out sequences the EVs are measured on")
    parser.add_argument("--batch-sequences", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write every run's numbers here as JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    for job in sorted(args.sweep.iterdir()):
        match = FOLDER.match(job.name)
        if (not match or match["run"] not in args.methods or int(match["l0"]) != args.l0
                or not (job / "sae" / "cfg.json").exists()):
            continue
        result = fit_and_score(job, args.fit_sequences, args.score_sequences,
                               args.batch_sequences)
        print(job.name, json.dumps({k: round(v, 4) for k, v in result.items()}), flush=True)
        runs.setdefault(match["run"], []).append({"seed": int(match["seed"]), **result})
    missing = [m for m in args.methods if m not in runs]
    if missing:
        raise SystemExit(f"--methods: no finished run with its model (sae/) at L0 {args.l0} "
                         f"in {args.sweep} for {', '.join(missing)}")
    keys = ["EV as trained", "EV global scale", "EV per-latent scales", "global scale",
            "median latent scale"]
    print("\n| method | seeds | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for method in args.methods:
        rows = runs[method]
        cells = []
        for key in keys:
            values = [r[key] for r in rows]
            sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3f}{sd}")
        print(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
