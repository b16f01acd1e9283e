"""What the `python -m posae.*` entry points share."""

from __future__ import annotations

import functools
import logging
import sys

from posae.config import ConfigError
from posae.data.cache_format import CacheError
from posae.training.checkpoint import CheckpointCorrupt

log = logging.getLogger("posae")

CONFIG_PATH = "conf"  # posae/conf/, shipped inside the package


def exit_on_user_error(main):
    """Report a bad config, cache or checkpoint as one clear line and exit 2, without a
    traceback."""

    @functools.wraps(main)
    def wrapper(cfg):
        try:
            return main(cfg)
        except (ConfigError, CacheError, CheckpointCorrupt) as err:
            log.error("%s: %s", type(err).__name__, err)
            sys.exit(2)

    return wrapper
