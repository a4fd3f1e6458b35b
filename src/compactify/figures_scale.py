"""The paper-scale figure (``benchmarks/scale.py``): one 2x2 figure from one or several runs.

Takes result dicts (the JSON that ``benchmarks/scale.py`` writes), never paths, and returns a
matplotlib Figure; :func:`save_scale_figure` writes it with a provenance footer per run (device,
shape, dtype, date), in the style of :mod:`compactify.figures`. Several runs (say the CPU-scaled
one and an H100 one) share the axes: speed and memory are shown as ratios to the dense model of
the same run, measured side by side, so runs on different machines and shapes can stand together.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import paper as P
from .figures import MATRIX_COLORS, MODEL_COLORS, apply_style, footer, save

# The paper's numbers (compactify.paper): Table I's sizes in GB of LLaMA-2 7B under this figure's
# names, Fig. 4's "more than 25% faster" as a tokens/s ratio (1 / 0.75), Fig. 3's "about 2x".
_T1 = P.table1()
PAPER = {"table1_gb": {k: _T1[m]["size_gb"] for k, m in (("dense_fp32", "original"), ("8bit", "8-bit"), ("4bit", "4-bit"),
                                                        ("mpo", "88%"), ("mixed", "93%"))},
         "decode_ratio": P.speed_ratio("88%"),
         "heal_ratio": P.claims()["healing_speedup_tensorized"]["value"]}
TARGETS = {"decomposition_s": 30.0, "decode_ratio": 1.5, "heal_tokens_ratio": 1.5, "heal_peak_memory_ratio": 0.5}
BYTES_ORDER = [("dense_fp32", "dense fp32"), ("dense", "dense 16-bit"), ("8bit", "8-bit"), ("4bit", "4-bit"),
               ("mpo", "MPO (88%)"), ("mixed", "mixed (93%)")]
BYTES_COLORS = {"dense_fp32": MODEL_COLORS["original"], "dense": "#969696", "8bit": MODEL_COLORS["8-bit"],
                "4bit": MODEL_COLORS["4-bit"], "mpo": MODEL_COLORS["88%"], "mixed": MODEL_COLORS["93%"]}
SPEED_MODELS = [("mpo", "MPO"), ("4bit", "4-bit"), ("mixed", "mixed")]
HATCHES = ["", "//", "..", "xx"]


def label(result: Mapping) -> str:
    """Short name of a run: its device and shape, e.g. 'cpu, h1024x4' or 'NVIDIA H100, 7B'."""
    dev = result["meta"]["device"]
    where = dev.get("gpu") or dev.get("device", "?")
    s = result["config"]["shape"]
    mode = result["config"].get("mpo_forward", {}).get("set_by", "default")
    return (f"{where}, " + ("7B" if result["config"].get("at_7b_shape") else f"h{s['hidden']}x{s['blocks']}")
            + ("" if mode == "default" else " (MPO factored)" if mode == "none" else f" (materialize from {mode})"))


def _forward(result: Mapping) -> str:
    """How the MPO layers multiplied: factored always, or W rebuilt from ``materialize_from`` tokens on."""
    n = result["config"].get("mpo_forward", {}).get("materialize_from")
    return "factored" if n is None else f"factored below {n} tokens, W rebuilt from {n}"


def _footer(result: Mapping) -> str:
    meta = dict(result["meta"])
    meta["config_name"] = f"{result['config']['dtype']}, ratio {result['config']['ratio']}"
    return footer(meta)


def _bar_labels(ax, bars, fmt="{:.2f}"):
    for b in bars:
        h = b.get_height()
        if np.isfinite(h) and h > 0:
            ax.text(b.get_x() + b.get_width() / 2, h, fmt.format(h), ha="center", va="bottom", fontsize=6)


def _group_labels(ax, x, width, vals):
    """Bar values of each group of bars (rows of ``vals`` = series): one label over the group when
    every series shows the same number, else one small upright label per bar."""
    for i, xi in enumerate(x):
        col = [v for v in vals[:, i] if np.isfinite(v)]
        texts = {f"{v:.2f}" for v in col}
        if len(texts) == 1:
            ax.text(xi, max(col) + 0.01, texts.pop(), ha="center", va="bottom", fontsize=7)
            continue
        for j, v in enumerate(vals[:, i]):
            if np.isfinite(v):
                ax.text(xi + (j - (len(vals) - 1) / 2) * width, v + 0.01, f"{v:.2f}", ha="center", va="bottom",
                        fontsize=6, rotation=90)


def _decomposition(ax, results, targets):
    x = np.arange(len(results))
    bottom = np.zeros(len(results))
    for kind, color in MATRIX_COLORS.items():
        vals = np.array([r["decomposition"]["per_type"].get(kind, {}).get("seconds", 0.0) for r in results])
        ax.bar(x, vals, bottom=bottom, color=color, width=0.55, label=kind)
        bottom += vals
    for i, r in enumerate(results):
        d = r["decomposition"]
        ax.text(i, bottom[i], f"{bottom[i]:.1f} s\n{d['matrices_tensorized']} matrices", ha="center", va="bottom", fontsize=7)
    ax.axhline(targets["decomposition_s"], color="#d62728", ls="--", lw=1.2)
    ax.text(len(results) - 0.5, targets["decomposition_s"], f"target {targets['decomposition_s']:.0f} s (H100, 7B)",
            color="#d62728", fontsize=7, ha="right", va="bottom")
    ax.set_xticks(x, [label(r) for r in results], fontsize=7)
    ax.set_xlim(-0.6, len(results) - 0.4)
    ax.set_ylim(0, 1.45 * max(bottom.max(), targets["decomposition_s"]))
    ax.set_ylabel("seconds, all block matrices")
    ax.set_title("(a) decomposition time (TT-SVD, 3 cores)")
    ax.legend(fontsize=6.5, ncol=7, loc="upper left", handlelength=1, columnspacing=0.8, title="matrix type",
              title_fontsize=6.5, alignment="left")


def _bytes(ax, results, paper):
    """Size as a fraction of the dense fp32 model: measured per run, computed at the 7B shape, paper."""
    series = [(label(r), r["bytes"]["measured"]) for r in results]
    series.append(("LLaMA-2 7B, computed", {k: {"bytes": v} for k, v in results[0]["bytes"]["llama2_7b_computed"]["bytes"].items()}))
    x = np.arange(len(BYTES_ORDER))
    width = 0.8 / len(series)
    all_vals = []
    for j, (name, sizes) in enumerate(series):
        ref = sizes["dense_fp32"]["bytes"]
        vals = [(sizes.get(k) or {}).get("bytes") for k, _ in BYTES_ORDER]
        vals = [np.nan if v is None else v / ref for v in vals]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, color=[BYTES_COLORS[k] for k, _ in BYTES_ORDER],
                      hatch=HATCHES[j % len(HATCHES)], edgecolor="white", lw=0.5, label=name)
        all_vals.append(vals)
        for xi, v in zip(x, vals):
            if not np.isfinite(v):
                ax.text(xi + (j - (len(series) - 1) / 2) * width, 0.02, "n/a", ha="center", fontsize=6, rotation=90)
    gb = paper["table1_gb"]
    for xi, (k, _) in zip(x, BYTES_ORDER):
        if k in gb:
            ax.plot(xi, gb[k] / gb["dense_fp32"], marker="D", color="k", ms=4, ls="none")
    _group_labels(ax, x, width, np.array(all_vals))
    ax.set_xticks(x, [n.replace(" (", "\n(").replace("dense ", "dense\n") + (f"\n{gb[k]} GB" if k in gb else "\n–")
                      for k, n in BYTES_ORDER], fontsize=7)
    ax.set_xlabel("model (third line: its size in the paper's Table I)", fontsize=7)
    ax.set_ylabel("size / dense fp32")
    ax.set_ylim(0, 1.15)
    ax.set_title("(b) bytes per model vs the paper's Table I")


def _ratio_axis(ax, ylabel, values):
    """Log axis for ratios to dense, with plain tick labels (0.5x, 1x, 2x) spanning the data and the lines."""
    from matplotlib.ticker import FixedLocator, NullLocator

    vals = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    lo, hi = min(vals + [0.8]) / 1.4, max(vals + [2.2]) * 1.4
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axhline(1, color="k", lw=1)
    ax.set_ylabel(ylabel)


def _speed(ax, results, paper, targets):
    groups = [(m, n, kind) for m, n in SPEED_MODELS for kind in ("prefill", "decode")]
    x = np.arange(len(groups))
    width = 0.8 / len(results)
    allv = []
    for j, r in enumerate(results):
        sp = r["speed"]["models"]
        vals = [sp.get(m, {}).get(f"{kind}_ratio_to_dense", np.nan) for m, _, kind in groups]
        bars = ax.bar(x + (j - (len(results) - 1) / 2) * width, vals, width, hatch=HATCHES[j % len(HATCHES)],
                      color=[BYTES_COLORS[m] if kind == "decode" else _lighter(BYTES_COLORS[m]) for m, _, kind in groups],
                      edgecolor="white", lw=0.5, label=label(r))
        _bar_labels(ax, bars)
        allv += vals
    ax.axhline(paper["decode_ratio"], color="k", ls=":", lw=1.2)
    ax.axhline(targets["decode_ratio"], color="#d62728", ls="--", lw=1.2)
    ax.text(-0.45, paper["decode_ratio"] / 1.04, f"paper {paper['decode_ratio']:.2f}x", fontsize=7, ha="left",
            va="top")  # left, below its line: the target's label sits right, above its own
    ax.text(len(groups) - 0.5, targets["decode_ratio"] * 1.08, f"target MPO decode {targets['decode_ratio']}x",
            color="#d62728", fontsize=7, ha="right", va="bottom")
    _ratio_axis(ax, "tokens/s relative to dense", allv)
    ax.set_xticks(x, [f"{n}\n{kind}" for _, n, kind in groups], fontsize=7)
    ax.set_title("(c) prefill (light) and batch-1 decode (dark) speed")


def _heal(ax, results, paper, targets):
    keys = [("heal_tokens_per_s", "tokens/s"), ("heal_peak_memory", "peak memory"), ("heal_state_memory", "params+grads+AdamW")]
    x = np.arange(len(keys))
    width = 0.8 / len(results)
    allv = []
    for j, r in enumerate(results):
        vals = [r["ratios"].get(k, np.nan) for k, _ in keys]
        allv += vals
        bars = ax.bar(x + (j - (len(results) - 1) / 2) * width, vals, width, color=["#2ca02c", "#9467bd", "#c5b0d5"],
                      hatch=HATCHES[j % len(HATCHES)], edgecolor="white", lw=0.5, label=label(r))
        _bar_labels(ax, bars)
    ax.hlines(targets["heal_tokens_ratio"], -0.45, 0.45, colors="#d62728", linestyles="--", lw=1.2)
    ax.hlines(paper["heal_ratio"], -0.45, 0.45, colors="k", linestyles=":", lw=1.2)
    ax.text(-0.45, paper["heal_ratio"], f"paper ~{paper['heal_ratio']:g}x", fontsize=7, ha="left", va="bottom")
    ax.text(-0.45, targets["heal_tokens_ratio"], f"target >= {targets['heal_tokens_ratio']}x", fontsize=7, ha="left",
            va="bottom", color="#d62728")
    ax.hlines(targets["heal_peak_memory_ratio"], 0.55, 2.45, colors="#d62728", linestyles="--", lw=1.2)
    ax.text(2.45, targets["heal_peak_memory_ratio"], f"target <= {targets['heal_peak_memory_ratio']}x (memory)",
            fontsize=7, ha="right", va="bottom", color="#d62728")
    _ratio_axis(ax, "MPO / dense", allv)
    ax.set_xticks(x, [n for _, n in keys], fontsize=7)
    ax.set_title("(d) one healing step, FSDP2: MPO relative to dense")


def _lighter(color: str) -> tuple:
    from matplotlib.colors import to_rgb

    return tuple(0.55 * c + 0.45 for c in to_rgb(color))


def scale_figure(results: Mapping | Sequence[Mapping], paper: Mapping = PAPER, targets: Mapping = TARGETS) -> plt.Figure:
    """2x2: (a) decomposition time vs the 30 s target, (b) bytes per model vs Table I, (c) prefill
    (light) and decode (dark) tokens/s relative to dense with the paper's 1.25x claim, (d) healing
    tokens/s and peak memory of the MPO model relative to dense with the targets. One legend
    (hatch = run) under the title; each run's model and MPO forward in a caption; room at the
    bottom for one provenance line per distinct run (:func:`save_scale_figure`)."""
    results = [results] if isinstance(results, Mapping) else list(results)
    if not results:
        raise ValueError("scale_figure needs at least one result of benchmarks/scale.py")
    apply_style()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4))
    _decomposition(axes[0, 0], results, targets)
    _bytes(axes[0, 1], results, paper)
    _speed(axes[1, 0], results, paper, targets)
    _heal(axes[1, 1], results, paper, targets)
    fig.suptitle("CompactifAI at LLaMA-2 7B shape (70% fewer block parameters), side by side with dense",
                 fontsize=10, y=0.995)
    handles = [Patch(facecolor="0.55", edgecolor="white", hatch=HATCHES[j % len(HATCHES)], label=label(r))
               for j, r in enumerate(results)]
    handles += [Patch(facecolor="0.55", edgecolor="white", hatch=HATCHES[len(results) % len(HATCHES)],
                      label="LLaMA-2 7B, computed (b)"),
                Line2D([], [], marker="D", color="k", ls="none", ms=4, label="paper, Table I (b)")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=len(handles), fontsize=7,
               handlelength=2.2, columnspacing=1.2)
    models = list(dict.fromkeys(r["meta"].get("model", "") for r in results))
    text = "; ".join(f"{label(r)}: MPO forward {_forward(r)}" for r in results)
    text = textwrap.fill(f"Model: {'; '.join(models)}. {text}.", 175)
    h = fig.get_figheight() * 72
    bottom = (4 + 8 * len(_footers(results))) / h
    fig.text(0.01, bottom, text, fontsize=7, color="0.25", ha="left", va="bottom")
    fig.tight_layout(rect=(0, bottom + (text.count("\n") + 1) * 9.5 / h + 3 / h, 1, 0.955), h_pad=1.0)
    return fig


def _footers(results: Sequence[Mapping]) -> list[str]:
    """One provenance line per distinct run description (runs that share it share the line)."""
    return list(dict.fromkeys(_footer(r) for r in results))


def save_scale_figure(results: Mapping | Sequence[Mapping], out_dir: str | Path, name: str, **kw) -> Path:
    """:func:`scale_figure`, saved as ``name``.png/.pdf with one provenance line per distinct run."""
    results = [results] if isinstance(results, Mapping) else list(results)
    fig = scale_figure(results, **kw)
    h = fig.get_figheight() * 72
    for i, text in enumerate(reversed(_footers(results))):
        fig.text(0.01, (2 + 8 * i) / h, text, fontsize=6, color="0.45", ha="left", va="bottom")
    path = save(fig, out_dir, name)
    plt.close(fig)
    return path
