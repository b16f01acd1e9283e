"""The GPU check (`make bench-gpu`, benchmarks/gpu_check.sh): one GPU, offline, minutes.

1. A model of Gemma-2-2b's architecture (its config: 26 blocks, d = 2304, vocabulary
   256,000) with random weights, built here, no Hub; its tokenizer a byte-level BPE
   trained here on the standard library's docstrings. Saved to a folder posae loads as a
   local model (`model=gemma-2-2b model.hf_id=<folder>`).
2. `python -m posae.cache`: 1M tokens of layer 12 in bf16.
3. `accelerate launch -m posae.train -m`: relu, topk, atr and hierarchical at width 16384
   with bf16 autocast, batches of 4096 tokens; relu and topk again in fp32.
4. Prints, per run, tokens/s, peak GPU memory, and the ratio of tokens/s to a roofline:
   what a step made of its 5 dense matmuls (2·d·m FLOPs each per token) would reach at the
   bf16 matmul throughput measured here. Fails if a run fails (posae exits non-zero on a
   non-finite loss), a number is not finite, or a bf16 run's held-out EV differs from its
   fp32 twin's by more than `--tolerance`.

`--cpu --tiny` is the dry run `make test` runs: the same steps on CPU at toy sizes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # posae from this checkout, installed or not
from roofline import matmul_flops  # noqa: E402  (benchmarks/, beside this script)

BF16_VARIANTS = ["relu", "topk", "atr", "hierarchical"]
FP32_VARIANTS = ["relu", "topk"]
# the real architecture, and a toy one for the dry run
SIZES = {
    "full": dict(d=2304, n_layers=26, heads=8, kv_heads=4, head_dim=256, ffn=9216,
                 vocab=256000, layer=12, width=16384, n_tokens=1_000_000, train_tokens=2_000_000,
                 batch_tokens=4096, bpe_vocab=4096),
    "tiny": dict(d=64, n_layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=1024,
                 layer=2, width=256, n_tokens=16384, train_tokens=8192, batch_tokens=1024,
                 bpe_vocab=1024),
}


def train_tokenizer(vocab: int):
    """A byte-level BPE tokenizer with <bos>, <eos> and <pad>, trained on the first
    docstrings of the stdlib (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posae.data.stdlib_docs import iter_stdlib_docstrings

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(itertools.islice(iter_stdlib_docstrings(), 3000), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def build_model(folder: Path, size: dict, device: torch.device) -> None:
    """Gemma-2's architecture with random weights (bf16 on a GPU) and the tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=size["vocab"], hidden_size=size["d"],
                          intermediate_size=size["ffn"], num_hidden_layers=size["n_layers"],
                          num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                          head_dim=size["head_dim"], max_position_embeddings=8192,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    train_tokenizer(size["bpe_vocab"]).save_pretrained(folder)


def posae(*args: str, launcher: list[str]) -> None:
    """Run a posae entry point; a failure (a non-finite loss included) fails the check."""
    command = [*launcher, *args]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(args[:3])} exited {result.returncode}")


def summaries(sweep: Path, variants: list[str]) -> dict[str, dict]:
    return {v: json.loads((sweep / str(job) / "train_summary.json").read_text())
            for job, v in enumerate(variants)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (the dry run)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the dry run)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest |EV(bf16) - EV(fp32)| allowed")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no GPU: run on a GPU machine, or pass --cpu --tiny for the dry run")
    device = torch.device("cpu" if args.cpu else "cuda")
    size = SIZES["tiny" if args.tiny else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, size, device)
    common = ["model=gemma-2-2b", "model.name=gemma2_random", f"model.hf_id={model_dir}",
              f"model.n_layers={size['n_layers']}", f"model.d_model={size['d']}",
              "context_size=128", f"n_tokens={size['n_tokens']}",
              f"cache.root={args.out / 'cache'}", "cache.dtype=bfloat16",
              f"cache.device={device.type}"]
    python = [sys.executable, "-m"]
    posae("posae.cache", *common, f"layers=[{size['layer']}]",
          f"hydra.run.dir={args.out / 'cache_run'}", launcher=python)
    launcher = python if args.cpu else [sys.executable, "-m", "accelerate.commands.launch",
                                        "--num_processes", "1", "--mixed_precision", "bf16",
                                        "-m"]
    train = [*common, f"layer={size['layer']}", "eval.enabled=false",
             f"trainer.n_tokens={size['train_tokens']}",
             f"trainer.batch_tokens={size['batch_tokens']}", f"variant.width={size['width']}",
             "trainer.checkpoint_every=100000", f"trainer.cpu={str(args.cpu).lower()}",
             "resume=auto"]
    for precision, variants in (("bf16", BF16_VARIANTS), ("no", FP32_VARIANTS)):
        posae("posae.train", "-m", f"variant={','.join(variants)}",
              f"trainer.mixed_precision={precision}", *train,
              f"hydra.sweep.dir={args.out / precision}", launcher=launcher)
    report(args.out, size, device, args.tolerance)


def report(out: Path, size: dict, device: torch.device, tolerance: float) -> None:
    """The table, and the failures: non-finite numbers, bf16 drift beyond `tolerance`."""
    # a step made of its 5 dense [B, d] x [d, m] matmuls, at the bf16 throughput measured now
    d, m = size["d"], size["width"]
    roofline = matmul_flops(size["batch_tokens"], d, m, torch.bfloat16, device) / (5 * 2 * d * m)
    bf16, fp32 = summaries(out / "bf16", BF16_VARIANTS), summaries(out / "no", FP32_VARIANTS)
    print(f"\nGemma-2 architecture ({size['n_layers']} blocks, d {size['d']}), layer "
          f"{size['layer']}, width {size['width']}, {size['batch_tokens']}-token batches, "
          f"{device}; bf16 matmul roofline {roofline:,.0f} tok/s")
    memory = "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB"
    print(f"{'variant':<14}{'precision':<10}{'tok/s':>12}{'x roofline':>12}"
          f"{memory:>14}{'held-out EV':>13}{'L0':>8}")
    failures = []
    for precision, runs in (("bf16", bf16), ("fp32", fp32)):
        for variant, summary in runs.items():
            speed = summary["tokens"] / summary["train_seconds"]
            peak = summary["peak_memory"]["gpu_bytes" if device.type == "cuda" else "rss_bytes"]
            ev, l0 = summary["held_out"]["explained_variance"], summary["held_out"]["l0"]
            print(f"{variant:<14}{precision:<10}{speed:>12,.0f}{speed / roofline:>12.2f}"
                  f"{peak / 2**30:>14.2f}{ev:>13.4f}{l0:>8.1f}")
            stats = [ev, l0, *summary["final_train_stats"].values()]
            if not all(math.isfinite(v) for v in stats if isinstance(v, (int, float))):
                failures.append(f"{variant} ({precision}): a non-finite number")
    for variant in FP32_VARIANTS:
        drift = abs(bf16[variant]["held_out"]["explained_variance"]
                    - fp32[variant]["held_out"]["explained_variance"])
        print(f"{variant}: |EV(bf16) - EV(fp32)| = {drift:.4f} (tolerance {tolerance})")
        if drift > tolerance:
            failures.append(f"{variant}: bf16 drifts from fp32 by {drift:.4f} EV")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("GPU check passed")


if __name__ == "__main__":
    main()
