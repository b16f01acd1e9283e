"""sha256 of a file, read in blocks: cache shards, checkpoints and corpus files use it."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 16 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
