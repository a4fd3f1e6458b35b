"""Plotting functions of the study: one style, PNG + PDF, readable at paper column width.

Each function takes result *data* (dicts loaded from the JSON the notebooks write), never file
paths, and returns a matplotlib Figure; :func:`save` writes it with a footer that says which
model, device, config and date made the numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import seaborn as sns

from .evaluate import SPECS
from .paper import PAPER_MODELS  # noqa: F401  (the five models of the paper; re-exported)

# One colour per matrix type (the paper's L1..L7) and one per model, used everywhere.
MATRIX_COLORS = dict(zip(("q", "k", "v", "o", "gate", "up", "down"), sns.color_palette("tab10", 7)))
MATRIX_LABELS = {"q": "L1 q_proj", "k": "L2 k_proj", "v": "L3 v_proj", "o": "L4 o_proj",
                 "gate": "L5 gate_proj", "up": "L6 up_proj", "down": "L7 down_proj"}
MODEL_COLORS = {"original": "#4c4c4c", "8-bit": "#6baed6", "4-bit": "#2171b5", "88%": "#fd8d3c",
                "93%": "#d94701"}
# Chance accuracy of each benchmark's primary metric (multiple choice: 1/choices; generation: 0).
CHANCE = {name: spec.chance for name, spec in SPECS.items()}  # each task's chance level (compactify.evaluate)


def apply_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1,
                  rc={"figure.dpi": 110, "savefig.dpi": 200, "axes.spines.top": False,
                      "axes.spines.right": False, "legend.frameon": False})


MODEL_NAMES = {"embedded": "SmolLM2-135M-Instruct"}  # the bundled checkpoint, by its name


def model_name(text: str) -> str:
    """``text`` with each config alias of a model ("embedded") replaced by the model's name."""
    import re

    for alias, name in MODEL_NAMES.items():
        text = re.sub(rf"\b{alias}\b", name, str(text))
    return text


def footer(meta: Mapping | None) -> str:
    """'model · device · config · date' from a result's ``meta`` block."""
    if not meta:
        return ""
    dev = meta.get("device", {})
    isa = f"{dev['cpu_isa']}, " if dev.get("cpu_isa") else ""  # results made before it was recorded have none
    where = dev.get("gpu") or f"{dev.get('device', '?')} ({dev.get('cpu', '?')}, {isa}{dev.get('torch_threads', '?')} threads)"
    return (f"model: {model_name(meta.get('model', '?'))} · device: {where} · config: {meta.get('config_name', '?')} · "
            f"seed {meta.get('seed', '?')} · {str(meta.get('timestamp', '?'))[:10]} · commit {meta.get('git_commit', '?')}")


def caption(fig, text: str, fontsize: float = 7.5, top: float = 1.0) -> None:
    """Lay the axes out above a small caption (``text``, may hold newlines) that sits above the
    footer line :func:`save` adds."""
    h = fig.get_figheight() * 72
    y0 = 11 / h
    fig.tight_layout(rect=(0, y0 + (text.count("\n") + 1) * 1.3 * fontsize / h + 4 / h, 1, top))
    fig.text(0.01, y0, text, fontsize=fontsize, color="0.25", ha="left", va="bottom")


def short_number(v: float) -> str:
    """124, 12.4k, 3.1M, 2.3e8: a count or perplexity readable at a glance."""
    if v != v:
        return ""
    if abs(v) < 1e3:
        return f"{v:.3g}"
    if abs(v) < 1e6:
        return f"{v / 1e3:.3g}k"
    if abs(v) < 1e8:
        return f"{v / 1e6:.3g}M"
    m, e = f"{v:.1e}".split("e")
    return f"{m}e{int(e)}"


def save(fig, out_dir: str | Path, name: str, meta: Mapping | None = None) -> Path:
    """Write ``name``.png and ``name``.pdf under ``out_dir`` with the provenance footer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = footer(meta)
    if text:
        fig.text(0.01, 0.005, text, fontsize=6, color="0.45", ha="left", va="bottom")
    fig.savefig(out_dir / f"{name}.png", bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight")
    return out_dir / f"{name}.png"


def param_breakdown(rows: Sequence[Mapping], counts: Mapping) -> plt.Figure:
    """Where a Llama model's parameters live: per matrix type in one block, and in the whole model."""
    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.2), gridspec_kw={"width_ratios": [1.3, 1]})
    block0 = [r for r in rows if r["block"] == rows[0]["block"]]
    a.barh([MATRIX_LABELS[r["type"]] + f"  {r['out']}×{r['in']}" for r in block0],
           [r["params"] / 1e6 for r in block0], color=[MATRIX_COLORS[r["type"]] for r in block0])
    a.invert_yaxis()
    a.set_xlabel("parameters per block (millions)")
    a.set_title("the seven matrices of one decoder block")
    parts = {"block\nmatrices\n(tensorizable)": counts["block_matrices"],
             "embedding" + ("\n(= tied head)" if counts.get("tied_embeddings") else ""): counts["embedding"],
             "lm head": counts.get("lm_head", 0), "norms\netc.": counts.get("other", 0)}
    parts = {k: v for k, v in parts.items() if v}
    b.bar(range(len(parts)), [v / 1e6 for v in parts.values()], color=["#fd8d3c", "#9e9ac8", "#bcbddc", "0.7"][:len(parts)])
    b.set_xticks(range(len(parts)), list(parts), fontsize=8)
    for i, v in enumerate(parts.values()):
        share = 100 * v / counts["total"]
        b.text(i, v / 1e6, f"{share:.0f}%" if share >= 0.5 else f"{share:.2f}%", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("parameters (millions)")
    b.set_ylim(0, 1.12 * max(parts.values()) / 1e6)
    b.set_title(f"whole model: {counts['total'] / 1e6:.1f} M")
    fig.tight_layout()
    return fig


METRIC_SHORT = {"acc": "acc", "acc_norm": "acc-norm", "exact_match": "exact match", "word_perplexity": "word ppl"}


def baseline_bars(tasks: Mapping[str, Mapping], title: str = "dense baseline") -> plt.Figure:
    """Primary metric per task (%) with its stderr, against chance (red dashes)."""
    apply_style()
    names = list(tasks)
    fig, ax = plt.subplots(figsize=(max(5, 0.75 * len(names) + 1.2), 3.3))
    vals = [100 * tasks[t]["value"] for t in names]
    errs = [100 * (tasks[t].get("stderr") or 0) for t in names]
    ax.bar(range(len(names)), vals, yerr=errs, color="#4c4c4c", capsize=3, width=0.6)
    for i, t in enumerate(names):
        if t in CHANCE:
            ax.hlines(100 * CHANCE[t], i - 0.38, i + 0.38, colors="#d62728", linestyles="--", lw=1.2)
        ax.text(i, min(vals[i] + errs[i], 100) + 1, f"{vals[i]:.1f}", ha="center", va="bottom", fontsize=7)
    labels = [f"{t}\n{METRIC_SHORT.get(m := tasks[t].get('metric', ''), m)}\nn={tasks[t].get('n', '?')}" for t in names]
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("score (%)")
    ax.set_title(f"{model_name(title)}  (red dashes: chance)", fontsize=10)
    fig.tight_layout()
    return fig


def mpo_diagram(d: Mapping) -> plt.Figure:
    """Fig. 1a: one real matrix as an MPO. Left: the tensor network (cores as nodes, a physical
    output leg up and input leg down per core, bond legs labelled with their dimension). Right:
    the singular values at each cut of the reshaped matrix, the ``chi`` kept shaded.

    ``d`` holds name, shape, out_factors, in_factors, bond_dims, chi, params, dense_params,
    rel_error and spectra (one list of singular values per cut).
    """
    import numpy as np
    from matplotlib.patches import Circle

    apply_style()
    n = len(d["out_factors"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.15, 1]})
    a.set_xlim(-0.8, n - 0.2)
    a.set_ylim(-1.5, 1.5)
    a.axis("off")
    for k in range(n):
        a.plot([k, k], [0.25, 1.0], color="0.3", lw=2)
        a.plot([k, k], [-0.25, -1.0], color="0.3", lw=2)
        a.text(k, 1.08, f"o{k + 1}={d['out_factors'][k]}", ha="center", va="bottom", fontsize=9)
        a.text(k, -1.08, f"i{k + 1}={d['in_factors'][k]}", ha="center", va="top", fontsize=9)
        if k < n - 1:
            a.plot([k + 0.25, k + 0.75], [0, 0], color="#d94701", lw=3)
            a.text(k + 0.5, 0.1, f"χ{k + 1}={d['bond_dims'][k]}", ha="center", va="bottom", fontsize=9, color="#d94701")
        a.add_patch(Circle((k, 0), 0.25, facecolor="#fdd0a2", edgecolor="#a63603", lw=1.5, zorder=3))
        a.text(k, 0, f"G{k + 1}", ha="center", va="center", fontsize=10, zorder=4)
    a.set_title(f"{d['name']} ({d['shape'][0]}×{d['shape'][1]}) as a {n}-core MPO, χ={d['chi']}\n"
                f"{d['params']:,} of {d['dense_params']:,} parameters ({100 * d['params'] / d['dense_params']:.1f}%), "
                f"relative error {d['rel_error']:.3f}", fontsize=9)
    for k, s in enumerate(d["spectra"]):
        s = np.asarray(s, dtype=float)
        s = s / s[0]
        line, = b.semilogy(np.arange(1, len(s) + 1), s, lw=1.4, label=f"cut {k + 1} (keeps {d['bond_dims'][k]} of {len(s)})")
        kept = d["bond_dims"][k]
        b.fill_between(np.arange(1, kept + 1), s[:kept], 1e-6, color=line.get_color(), alpha=0.12)
    b.axvline(d["chi"], color="#d94701", ls="--", lw=1)
    b.set_ylim(bottom=max(1e-4, min(min(np.asarray(s) / s[0]) for s in d["spectra"] if len(s))))
    b.set_xscale("log")
    b.set_xlabel("singular value index")
    b.set_ylabel("σ / σ₁")
    b.set_title("spectrum at each cut: shaded = kept, the rest is truncated", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def block_diagram(block: Mapping[str, Mapping], block_index: int, title: str = "") -> plt.Figure:
    """Fig. 1b: where tensorization sits in a Llama decoder block. ``block`` maps each matrix
    type (q..down) to ``{"out", "in", "kept"}`` (fraction of parameters kept; 1.0 = dense) and
    optionally ``"chi"``. Tensorized matrices are coloured by how much they keep."""
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import FancyBboxPatch

    apply_style()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.axis("off")
    ax.set_xlim(0, 10.4)
    ax.set_ylim(0, 4)
    cmap, norm = LinearSegmentedColormap.from_list("kept", ["#a63603", "#fdae6b", "#fff5eb"]), Normalize(0, 1)

    def box(x, y, w, h, text, kind=None):
        info = block.get(kind) if kind else None
        face = "0.93"
        if info is not None:
            face = cmap(norm(info["kept"])) if info["kept"] < 1 else "white"
            chi = f", χ={info['chi']}" if info.get("chi") else ""
            text = (f"{text}\n{info['out']}×{info['in']}\n"
                    + ("dense" if info["kept"] >= 1 else f"MPO {100 * info['kept']:.0f}%{chi}"))
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", facecolor=face, edgecolor="0.3"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7.5)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="0.35", lw=1))

    box(0.0, 1.6, 0.7, 0.8, "x")
    box(0.9, 1.6, 0.8, 0.8, "RMSNorm")
    for i, t in enumerate(("v", "k", "q")):
        box(2.0, 0.2 + 1.25 * i, 1.1, 1.05, f"L{3 - i} {t}_proj", t)
        arrow(1.7, 2.0, 2.0, 0.72 + 1.25 * i)
        arrow(3.1, 0.72 + 1.25 * i, 3.4, 2.0)
    box(3.4, 1.6, 0.9, 0.8, "attention\n(RoPE)")
    box(4.5, 1.45, 1.1, 1.1, "L4 o_proj", "o")
    arrow(4.3, 2.0, 4.5, 2.0)
    box(5.8, 1.6, 0.8, 0.8, "+ x\nRMSNorm")
    arrow(5.6, 2.0, 5.8, 2.0)
    box(6.9, 2.2, 1.1, 1.05, "L5 gate_proj", "gate")
    box(6.9, 0.75, 1.1, 1.05, "L6 up_proj", "up")
    arrow(6.6, 2.0, 6.9, 2.7)
    arrow(6.6, 2.0, 6.9, 1.27)
    box(8.2, 1.6, 0.7, 0.8, "SiLU(·)\n× ·")
    arrow(8.0, 2.7, 8.2, 2.0)
    arrow(8.0, 1.27, 8.2, 2.0)
    box(9.1, 1.45, 1.2, 1.1, "L7 down_proj", "down")
    arrow(8.9, 2.0, 9.1, 2.0)
    arrow(0.7, 2.0, 0.9, 2.0)
    ax.set_title(title or f"Decoder block {block_index}: the seven matrices CompactifAI replaces by MPOs", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    cb = fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label("fraction of parameters kept", fontsize=8)
    fig.tight_layout()
    return fig


def heal_start_label(blockwise: Mapping | None) -> str:
    """The legend name of notebook 05's main healing: the paper's start, and whether the block-wise
    step (its record, ``05_heal.json``'s ``blockwise``; None when off) trained it first."""
    return "paper's start (TT-SVD), block-wise first" if blockwise else "paper's start (TT-SVD)"


def heal_figure(loss_curve: Sequence[Mapping], speed: Mapping[str, Mapping],
                losses: Mapping[str, Mapping] | None = None, paper_ratio: float = 2.0,
                starts: Mapping[str, Sequence[Mapping]] | None = None,
                control: Sequence[Mapping] | None = None, main: str = "paper's start (TT-SVD)") -> plt.Figure:
    """Left: the healing run's next-token loss (``main`` names its start) over training tokens (log axis), with the loss
    comparison's runs (``losses[loss]["curve"]``, notebook 05), the healings of other starting
    points (``starts[label]``: their loss curves, same recipe) and the dense model healed the same
    way (``control``: the floor a compressed model heals towards) beside it. Right (Fig. 3
    analogue): training tokens/s of the dense and the tensorized model, same steps and data; the
    dotted line is the paper's "about 2x faster" applied to our dense rate."""
    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.3), gridspec_kw={"width_ratios": [1.5, 1]})
    a.plot([p["tokens"] for p in loss_curve], [p.get("lm_loss", p["loss"]) for p in loss_curve], marker="o", ms=2.5,
           color="#d94701", label=f"{main}: next-token loss")
    for (label, curve), c in zip((starts or {}).items(), ("#2171b5", "#6a51a3")):
        a.plot([p["tokens"] for p in curve], [p.get("lm_loss", p["loss"]) for p in curve], marker="s", ms=2.5,
               color=c, label=f"{label}: next-token loss")
    if control:
        a.plot([p["tokens"] for p in control], [p.get("lm_loss", p["loss"]) for p in control], ls="--", color="0.35",
               lw=1.2, label="original dense model, healed the same way")
    styles = {"lm": ("#6baed6", "-"), "kd": ("#31a354", "--"), "mix": ("#756bb1", ":")}
    for loss, v in (losses or {}).items():
        c, ls = styles.get(loss, ("0.5", "-"))
        a.plot([p["tokens"] for p in v["curve"]], [p["lm_loss"] for p in v["curve"]], ls=ls, color=c, lw=1.2,
               label=f"loss comparison: heal.loss={loss} (its next-token loss)")
    a.set_xscale("log")
    a.set_xlabel("healing tokens")
    a.set_ylabel("next-token loss (nats/token)")
    a.set_title("healing the tensorized model")
    a.legend(fontsize=7)
    names = list(speed)
    vals = [speed[n]["tokens_per_s"] for n in names]
    bars = b.bar(names, vals, color=[MODEL_COLORS.get(n, "#fd8d3c") for n in names])
    for bar, v, n in zip(bars, vals, names):
        b.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f} tok/s\n{max(speed[n]['peak_rss_mib_per_rank']) / 1024:.1f} GiB",
               ha="center", va="bottom", fontsize=7)
    if "original" in speed and paper_ratio:
        ref = paper_ratio * speed["original"]["tokens_per_s"]
        b.axhline(ref, ls=":", color="k", lw=1)
        b.text(-0.4, ref, f"paper: ~{paper_ratio:g}x dense", va="bottom", fontsize=7)
    b.set_ylabel("healing tokens / s")
    b.set_title("Fig. 3 analogue: same recipe, same data")
    b.set_ylim(0, max(vals + [paper_ratio * speed.get("original", {"tokens_per_s": 0})["tokens_per_s"]]) * 1.3)
    fig.tight_layout()
    return fig


# The figures that do not fit in this file live in figures_<topic>.py; each is reachable as figures.<name>.
_ELSEWHERE = {"figures_plan": ("plan_and_comparison", "sensitivity_heatmap", "sensitivity_panels"),  # 02, 03
              "figures_eval": ("accuracy_bars", "inference_time", "quantize_figure"),  # 04, 06
              "figures_mpo": ("error_vs_kept",),  # 01
              "figures_frontier": ("frontier", "matrix_errors", "speed_quality"),  # 07, benchmarks
              "figures_scale": ("scale_figure", "save_scale_figure"),  # benchmarks/scale.py
              "figures_pipeline": ("pipeline",),  # the README's overview
              "figures_heal": ("heal_long_figure", "heal_long_comparison", "recovery_figure", "healed_frontier",
                               "loss_study_figure")}  # scripts/heal_long.py, recovery_curve.py


def __getattr__(name: str):
    import importlib

    for module, names in _ELSEWHERE.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
