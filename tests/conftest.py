"""Shared fixtures: composed configs, the embedded MiniLM, small caches in tmp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402

import posae.sae  # noqa: E402,F401  (registers the architecture schemas compose needs)
from posae.config import cache_request, model_config  # noqa: E402
from posae.models.lm import load_language_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "posae" / "conf"


def compose_config(name: str = "config", overrides: list[str] | None = None):
    """Compose posae/conf/<name>.yaml exactly as the entry points do."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def small_cache_request(root: Path, layers=(1, 3), n_tokens=40 * 32, context=32, shard=16,
                        dtype="float16", extra: list[str] | None = None):
    """A posae.cache request on the embedded default, sized for tests."""
    cfg = compose_config("cache", [
        f"cache.root={root}", f"layers=[{','.join(map(str, layers))}]", f"n_tokens={n_tokens}",
        f"context_size={context}", f"cache.shard_sequences={shard}", "cache.batch_sequences=8",
        f"cache.dtype={dtype}", "cache.device=cpu", *(extra or []),
    ])
    return cache_request(cfg, "layers")


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 300,
               env: dict | None = None):
    """Run `python -m <module> args` in a real subprocess; `.output` is stdout and stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    result.output = result.stdout
    return result


@pytest.fixture(scope="session")
def minilm():
    """The embedded default model, loaded once per session on CPU."""
    import torch

    return load_language_model(model_config(compose_config().model), torch.device("cpu"))


def identity_sae(d: int):
    """A ReLU SAE with W_enc = [I, -I], W_dec = [I; -I], zero biases: its codes are
    [ReLU(x), ReLU(-x)], which hold x exactly, and x̂ = ReLU(x) - ReLU(-x) = x."""
    import torch

    from posae.sae import REGISTRY, build_sae

    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=d, width=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()
