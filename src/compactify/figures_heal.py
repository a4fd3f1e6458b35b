"""Healing beyond notebook 05: the long run (``scripts/heal_long.py``) and the recovery curve
across compression (``scripts/recovery_curve.py``)."""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt

from .figures import apply_style, short_number

# The three starts of the recovery curve, in the order a reader meets them, one colour each.
STARTS = {"tt_svd": ("paper's MPO (TT-SVD)", "#d94701"), "activation_aware": ("activation-aware MPO", "#2171b5"),
          "asvd": ("activation-aware SVD (low rank)", "#31a354"),
          # the same starts distilled block by block before healing (scripts/recovery_curve.py --blockwise)
          "tt_svd_bw": ("paper's MPO, block-wise first", "#7f2704"),
          "asvd_bw": ("activation-aware SVD, block-wise first", "#00441b")}
# Long healing runs (scripts/heal_long.py): the starts above on Brown, and one start on another heal.data
LONG_RUNS = {**STARTS, "asvd_brownwiki": ("activation-aware SVD, healed on Brown + Wikipedia", "#756bb1"),
             "asvd_brownwiki_lr5e-4": ("the same, at half the peak rate", "#e7298a")}


def heal_long_figure(r: Mapping, target: float = 3.0) -> plt.Figure:
    """The long healing run (``scripts/heal_long.py``). Left: held-out perplexity of the healed
    model against healing tokens, log-log, one line per held-out text with its dense level
    (dashed) and the issue's target (dotted, ``target`` x dense on the primary text); open circles
    are full healing runs of the same start, each with its own complete cosine schedule (a point
    inside the long run was measured at a higher learning rate). Right: the training loss."""
    import numpy as np

    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6), gridspec_kw={"width_ratios": [1.45, 1]})
    points = [p for p in r["points"] if p["tokens"] > 0]
    texts = list(r["dense"])
    colors = dict(zip(texts, ("#d94701", "#2171b5", "#31a354")))
    start = next((p for p in r["points"] if p["tokens"] == 0), None)
    ends = []
    for t in texts:
        x, y = [p["tokens"] for p in points], [p["perplexity"][t]["ppl"] for p in points]
        a.plot(x, y, marker="o", ms=3, color=colors[t], label=f"{t} ({r['dense'][t]['tokens']:,} tokens)")
        a.axhline(r["dense"][t]["ppl"], ls="--", lw=1, color=colors[t])
        ends.append((y[-1], x[-1], colors[t], f"x{y[-1] / r['dense'][t]['ppl']:.3g}\ndense"))
        a.text(x[0], r["dense"][t]["ppl"], f" dense {r['dense'][t]['ppl']:.1f}", fontsize=7, color=colors[t],
               va="top", ha="left")
    first = texts[0]
    a.axhline(target * r["dense"][first]["ppl"], ls=":", lw=1, color="0.3")
    a.text(points[0]["tokens"], target * r["dense"][first]["ppl"], f" target {target:g}x dense ({first})",
           fontsize=7, color="0.3", va="bottom", ha="left")
    full = r.get("earlier_full_runs") or []
    if full:
        a.plot([e["tokens"] for e in full], [e["ppl"] for e in full], ls="none", marker="o", ms=6, mfc="none",
               mec=colors[first], mew=1.2, label=f"separate full run{'s' if len(full) > 1 else ''} ({first})")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlim(right=points[-1]["tokens"] * 1.9)  # room for the last points' labels
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 20, 50, 100, 200: labels within one decade too
    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.yaxis.set_minor_formatter(NullFormatter())
    a.set_xlabel("healing tokens")
    a.set_ylabel("held-out perplexity")
    before = f"; before healing {short_number(start['perplexity'][first]['ppl'])}" if start else ""
    a.set_title(f"held-out perplexity while healing{before}", fontsize=9)
    top = max(p["perplexity"][t]["ppl"] for p in points for t in texts)
    a.set_ylim(top=top * 2.6)  # headroom: the legend above every curve, not over one
    # end labels (x dense, two lines each), pushed apart where the texts end close together
    lo, hi = np.log10(a.get_ylim())
    gap, last = 0.1 * (hi - lo), -np.inf
    for y, x, color, label in sorted(ends):
        at = max(np.log10(y), last + gap)
        a.annotate(label, (x, y), xytext=(x * 1.12, 10 ** at), textcoords="data", fontsize=7, color=color,
                   ha="left", va="center")
        last = at
    a.legend(fontsize=7, loc="upper right")
    curve = r["heal"]["curve"]
    x = np.array([p["tokens"] for p in curve], dtype=float)
    y = np.array([p["lm_loss"] for p in curve], dtype=float)
    k = max(1, len(y) // 50)  # a running mean over ~2% of the run, so the trend shows through the noise
    b.plot(x, y, color="0.75", lw=0.6, label="per step")
    if len(y) > k:
        b.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="#d94701", lw=1.4,
               label=f"mean of {k} steps")
    b.set_xscale("log")
    b.set_xlabel("healing tokens")
    b.set_ylabel("next-token loss (nats/token)")
    b.set_title(f"training loss (peak lr {r['lr']:g}, cosine)", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def recovery_figure(r: Mapping, targets: Mapping[float, float] | None = None) -> plt.Figure:
    """The recovery curve across compression (``recovery_curve.json``): held-out perplexity over
    the dense model's (paired over the same windows, 95% interval) against the fraction of block
    parameters kept, one line per start; before healing (left; for a start distilled block by
    block first, after that step), after equal healing on the primary held-out text (middle) and
    on the other one (right). ``targets`` ({kept: ratio},
    default the healing issue's 1.1x at 70%, 1.3x at 50%) are marked on the middle panel."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    targets = {0.7: 1.1, 0.5: 1.3} if targets is None else targets
    apply_style()
    texts = list(r["dense"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.7))
    bw = any("blockwise" in p for p in r["points"])
    panels = [(axes[0], "before_vs_dense", texts[0], "before healing" + (" (block-wise: after its step)" if bw else "")),
              (axes[1], "after_vs_dense", texts[0], "after equal healing"),
              (axes[2], "after_vs_dense", texts[-1], "after equal healing")]
    starts = [s for s in STARTS if any(p["start"] == s for p in r["points"])]
    tokens = sorted({p["tokens"] for p in r["points"]})

    def at(keep, k):  # the starts side by side at each budget, not on top of each other
        return 100 * keep + 1.6 * (k - (len(starts) - 1) / 2)

    def bw_or(p, key, text):  # a block-wise point's healing starts where its step ended: that is its "before"
        return p["blockwise"]["vs_dense"][text] if key == "before_vs_dense" and "blockwise" in p else p[key][text]

    for ax, key, text, title in panels:
        for k, s in enumerate(starts):
            pts = sorted((p for p in r["points"] if p["start"] == s and key in p), key=lambda p: p["keep"])
            x = [at(p["keep"], k) for p in pts]
            v = [bw_or(p, key, text) for p in pts]
            y = [c["ppl_ratio"] for c in v]
            err = [[c["ppl_ratio"] - c["ppl_ratio_lo"] for c in v], [c["ppl_ratio_hi"] - c["ppl_ratio"] for c in v]]
            label, color = STARTS[s]
            lr = {p["lr"] for p in pts}
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, lw=1.3, capsize=2, color=color,
                        label=label + (f" (lr {lr.pop():.0e})" if len(lr) == 1 and key == "after_vs_dense" else ""))
            # the same start and budget measured again at another seed: open markers just right of the first
            rep = [(p, bw_or(p, key, text)) for p in r.get("repeats", []) if p["start"] == s and key in p]
            if rep:
                ax.errorbar([at(p["keep"], k) + 0.8 for p, _ in rep],
                            [c["ppl_ratio"] for _, c in rep],
                            yerr=[[c["ppl_ratio"] - c["ppl_ratio_lo"] for _, c in rep],
                                  [c["ppl_ratio_hi"] - c["ppl_ratio"] for _, c in rep]],
                            marker="o", ms=4, mfc="white", ls="none", capsize=2, lw=1, color=color)
        ax.axhline(1, ls="--", lw=1, color="0.3")
        ax.text(29, 1, "dense", fontsize=7, color="0.3", va="bottom")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if key == "before_vs_dense" else (1, 1.5, 2, 3, 5, 7)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([30, 50, 70])
        ax.set_xlim(25, 75)
        ax.set_xlabel("block parameters kept (%)")
        ax.set_title(f"{title}: {text}", fontsize=9)
    axes[0].set_ylabel("perplexity / dense (paired, 95% CI)")
    seeds = sorted({p["seed"] for p in r.get("repeats", [])})
    if seeds:  # one legend entry for the open markers
        axes[1].plot([], [], marker="o", ms=4, mfc="white", color="0.3", ls="none",
                     label=f"seed {', '.join(map(str, seeds))} (open)")
    for keep, ratio in targets.items():
        axes[1].plot([100 * keep], [ratio], marker="*", ms=9, color="black", ls="none",
                     label="target (best start)" if keep == max(targets) else None)
    axes[1].set_ylim(bottom=min(0.9, min(targets.values()) * 0.8))
    axes[2].set_ylim(bottom=0.9)
    fig.suptitle(f"The recovery curve: {', '.join(f'{t:,}' for t in tokens)} healing tokens per model, same recipe",
                 fontsize=10, y=0.99)
    handles, labels = axes[1].get_legend_handles_labels()  # under the title, clear of every curve: one row,
    rows = 1 if len(labels) <= 4 else 2                       # two where five entries would not fit the width
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.945), ncol=-(-len(labels) // rows),
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.895 - 0.06 * (rows - 1)))
    return fig


def healed_frontier(d: Mapping) -> plt.Figure:
    """Which healed model to deploy (``benchmarks/healed_frontier.py``): held-out perplexity over
    dense after equal healing (log, paired 95% interval) against batch-1 decode speed over dense
    (left; the per-round ratio's quartiles as horizontal bars) and against the model's bytes over
    dense (right), one line per start through 70/50/30% kept; dense is the star at (1, 1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    apply_style()
    text = next(iter(d["dense"]["perplexity"]))
    s = d["settings"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    for ax, x in ((a, "decode_ratio"), (b, "bytes_ratio")):
        for start, (label, color) in STARTS.items():
            pts = sorted((p for p in d["points"] if p["start"] == start), key=lambda p: p["keep"])
            if not pts:
                continue
            xs, ys = [p[x] for p in pts], [p["after_vs_dense"][text]["ppl_ratio"] for p in pts]
            yerr = [[y - p["after_vs_dense"][text]["ppl_ratio_lo"] for y, p in zip(ys, pts)],
                    [p["after_vs_dense"][text]["ppl_ratio_hi"] - y for y, p in zip(ys, pts)]]
            xerr = None
            if x == "decode_ratio":
                q = [p["decode_ratio_rounds"] for p in pts]
                xerr = [[max(v - r["q1"], 0) for v, r in zip(xs, q)], [max(r["q3"] - v, 0) for v, r in zip(xs, q)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, lw=1.2, capsize=2, color=color, label=label)
            left = start == "activation_aware"  # its points sit on the TT-SVD start's: label them on the other side
            for p, xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{round(100 * p['keep'])}%", (xv, yv), xytext=(-5 if left else 5, -9 if left else 4),
                            textcoords="offset points", fontsize=7, color=color, ha="right" if left else "left")
        ax.plot([1], [1], marker="*", ms=13, color="k", ls="none", label="dense fp32")
        ax.axhline(1, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    a.axvline(1.0, color="0.5", ls=":", lw=0.8)
    ctrl = d.get("control")
    if ctrl:  # the A/A control's interquartile range: ratios the harness cannot tell from dense speed
        q = ctrl["decode_ratio_rounds"]
        a.axvspan(q["q1"], max(q["q3"], q["q1"] + 1e-3), color="0.85", zorder=0,
                  label="dense, 2nd copy (IQR): timing error")
    a.set_xlabel(f"batch-1 decode tokens/s / dense ({s['threads']} threads, MPO mode {s['mode']}, same run)", fontsize=9)
    a.set_ylabel(f"healed {text} perplexity / dense (log)", fontsize=9)
    b.set_xlabel("model bytes / dense fp32 (embeddings included)", fontsize=9)
    a.set_title("quality against speed, after equal healing", fontsize=9)
    b.set_title("quality against size, after equal healing", fontsize=9)
    tokens = sorted({p["tokens"] for p in d["points"]})
    handles, labels = a.get_legend_handles_labels()  # one row above the panels, clear of every point
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.99), ncol=len(labels), fontsize=8,
               title=f"{' / '.join(f'{t:,}' for t in tokens)} healing tokens each, same recipe", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig


def heal_long_comparison(runs: Mapping[str, Mapping], targets: tuple[float, ...] = (3.0, 1.5),
                         tasks: Mapping | None = None, task_points: Mapping[str, Mapping[int, str]] | None = None
                         ) -> plt.Figure:
    """Long healing runs (``scripts/heal_long.py``, ``--start``), each ``{key of LONG_RUNS:
    result}``: held-out perplexity against healing tokens, log-log, one panel per held-out text,
    one line per run, the dense level dashed and the issue's ``targets`` (x dense) dotted on the
    first text. With ``tasks`` (``scripts/eval_models.py`` on models saved along the runs, the dense
    model its reference) and ``task_points`` (``{run key: {healing tokens: model name in tasks}}``),
    one more panel per task: accuracy against healing tokens with its 95% interval, dense dashed,
    chance dotted."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    apply_style()
    first_run = next(iter(runs.values()))
    texts = list(first_run["dense"])
    task_names = list(tasks["tasks"]) if tasks else []
    ncol = len(texts)
    nrow = 2 if task_names else 1  # the benchmarks in a second row, under the perplexities
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.6 * nrow + 0.5), squeeze=False)
    x0 = min(p["tokens"] for r in runs.values() for p in r["points"] if p["tokens"] > 0)
    for ax, t in zip(axes[0], texts):
        dense, ends = first_run["dense"][t]["ppl"], []
        for key, r in runs.items():
            label, color = LONG_RUNS[key]
            pts = [p for p in r["points"] if p["tokens"] > 0]
            x, y = [p["tokens"] for p in pts], [p["perplexity"][t]["ppl"] for p in pts]
            ax.plot(x, y, marker="o", ms=3, lw=1.3, color=color,
                    label=f"{label} (lr {r['lr']:.0e}, {r['heal']['tokens_per_s']:.0f} tok/s)")
            ends.append((y[-1], x[-1], color))
            for i in range(1, len(y) - 1):  # a point far above both neighbours: a loss spike, named as such
                if y[i] > 3 * max(y[i - 1], y[i + 1]):
                    ax.annotate("loss spike", (x[i], y[i]), xytext=(6, -2), textcoords="offset points", fontsize=7,
                                color=color, ha="left", va="top")
        ax.axhline(dense, ls="--", lw=1, color="k")
        ax.text(x0, dense, f"dense {dense:.1f}", fontsize=7, va="bottom", ha="left")
        if t == texts[0]:
            for k in targets:
                ax.axhline(k * dense, ls=":", lw=1, color="0.4")
                ax.text(x0, k * dense, f"{k:g}x dense", fontsize=7, color="0.4", va="bottom", ha="left")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(right=ax.get_xlim()[1] * 1.6)  # room for the end labels
        ax.set_xlabel("healing tokens (one cosine schedule per run)")
        ax.set_title(f"held-out perplexity: {t} ({first_run['dense'][t]['tokens']:,} tokens)", fontsize=9)
        # end labels (x dense), pushed apart where the runs end close together
        lo, hi = np.log10(ax.get_ylim())
        gap, last = 0.065 * (hi - lo), -np.inf
        for y, x, color in sorted(ends):
            at = max(np.log10(y), last + gap)
            ax.annotate(f"x{y / dense:.3g}", (x, y), xytext=(x * 1.12, 10 ** at), textcoords="data", fontsize=7,
                        color=color, ha="left", va="center")
            last = at
    axes[0][0].set_ylabel("perplexity (log)")
    for ax in axes[1][len(task_names):] if task_names else []:
        ax.set_visible(False)
    for ax, task in zip(axes[1] if task_names else [], task_names):
        ref = tasks["evaluations"][tasks["reference"]]["tasks"][task]
        for k, (key, at) in enumerate((task_points or {}).items()):
            x = sorted(at)
            res = [tasks["evaluations"][at[n]]["tasks"][task] for n in x]
            shift = 1.05 ** (k - (len(task_points) - 1) / 2)  # side by side where two runs share a token count
            ax.errorbar([v * shift for v in x], [100 * r["value"] for r in res], yerr=[196 * r["stderr"] for r in res],
                        marker="o", ms=3.5, lw=1.3, capsize=2, color=LONG_RUNS[key][1])
        ax.axhline(100 * ref["value"], ls="--", lw=1, color="k")
        ax.text(x0, 100 * ref["value"], f"dense {100 * ref['value']:.1f}%", fontsize=7, va="bottom", ha="left")
        if ref.get("chance"):
            ax.axhline(100 * ref["chance"], ls=":", lw=1, color="0.4")
            ax.text(x0, 100 * ref["chance"], "chance", fontsize=7, color="0.4", va="bottom", ha="left")
        ax.set_xscale("log")
        ax.set_xlim(axes[0][0].get_xlim())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("healing tokens (one cosine schedule per run)")
        ax.set_ylabel(f"{ref['metric']} (%), 95% interval")
        ax.set_title(f"{task} ({ref['n']:,} documents, models saved along the runs)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=1 if len(labels) > 2 else 2,
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.045 * len(labels) + 0.02) / nrow if len(labels) > 2 else 0.9))
    return fig


def loss_study_figure(runs: list[Mapping], tasks: Mapping | None = None, reference: str = "lm@heal") -> plt.Figure:
    """``scripts/loss_study.py``'s runs: each variant's held-out perplexity as a ratio to notebook
    05's next-token healing on Brown (paired 95% interval; one panel per text), and, with ``tasks``
    (``scripts/eval_models.py`` on the same models), each model's benchmark accuracy as a paired
    difference from ``reference`` (points, 95% interval), dense and the dense model healed on Brown
    included."""
    import numpy as np

    from . import compare as C
    from .heal_study import loss_study_label

    apply_style()
    rows = [(loss_study_label(h, name, runs[0]["tokens"]), v, h["variants"][name]["tokens_per_s"])
            for h in runs for name, v in h["vs_notebook_05"]["by_variant"].items()]
    texts = list(rows[0][1])
    ev = tasks["evaluations"] if tasks else {}
    task_names = list(tasks["tasks"]) if tasks else []
    ncol = len(texts) + len(task_names)
    fig, axes = plt.subplots(1, ncol, figsize=(3.3 * ncol, 0.42 * max(len(rows), len(ev)) + 1.6))
    axes = np.atleast_1d(axes)
    y = np.arange(len(rows))[::-1]
    for ax, t in zip(axes, texts):
        r = [v[t] for _, v, _ in rows]
        mid = np.array([x["ppl_ratio"] for x in r])
        err = np.array([[m - x["ppl_ratio_lo"] for m, x in zip(mid, r)], [x["ppl_ratio_hi"] - m for m, x in zip(mid, r)]])
        colors = ["#2171b5" if x["ppl_ratio_hi"] < 1 else "#d94701" if x["ppl_ratio_lo"] > 1 else "0.4" for x in r]
        ax.errorbar(mid, y, xerr=err, fmt="none", ecolor=colors, lw=1.5)
        ax.scatter(mid, y, c=colors, s=18, zorder=3)
        ax.axvline(1, color="k", lw=1, ls="--")
        ax.set_yticks(y, [f"{n} ({s:.0f} tok/s)" for n, _, s in rows] if ax is axes[0] else [])
        ax.set_xlabel(f"perplexity / {reference}'s")
        ax.set_title(f"{t} ({r[0]['tokens']:,} tokens)", fontsize=9)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    if tasks:
        names = list(ev)
        yt = np.arange(len(names))[::-1]
        for ax, task in zip(axes[len(texts):], task_names):
            cmp = [C.compare_task(ev[reference]["tasks"][task], ev[n]["tasks"][task], task, reference, n) for n in names]
            mid = np.array([c["diff"] for c in cmp])
            err = np.array([[c["diff"] - c["lo"] for c in cmp], [c["hi"] - c["diff"] for c in cmp]])
            ax.errorbar(mid, yt, xerr=err, fmt="o", ms=3.5, color="#31a354", lw=1.4)
            ax.axvline(0, color="k", lw=1, ls="--")
            ax.set_yticks(yt, [f"{n}: {100 * ev[n]['tasks'][task]['value']:.1f}%" for n in names], fontsize=7)
            ax.set_xlabel(f"points vs {reference}")
            t0 = ev[reference]["tasks"][task]
            ax.set_title(f"{task} ({t0['metric']}, {t0['n']} docs)", fontsize=9)
    fig.suptitle(f"Loss and healing text for the paper's TT-SVD start (30% kept), {runs[0]['tokens']:,} tokens each "
                 f"unless named\nblue: better than {reference} (notebook 05), red: worse; paired 95% intervals", fontsize=9)
    fig.tight_layout()
    return fig
