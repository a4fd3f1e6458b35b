"""The evaluation figures of notebooks 04 (memory and speed of the quantized models) and 06 (paper
Figs. 2 and 4), in the style of :mod:`compactify.figures` (which re-exports them). Each takes result
data, returns a Figure."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt

from .figures import CHANCE, MODEL_COLORS, apply_style, caption
from .paper import PAPER_MODELS


def accuracy_bars(ours: Mapping[str, Mapping[str, Mapping]], paper: Mapping[str, Mapping[str, float]] | None,
                  tasks: Sequence[str], paired: Mapping[str, Mapping[str, Mapping]] | None = None) -> plt.Figure:
    """Fig. 2. Left: scores (%, 0-100), tasks x models (``ours[model][task] = {"value", "stderr", "n"}``,
    0-1), chance as a dotted line, the paper's score (``paper[task][model]``, Table II, %) as a
    faded diamond on each bar. Right (with ``paired[model][task]`` from ``compactify.compare``):
    each model minus the original on the same documents, in points, with its paired 95% interval,
    the paper's difference as a faded diamond beside it. One legend below both panels."""
    import numpy as np
    from matplotlib.lines import Line2D

    apply_style()
    models = [m for m in PAPER_MODELS if m in ours] + [m for m in ours if m not in PAPER_MODELS]
    right = paired is not None
    fig, axes = plt.subplots(1, 2 if right else 1, figsize=(10 if right else 6, 0.45 * len(tasks) + 2.4),
                             squeeze=False, gridspec_kw={"width_ratios": [1.15, 1]} if right else None)
    ax = axes[0][0]
    h = 0.8 / len(models)
    for j, m in enumerate(models):
        y = np.arange(len(tasks)) + (j - (len(models) - 1) / 2) * h
        vals = [100 * ours[m][t]["value"] if t in ours[m] else np.nan for t in tasks]
        errs = [100 * (ours[m][t].get("stderr") or 0) if t in ours[m] else 0 for t in tasks]
        ax.barh(y, vals, height=h, xerr=errs, color=MODEL_COLORS.get(m, "0.6"), label=m,
                error_kw={"lw": 0.6, "capsize": 1.2, "ecolor": "0.3"})
        if paper:
            ax.plot([paper[t][m] if t in paper and m in paper[t] else np.nan for t in tasks], y, "D", ms=3.5,
                    color=MODEL_COLORS.get(m, "0.6"), mec="k", mew=0.4, alpha=0.45)
    for i, t in enumerate(tasks):
        ax.plot([100 * CHANCE.get(t, 0)] * 2, [i - 0.45, i + 0.45], ls=":", color="k", lw=1)
    n = {t: ours["original"][t]["n"] for t in tasks if t in ours.get("original", {})}
    ax.set_yticks(range(len(tasks)), [f"{t} (n={n.get(t, '?')})" for t in tasks], fontsize=8)
    ax.set_ylim(len(tasks) - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%) ± stderr")
    ax.set_title("scores: ours (bars), paper (faded ◆)", fontsize=9)
    ax.grid(axis="y", visible=False)
    if right:
        _paired_panel(axes[0][1], [m for m in models if m != "original"], tasks, paired, paper)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls=":", color="k", lw=1)]
    labels += ["chance"]
    if paper:
        handles += [Line2D([], [], marker="D", ls="none", color="0.6", mec="k", mew=0.4, alpha=0.45, ms=4)]
        labels += ["paper (LLaMA-2 7B, Table II)"]
    fig.suptitle("Accuracy of the original, quantized and compressed models (cf. paper Fig. 2)", fontsize=10)
    fig.tight_layout(rect=(0, 0.075, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7.5, bbox_to_anchor=(0.5, 0.02),
               handlelength=1.5, columnspacing=1.2)
    return fig


def _paired_panel(ax, models, tasks, paired, paper) -> None:
    """Fig. 2, right: paired differences to the original with 95% intervals, the paper's beside them."""
    import numpy as np

    h = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        y = np.arange(len(tasks)) + (j - (len(models) - 1) / 2) * h
        d = [paired.get(m, {}).get(t) for t in tasks]
        x = [r["diff"] if r else np.nan for r in d]
        lo = [r["diff"] - r["lo"] if r else 0 for r in d]
        hi = [r["hi"] - r["diff"] if r else 0 for r in d]
        ax.errorbar(x, y, xerr=[lo, hi], fmt="o", ms=3.5, color=MODEL_COLORS.get(m, "0.6"), lw=1, capsize=1.5)
        if paper:
            px = [paper[t][m] - paper[t]["original"] if t in paper and m in paper[t] else np.nan for t in tasks]
            ax.plot(px, y, "D", ms=3.5, color=MODEL_COLORS.get(m, "0.6"), mec="k", mew=0.4, alpha=0.45)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvspan(-3, 0, color="#fdd0a2", alpha=0.6, lw=0)
    for k in range(len(tasks) - 1):
        ax.axhline(k + 0.5, color="0.88", lw=0.6)
    ax.grid(axis="y", visible=False)
    ax.set_yticks(range(len(tasks)), [""] * len(tasks))
    ax.set_ylim(len(tasks) - 0.5, -0.5)
    ax.set_xlabel("model − original (points), paired 95% interval\nshaded: the paper's 3-point drop", fontsize=8)
    ax.set_title("difference on the same documents", fontsize=9)


def inference_time(task_time: Mapping[str, Mapping[str, float]], speed: Mapping[str, Mapping],
                   paper: Mapping[str, float] | None = None) -> plt.Figure:
    """Fig. 4: per task, evaluation wall time relative to the original (= 1), per model; and
    prefill / decode tokens/s relative to the original, measured side by side. ``paper`` (the
    paper's time relative to the original, e.g. ``{"4-bit": 1.13, "88%": 0.75}``) is drawn as a
    dotted line on the left and as its speed (1 / time) as a diamond on the right."""
    import numpy as np

    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    models = [m for m in task_time if m != "original"]
    tasks = list(next(iter(task_time.values())))
    w = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        a.bar(np.arange(len(tasks)) + (j - (len(models) - 1) / 2) * w, [task_time[m][t] for t in tasks], width=w,
              color=MODEL_COLORS.get(m, "0.6"), label=m)
    a.axhline(1, color="k", lw=1, ls="--")
    for m, v in (paper or {}).items():
        a.axhline(v, color=MODEL_COLORS.get(m, "0.5"), lw=1.3, ls=":", label=f"paper {m}: {v:g}")
    a.set_xticks(range(len(tasks)), tasks, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
    a.set_ylabel("evaluation time / original")
    a.set_title("per-task wall time, lm-eval (cf. paper Fig. 4)", fontsize=9)
    a.legend(fontsize=7, ncol=len(models) + len(paper or {}), loc="lower center", bbox_to_anchor=(0.5, 1.09),
             handlelength=1.5, columnspacing=1)
    names = [m for m in speed if not m.startswith("_")]
    for k, (kind, hatch) in enumerate((("prefill", ""), ("decode", "//"))):
        b.bar(np.arange(len(names)) + (k - 0.5) * 0.38, [speed[n][f"{kind}_ratio"] for n in names], width=0.38,
              color=[MODEL_COLORS.get(n, "0.6") for n in names], hatch=hatch, edgecolor="white", label=kind)
    for m, v in (paper or {}).items():
        if m in names:
            b.plot(names.index(m), 1 / v, "D", color="k", ms=5, ls="none", label="paper: 1 / time" if
                   m == next(iter(paper)) else None)
    b.axhline(1, color="k", lw=1, ls="--")
    b.set_xticks(range(len(names)), names, fontsize=8)
    b.set_ylabel("tokens/s relative to original")
    b.set_ylim(0, 1.15 * max([1.0] + [1 / v for v in (paper or {}).values()]
                            + [speed[n][f"{k}_ratio"] for n in names for k in ("prefill", "decode")]))
    b.set_title("batch-1 prefill (plain) and decode (hatched)", fontsize=9)
    b.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.09), handlelength=1.5)
    caption(fig, "Left: wall time of each whole lm-eval task (many documents, prefill-dominated); right: batch-1 "
                 "decode and a short prefill in tokens/s. They measure different regimes and need not agree.\n"
                 "Paper (LLaMA-2 7B, GPU): 4-bit 1.13x and 88% 0.75x the original's time (dotted lines; ◆ = the same "
                 "as a speed).", fontsize=7)
    return fig


def quantize_figure(result: Mapping, title: str = "speed") -> plt.Figure:
    """Notebook 04's figure from its result (``04_quantize.json``: ``models``, ``speed``,
    ``speed_claims``). Left: each model's memory relative to the fp32 original, in use and on disk,
    with Table I's ratio (black tick). Right: prefill and decode tokens/s relative to the original
    (bars: medians, whiskers: interquartile range over the rounds), with the paper's claims as
    speeds (black ticks). ``title`` heads the right panel (e.g. the machine's name)."""
    import numpy as np

    apply_style()
    rows, sp, claims = result["models"], result["speed"], result.get("speed_claims") or {}
    names = list(rows)
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = [MODEL_COLORS.get(n, "0.5") for n in names]
    a.bar(x - 0.2, [rows[n]["memory_ratio_vs_fp32"] for n in names], 0.4, color=colors, label="in memory")
    a.bar(x + 0.2, [rows[n]["disk_ratio_vs_fp32"] for n in names], 0.4, color=colors, alpha=0.5, label="on disk")
    a.scatter(x, [rows[n]["paper_ratio_vs_fp32"] for n in names], marker="_", s=400, color="k", zorder=3,
              label="paper (Table I)")
    for i, n in enumerate(names):
        a.text(i - 0.2, rows[n]["memory_ratio_vs_fp32"] + 0.02, f"{rows[n]['memory_ratio_vs_fp32']:.2f}", ha="center",
               fontsize=7)
    a.set_xticks(x, names)
    a.set_ylabel("bytes / fp32 original")
    a.set_title("memory")
    a.legend(fontsize=7)
    for j, (k, hatch) in enumerate((("prefill", ""), ("decode", "//"))):
        ref = sp["original"][k]["median"]
        med = np.array([sp[n][k]["median"] / ref for n in names])
        lo = med - np.array([sp[n][k]["q1"] / ref for n in names])
        hi = np.array([sp[n][k]["q3"] / ref for n in names]) - med
        b.bar(x + (j - 0.5) * 0.4, med, 0.4, yerr=[lo, hi], color=colors, hatch=hatch, edgecolor="white", capsize=2,
              label=k)
    for i, (n, c) in enumerate((n, c) for n, c in claims.items() if n in names):
        b.scatter(names.index(n), c["paper_ratio"], marker="_", s=400, color="k", zorder=3, label=None if i else "paper")
    b.axhline(1, color="0.3", lw=0.8)
    b.set_xticks(x, names)
    b.set_ylabel("tokens/s relative to original")
    b.set_title(title[:60], fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig
