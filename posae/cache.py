"""`python -m posae.cache`: cache the residual stream of `layers` in one LM pass.

    python -m posae.cache model=minilm dataset=stdlib_docs 'layers=[1,3]' n_tokens=200000
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import cache_request
from posae.data.cache_writer import build_cache


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="cache")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for folder in build_cache(cache_request(cfg, "layers")):
        log.info("cache ready: %s", folder)


if __name__ == "__main__":
    main()
