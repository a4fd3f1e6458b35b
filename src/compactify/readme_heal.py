"""The README's blocks of the healing studies beyond notebook 05 (the long runs, the benchmarks along
them, the loss study, the healed speed frontier), and the small readers and formatters every block
shares; the recovery curve's blocks are in :mod:`compactify.readme_recovery`.
:mod:`compactify.readme` collects them into its ``BLOCKS``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from . import compare as C
from .figures import footer
from .results import read_json


def _j(r: Path, name: str) -> dict | None:
    p = Path(r) / name
    return read_json(p) if p.is_file() else None


def _ppl(p) -> str:
    """A perplexity (a number, or a result dict with "ppl") as the README prints it."""
    v = p["ppl"] if isinstance(p, dict) else p
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def _ratio(r: dict) -> str:
    return f"x{r['ppl_ratio']:.2f} [{r['ppl_ratio_lo']:.2f}, {r['ppl_ratio_hi']:.2f}]"



# The long healing runs' blocks (scripts/heal_long.py): {block: (run key of heal_study.LONG_RUN_FILES, whose
# run, how to make it)}
LONG_RUNS = {"heal_long": ("tt_svd", "The paper's TT-SVD start", "make heal-long"),
             "heal_long_bw": ("tt_svd_bw", "The same TT-SVD start after notebook 05's block-wise step",
                              "scripts/heal_long.py --blockwise"),
             "heal_long_asvd": ("asvd", "The activation-aware SVD start (the recovery curve's, 30% kept)",
                                "scripts/heal_long.py --start"),
             "heal_long_asvd_brownwiki": ("asvd_brownwiki", "The same activation-aware SVD start",
                                          "scripts/heal_long.py --start --set heal.data=brown-wiki"),
             "heal_long_asvd_brownwiki_lr5e4": ("asvd_brownwiki_lr5e-4", "The same start, data and schedule at peak lr 5e-4",
                                                 "scripts/heal_long.py --start --set heal.data=brown-wiki heal.lr=5.0e-4"),
             "heal_long_keep07_asvd_bw": ("asvd_bw_keep0.7", "The activation-aware SVD at 70% kept after its block-wise "
                                          "step (the recovery curve's best model at that budget)",
                                          "scripts/heal_long.py --start <run>/recovery/keep0.7_asvd/start_bw --target 1.1")}
HEAL_DATA = {"heal": "Brown", "wiki-vital": "Wikipedia vital-article leads",
             "brown-wiki": "Brown + Wikipedia vital-article leads (`brown-wiki`)"}


# A long run read against another of the same start before one step ({run key: (other run key, what it lacks)})
LONG_RUN_VERSUS = {"tt_svd_bw": ("tt_svd", "the plain start's run")}


def long_run_block(name: str, r: Path) -> str:
    """One long healing run (:data:`LONG_RUNS`): held-out perplexity along one long schedule, and
    where :data:`LONG_RUN_VERSUS` names another run, its perplexity over that run's at the token
    counts both measured."""
    from .heal_study import LONG_RUN_FILES

    key, who, how = LONG_RUNS[name]
    h = _j(Path(r) / "heal", LONG_RUN_FILES[key])
    if h is None:
        return f"(this long healing run has not been published: {how})"
    other = LONG_RUN_VERSUS.get(key)
    o = _j(Path(r) / "heal", LONG_RUN_FILES[other[0]]) if other else None
    beside = _beside(h, Path(r))
    return _long_run(h, who) + ("" if o is None else " " + _versus(h, o, other[1])) + (" " + beside if beside else "")


def _beside(h: dict, r: Path) -> str:
    """A long run of a recovery-curve start (``--start``): its end paired with the curve's healing of the
    same start (:func:`recovery.curve_point`: the same recipe for fewer tokens in a schedule of their own,
    at their own peak rate) over the same windows, on every held-out text both scored; "" otherwise."""
    from .recovery import curve_point

    found = curve_point(h["meta"].get("start", ""), r)
    if found is None:
        return ""
    file, p = found
    end = h["points"][-1]["perplexity"]
    cells = [f"`{t}` {_ratio(C.compare_nll(p['after'][t], end[t]))}" for t in end
             if "window_nll" in end[t] and "window_nll" in p["after"].get(t, {})]
    first = next(iter(p["after"]))
    return "" if not cells else (
        f"Against the recovery curve's healing of the same start (`{file}`: {p['tokens']:,} tokens in a schedule of "
        f"their own" + (f", peak lr {p['lr']:g}" if "lr" in p else "") + f", `{first}` {_ppl(p['after'][first])}), "
        f"the end of this run, paired over the same windows: "
        + ", ".join(cells) + ".")


def _versus(h: dict, o: dict, who: str) -> str:
    """``h``'s perplexity over ``o``'s at the token counts both runs measured (first held-out text),
    paired over the same windows where both kept them, else as a plain ratio (said so)."""
    first = next(iter(h["dense"]))
    at = {p["tokens"]: p for p in o["points"] if p["tokens"] > 0}
    both = [(p, at[p["tokens"]]) for p in h["points"] if p["tokens"] in at]
    if not both:
        return ""
    shown = {min(both, key=lambda b: abs(math.log(b[0]["tokens"] / t)))[0]["tokens"]
             for t in (5e4, 1e5, 2.5e5, 5e5, both[-1][0]["tokens"])}
    cells, paired = [], True
    for p, q in both:
        if p["tokens"] not in shown:
            continue
        a, b = q["perplexity"][first], p["perplexity"][first]
        if "window_nll" in a and "window_nll" in b:
            cells.append(f"{_ratio(C.compare_nll(a, b))} at {p['tokens'] / 1e3:,.0f}k")
        else:
            paired = False
            cells.append(f"x{b['ppl'] / a['ppl']:.2f} at {p['tokens'] / 1e3:,.0f}k")
    how = "paired over the same windows" if paired else (
        "ratios of perplexities without an interval: the other run kept no per-window losses")
    return f"Against {who} at the same token counts (`{first}`, {how}): " + ", ".join(cells) + "."


def _tasks_table(h: dict) -> str:
    """One ``scripts/eval_models.py`` result as a table: accuracy per task, each model paired with the first."""
    ref, tasks = h["reference"], h["tasks"]
    ev = h["evaluations"]
    text = next(iter(ev[ref]["perplexity_texts"]))
    head = "| model | " + " | ".join(f"{t} ({ev[ref]['tasks'][t]['metric']}, {ev[ref]['tasks'][t]['n']} docs)"
                                     for t in tasks) + f" | `{text}` perplexity / {ref} |"
    rows = [head, "|---" * (len(tasks) + 2) + "|",
            f"| {ref} | " + " | ".join(f"{100 * ev[ref]['tasks'][t]['value']:.1f}%" for t in tasks) + " | 1 |"]
    for name, p in h["paired"].items():
        cells = [f"{100 * ev[name]['tasks'][t]['value']:.1f}% ({p['tasks'][t]['diff']:+.1f} [{p['tasks'][t]['lo']:+.1f}, "
                 f"{p['tasks'][t]['hi']:+.1f}])" for t in tasks]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_ratio(p['texts'][text])} |")
    return ("\n".join(rows) + f"\n\nPoints of accuracy against {ref} on the same documents, paired 95% intervals; "
            f"MPO layers contracted, {ev[ref]['tasks'][tasks[0]]['autocast']} autocast as in notebook 06; "
            f"{footer(h['meta'])}.")


def tasks_block(file: str, r: Path, against: tuple[str, str] | None = None) -> str:
    """``scripts/eval_models.py``'s scoring of healed models on more benchmark documents, paired with dense;
    with ``against = (file, model)``, its last model also paired with that model of another scoring on
    the same documents (e.g. two long runs' final models, scored in separate runs)."""
    from . import compare as C

    h = _j(Path(r) / "heal", file)
    if h is None:
        return f"(these benchmark scores have not been published: scripts/eval_models.py --out {file})"
    other = _j(Path(r) / "heal", against[0]) if against else None
    if other is None:
        return _tasks_table(h)
    name = list(h["evaluations"])[-1]
    paired, _ = C.paired(other["evaluations"][against[1]], h["evaluations"][name], against[1], name)
    return _tasks_table(h) + f"\n\n{name} minus {against[1]} (`{against[0]}`), paired on the same documents: " + "; ".join(
        f"{t} {p['diff']:+.1f} points [{p['lo']:.1f}, {p['hi']:.1f}] over {p['n']:,}" for t, p in paired.items()) + "."


def loss_study(r: Path) -> str:
    """``scripts/loss_study.py``'s runs (``heal_study.LOSS_STUDY_FILES``): the main start healed with
    each loss and healing text, paired with notebook 05's next-token healing on Brown on every
    held-out text; and, where published, the same models' benchmark scores
    (``loss_study_tasks.json``, ``scripts/eval_models.py``)."""
    from .heal_study import LOSS_STUDY_FILES, loss_study_label

    runs = [h for h in (_j(Path(r) / "heal", f) for f in LOSS_STUDY_FILES) if h is not None]
    if not runs:
        return "(the loss comparison has not been published: scripts/loss_study.py)"
    texts = list(next(iter(runs[0]["variants"].values()))["perplexity"])
    rows = ["| loss@healing text | tokens/s | " + " | ".join(f"`{t}` perplexity (x notebook 05's, paired)"
                                                            for t in texts) + " |", "|---|---|" + "---|" * len(texts)]
    nb05 = _j(r, "05_heal.json")
    ref = next(iter(runs[0]["vs_notebook_05"]["by_variant"].values()))  # its ppl_a: notebook 05's perplexity
    # 05_heal.json's own rate only while it is still the plain healing the study was paired with
    if nb05 and nb05.get("blockwise"):
        rows.append("| lm@heal (notebook 05 before its block-wise step, the reference) | – | ")
    else:
        rows.append(f"| lm@heal (notebook 05, the reference) | {nb05['heal']['tokens_per_s_steady']:.0f} | " if nb05 else
                    "| lm@heal (notebook 05, the reference) | | ")
    rows[-1] += " | ".join(f"{_ppl(ref[t]['ppl_a'])} (1)" for t in texts) + " |"
    for h in runs:
        for name, v in h["variants"].items():
            cells = [f"{_ppl(v['perplexity'][t])} ({_ratio(h['vs_notebook_05']['by_variant'][name][t])})" for t in texts]
            rows.append(f"| {loss_study_label(h, name, runs[0]['tokens'])} | {v['tokens_per_s']:.0f} | "
                        + " | ".join(cells) + " |")
    rc = runs[0]["recipe"]
    out = ("\n".join(rows) + f"\n\nEvery row heals notebook 03's main model (the paper's TT-SVD MPO) for "
           f"{runs[0]['tokens']:,} tokens (heal = Brown's heal split; brown-wiki = the same and Wikipedia's vital-article "
           f"leads), batch {rc['batch_per_rank']} x {rc['seq_len']}, peak lr {rc['lr']:g}; kd: KL divergence from the "
           f"original model ({rc['teacher_mode']} teacher, temperature {rc['kd_temperature']:g}); mix: "
           f"{rc['kd_weight (mix)']:g} kd + {1 - rc['kd_weight (mix)']:g} lm. Reference: "
           f"{runs[0]['vs_notebook_05']['reference']}, on Brown. "
           + "Measured at " + ", ".join(f"{h['meta'].get('git_commit')} ({', '.join(h['variants'])})" for h in runs)
           + f"; {footer(runs[0]['meta']).split(' · commit')[0]}.")
    t = _j(Path(r) / "heal", "loss_study_tasks.json")
    return out if t is None else out + "\n\n" + _tasks_table(t)


def _long_run(h: dict, who: str) -> str:
    pts, first = [p for p in h["points"] if p["tokens"] > 0], next(iter(h["dense"]))
    shown = {min(pts, key=lambda p: abs(math.log(p["tokens"] / t))) ["tokens"]: None
             for t in (5e4, 1e5, 2.5e5, 5e5, pts[-1]["tokens"])}
    start = next((p for p in h["points"] if p["tokens"] == 0), None)
    along = ", ".join(f"{_ppl(p['perplexity'][first])} at {p['tokens'] / 1e3:,.0f}k" for p in pts if p["tokens"] in shown)
    end = "; ".join(f"`{t}` {_ppl(v['ppl_b'])} = {_ratio(v)} the dense model's ({h['dense'][t]['ppl']:.1f}, "
                    f"{v['tokens']:,} tokens, windows of {v['seq_len']})" for t, v in h["final_vs_dense"].items())
    f, heal = h["final_vs_dense"][first], h["heal"]
    half = min(pts, key=lambda p: abs(math.log(p["tokens"] / (pts[-1]["tokens"] / 2))))
    slope = math.log(pts[-1]["perplexity"][first]["ppl"] / half["perplexity"][first]["ppl"]) / math.log(
        pts[-1]["tokens"] / half["tokens"]) if half is not pts[-1] else float("nan")

    def verdict(target: float) -> str:  # judged on the paired interval, not the point
        return "met" if f["ppl_ratio_hi"] <= target else "missed" if f["ppl_ratio_lo"] > target else \
            "not resolved (its interval holds it)"

    # the main model's targets, or the one a run of another budget was judged against (--target)
    targets = (3.0, 1.5) if h.get("target", 3.0) == 3.0 else (h["target"],)
    data = h["meta"].get("config", {}).get("heal", {}).get("data", "heal")
    part = heal.get("tokens_this_run") or h["tokens"]
    speed = (f"{heal['tokens_per_s']:.0f} tok/s, {heal['train_seconds'] / 3600:.1f} h of training" if part >= h["tokens"] else
             f"resumed at {h['tokens'] - part:,} tokens from a checkpoint of the same run; its last {part:,} tokens: "
             f"{heal['tokens_per_s']:.0f} tok/s, {heal['train_seconds'] / 3600:.1f} h of training")
    return (f"{who} healed for {h['tokens']:,} tokens of {HEAL_DATA.get(data, data)} in one cosine schedule (peak lr "
            f"{h['lr']:g}, {heal['compute']}, {speed}; {footer(h['meta'])}): `{first}` perplexity "
            + (f"{_ppl(start['perplexity'][first])} before, " if start else "") + f"{along}. At the end: {end}. "
            f"Target{'s' if len(targets) > 1 else ''} on `{first}`: "
            + ", ".join(f"<= {t:g}x dense {verdict(t)}" for t in targets) + ". Log-log slope of "
            f"`{first}` perplexity against tokens over the last doubling ({half['tokens'] / 1e3:,.0f}k to "
            f"{pts[-1]['tokens'] / 1e3:,.0f}k, the schedule's low-rate end): {slope:.2f}.")


def slower_than_dense_below(h: Mapping) -> float:
    """The decode ratio under which a model of ``healed_frontier.json`` is judged slower than dense:
    1.0, or lower where the A/A control (the dense model's second copy) measured lower in a quarter
    of the rounds (the first quartile of its per-round ratio): the harness cannot tell such a
    ratio from equal speed."""
    ctrl = h.get("control")
    return 1.0 if ctrl is None else min(1.0, ctrl["decode_ratio_rounds"]["q1"])


def healed_frontier(r: Path) -> str:
    """``benchmarks/healed_frontier.py``: every healed model's quality, decode speed and bytes, and
    the speed targets of the speed issue judged on them."""
    from .figures_heal import STARTS

    h = _j(Path(r) / "benchmarks", "healed_frontier.json")
    if h is None:
        return "(the healed speed-quality frontier has not been published: benchmarks/healed_frontier.py)"
    text, s = next(iter(h["dense"]["perplexity"])), h["settings"]
    pts = sorted(h["points"], key=lambda p: (-p["keep"], list(STARTS).index(p["start"])))
    rows = [f"| block params kept | start | healed / dense, {text} | decode x dense (IQR of rounds) | "
            "prefill x dense | bytes x dense |", "|---|---|---|---|---|---|"]
    for p in pts:
        q = p["decode_ratio_rounds"]
        rows.append(f"| {100 * p['keep']:.0f}% | {STARTS[p['start']][0]} | {_ratio(p['after_vs_dense'][text])} | "
                    f"{p['decode_ratio']:.2f} ({q['q1']:.2f}-{q['q3']:.2f}) | {p['prefill_ratio']:.2f} | "
                    f"{p['bytes_ratio']:.2f} |")
    floor, ctrl = slower_than_dense_below(h), h.get("control")
    slow = [p for p in pts if p["decode_ratio"] < floor]
    within = [p for p in pts if floor <= p["decode_ratio"] < 1.0]
    half = max((p for p in pts if p["keep"] == 0.5), key=lambda p: p["decode_ratio"], default=None)
    control = "" if ctrl is None else (
        f"A/A control: a second copy of the dense model, "
        f"{ctrl.get('position', 'last in each round').replace('every position', 'in every position of a round')}, measured "
        f"{ctrl['decode_ratio']:.2f}x ({ctrl['decode_ratio_rounds']['q1']:.2f}-{ctrl['decode_ratio_rounds']['q3']:.2f}) "
        f"the first: the harness's own error, so a model counts as slower than dense only below "
        f"{floor:.2f}x. ")
    verdicts = (control + "Speed targets on these models: every compressed model at >= 1.0x dense in auto mode: "
                + ("met" if not slow else "missed by " + ", ".join(
                    f"{STARTS[p['start']][0]} at {100 * p['keep']:.0f}% ({p['decode_ratio']:.2f}x)" for p in slow))
                + (" (" + ", ".join(f"{STARTS[p['start']][0]} at {100 * p['keep']:.0f}% ({p['decode_ratio']:.2f}x)"
                                    for p in within) + " below 1.0x but within the control's error)" if within else "")
                + (f"; the fastest at 50% kept at >= 1.5x dense: {'met' if half['decode_ratio'] >= 1.5 else 'missed'}"
                   f" ({STARTS[half['start']][0]}, {half['decode_ratio']:.2f}x)" if half else "") + ".")
    return ("\n".join(rows) + f"\n\nDense: {h['dense']['decode_tokens_per_s']['median']:.1f} decode tokens/s, "
            f"{h['dense']['prefill_tokens_per_s']['median']:.0f} prefill tokens/s ({s['prefill_tokens']} tokens); "
            f"batch 1, {s['dtype']}, {s['threads']} threads, MPO mode {s['mode']}, {s['repeats']} round-robin rounds "
            f"({s.get('order', 'fixed')} order) after a warm-up; {footer(h['meta'])}. {verdicts}")
