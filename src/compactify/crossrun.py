"""Two runs of the same study, measurement by measurement: does it reproduce on another machine?

The reference results were made on a CPU with fast bf16 (autocast for scoring, profiling and
healing); a CPU without it runs every step in fp32, and a GPU in its own bf16. Same config, same
seed, same documents and windows, so every perplexity and every benchmark score of one run pairs
with the other's: :func:`compare_runs` walks both runs' result files, pairs each held-out
perplexity (per-window NLL, :func:`compactify.compare.compare_nll`) and each task score (per
document, :func:`compactify.compare.compare_task`) found at the same place in both, and says
whether the sensitivity plan (notebook 03) came out the same and whether each of the paper's
claims gets the same verdict (:func:`compactify.report.claims`). ``scripts/compare_runs.py``
writes it; the README's cross-machine section reads it.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import median
from typing import Iterator, Mapping

from .compare import PairingError, compare_nll, compare_task
from .results import read_json

# The measurements a reader looks for first (file, path inside it): the rest are summarised per file.
HEADLINE = {
    "dense (notebook 00)": ("00_baseline.json", "baseline/perplexity_texts"),
    "TT-SVD plan, before healing (03)": ("03_tensorize.json", "main/evaluation/perplexity_texts"),
    "block-wise start (05)": ("05_heal.json", "blockwise/perplexity"),
    "healed TT-SVD (05)": ("05_heal.json", "after/perplexity_texts"),
    "healed activation-aware SVD (05)": ("05_heal.json", "improved/after/perplexity_texts"),
    "dense healed, the fair reference (05)": ("05_heal.json", "dense_control/after/perplexity_texts"),
}


def records(x, path: tuple = ()) -> Iterator[tuple[str, str, Mapping]]:
    """Every perplexity record (``window_nll``) and task record (per-document ``samples``) in a result
    tree, as ``(path, "ppl" | "task", record)``. ``perplexity`` beside ``perplexity_texts`` is the
    same record as its first text and is skipped."""
    if isinstance(x, Mapping):
        if "window_nll" in x and "ids_sha" in x:
            yield "/".join(map(str, path)), "ppl", x
            return
        if isinstance(x.get("samples"), Mapping) and "doc_id" in x["samples"]:
            yield "/".join(map(str, path)), "task", x
            return
        for k, v in x.items():
            if k == "meta" or (k == "perplexity" and "perplexity_texts" in x):
                continue
            yield from records(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from records(v, path + (i,))


def _plan(results: Path) -> dict | None:
    p = results / "03_tensorize.json"
    return read_json(p)["main"]["plan"] if p.exists() else None


def _verdicts(results: Path) -> dict[str, str]:
    from .report import claims
    try:
        return {r["claim"]: r["verdict"] for r in claims(results)}
    except Exception as e:  # a partial run: say so rather than fail the whole comparison
        return {"(claims could not be built)": f"{type(e).__name__}: {e}"}


def compare_runs(ref: Path, other: Path, names=("reference", "other"), seed: int = 0) -> dict:
    """Pair every measurement the two results folders share (``NN_*.json`` files). A record whose
    windows or documents differ between the runs is listed under ``unpaired`` with the reason."""
    ref, other = Path(ref), Path(other)
    files = sorted(p.name for p in ref.glob("[0-9][0-9]_*.json") if (other / p.name).exists())
    if not files:
        raise FileNotFoundError(f"{ref} and {other} share no notebook result files (NN_*.json): point both at a "
                                "run's results/ folder (or data/results/).")
    ppl, tasks, unpaired, meta = {}, {}, [], {}
    for name in files:
        a, b = read_json(ref / name), read_json(other / name)
        meta[name] = {names[0]: _meta_brief(a.get("meta", {})), names[1]: _meta_brief(b.get("meta", {}))}
        rb = {p: (kind, r) for p, kind, r in records(b)}
        for path, kind, ra in records(a):
            if path not in rb or rb[path][0] != kind:
                continue
            key = f"{name}:{path}"
            try:
                if kind == "ppl":
                    ppl[key] = compare_nll(ra, rb[path][1], names[0], names[1], seed=seed)
                else:
                    tasks[key] = compare_task(ra, rb[path][1], path.rsplit("/", 1)[-1], names[0], names[1], seed=seed)
            except PairingError as e:
                unpaired.append({"record": key, "why": str(e)})
    plan_a, plan_b = _plan(ref), _plan(other)
    va, vb = _verdicts(ref), _verdicts(other)
    compute = {n: _compute(d) for n, d in zip(names, (ref, other))}
    return {"names": list(names), "files": files, "meta": meta, "perplexity": ppl, "tasks": tasks,
            "unpaired": unpaired, "compute": compute, "headline": headline(ppl),
            "per_file": per_file(ppl, tasks),
            "plan_same": None if plan_a is None or plan_b is None else plan_a == plan_b,
            "verdicts": {c: {names[0]: va.get(c), names[1]: vb.get(c)} for c in va}}


def _meta_brief(m: Mapping) -> dict:
    dev = m.get("device") or {}
    return {"device": dev.get("gpu") or dev.get("cpu") or dev.get("device"), "cpu_isa": dev.get("cpu_isa"), "threads": dev.get("torch_threads"),
            "commit": m.get("git_commit"), "timestamp": m.get("timestamp"), "torch": (m.get("versions") or {}).get("torch")}


def _compute(results: Path) -> str | None:
    """How the run's healing computed (``autocast-bf16`` or ``fp32``), from notebook 05's record."""
    p = results / "05_heal.json"
    return read_json(p)["heal"].get("compute") if p.exists() else None


def headline(ppl: Mapping[str, Mapping]) -> dict:
    """The :data:`HEADLINE` records, ``{label: {text: comparison}}``."""
    out = {}
    for label, (name, prefix) in HEADLINE.items():
        start = f"{name}:{prefix}/"
        rows = {k[len(start):]: v for k, v in ppl.items() if k.startswith(start) and "/" not in k[len(start):]}
        if rows:
            out[label] = rows
    return out


def per_file(ppl: Mapping[str, Mapping], tasks: Mapping[str, Mapping]) -> dict:
    """Per result file: how many perplexities paired, the median and extreme ratio (other / reference),
    how many intervals exclude 1; how many task scores paired and the largest accuracy difference."""
    out: dict[str, dict] = {}
    for key, r in ppl.items():
        out.setdefault(key.split(":")[0], {"ppl": [], "tasks": []})["ppl"].append((key, r))
    for key, r in tasks.items():
        out.setdefault(key.split(":")[0], {"ppl": [], "tasks": []})["tasks"].append((key, r))
    summary = {}
    for name, d in sorted(out.items()):
        s: dict = {"perplexities": len(d["ppl"]), "tasks": len(d["tasks"])}
        if d["ppl"]:
            ratios = [r["ppl_ratio"] for _, r in d["ppl"]]
            worst_key, worst = max(d["ppl"], key=lambda kr: abs(math.log(kr[1]["ppl_ratio"])))
            s.update({"ratio_median": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "excluding_1": sum(1 for _, r in d["ppl"] if r["ppl_ratio_lo"] > 1 or r["ppl_ratio_hi"] < 1),
                      "largest": {"record": worst_key, **{k: worst[k] for k in (
                          "ppl_a", "ppl_b", "ppl_ratio", "ppl_ratio_lo", "ppl_ratio_hi", "text")}}})
        if d["tasks"]:
            key, r = max(d["tasks"], key=lambda kr: abs(kr[1]["diff"]))
            s.update({"task_diff_max": {"record": key, "diff": r["diff"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]},
                      "task_excluding_0": sum(1 for _, r in d["tasks"] if r["lo"] > 0 or r["hi"] < 0)})
        summary[name] = s
    return summary


def _pct(x: float) -> str:
    return f"{100 * (x - 1):+.1f}%"


def comparisons(results: Path) -> list[tuple[Path, dict]]:
    """Every ``crossrun/*.json`` that :func:`compare_runs` wrote, as ``(path, data)``; other checks'
    files there (``scripts/nf4_scoring_check.py``) are left out."""
    return [(f, d) for f in sorted((Path(results) / "crossrun").glob("*.json")) if "names" in (d := read_json(f))]


def readme_block(results: Path) -> str:
    """The README's cross-machine section: every published ``crossrun/*.json``, headline table first."""
    runs = comparisons(results)
    if not runs:
        return "(no second run has been compared with the reference run yet: `scripts/compare_runs.py`)"
    out = []
    for f, d in runs:
        a, b = d["names"]
        t = d.get("timings") or {}
        secs = t.get("seconds") or {}
        took = (f"; its notebooks took {t['total_seconds'] / 60:.0f} minutes ("
                + ", ".join(f"{k[:2]} {v:.0f} s" for k, v in secs.items()) + ")") if secs else ""
        out += [f"**{b} against {a}** (`data/results/crossrun/{f.name}`; healing computed in "
                f"{d['compute'].get(b)} against {d['compute'].get(a)}){took}. {d.get('note') or ''}".rstrip(), "",
                f"| measurement | text | {a} | {b} | {b} / {a} [95% CI, paired over windows] |", "|---|---|---|---|---|"]
        for label, texts in d["headline"].items():
            for x, r in texts.items():
                out.append(f"| {label} | {x} ({r['tokens']:,} tokens, seq_len {r['seq_len']}) | {r['ppl_a']:,.1f} | "
                           f"{r['ppl_b']:,.1f} | x{r['ppl_ratio']:.3f} [{r['ppl_ratio_lo']:.3f}, {r['ppl_ratio_hi']:.3f}] |")
        out.append("")
        n_ppl = sum(s["perplexities"] for s in d["per_file"].values())
        n_ex = sum(s.get("excluding_1", 0) for s in d["per_file"].values())
        n_task = sum(s["tasks"] for s in d["per_file"].values())
        n_tex = sum(s.get("task_excluding_0", 0) for s in d["per_file"].values())
        lines = [f"Of all {n_ppl} held-out perplexities the two runs share, {n_ex} moved by more than their paired 95% "
                 f"interval (it excludes x1); of {n_task} benchmark scores, {n_tex} (the interval excludes 0 points). Per "
                 f"result file, {b} / {a} (median and range of the ratio, the largest move):"]
        for name, s in d["per_file"].items():
            parts = []
            if s["perplexities"]:
                lg = s["largest"]
                parts.append(f"{s['perplexities']} perplexities, median {_pct(s['ratio_median'])} "
                             f"(range {_pct(s['ratio_min'])} to {_pct(s['ratio_max'])}), largest "
                             f"`{lg['record'].split(':', 1)[1]}` {lg['ppl_a']:,.1f} -> {lg['ppl_b']:,.1f}")
            if s["tasks"]:
                m = s["task_diff_max"]
                parts.append(f"{s['tasks']} task scores, largest difference `{m['record'].split(':', 1)[1]}` "
                             f"{m['diff']:+.1f} points [{m['lo']:+.1f}, {m['hi']:+.1f}] (n={m['n']})")
            lines.append(f"- `{name}`: " + "; ".join(parts))
        out += lines + [""]
        plan = {True: "the same", False: "**different**", None: "not compared"}[d["plan_same"]]
        differ = [c for c, v in d["verdicts"].items() if len(set(v.values())) > 1]
        out.append(f"Notebook 03's sensitivity plan: {plan}. The paper's claims: "
                   + (f"{len(d['verdicts']) - len(differ)} of {len(d['verdicts'])} verdicts the same; different: "
                      + "; ".join(f"{c} ({a}: {d['verdicts'][c][a]}; {b}: {d['verdicts'][c][b]})" for c in differ)
                      if differ else f"all {len(d['verdicts'])} verdicts the same.")
                   + (f" Records not paired (other windows or documents): {len(d['unpaired'])}." if d["unpaired"] else ""))
        out.append("")
    return "\n".join(out).rstrip()


def slow_machine_note(cfg: Mapping, results: Path) -> str | None:
    """For ``make reproduce``'s first lines: on a CPU without fast bf16 the study runs in fp32 and takes
    longer than on the reference machine; say so, with the measured time of such a run where one is
    published (``crossrun/*.json`` whose second run healed in fp32). None on CUDA or a fast-bf16 CPU."""
    import torch

    from .perplexity import fast_bf16
    from .results import cpu_isa

    dev = str(cfg.get("device") or "cpu")
    if (dev == "auto" and torch.cuda.is_available()) or dev.startswith("cuda") or fast_bf16(torch.device("cpu")):
        return None
    note = (f"[run] this CPU ({cpu_isa()}) has no fast bf16 (AVX512-BF16 or AMX), so every step runs in fp32 and "
            "takes longer than on the reference machine")
    for f, d in comparisons(results):
        t, other = d.get("timings") or {}, d["names"][1]
        if d["compute"].get(other) == "fp32" and t.get("total_seconds"):
            return (note + f": {Path(str(t.get('config'))).name}'s notebooks took {t['total_seconds'] / 60:.0f} minutes "
                    f"on a 2-core {other} machine (data/results/crossrun/{f.name})")
    return note


def disagreements(results: Path, file: str, factor: float = 2.0) -> dict[str, dict]:
    """The perplexities of ``file`` (a published result, e.g. ``07_frontier.json``) that another
    machine's run scored more than ``factor`` times higher or lower, the whole paired 95% interval
    of the ratio beyond ``factor``, from every ``crossrun/*.json`` whose first run made the published
    ``file`` (same commit: otherwise its record paths may point elsewhere). ``{path inside file:
    {"ratio", "lo", "hi", "other", "source"}}``, e.g. ``{"points/5": ...}``; empty without such a
    comparison. A figure marks these points as depending on the machine."""
    results = Path(results)
    published = results / file
    if not published.exists():
        return {}
    commit = str(read_json(published)["meta"].get("git_commit") or "")[:7]
    out: dict[str, dict] = {}
    for f, d in comparisons(results):
        a, b = d["names"]
        made_by = str(((d.get("meta") or {}).get(file) or {}).get(a, {}).get("commit") or "")[:7]
        if not commit or made_by != commit:
            continue
        for key, r in d["perplexity"].items():
            name, _, path = key.partition(":")
            if name == file and (r["ppl_ratio_hi"] < 1 / factor or r["ppl_ratio_lo"] > factor):
                out[path] = {"ratio": r["ppl_ratio"], "lo": r["ppl_ratio_lo"], "hi": r["ppl_ratio_hi"], "other": b,
                             "source": f"crossrun/{f.name}"}
    return out
