"""The recovery curve's results (``scripts/recovery_curve.py``): the plain healings of each start
and budget in ``recovery_curve.json``, the same starts distilled block by block before healing
(``--blockwise``) in ``recovery_curve_bw.json``. Points of the second carry the start's name with
``_bw``; these helpers pair them with the first and merge the two for the figure and the README."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from . import compare as C
from .results import read_json

SUFFIX = "_bw"


def paired_points(plain: Sequence[Mapping], blockwise: Sequence[Mapping], suffix: str = SUFFIX) -> list[dict]:
    """Each block-wise point healed (``<start><suffix>``) paired with the plain point of the same
    start and budget on every held-out text both scored (same windows: perplexity ratio with its
    95% interval, :func:`compare.compare_nll`). Points without a plain twin are left out."""
    twins = {(p["keep"], p["start"]): p for p in plain}
    out = []
    for p in blockwise:
        if not p["start"].endswith(suffix):
            continue
        base = p["start"][: -len(suffix)]
        q = twins.get((p["keep"], base))
        if q is None:
            continue
        out.append({"keep": p["keep"], "start": base, "tokens": (q["tokens"], p["tokens"]),
                    "after": {t: C.compare_nll(q["after"][t], p["after"][t], base, p["start"])
                              for t in p["after"] if t in q["after"]}})
    return sorted(out, key=lambda r: (-r["keep"], r["start"]))


def with_blockwise(plain: Mapping, results: Path) -> dict:
    """The plain curve (``recovery_curve.json``, loaded) with the points of ``recovery_curve_bw.json``
    beside it where that file exists (the figure draws both; each point keeps its own commit)."""
    bw = Path(results) / "recovery_curve_bw.json"
    if not bw.is_file():
        return dict(plain)
    extra = read_json(bw)
    commit = extra["meta"].get("git_commit")
    return {**plain, "points": list(plain["points"]) + [{**p, "commit": p.get("commit") or commit}
                                                        for p in extra["points"]]}
