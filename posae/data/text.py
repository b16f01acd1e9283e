"""Documents from the configured text source, in a fixed order."""

from __future__ import annotations

import functools
import glob
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from posae.config import ConfigError, DatasetConfig
from posae.data.sequences import CHUNK_CHARS
from posae.data.stdlib_docs import iter_stdlib_docstrings, stdlib_version
from posae.hashing import file_sha256

TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def source_identity(ds: DatasetConfig) -> dict:
    """What determines the text, recorded in the cache manifest and its directory name."""
    identity = {"source": ds.source, "pack": ds.pack}
    if ds.source == "stdlib_docs":
        identity["python"] = stdlib_version()
    elif ds.source == "synthetic":
        identity.update(asdict(ds.synthetic))
    elif ds.source == "hf":
        identity.update(path=ds.path, split=ds.split, text_field=ds.text_field)
    else:
        identity.update(paths=list(ds.paths), text_field=ds.text_field,
                        files=[file_identity(path) for path in expand_paths(list(ds.paths))])
    if ds.source in ("hf", "text_files"):  # a cache is never extended under another cut
        identity["long_documents"] = f"tokenised in pieces of {CHUNK_CHARS} characters"
    return identity


def file_identity(path: Path) -> dict:
    """A text file's path, size and sha256: an edited corpus is a different cache."""
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size,
            "sha256": _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per process and version of the file (size and mtime in the key)."""
    return file_sha256(Path(path))


def corpus_changes(old: dict, new: dict) -> list[str]:
    """What differs between two `text_files` identities' file lists, by path."""
    before = {f["path"]: f for f in old.get("files", [])}
    after = {f["path"]: f for f in new.get("files", [])}
    return ([f"{p} changed" for p in sorted(before.keys() & after.keys())
             if before[p] != after[p]]
            + [f"{p} added" for p in sorted(after.keys() - before.keys())]
            + [f"{p} removed" for p in sorted(before.keys() - after.keys())])


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files matching each glob, sorted; a glob matching nothing is an error naming it."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise ConfigError(f"dataset.paths: {pattern!r} matches no file")
        for path in matches:
            if path.suffix not in TEXT_FILE_SUFFIXES:
                raise ConfigError(
                    f"dataset.paths: {path} is not one of {', '.join(TEXT_FILE_SUFFIXES)}"
                )
            if path.stat().st_size == 0:
                raise ConfigError(f"dataset.paths: {path} is empty")
        files += matches
    return files


def iter_text_file(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file: a .txt is one document, each .jsonl line one (its
    `text_field`), each parquet row one. Bytes that are not UTF-8 or a line that is not a
    JSON object raise ConfigError naming the file (and line)."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"dataset.paths: {path} is not UTF-8 text (byte {err.start}); "
                              f"a binary file?") from None
    elif path.suffix == ".jsonl":
        with path.open("rb") as lines:  # decoded line by line, so an error names its line
            for number, raw in enumerate(lines, 1):
                try:
                    row = json.loads(raw.decode("utf-8")) if raw.strip() else None
                except UnicodeDecodeError:
                    raise ConfigError(f"dataset.paths: {path}:{number} is not UTF-8 "
                                      f"text") from None
                except ValueError as err:  # json.JSONDecodeError
                    raise ConfigError(f"dataset.paths: {path}:{number}: not a JSON object "
                                      f"per line ({err})") from None
                if row is None:
                    continue
                if not isinstance(row, dict):
                    raise ConfigError(f"dataset.paths: {path}:{number}: not a JSON object "
                                      f"per line (a {type(row).__name__})")
                yield _field(row, text_field, f"{path}:{number}")
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ConfigError(f"dataset.text_field: {path} has no column {text_field!r}")
        yield from table.column(text_field).to_pylist()


def _field(row: dict, text_field: str, where: str) -> str:
    if text_field not in row:
        raise ConfigError(f"dataset.text_field: {where} has no field {text_field!r}")
    return row[text_field]


def iter_hf_stream(ds: DatasetConfig) -> Iterator[str]:
    """Stream a Hugging Face dataset (needs network access to the Hub)."""
    import datasets

    stream = datasets.load_dataset(ds.path, split=ds.split, streaming=True)
    for row in stream:
        yield _field(row, ds.text_field, f"{ds.path} ({ds.split})")


def iter_documents(ds: DatasetConfig) -> Iterator[str]:
    if ds.source == "stdlib_docs":
        return iter_stdlib_docstrings()
    if ds.source == "text_files":
        files = expand_paths(list(ds.paths))
        return (doc for path in files for doc in iter_text_file(path, ds.text_field))
    return iter_hf_stream(ds)
