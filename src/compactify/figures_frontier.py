"""Figures of notebook 07 (the compression-quality frontier). Each function takes result data
(the ``points`` / ``matrices`` lists of ``07_frontier.json``) and returns a matplotlib Figure;
save it with :func:`compactify.figures.save` (provenance footer). To be merged into
:mod:`compactify.figures` by its owner.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt

from .figures import apply_style, caption

# Plain methods grey/orange, activation-aware ones black/blue; more cores = darker.
METHOD_STYLE = {
    "svd": ("#969696", "o", "truncated SVD"), "asvd": ("#000000", "o", "activation-aware SVD (SVD-LLM)"),
    "mpo2": ("#fdae6b", "s", "MPO, 2 cores"), "mpo3": ("#f16913", "s", "MPO, 3 cores (paper)"),
    "mpo4": ("#a63603", "s", "MPO, 4 cores"), "aa_mpo2": ("#6baed6", "D", "activation-aware MPO, 2 cores"),
    "aa_mpo3": ("#2171b5", "D", "activation-aware MPO, 3 cores"),
    "aa_mpo4": ("#08306b", "D", "activation-aware MPO, 4 cores"), "dense": ("#4c4c4c", "*", "dense"),
}


def _style(method: str):
    return METHOD_STYLE.get(method, ("#e7298a", "x", method))


def _lines(ax, points: Sequence[Mapping], x: str, y: str, precision: str | None, stage: str, ls: str,
           label_suffix: str = "") -> None:
    methods = list(dict.fromkeys(p["method"] for p in points))
    for m in methods:
        pts = sorted((p[x], p[y]) for p in points if p["method"] == m and p.get("stage") == stage
                     and (precision is None or p["precision"] == precision) and p.get(y) is not None)
        if not pts:
            continue
        color, marker, label = _style(m)
        ax.plot(*zip(*pts), ls=ls, marker=marker, ms=4, lw=1.4, color=color,
                mfc=color if ls == "-" else "white", label=label + label_suffix)


def frontier(points: Sequence[Mapping], dense: Mapping, metric: str = "ppl",
             metric_label: str = "held-out perplexity", flagged: Mapping[int, Mapping] | None = None) -> plt.Figure:
    """Quality vs size, one line per method: (left) against the fraction of block-matrix
    parameters kept, (right) against the bytes of the block matrices relative to fp32, where
    methods stored in fp16 (solid) meet the same methods with NF4-stored factors (dotted) and
    the dense 4-bit model. Before healing solid markers; after healing (if present) dashed.
    Two legends: colour/marker = method, line style = precision (and stage). ``flagged``:
    ``{index into points: {"ratio", "other", "source"}}`` (:func:`compactify.crossrun.disagreements`),
    points another machine scored more than 2x apart (the whole paired interval), circled in red
    and named in the caption."""
    from matplotlib.lines import Line2D

    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.0))
    stages = list(dict.fromkeys(p.get("stage", "before healing") for p in points))
    methods = [p for p in points if p["method"] != "dense"]
    for stage, ls in zip(stages, ("-", "--")):
        _lines(a, methods, "ratio", metric, "fp16", stage, ls)
        _lines(b, methods, "bytes_ratio", metric, "fp16", stage, ls)
        _lines(b, methods, "bytes_ratio", metric, "nf4", stage, ":")
    for p in points:
        if p["method"] == "dense" and p.get(metric) is not None:
            b.plot(p["bytes_ratio"], p[metric], marker="*", ms=11, color="#2ca02c" if p["precision"] == "nf4" else "k",
                   ls="none")
    flagged = {i: f for i, f in (flagged or {}).items() if 0 <= i < len(points) and points[i].get(metric) is not None}
    for i in flagged:
        p = points[i]
        for ax, x in ((a, "ratio"), (b, "bytes_ratio")):
            if ax is b or p["precision"] == "fp16":  # the left panel shows the fp16 points only
                ax.plot(p[x], p[metric], marker="o", ms=14, mfc="none", mec="#d62728", mew=1.3, ls="none", zorder=5)
    for ax in (a, b):
        if metric in dense:
            ax.axhline(dense[metric], color="k", ls="--", lw=1)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_ylabel(metric_label, fontsize=9)
    a.set_xlabel("fraction of block-matrix parameters kept", fontsize=9)
    a.set_title("equal parameters", fontsize=9)
    b.set_xscale("log")
    b.set_xlabel("bytes of the block matrices / fp32 dense (log)", fontsize=9)
    b.set_title("equal bytes: fp16 factors vs NF4-stored factors", fontsize=9)
    present = list(dict.fromkeys(p["method"] for p in methods))
    method_handles = [Line2D([], [], color=_style(m)[0], marker=_style(m)[1], ms=4, lw=1.4, label=_style(m)[2])
                      for m in present]
    style_handles = [Line2D([], [], color="0.3", lw=1.4, marker="o", ms=4, label="fp16 factors"),
                     Line2D([], [], color="0.3", lw=1.4, ls=":", marker="o", mfc="white", ms=4, label="NF4 factors"),
                     Line2D([], [], color="k", marker="*", ms=9, ls="none", label="dense fp32"),
                     Line2D([], [], color="#2ca02c", marker="*", ms=9, ls="none", label="dense NF4")]
    if metric in dense:
        style_handles.append(Line2D([], [], color="k", ls="--", lw=1, label=f"dense fp32: {dense[metric]:.3g}"))
    if flagged:
        style_handles.append(Line2D([], [], marker="o", ms=9, mfc="none", mec="#d62728", mew=1.3, ls="none",
                                    label="another CPU: >2x apart"))
    if len(stages) > 1:
        style_handles.append(Line2D([], [], color="0.3", ls="--", lw=1.4, label=f"dashed: {stages[1]}"))
    fig.suptitle(f"Compression-quality frontier: all block matrices compressed by one method ({stages[0]})",
                 fontsize=10)
    text = ("Plain SVD / MPO without healing reach perplexities of 1e6-1e10: the model is broken there, so the "
            "order of those points (non-monotone in size) is noise.")
    if flagged:
        ratios = sorted(1 / f["ratio"] if f["ratio"] < 1 else f["ratio"] for f in flagged.values())
        others = sorted({f"{f['other']} ({f['source']})" for f in flagged.values()})
        text += (f"\nCircled: {len(flagged)} point{'s' if len(flagged) > 1 else ''} that the same study on "
                 f"{', '.join(others)} scored {ratios[0]:.0f}-{ratios[-1]:.0f}x apart (paired 95% intervals all beyond "
                 "2x); which machine is right is open, so read them as unreliable.")
    caption(fig, text, fontsize=7)
    fig.subplots_adjust(right=0.77)
    leg = fig.legend(handles=method_handles, loc="upper left", bbox_to_anchor=(0.78, 0.9), fontsize=7, title="method",
                     title_fontsize=7.5, alignment="left")
    fig.legend(handles=style_handles, loc="lower left", bbox_to_anchor=(0.78, 0.12), fontsize=7,
               title="storage / reference", title_fontsize=7.5, alignment="left")
    fig.add_artist(leg)
    return fig


def matrix_errors(matrices: Sequence[Mapping], keep: float) -> plt.Figure:
    """Per matrix at one budget: relative weight error ``||W - W'|| / ||W||`` (what plain
    truncation minimises) against relative activation error ``||X (W - W')^T|| / ||X W^T||`` on
    the calibration inputs (what matters for the model), one colour per method."""
    apply_style()
    recs = [r for r in matrices if abs(r["keep"] - keep) < 1e-9 and r.get("act_error") is not None]
    fig, ax = plt.subplots(figsize=(6.2, 5))
    for m in dict.fromkeys(r["method"] for r in recs):
        pts = [(r["rel_error"], r["act_error"]) for r in recs if r["method"] == m]
        color, marker, label = _style(m)
        ax.scatter(*zip(*pts), s=10, marker=marker, color=color, alpha=0.6, lw=0, label=f"{label} ({len(pts)})")
    lim = max([1.0] + [max(r["rel_error"], r["act_error"]) for r in recs])
    ax.plot([0, lim], [0, lim], color="0.6", lw=0.8, ls=":", label="equal errors")
    ax.set_xlim(0, lim * 1.02)
    ax.set_ylim(0, lim * 1.02)
    ax.set_xlabel("relative weight error")
    ax.set_ylabel("relative activation error (calibration inputs)")
    ax.set_title(f"Every block matrix at {100 * keep:.0f}% of its parameters")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


# Which roofline format runs a frontier method's matrices: the same shapes, so the same speed
# (activation awareness changes the values of the factors, not their sizes).
SPEED_FORMAT = {"svd": "svd", "asvd": "svd", "mpo2": "mpo2", "mpo3": "mpo3", "aa_mpo2": "mpo2", "aa_mpo3": "mpo3"}


def speed_quality_points(points: Sequence[Mapping], roofline: Mapping, threads: str = "2") -> list[dict]:
    """Each fp16 point of the frontier (and the dense fp32 / NF4 references) with the batch-1
    decode rate of its format in ``benchmarks/roofline.py``'s run at ``threads`` (tokens/s, and
    as a ratio to dense fp32 measured in the same round-robin). Points whose format the roofline
    did not time are left out."""
    formats = roofline["formats"]

    def rate(name):
        f = formats.get(name, {}).get("by_threads", {}).get(threads)
        return (f["decode"]["median"], f["decode_ratio_to_fp32"]) if f else None

    out = []
    for p in points:
        if p["method"] == "dense":
            name = "fp32" if p["precision"] == "fp32" else p["precision"]
        elif p["precision"] == "fp16" and p["method"] in SPEED_FORMAT:
            name = f"{SPEED_FORMAT[p['method']]}-{round(100 * p['keep'])}"
        else:
            continue
        r = rate(name)
        if r and p.get("ppl") is not None:
            out.append({**p, "format": name, "decode_tokens_per_s": r[0], "decode_ratio": r[1]})
    return out


def _label_points(ax, labels: Sequence[tuple], markers: Sequence[tuple], fontsize: float = 6.5) -> None:
    """Annotate points ``(x, y, text, color)`` of ``ax`` beside their marker, at the first of four
    corners (upper right, upper left, lower right, lower left) where the label's box covers no
    other marker in ``markers`` ((x, y) pairs) and no label placed before: two budgets of one
    format a few pixels apart no longer print over each other."""
    import numpy as np

    ax.autoscale_view()
    to_pt = 72.0 / ax.figure.dpi  # display pixels -> points, the unit of the offsets
    pos = lambda x, y: np.asarray(ax.transData.transform((x, y))) * to_pt  # noqa: E731
    others = [pos(x, y) for x, y in markers]
    placed: list[tuple] = []
    for x, y, text, color in labels:
        at = pos(x, y)
        w, h = 0.62 * fontsize * len(text), fontsize  # the label's box, roughly, in points
        for dx, dy, ha, va in ((4, 3, "left", "bottom"), (-4, 3, "right", "bottom"), (4, -3, "left", "top"),
                               (-4, -3, "right", "top")):
            x0 = at[0] + dx - (w if ha == "right" else 0)
            y0 = at[1] + dy - (h if va == "top" else 0)
            box = (x0 - 3, y0 - 3, x0 + w + 3, y0 + h + 3)  # 3 points: about a marker's radius
            hits = [o for o in others if box[0] < o[0] < box[2] and box[1] < o[1] < box[3] and not np.allclose(o, at)]
            clash = [q for q in placed if box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3]]
            if not hits and not clash:
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=color,
                    ha=ha, va=va)


def speed_quality(points: Sequence[Mapping], dense: Mapping, roofline: Mapping, threads: str = "2") -> plt.Figure:
    """Which format to deploy: held-out perplexity (log) against batch-1 decode speed relative to
    dense fp32 (left) and against bytes relative to fp32 (right), one marker per method and budget,
    dense fp32 and NF4 as stars. Lower and further right (left panel) or left (right panel) is better."""
    apply_style()
    pts = speed_quality_points(points, roofline, threads)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    for ax, x in ((a, "decode_ratio"), (b, "bytes_ratio")):
        for m in dict.fromkeys(p["method"] for p in pts):
            mine = sorted((p for p in pts if p["method"] == m), key=lambda p: p["keep"])
            color, marker, label = _style(m)
            if m == "dense":
                for p in mine:
                    ax.plot(p[x], p["ppl"], marker="*", ms=12, ls="none",
                            color="#2ca02c" if p["precision"] == "nf4" else "k",
                            label=f"dense {p['precision'].upper() if p['precision'] == 'nf4' else 'fp32'}")
                continue
            ax.plot([p[x] for p in mine], [p["ppl"] for p in mine], marker=marker, ms=5, lw=1.2, color=color, label=label)
        ax.axhline(dense["ppl"], color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
    b.set_xscale("log")
    a.axvline(1.0, color="0.5", ls=":", lw=0.8)
    a.set_xlabel(f"batch-1 decode tokens/s / dense fp32 ({threads} threads, same run)", fontsize=9)
    a.set_ylabel(f"held-out perplexity ({dense['tokens']:,} tokens, before healing; log)", fontsize=9)
    b.set_xlabel("bytes of the block matrices / fp32 dense (log)", fontsize=9)
    a.set_title("quality against speed", fontsize=9)
    b.set_title("quality against size", fontsize=9)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo = min(p["bytes_ratio"] for p in pts)  # the points sit within one decade: label its usual fractions
    b.xaxis.set_major_locator(FixedLocator([v for v in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if v >= lo / 1.5]))
    b.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    b.xaxis.set_minor_formatter(NullFormatter())
    handles, labels = a.get_legend_handles_labels()
    fig.suptitle("Speed-quality frontier: perplexity from notebook 07, decode speed from benchmarks/roofline.py",
                 fontsize=10)
    caption(fig, "Speed of each format's shapes in fp32, MPO layers factored (the format's own cost; in auto mode an MPO\n"
                 "model decodes at about dense speed, see mpo_modes.json). Labels: % of block parameters kept. "
                 "Activation-aware methods share their plain twin's speed (same shapes).", fontsize=7)
    fig.subplots_adjust(right=0.76)  # after caption's tight_layout: room for the legend
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.77, 0.55), fontsize=7, title="format",
               title_fontsize=7.5, alignment="left")
    for ax, x in ((a, "decode_ratio"), (b, "bytes_ratio")):  # last, at the axes' final size: labels placed clear
        _label_points(ax, [(p[x], p["ppl"], f"{round(100 * p['keep'])}%", _style(p["method"])[0])
                           for p in pts if p["method"] != "dense"], [(p[x], p["ppl"]) for p in pts])
    return fig
