"""Syntactic probing: a token's word class from its codes alone (docs/metrics.md,
`word_class_probing`), the syntactic half of T-SAE's semantic vs syntactic comparison
(2511.05541 §4.2; the semantic half is `sparse_probing`).

T-SAE labels each token with spaCy's part of speech; no tagger can be installed offline, so
the labels here are the closed word classes, which need none: a held-out token whose
whole word (not a piece of a longer one) is in one of the lists below. One class against
the rest, balanced, as in sparse probing (`sparse_probing.probes`): logistic probes on the
raw activation (`llm_*`), on the codes (`sae_*`: all latents, and the top k by training
mean difference), and for an SAE with latent groups on each group's codes alone
(`sae_<group>_*`, T-SAE's high- and low-level features). Chance accuracy is 0.5.
"""

from __future__ import annotations

import numpy as np

from posae.eval.sparse_probing.probes import binary_split, class_pools, probe_family

KS = (1, 5, 20)  # top-k latents probed, beside all of them
WORD_CLASS_TOKENS = 20000  # counted held-out tokens labelled
WORD_CLASSES: dict[str, frozenset[str]] = {
    "determiner": frozenset("the a an this that these those each every any some no".split()),
    "preposition": frozenset("of in to for with on by from at as into about over after "
                             "under between through".split()),
    "pronoun": frozenset("it its they them their he she his her we you i itself".split()),
    "conjunction": frozenset("and or but if when while because unless whether".split()),
    "auxiliary": frozenset("is are was were be been being can could will would should may "
                           "must has have had do does did".split()),
}


def word_start_marker(tokenizer) -> str:
    """How the tokenizer marks word boundaries: "##" (WordPiece: the continuation pieces
    carry it), or "Ġ" / "▁" (byte-level BPE, SentencePiece: the pieces that start a word
    carry it); read from how it splits " unwieldy"."""
    ids = tokenizer(" unwieldy", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if any(piece.startswith("##") for piece in pieces):
        return "##"
    for marker in ("Ġ", "▁"):
        if pieces and pieces[0].startswith(marker):
            return marker
    raise ValueError(f"word_class: cannot tell where words start in {pieces} "
                     f"({type(tokenizer).__name__})")


def whole_words(pieces: list[str], marker: str) -> list[str | None]:
    """The lower-cased word each piece is, or None where it is a piece of a longer word:
    it continues the previous piece, or the next piece continues it (a piece with no
    letters or digits, punctuation, never continues a word)."""
    def continues(piece: str) -> bool:
        if marker == "##":
            return piece.startswith("##")
        return not piece.startswith(marker) and any(c.isalnum() for c in piece)

    words: list[str | None] = []
    for i, piece in enumerate(pieces):
        following = pieces[i + 1] if i + 1 < len(pieces) else ""
        if continues(piece) or continues(following):
            words.append(None)
        else:
            words.append(piece.removeprefix(marker).strip().lower() or None)
    return words


def word_class_labels(tokenizer, tokens: np.ndarray) -> np.ndarray:
    """Per token of one sequence: its class name, or "" when it is in none."""
    lookup = {w: c for c, words in WORD_CLASSES.items() for w in words}
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in tokens])
    words = whole_words(pieces, word_start_marker(tokenizer))
    return np.asarray([lookup.get(w, "") if w else "" for w in words])


def word_class_probing(raw: np.ndarray, codes: np.ndarray, labels: np.ndarray, groups: dict,
                       ks=KS, n_train: int = 1000, n_test: int = 500, seed: int = 42,
                       C: float = 1.0, max_iter: int = 1000) -> dict:
    """Mean over the classes of each probe's test accuracy (one class vs the rest), and the
    tokens each class had."""
    classes = [c for c in WORD_CLASSES if (labels == c).sum() >= 4]
    pools = class_pools(list(labels), classes, n_train, n_test, seed)
    features = {"llm": raw, "sae": codes}
    if len(groups) > 1:
        features.update({f"sae_{name}": codes[:, a:b] for name, (a, b) in groups.items()
                         if name != "all"})
    accuracy: dict[str, list[float]] = {}
    for target in classes:
        split = binary_split(pools, target, n_train, n_test, seed)
        for prefix, x in features.items():
            correct, _, _ = probe_family(prefix, x[split.train], split.train_y, x[split.test],
                                         split.test_y, ks, C, max_iter, seed)
            for key, right in correct.items():
                accuracy.setdefault(key, []).append(float(right.mean()))
    return {"classes": classes,
            "tokens_per_class": {c: int((labels == c).sum()) for c in classes},
            "chance": 0.5,
            "mean": {key: float(np.mean(values)) for key, values in accuracy.items()}}
