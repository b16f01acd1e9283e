"""Text sources are deterministic; sequences carry the model's special tokens at fixed places."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from posae.config import ConfigError, DatasetConfig
from posae.data.sequences import SpecialTokens, iter_sequence_blocks
from posae.data.stdlib_docs import iter_stdlib_docstrings, stdlib_root
from posae.data.text import iter_documents

FIRST_SEQUENCES_DIGEST = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from itertools import islice
from conftest import compose_config
from posae.config import model_config
from posae.data.sequences import SpecialTokens, iter_sequence_blocks
from posae.data.stdlib_docs import iter_stdlib_docstrings
from posae.models.lm import load_language_model
import torch
lm = load_language_model(model_config(compose_config().model), torch.device("cpu"))
special = SpecialTokens.for_tokenizer(lm.tokenizer, False)
blocks = iter_sequence_blocks(iter_stdlib_docstrings(), lm.tokenizer, special, 64, True, 100)
print(hashlib.sha256(b"".join(t.tobytes() for t, _ in islice(blocks, 3))).hexdigest())
"""


def word_tokenizer(**special):
    """A real fast tokenizer over a tiny word vocabulary, for BOS/EOS handling."""
    words = ["[UNK]", "<bos>", "<eos>", "<pad>", "a", "b", "c", "d", "e"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


def test_stdlib_docs_are_real_prose_in_a_fixed_order():
    email_dir = stdlib_root() / "email"
    first = list(iter_stdlib_docstrings(email_dir))
    assert len(first) > 100 and first == list(iter_stdlib_docstrings(email_dir))
    assert sum(len(d) for d in first) > 20_000
    assert any("message" in d.lower() for d in first[:5])


def test_stdlib_token_sequences_are_identical_in_a_fresh_process(minilm, tmp_path):
    """Same tokens twice, including under another hash seed (no set/dict-order leaks)."""
    special = SpecialTokens.for_tokenizer(minilm.tokenizer, False)
    blocks = iter_sequence_blocks(iter_stdlib_docstrings(), minilm.tokenizer, special, 64, True,
                                  100)
    here = hashlib.sha256(b"".join(t.tobytes() for t, _ in islice(blocks, 3))).hexdigest()
    script = FIRST_SEQUENCES_DIGEST.format(tests=os.path.dirname(__file__))
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert there.stdout.strip().splitlines()[-1] == here


def test_bert_sequences_start_with_cls_and_end_with_sep(minilm):
    special = SpecialTokens.for_tokenizer(minilm.tokenizer, prepend_bos=False)
    cls, sep = minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id
    assert special.prefix == (cls,) and special.suffix == (sep,) and special.separator == sep
    docs = ["The first document.", "A second, longer document " * 20, "Third."]
    tokens, mask = next(iter_sequence_blocks(docs, minilm.tokenizer, special, 16, True, 100))
    assert tokens.shape[1] == 16 and mask.all()
    assert (tokens[:, 0] == cls).all() and (tokens[:, -1] == sep).all()
    body = minilm.tokenizer("The first document.", add_special_tokens=False)["input_ids"]
    assert tokens[0, 1 : 1 + len(body)].tolist() == body and tokens[0, 1 + len(body)] == sep


def test_prepend_bos_for_tokenizers_that_add_none():
    tok = word_tokenizer(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    special = SpecialTokens.for_tokenizer(tok, prepend_bos=True)
    assert special.prefix == (1,) and special.suffix == () and special.separator == 2
    tokens, mask = next(iter_sequence_blocks(["a b c", "d e"], tok, special, 4, True, 10))
    # packed stream: a b c <eos> d e <eos>, cut into 3 content tokens after BOS
    assert tokens.tolist() == [[1, 4, 5, 6], [1, 2, 7, 8]] and mask.all()
    with pytest.raises(ConfigError, match="prepend_bos"):
        SpecialTokens.for_tokenizer(word_tokenizer(eos_token="<eos>"), prepend_bos=True)


def test_unpacked_sequences_pad_and_mask():
    tok = word_tokenizer(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    special = SpecialTokens.for_tokenizer(tok, prepend_bos=True)
    tokens, mask = next(iter_sequence_blocks(["a b", "c d e a b c"], tok, special, 5, False, 10))
    assert tokens.tolist() == [[1, 4, 5, 3, 3], [1, 6, 7, 8, 4]]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_text_files_read_txt_jsonl_parquet_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n"
                                         + json.dumps({"text": "row two"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), tmp_path / "t.parquet")
    ds = DatasetConfig(name="t", source="text_files", paths=[
        str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")])
    assert list(iter_documents(ds)) == ["first file", "second file", "row one", "row two",
                                        "pq one", "pq two"]


def test_text_files_errors_name_the_key_and_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    ds = DatasetConfig(name="t", source="text_files", paths=[str(tmp_path / "*.jsonl")])
    with pytest.raises(ConfigError, match=r"dataset\.text_field: .*rows\.jsonl:1"):
        list(iter_documents(ds))
    ds.paths = [str(tmp_path / "missing/*.txt")]
    with pytest.raises(ConfigError, match=r"dataset\.paths: .*matches no file"):
        list(iter_documents(ds))


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", r"empty\.txt is empty"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"binary\.txt is not UTF-8 text"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": broken\n', r"rows\.jsonl:2: not a JSON object"),
    ("rows.jsonl", b'{"text": "fine"}\n["a list"]\n', r"rows\.jsonl:2: not a JSON object"),
    ("rows.jsonl", b'{"text": "fine"}\n' * 100 + b'{"text": "\xff"}\n',
     r"rows\.jsonl:101 is not UTF-8"),
])
def test_an_unreadable_text_file_is_named_with_its_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    ds = DatasetConfig(name="t", source="text_files", paths=[str(tmp_path / name)])
    with pytest.raises(ConfigError, match=rf"^dataset\.paths: .*{message}"):
        list(iter_documents(ds))


def test_a_corpus_without_text_writes_no_cache(minilm, tmp_path):
    """Whitespace only: no sequence at all. An empty manifest would pass for a finished
    cache in every later run; nothing is written instead."""
    from conftest import small_cache_request

    from posae.data.cache_format import CacheError
    from posae.data.cache_writer import build_cache

    (tmp_path / "blank.txt").write_text("   \n\n  ")
    request = small_cache_request(tmp_path / "cache", layers=(1,), extra=[
        "dataset=text_files", f"dataset.paths=[{tmp_path}/blank.txt]"])
    with pytest.raises(CacheError, match="yields no text to cache"):
        build_cache(request, lm=minilm)
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_a_long_document_tokenised_in_pieces_gives_the_same_sequences(minilm):
    """Cut just before whitespace, the pieces tokenise as the whole does (WordPiece here)."""
    import numpy as np

    from posae.data import sequences

    docs = list(islice(iter_stdlib_docstrings(), 2000))
    whole = "  \n".join(docs) + " tail"  # one document of ~4 pieces, runs of mixed whitespace
    assert len(whole) > 3 * sequences.CHUNK_CHARS
    assert "".join(sequences.text_pieces(whole)) == whole
    special = SpecialTokens.for_tokenizer(minilm.tokenizer, prepend_bos=False)
    ids = minilm.tokenizer(whole, add_special_tokens=False, verbose=False)["input_ids"]
    n = special.content_length(32)
    expected = [[*special.prefix, *ids[i:i + n], *special.suffix]
                for i in range(0, len(ids) + 1 - n, n)]  # + separator: the last may differ
    got = np.concatenate([tokens for tokens, _ in iter_sequence_blocks(
        [whole], minilm.tokenizer, special, 32, True, 64)])
    assert got[:-1].tolist() == expected[:len(got) - 1]


def test_caching_a_few_sequences_of_a_huge_one_line_file_stays_small(tmp_path):
    """A 40 MB single-line document: only the pieces the first sequences need are
    tokenised (whole, it took gigabytes); peak memory of the process stays low."""
    script = (
        "import resource, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import compose_config\n"
        "from posae.config import model_config\n"
        "from posae.models.lm import load_language_model\n"
        "from posae.data.sequences import SpecialTokens, iter_sequence_blocks\n"
        "import torch\n"
        "lm = load_language_model(model_config(compose_config().model), torch.device('cpu'))\n"
        "special = SpecialTokens.for_tokenizer(lm.tokenizer, False)\n"
        "doc = 'word and more words, ' * 2_000_000\n"
        "blocks = iter_sequence_blocks([doc], lm.tokenizer, special, 128, True, 64)\n"
        "next(blocks); next(blocks)\n"
        "print('peak_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split("peak_mb")[1])
    assert peak < 1500, f"peak RSS {peak} MB"
