"""`python -m posae.train`: compose the config, validate it, build the cache if missing, open it.

    python -m posae.train variant=relu layer=3
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import cache_request
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.cache_writer import build_cache


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    req = cache_request(cfg, "layer")
    build_cache(req)
    cache = ActivationCache.open(CacheSpec.from_request(req), req.layers[0], req.cache.verify)
    log.info(
        "activations: %s, layer %d: %d sequences x %d tokens, d=%d, E|x|=%.3f",
        cache.dir, req.layers[0], len(cache), cache.context_size, cache.d_model,
        cache.stats["mean_norm"],
    )


if __name__ == "__main__":
    main()
