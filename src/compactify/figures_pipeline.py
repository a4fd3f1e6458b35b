"""The whole study on one page: profile -> plan -> tensorize -> quantize -> heal -> evaluate, the
notebook that runs each step, the artefact it writes into the run directory, and the number it
measured in the run whose results are given (notebook 08, ``figures/pipeline.png``)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .figures import apply_style, model_name, short_number
from .results import read_json

STEPS = (  # (step, notebook, what it does, artefact written under runs/<config>/)
    ("baseline", "00", "load the model, score it\n(tasks, held-out perplexity)", "results/00_baseline.json"),
    ("profile", "02", "compress one matrix at a time,\nmeasure the damage", "results/02_layer_sensitivity.json"),
    ("plan + tensorize", "03", "per-matrix budget from the\nprofile; TT-SVD into MPOs", "models/tensorized/"),
    ("quantize", "04", "int8 / NF4 (bitsandbytes)\nof dense and MPO models", "models/int8/, nf4/, mixed/"),
    ("heal", "05", "block-wise distillation, then a\nshort retraining (torchrun, FSDP2)", "heal/tensorized/model/"),
    ("evaluate", "06", "lm-eval tasks, perplexity,\nspeed; paired differences", "results/06_evaluate.json"),
)


def _get(results_dir: Path, name: str):
    p = Path(results_dir) / name
    return read_json(p) if p.is_file() else None


def measured(results_dir: Path) -> dict[str, str]:
    """One line per step with the number its result file holds ("not run" where it is missing)."""
    out = {s[0]: "not run in these results" for s in STEPS}
    if b := _get(results_dir, "00_baseline.json"):
        p = b["baseline"]["perplexity"]
        out["baseline"] = f"perplexity {p['ppl']:.1f}\n({p.get('text') or 'held-out'}, {p['tokens']:,} tok)"
    if s := _get(results_dir, "02_layer_sensitivity.json"):
        n = len({(r["block"], r["type"]) for r in s["heatmap"]})
        out["profile"] = f"{n} matrices profiled\non {s['tokens']} tokens"
    if t := _get(results_dir, "03_tensorize.json"):
        tot = t["main"]["size_report"]["totals"]
        out["plan + tensorize"] = (f"{tot['matrices_tensorized']}/{tot['matrices']} matrices MPO,\n"
                                   f"{100 * tot['block_params_after'] / tot['block_params_before']:.0f}% block params"
                                   f" kept;\nppl {short_number(t['main']['evaluation']['perplexity']['ppl'])}")
    if q := _get(results_dir, "04_quantize.json"):
        m = q["models"]
        out["quantize"] = "memory vs fp32:\n" + ", ".join(f"{k} {m[k]['memory_ratio_vs_fp32']:.2f}"
                                                         for k in ("8-bit", "4-bit", "88%") if k in m)
    if h := _get(results_dir, "05_heal.json"):
        hh = h["heal"]
        bw = (h.get("blockwise") or {}).get("perplexity")
        mid = f" -> {short_number(next(iter(bw.values()))['ppl'])}" if bw else ""
        out["heal"] = (f"{'block-wise + ' if bw else ''}{hh['plan']['tokens']:,} tokens, {hh['loss']} loss;\nppl "
                       f"{short_number(h['before']['perplexity']['ppl'])}{mid} -> {short_number(h['after']['perplexity']['ppl'])}")
    if e := _get(results_dir, "06_evaluate.json"):
        tasks = list(e["evaluations"]["original"]["tasks"])
        out["evaluate"] = f"{len(e['models'])} models x {len(tasks)} tasks\n+ 2 held-out texts"
    return out


def pipeline(numbers: Mapping[str, str], model: str = "SmolLM2-135M-Instruct") -> plt.Figure:
    """Six boxes left to right (two rows of three), each: step, notebook, what it does, the
    artefact it writes (monospace) and the run's number; arrows in order."""
    apply_style()
    fig, ax = plt.subplots(figsize=(10.5, 5.0))
    ax.set_xlim(0, 3)
    ax.set_ylim(0, 2)
    ax.axis("off")
    w, h = 0.86, 0.86
    centers = [(0.5 + i % 3, 1.5 if i < 3 else 0.5) for i in range(len(STEPS))]
    centers[3:] = centers[3:][::-1]  # snake: the second row runs right to left, so each arrow is short
    for (step, nb, what, artefact), (cx, cy) in zip(STEPS, centers):
        ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.04",
                                    fc="#f3f6fb", ec="#4a6fa5", lw=1.2))
        ax.text(cx, cy + 0.34, f"{step}", ha="center", va="center", fontsize=11, weight="bold", color="#1f3b66")
        ax.text(cx, cy + 0.23, f"notebook {nb}", ha="center", va="center", fontsize=7.5, color="0.35")
        ax.text(cx, cy + 0.08, what, ha="center", va="center", fontsize=8)
        ax.text(cx, cy - 0.11, artefact, ha="center", va="center", fontsize=7.5, family="monospace", color="#7a3e00")
        ax.text(cx, cy - 0.29, numbers.get(step, ""), ha="center", va="center", fontsize=7.8, color="#0b5d1e")
    for (x0, y0), (x1, y1) in zip(centers, centers[1:]):
        if y0 == y1:
            start, end = (x0 + np.sign(x1 - x0) * w / 2, y0), (x1 - np.sign(x1 - x0) * w / 2, y1)
        else:
            start, end = (x0, y0 - h / 2), (x1, y1 + h / 2)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#4a6fa5"))
    ax.set_title(f"The study, step by step, on {model_name(model)}: notebook, artefact (brown), measured (green)",
                 fontsize=10.5, loc="left")
    fig.text(0.01, 0.035, "Notebook 01 teaches the MPO on one matrix; 07 compares compression methods at equal budgets; "
             "08 redraws every figure from results/ alone.", fontsize=7.5, color="0.3")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.07)
    return fig

