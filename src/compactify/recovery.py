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
    beside it where that file exists (the figure draws both; each point keeps its own commit), and
    the block-wise points measured again at other seeds (:func:`seed_repeats`) under ``repeats``."""
    bw = Path(results) / "recovery_curve_bw.json"
    out = dict(plain)
    if bw.is_file():
        extra = read_json(bw)
        commit = extra["meta"].get("git_commit")
        out["points"] = list(plain["points"]) + [{**p, "commit": p.get("commit") or commit} for p in extra["points"]]
    repeats = seed_repeats(results)
    if repeats:
        out["repeats"] = repeats
    return out


def seed_repeats(results: Path) -> list[dict]:
    """The block-wise points of ``recovery_curve_bw_seed<N>.json`` (``scripts/recovery_curve.py
    --blockwise --seed N``), each with its ``seed``, sorted by seed, budget and start."""
    out = []
    for f in sorted(Path(results).glob("recovery_curve" + SUFFIX + "_seed*.json")):
        d = read_json(f)
        seed = int(d["meta"]["seed"])
        out += [{**p, "seed": seed, "file": f.name} for p in d["points"]
                if p.get("source") == "scripts/recovery_curve.py" and "after" in p]
    return sorted(out, key=lambda p: (p["seed"], -p["keep"], p["start"]))


def seed_pairs(points: Sequence[Mapping], repeats: Sequence[Mapping], text: str) -> list[dict]:
    """Each repeated point beside the same start and budget at the curve's own seed, on ``text``:
    the other seed's healed perplexity over the first's (paired over the same windows), and within
    each seed the low-rank start's perplexity over the MPO's (``asvd<suffix>`` over ``tt_svd<suffix>``)."""
    first = {(p["keep"], p["start"]): p for p in points if p.get("source") == "scripts/recovery_curve.py"}
    by_seed = {}
    for p in repeats:
        by_seed.setdefault(p["seed"], {})[(p["keep"], p["start"])] = p
    out = []
    for seed, pts in sorted(by_seed.items()):
        for (keep, start), p in sorted(pts.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            q = first.get((keep, start))
            row = {"seed": seed, "keep": keep, "start": start, "after": p["after"][text]["ppl"],
                   "first": q["after"][text]["ppl"] if q else None,
                   "vs_first": C.compare_nll(q["after"][text], p["after"][text]) if q else None}
            if start.startswith("asvd"):
                mpo = "tt_svd" + start[len("asvd"):]
                if (keep, mpo) in pts:
                    row["low_rank_vs_mpo"] = C.compare_nll(pts[(keep, mpo)]["after"][text], p["after"][text])
                if (keep, mpo) in first and q:
                    row["low_rank_vs_mpo_first"] = C.compare_nll(first[(keep, mpo)]["after"][text], q["after"][text])
            out.append(row)
    return out


def curve_point(start_dir: Path, results: Path) -> tuple[str, dict] | None:
    """The recovery curve's healing of a saved start (``<run>/recovery/keep<k>_<start>/start`` or
    ``.../start_bw``, the folders ``scripts/recovery_curve.py`` writes) as ``(file name, point)``, or
    None where the folder is not one of them or the script has not published a healing of it (a
    point taken from notebook 05 healed notebook 03's start, not that folder's)."""
    start_dir = Path(start_dir)
    parent, leaf = start_dir.resolve().parent.name, start_dir.resolve().name
    if not parent.startswith("keep") or "_" not in parent or leaf not in ("start", "start" + SUFFIX):
        return None
    keep, start = parent[len("keep"):].split("_", 1)
    try:
        keep = float(keep)
    except ValueError:
        return None
    name = "recovery_curve.json" if leaf == "start" else "recovery_curve" + SUFFIX + ".json"
    f = Path(results) / "heal" / name
    if not f.is_file():
        return None
    start += "" if leaf == "start" else SUFFIX
    return next(((name, p) for p in read_json(f)["points"] if p["keep"] == keep and p["start"] == start
                 and "after" in p and p.get("source") == "scripts/recovery_curve.py"), None)


def full_run_of(start_dir: Path, results: Path) -> dict | None:
    """:func:`curve_point` as ``{tokens, ppl, source}`` on the first held-out text: the separate full
    run a long run of the same start is drawn beside."""
    found = curve_point(start_dir, results)
    if found is None:
        return None
    name, p = found
    first = next(iter(p["after"]))
    return {"tokens": p["tokens"], "ppl": p["after"][first]["ppl"], "source": f"{name} ({p['keep']:g} kept, {p['start']})"}
