"""Figures of the sensitivity profile and the tensorization plan (notebooks 02 and 03, paper
Fig. 5), in the style of :mod:`compactify.figures` (which re-exports them). Each function takes
result data and returns a matplotlib Figure."""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .figures import MATRIX_COLORS, MATRIX_LABELS, apply_style, caption, short_number

PLAN_COLORS = ("#fd8d3c", "#9e9ac8", "#2171b5", "#74c476")


def sensitivity_panels(records: Sequence[Mapping], dense_ppl: float, x: str = "chi", y: str = "ppl",
                       metric_label: str = "perplexity (calibration prose)") -> plt.Figure:
    """The paper's Fig. 5: one panel per profiled block, the metric vs the bond dimension χ,
    one curve per matrix type (L1..L7), the dense model as a reference line. Each panel has its
    own y-axis (log where its values span a decade or more), so blocks with small changes show."""
    apply_style()
    recs = [r for r in records if r.get("level") == "chi" and y in r]
    block_ids = sorted({r["block"] for r in recs})
    fig, axes = plt.subplots(1, len(block_ids), figsize=(2.35 * len(block_ids) + 1.6, 3.1), squeeze=False)
    for ax, b in zip(axes[0], block_ids):
        for t in MATRIX_LABELS:
            pts = sorted((r[x], r[y]) for r in recs if r["block"] == b and r["type"] == t)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.3, color=MATRIX_COLORS[t], label=MATRIX_LABELS[t])
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label="original")
        vals = [r[y] for r in recs if r["block"] == b] + [dense_ppl]
        if y == "ppl" and max(vals) / min(vals) >= 10:
            ax.set_yscale("log")
        ax.set_title(f"block {b}", fontsize=9)
        ax.set_xlabel("bond dimension χ" if x == "chi" else x, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(metric_label, fontsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.86, 0.55), fontsize=7)
    fig.suptitle("Layer sensitivity: one matrix tensorized at a time (cf. paper Fig. 5)", fontsize=10)
    caption(fig, f"Ours: SmolLM2-135M-Instruct, {metric_label}: calibration text, not held out; "
                 "each panel has its own y-axis.\nThe paper's panels: MMLU accuracy of LLaMA-2 7B.", fontsize=7)
    fig.subplots_adjust(right=0.85)
    return fig


def _signed_log(v):
    """sign(v) log10(1 + |v|): a colour coordinate for changes spanning -1% to +10^6 %."""
    return np.sign(v) * np.log10(1 + np.abs(v))


def sensitivity_heatmap(records: Sequence[Mapping], ratio: float, dense_ppl: float) -> plt.Figure:
    """Every block x every matrix type at one compression level: the change in perplexity (%)
    when only that matrix is tensorized to keep ``ratio`` of its parameters. Diverging colours
    centred at 0 (blue: better than dense, red: worse) on a signed log scale; each cell annotated."""
    from matplotlib.colors import TwoSlopeNorm

    apply_style()
    recs = [r for r in records if r.get("level") == "ratio" and abs(r["value"] - ratio) < 1e-9 and "ppl" in r]
    n_blocks = max(r["block"] for r in recs) + 1
    types = list(MATRIX_LABELS)
    grid = np.full((n_blocks, len(types)), np.nan)
    for r in recs:
        grid[r["block"], types.index(r["type"])] = 100 * (r["ppl"] / dense_ppl - 1)
    c = _signed_log(grid)
    finite = c[np.isfinite(c)]
    norm = TwoSlopeNorm(0, vmin=min(finite.min(), -0.05), vmax=max(finite.max(), 0.05))
    fig, ax = plt.subplots(figsize=(6.2, 0.2 * n_blocks + 1.6))
    im = ax.imshow(c, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            txt = f"{v:+.1f}" if abs(v) < 10 else ("+" if v > 0 else "") + short_number(v)
            ax.text(j, i, txt, ha="center", va="center", fontsize=6.5,
                    color="white" if abs(norm(c[i, j]) - 0.5) > 0.33 else "0.1")
    ax.set_xticks(range(len(types)), [MATRIX_LABELS[t].replace(" ", "\n") for t in types], fontsize=7.5)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_blocks), range(n_blocks), fontsize=7)
    ax.set_ylabel("decoder block")
    ax.grid(False)
    ticks = [v for v in (-100, -10, -1, 0, 1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7) if norm.vmin <= _signed_log(v) <= norm.vmax]
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, ticks=[_signed_log(v) for v in ticks])
    cb.ax.set_yticklabels(["0" if v == 0 else f"{v:+g}" if abs(v) < 1e3 else "+" + short_number(v) for v in ticks], fontsize=7)
    cb.set_label("perplexity change vs dense (%)", fontsize=8)
    ax.set_title(f"One matrix tensorized to {100 * ratio:.0f}% of its parameters\n"
                 f"(calibration perplexity, dense {dense_ppl:.2f}; blue = lower than dense)", fontsize=9)
    fig.tight_layout()
    return fig


def plan_and_comparison(report: Mapping, comparison: Sequence[Mapping], dense_ppl: float) -> plt.Figure:
    """Left: the saved plan as a matrix type x block map of the fraction of parameters each
    matrix keeps (%, dense = 100). Right: held-out perplexity of each plan at each budget (before
    healing), dense as a reference line; plans (``comparison[i]["plan"]``) that were measured
    at some budgets only leave those bars out."""
    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [1.75, 1]})
    rows = report["rows"]
    types = list(MATRIX_LABELS)
    n_blocks = max(r["block"] for r in rows) + 1
    kept = np.full((len(types), n_blocks), np.nan)
    for r in rows:
        kept[types.index(r["matrix"]), r["block"]] = 100 * r["params_after"] / r["params_before"]
    im = a.imshow(kept, cmap="magma", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    a.set_yticks(range(len(types)), [MATRIX_LABELS[t] for t in types], fontsize=7.5)
    a.set_xticks(range(0, n_blocks, 2 if n_blocks > 16 else 1), range(0, n_blocks, 2 if n_blocks > 16 else 1), fontsize=7)
    a.set_xlabel("decoder block", fontsize=8)
    a.grid(False)
    cb = fig.colorbar(im, ax=a, fraction=0.04, pad=0.02)
    cb.set_label("% of parameters kept (dense = 100)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    total = report["totals"]
    a.set_title(f"saved plan: {100 * total['block_params_after'] / total['block_params_before']:.0f}% of the block "
                f"parameters kept, {total['matrices_tensorized']} of {total['matrices']} matrices tensorized", fontsize=9)
    _plan_bars(b, comparison, dense_ppl)
    fig.tight_layout()
    return fig


def _plan_bars(ax, comparison: Sequence[Mapping], dense_ppl: float) -> None:
    levels = sorted({c["keep_target"] for c in comparison})
    names = list(dict.fromkeys(c["plan"] for c in comparison))
    w = 0.84 / len(names)
    for j, name in enumerate(names):
        ppl = {c["keep_target"]: c["ppl"] for c in comparison if c["plan"] == name}
        vals = [ppl.get(lv, np.nan) for lv in levels]
        bars = ax.bar(np.arange(len(levels)) + (j - (len(names) - 1) / 2) * w, vals, width=w,
                      color=PLAN_COLORS[j % len(PLAN_COLORS)], label=textwrap.fill(name, 16))
        for bar, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v * 1.15, short_number(v), ha="center", va="bottom",
                        fontsize=6.5, rotation=90 if len(names) > 3 else 0)
    ax.axhline(dense_ppl, color="k", ls="--", lw=1, label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_ylim(dense_ppl / 2, np.nanmax([c["ppl"] for c in comparison] + [dense_ppl]) * 6)
    ax.set_xticks(range(len(levels)), [f"{100 * lv:.0f}% kept" for lv in levels], fontsize=8)
    ax.set_ylabel("held-out perplexity\n(before healing)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("plans compared", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), labelspacing=0.8)
