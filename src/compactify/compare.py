"""Paired comparisons: how much worse is model B than the original on the same documents?

Two models scored on the same documents (or the same held-out windows) differ by far less
noise than two independent scores: the documents both get right or both get wrong cancel. So
every comparison in the study is paired:

* :func:`paired_bootstrap`: the mean of ``b - a`` over units (documents or windows) with a
  percentile bootstrap interval, resampling units with replacement;
* :func:`mcnemar_exact`: McNemar's exact two-sided p for binary scores (only the discordant
  documents count);
* :func:`compare_tasks` / :func:`compare_nll`: the above on two evaluations' per-document
  records / per-window negative log-likelihoods, refusing results that are not paired (other
  documents, prompts, task versions or windows) with an error that names what differs;
* :func:`drop_verdict`: the rule that turns an interval on an accuracy drop into a verdict on
  the paper's "2-3 point" claim.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np


class PairingError(ValueError):
    """Two results that cannot be compared document by document; the message says why."""


def paired_bootstrap(a, b, n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired units with a percentile bootstrap interval.

    Returns ``{"diff", "lo", "hi", "half_width", "n", "level"}``. Identical inputs give a zero
    difference with a zero-width interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise PairingError(f"paired_bootstrap needs two equal-length 1-D sequences, got shapes {a.shape} and "
                           f"{b.shape}.")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 500):  # chunks keep memory at 500 x n
        k = min(500, n_boot - start)
        means[start:start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "half_width": float((hi - lo) / 2),
            "n": int(len(d)), "level": level}


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired binary scores (0/1)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    p = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, p)


def _check_same(what: str, x, y, name_a: str, name_b: str, fix: str) -> None:
    if x != y:
        raise PairingError(f"Cannot pair {name_b} with {name_a}: {what} differ ({x!r} vs {y!r}). {fix}")


def samples_of(result: Mapping, task: str, where: str) -> dict:
    s = result.get("samples")
    if not s:
        raise PairingError(f"The {task} result of {where} has no per-document records (it was made before they were "
                           "kept). Rerun the notebook that wrote it (make reproduce reruns all).")
    return s


def compare_task(a: Mapping, b: Mapping, task: str, name_a: str = "original", name_b: str = "model",
                 seed: int = 0) -> dict:
    """Paired difference ``b - a`` in a task's primary metric (in points, x100), document by document."""
    fix = "Evaluate both models with the same eval settings (limit, shots, seed, task version)."
    sa, sb = samples_of(a, task, name_a), samples_of(b, task, name_b)
    _check_same(f"the {task} documents", sa["doc_id"], sb["doc_id"], name_a, name_b, fix)
    _check_same(f"the {task} prompts", sa["prompt_hash"], sb["prompt_hash"], name_a, name_b, fix)
    _check_same(f"the {task} task versions", a.get("versions"), b.get("versions"), name_a, name_b, fix)
    _check_same(f"the {task} metrics", a.get("metric"), b.get("metric"), name_a, name_b, fix)
    xa, xb = 100 * np.asarray(sa["score"], float), 100 * np.asarray(sb["score"], float)
    out = paired_bootstrap(xa, xb, seed=seed)
    binary = set(np.unique(np.concatenate([xa, xb])).tolist()) <= {0.0, 100.0}
    out.update({"task": task, "metric": a.get("metric"), "a": float(xa.mean()), "b": float(xb.mean()),
                "p_mcnemar": mcnemar_exact(xa > 0, xb > 0) if binary else None,
                "discordant": int((xa != xb).sum()), "chance": 100 * float(a.get("chance") or 0.0)})
    return out


def compare_tasks(a: Mapping, b: Mapping, name_a: str = "original", name_b: str = "model", seed: int = 0) -> dict:
    """:func:`compare_task` for every task two evaluations (``evaluate_model`` results) share."""
    common = [t for t in a["tasks"] if t in b["tasks"]]
    return {t: compare_task(a["tasks"][t], b["tasks"][t], t, name_a, name_b, seed) for t in common}


def compare_nll(a: Mapping, b: Mapping, name_a: str = "original", name_b: str = "model", seed: int = 0) -> dict:
    """Paired difference in held-out NLL per token (nats) over windows, and the perplexity ratio."""
    fix = "Score both models on the same held-out text, token count and seq_len (eval.perplexity)."
    for key in ("text", "ids_sha", "seq_len", "windows"):
        _check_same(f"the held-out {key}s", a.get(key), b.get(key), name_a, name_b, fix)
    if "window_nll" not in a or "window_nll" not in b:
        raise PairingError("A perplexity result has no per-window NLL (made before they were kept): rerun the "
                           "notebook that wrote it.")
    out = paired_bootstrap(a["window_nll"], b["window_nll"], seed=seed)
    out.update({"text": a["text"], "tokens": a["tokens"], "seq_len": a["seq_len"], "ppl_a": a["ppl"], "ppl_b": b["ppl"],
                "ppl_ratio": math.exp(out["diff"]), "ppl_ratio_lo": math.exp(out["lo"]),
                "ppl_ratio_hi": math.exp(out["hi"])})
    return out


def compare_texts(a: Mapping, b: Mapping, name_a: str = "original", name_b: str = "model") -> dict:
    """:func:`compare_nll` for every held-out text of evaluation ``b`` (``evaluate_model`` results)."""
    return {x: compare_nll(a["perplexity_texts"][x], b["perplexity_texts"][x], name_a, name_b)
            for x in b["perplexity_texts"]}


def paired(a: Mapping, b: Mapping, name_a: str = "original", name_b: str = "model", seed: int = 0) -> tuple[dict, dict]:
    """Two evaluations on the same documents and windows: (:func:`compare_tasks`, :func:`compare_texts`)."""
    return compare_tasks(a, b, name_a, name_b, seed), compare_texts(a, b, name_a, name_b)


def summary_of(rows: Mapping[str, tuple]):
    """:func:`summary_table` of ``{row name: paired(...)}``."""
    return summary_table({k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()})


def ppl_interval(ppl: Mapping, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over windows) of one model's perplexity."""
    w = np.asarray(ppl["window_nll"], float)
    rng = np.random.default_rng(seed)
    means = w[rng.integers(0, len(w), size=(n_boot, len(w)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return math.exp(lo), math.exp(hi)


def at_chance(base: Mapping) -> bool:
    """Whether the original's score on a task is indistinguishable from chance (its interval
    ``value +- 1.96 stderr`` covers the chance level, or the score is 0 on a generative task)."""
    chance, value, se = float(base.get("chance") or 0.0), float(base["value"]), float(base.get("stderr") or 0.0)
    return value - 1.96 * se <= chance + 1e-9


def drop_verdict(drop_lo: float, drop_hi: float, threshold: float = 3.0) -> str:
    """The paper's "2-3 point drop" claim, judged by the interval of the drop (points, original
    minus model): reproduced if its upper end is at most ``threshold``, not reproduced if its
    lower end is above it, inconclusive otherwise."""
    if drop_hi <= threshold:
        return "reproduced"
    if drop_lo > threshold:
        return "not reproduced"
    return "inconclusive"


def mean_drop(comparisons: Mapping[str, Mapping], tasks) -> dict:
    """The mean over ``tasks`` of the paired drop (a - b, points) with an interval: the per-task
    bootstrap means are independent across tasks, so the mean's half-width is the root of the
    summed squared half-widths over the number of tasks (a normal approximation)."""
    rows = [comparisons[t] for t in tasks if t in comparisons]
    if not rows:
        raise PairingError(f"None of the tasks {list(tasks)} was compared.")
    drop = -sum(r["diff"] for r in rows) / len(rows)
    hw = math.sqrt(sum(r["half_width"] ** 2 for r in rows)) / len(rows)
    return {"drop": drop, "lo": drop - hw, "hi": drop + hw, "half_width": hw, "tasks": [r["task"] for r in rows],
            "n": {r["task"]: r["n"] for r in rows}}


def fmt(r: Mapping, scale: float = 1.0, digits: int = 1) -> str:
    """'-12.3 [-15.1, -9.6]' for a comparison (``diff``, ``lo``, ``hi``)."""
    return f"{scale * r['diff']:+.{digits}f} [{scale * r['lo']:+.{digits}f}, {scale * r['hi']:+.{digits}f}]"


def summary_table(paired: Mapping[str, Mapping[str, Mapping]], paired_nll: Mapping[str, Mapping[str, Mapping]]):
    """One row per (model, measure): the paired difference vs the original with its 95% interval,
    the interval's half-width, n and McNemar's p (tasks, points) or the perplexity ratio (texts)."""
    import pandas as pd

    rows = []
    for model, tasks in paired.items():
        for t, r in tasks.items():
            rows.append({"model": model, "measure": f"{t} ({r['metric']}, points)", "difference [95% CI]": fmt(r),
                         "± half-width": round(r["half_width"], 1), "n": r["n"],
                         "McNemar p": None if r["p_mcnemar"] is None else float(f"{r['p_mcnemar']:.2g}")})
        for text, r in paired_nll.get(model, {}).items():
            rows.append({"model": model, "measure": f"{text} NLL/token (nats; {r['tokens']} tokens, seq {r['seq_len']})",
                         "difference [95% CI]": fmt(r, digits=3), "± half-width": round(r["half_width"], 3),
                         "n": f"{len(r.get('window_nll', [])) or r['n']} windows",
                         "McNemar p": None,
                         "perplexity ratio": f"{r['ppl_ratio']:.3g} [{r['ppl_ratio_lo']:.3g}, {r['ppl_ratio_hi']:.3g}]"})
    return pd.DataFrame(rows).set_index(["model", "measure"])
