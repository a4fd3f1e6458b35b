"""The README's numbers, written from the published results and nowhere else.

Each block of the README between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` is
the output of one function here on ``data/results/``: ``make reproduce`` rewrites them when it
publishes (:func:`update`, called by ``scripts/run_notebooks.py --publish``), and a test fails
when the committed README and the committed results disagree (:func:`check`). So a number a
reader finds in the README's results is the number the run wrote, with its text, tokens and
interval. Prose outside the blocks carries no measured number of the reference run.
"""
from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

from . import compare as C
from . import report
from .figures import footer
from .results import atomic_write_bytes, read_json


def _j(r: Path, name: str) -> dict | None:
    p = Path(r) / name
    return read_json(p) if p.is_file() else None


def _ppl(p) -> str:
    """A perplexity (a number, or a result dict with "ppl") as the README prints it."""
    v = p["ppl"] if isinstance(p, dict) else p
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def _ratio(r: dict) -> str:
    return f"x{r['ppl_ratio']:.2f} [{r['ppl_ratio_lo']:.2f}, {r['ppl_ratio_hi']:.2f}]"


def baseline(r: Path) -> str:
    """The dense model's scores and perplexities (notebook 00), one row each."""
    b = _j(r, "00_baseline.json")
    if b is None:
        return "(notebook 00 has not been published)"
    rows = ["| task | metric | score | ± stderr | documents | shots |", "|---|---|---|---|---|---|"]
    for t, x in b["baseline"]["tasks"].items():
        rows.append(f"| {t} | {x['metric']} | {100 * x['value']:.1f} | {100 * (x['stderr'] or 0):.1f} | {x['n']} | "
                    f"{x['num_fewshot']} |")
    for name, p in b["baseline"]["perplexity_texts"].items():
        lo, hi = C.ppl_interval(p)
        rows.append(f"| perplexity, {name} | ppl (seq_len {p['seq_len']}) | {p['ppl']:.2f} | 95% CI {lo:.2f}-{hi:.2f} | "
                    f"{p['tokens']:,} tokens | |")
    m = b["meta"]
    return "\n".join(rows) + f"\n\n({footer(m)})"


def claims(r: Path) -> str:
    """The paper's claims beside ours (the same table as ``figures/claims.md``)."""
    return report.claims_markdown(report.claims(Path(r))).rstrip("\n")


def headline(r: Path) -> str:
    """The study's result in one paragraph: compression, healing, accuracy, memory, speed."""
    b, t, h, e = (_j(r, n) for n in ("00_baseline.json", "03_tensorize.json", "05_heal.json", "06_evaluate.json"))
    if not all((b, t, h, e)):
        return "(notebooks 00, 03, 05 and 06 have not all been published)"
    tot = t["main"]["size_report"]["totals"]
    ev = t["main"]["evaluation"]["perplexity"]
    text, dense = ev.get("text") or "brown-heldout", b["baseline"]["perplexity_texts"]
    uniform = [c["ppl"] for c in t["comparison"] if c["plan"] == "uniform"]
    aa = (t.get("improved") or {}).get("evaluation", {}).get("perplexity")
    hh, hs = h["heal"], h["settings"]
    healed = e["paired_nll"].get("healed (fp32)", {})
    out = [f"On SmolLM2-135M, the sensitivity plan that keeps {100 * tot['block_params_after'] / tot['block_params_before']:.0f}% "
           f"of the block parameters ({tot['matrices_tensorized']} of the {tot['matrices']} block matrices as MPOs, the rest "
           f"left dense) takes perplexity on `{text}` ({ev['tokens']:,} tokens, windows of {ev['seq_len']}) from "
           f"{_ppl(dense[text])} to {_ppl(ev)} before healing"
           + (f" (a uniform plan at the same budget: {uniform[0]:.2g})" if uniform else "")
           + (f"; the same plan with activation-aware MPO cores starts at {_ppl(aa)}" if aa else "") + "."]
    out.append(f"Healing ({hh['plan']['tokens']:,} tokens of Brown, {hh['loss']} loss, lr {hs['lr']:.0e}, {hh['compute']}, "
               f"{hh['world_size']} process{'es' if hh['world_size'] > 1 else ''}, {hh['tokens_per_s_steady']:.0f} tok/s) brings the paper's TT-SVD start to "
               f"{_ppl(h['after']['perplexity'])}"
               + (": " + ", ".join(f"{_ratio(p)} the dense perplexity on {x}" for x, p in healed.items()) if healed else "")
               + " (paired over the same windows).")
    ctl = h.get("dense_control") or {}
    if ctl.get("paired_nll_vs_tt_svd"):
        out.append("The original dense model healed the same way (the fair reference) goes "
                   + ", ".join(f"from {_ppl(p['ppl_a'])} to {_ppl(p['ppl_b'])} on {x}" for x, p in ctl["paired_nll"].items())
                   + "; against it the healed TT-SVD start is "
                   + ", ".join(f"{_ratio(p)} on {x}" for x, p in ctl["paired_nll_vs_tt_svd"].items()) + ".")
    imp = h.get("improved") or {}
    if imp.get("after"):
        pn = imp["paired_nll_vs_tt_svd"]
        own = f" at its own peak rate {imp['lr']:.0e}" if imp.get("lr") and imp["lr"] != hs["lr"] else ""
        out.append(f"The activation-aware start heals to {_ppl(imp['after']['perplexity'])} with the same recipe{own}: "
                   + ", ".join(f"x{math.exp(p['diff']):.2f} [{math.exp(p['lo']):.2f}, {math.exp(p['hi']):.2f}] "
                               f"the TT-SVD start's perplexity on {x}" for x, p in pn.items())
                   + " (paired over the same windows).")
    for row in report.accuracy_claims(e):
        out.append(f"{row['claim'].replace('2-3 point accuracy drop', 'Accuracy')}: {row['ours'].split('; at chance')[0]}; "
                   f"verdict: {row['verdict']}.")
    q = e["paired_nll"]
    out.append("bitsandbytes: " + ", ".join(f"{m} perplexity {_ratio(q[m][text])} on {text}" for m in ("8-bit", "4-bit") if m in q)
               + ".")
    sp = e["speed"]
    out.append("Batch-1 decode, tokens/s relative to the original (median of round-robin rounds, IQR): "
               + ", ".join(f"{m} {v['decode_ratio']:.2f}x ({v['decode_ratio_rounds']['q1']:.2f}-{v['decode_ratio_rounds']['q3']:.2f})"
                           for m, v in sp.items() if not m.startswith("_") and m != "original")
               + f"; healing the MPO model runs at {h['speed_ratio_tensorized_vs_dense']:.2f}x the dense model's tokens/s.")
    return " ".join(out)


def frontier(r: Path) -> str:
    """Notebook 07: every method's held-out perplexity at each budget, the winner, the NF4 points."""
    f = _j(r, "07_frontier.json")
    if f is None:
        return "(notebook 07 has not been published)"
    d = f["dense"]
    pts = [p for p in f["points"] if p["method"] != "dense"]
    out = [f"All {f['n_matrices']} block matrices compressed by one method, no healing; held-out perplexity on "
           f"{d['tokens']:,} tokens of `{d.get('text') or 'brown-heldout'}` (windows of {d['seq_len']}; dense {d['ppl']:.1f})."]
    for keep, w in f["winners"].items():
        out.append(f"At {100 * float(keep):.0f}% of the block parameters kept: " +
                   ", ".join(f"{m} {v:,.0f}" if v < 1e5 else f"{m} {v:.1e}" for m, v in w["ranking"]) +
                   f" (winner: **{w['winner']}**).")
    nf4 = [p for p in f["points"] if p["method"] == "dense" and p["precision"] == "nf4"]
    q = sorted((p for p in pts if p["precision"] == "nf4"), key=lambda p: p["ppl"])
    if nf4:
        out.append(f"At equal bytes: the dense NF4 model, {100 * nf4[0]['bytes_ratio']:.1f}% of the fp32 bytes, scores "
                   f"{nf4[0]['ppl']:.1f}" + (f"; the best NF4-stored factorisation, {q[0]['method']} at "
                                             f"{100 * q[0]['keep']:.0f}% kept ({100 * q[0]['bytes_ratio']:.1f}% of the bytes), "
                                             f"{q[0]['ppl']:,.0f}" if q else "") + ".")
    return " ".join(out)


def speed(r: Path) -> str:
    """benchmarks/roofline.py and mpo_modes.py: each format's decode rate, its bound, and the MPO modes."""
    rf, mm = _j(Path(r) / "benchmarks", "roofline.json"), _j(Path(r) / "benchmarks", "mpo_modes.json")
    if rf is None:
        return "(benchmarks/roofline.py has not been published: make benchmarks)"
    key = "2" if "2" in rf["settings"]["passes"] else rf["settings"]["passes"][-1]
    c = rf["ceilings"][key]
    fp32_bytes = rf["formats"]["fp32"]["stored_bytes"]
    rows = [f"Measured on {footer(rf['meta'])}; {key} thread(s): memory bandwidth "
            f"{c['bandwidth_roof']['bytes_per_s'] / 1e9:.1f} GB/s, fp32 GEMM {c['gemm']['float32']['flops_per_s'] / 1e9:.0f} GFLOP/s.",
            "", "| format | bytes / fp32 | FLOPs / fp32 (decode) | decode tok/s (IQR) | x dense fp32 | % of its bound | "
            "prefill tok/s |", "|---|---|---|---|---|---|---|"]
    fp32_flops = rf["formats"]["fp32"]["decode_cost"]["flops_per_token"]
    for name, f in rf["formats"].items():
        if "skipped" in f:
            rows.append(f"| {f['label']} | | | skipped: {f['skipped']} | | | |")
            continue
        t = f["by_threads"][key]
        d = t["decode"]
        rows.append(f"| {f['label']} | {f['stored_bytes'] / fp32_bytes:.2f} | "
                    f"{f['decode_cost']['flops_per_token'] / fp32_flops:.2f} | {d['median']:.1f} ({d['q1']:.1f}-{d['q3']:.1f}) | "
                    f"{t['decode_ratio_to_fp32']:.2f} | {100 * t['decode_fraction_of_bound']:.0f}% | {t['prefill']['median']:.0f} |")
    text = "\n".join(rows)
    if mm:
        runs = mm["runs"]
        text += ("\n\nMPO layers by inference mode (SmolLM2 at 30% kept, batch-1 decode vs dense, `mpo_modes.json`): " +
                 "; ".join(f"{t} thread(s): " + ", ".join(f"{m} {v['decode_ratio_to_dense']:.2f}x" for m, v in run["models"].items()
                                                         if m != "dense") for t, run in runs.items()) + ".")
    return text


# The long healing runs' blocks (scripts/heal_long.py): {block: (file under heal/, whose run, how to make it)}
LONG_RUNS = {"heal_long": ("heal_long.json", "The paper's TT-SVD start", "make heal-long"),
             "heal_long_asvd": ("heal_long_asvd.json", "The activation-aware SVD start (the recovery curve's, 30% kept)",
                                "scripts/heal_long.py --start"),
             "heal_long_asvd_brownwiki": ("heal_long_asvd_brownwiki.json", "The same activation-aware SVD start",
                                          "scripts/heal_long.py --start --set heal.data=brown-wiki")}
HEAL_DATA = {"heal": "Brown", "wiki-vital": "Wikipedia vital-article leads",
             "brown-wiki": "Brown + Wikipedia vital-article leads (`brown-wiki`)"}


def long_run_block(name: str, r: Path) -> str:
    """One long healing run (:data:`LONG_RUNS`): held-out perplexity along one long schedule."""
    file, who, how = LONG_RUNS[name]
    h = _j(Path(r) / "heal", file)
    return f"(this long healing run has not been published: {how})" if h is None else _long_run(h, who)


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


def tasks_block(file: str, r: Path) -> str:
    """``scripts/eval_models.py``'s scoring of healed models on more benchmark documents, paired with dense."""
    h = _j(Path(r) / "heal", file)
    if h is None:
        return f"(these benchmark scores have not been published: scripts/eval_models.py --out {file})"
    return _tasks_table(h)


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

    data = h["meta"].get("config", {}).get("heal", {}).get("data", "heal")
    return (f"{who} healed for {h['tokens']:,} tokens of {HEAL_DATA.get(data, data)} in one cosine schedule (peak lr "
            f"{h['lr']:g}, {heal['compute']}, {heal['tokens_per_s']:.0f} tok/s, "
            f"{heal['train_seconds'] / 3600:.1f} h of training; {footer(h['meta'])}): `{first}` perplexity "
            + (f"{_ppl(start['perplexity'][first])} before, " if start else "") + f"{along}. At the end: {end}. "
            f"Targets on `{first}`: <= 3x dense {verdict(3.0)}, <= 1.5x dense {verdict(1.5)}. Log-log slope of "
            f"`{first}` perplexity against tokens over the last doubling ({half['tokens'] / 1e3:,.0f}k to "
            f"{pts[-1]['tokens'] / 1e3:,.0f}k, the schedule's low-rate end): {slope:.2f}.")


def recovery(r: Path) -> str:
    """``scripts/recovery_curve.py``: before and after equal healing at each budget and start, and
    each start's healed perplexity paired against the paper's TT-SVD start's."""
    from .figures_heal import STARTS

    h = _j(Path(r) / "heal", "recovery_curve.json")
    if h is None:
        return "(the recovery curve has not been published: scripts/recovery_curve.py)"
    texts = list(h["dense"])
    pts = sorted(h["points"], key=lambda p: (-p["keep"], list(STARTS).index(p["start"])))
    rows = ["| block params kept | start (peak lr) | before healing | healed | " +
            " | ".join(f"healed / dense, {t}" for t in texts) + " | healed / TT-SVD start's, paired |",
            "|---" * (5 + len(texts)) + "|"]
    for p in pts:
        ref = next((q for q in pts if q["keep"] == p["keep"] and q["start"] == "tt_svd"), None)
        vs = "" if ref is None or ref is p else _ratio(C.compare_nll(ref["after"][texts[0]], p["after"][texts[0]]))
        rows.append(f"| {100 * p['keep']:.0f}% | {STARTS[p['start']][0]} ({p['lr']:.0e}) | "
                    f"{_ppl(p['before'][texts[0]]) if 'before' in p else '–'} | {_ppl(p['after'][texts[0]])} | "
                    + " | ".join(_ratio(p["after_vs_dense"][t]) for t in texts) + f" | {vs} |")
    made = sorted({"the reference run (05_heal.json)" if p["source"] == "05_heal.json" else f"commit {p.get('commit', h['meta']['git_commit'])}"
                   for p in pts})
    tokens = sorted({p["tokens"] for p in pts})
    return ("\n".join(rows) + f"\n\nPerplexities on `{texts[0]}` ({h['dense'][texts[0]]['tokens']:,} tokens, windows of "
            f"{h['dense'][texts[0]]['seq_len']}; dense {h['dense'][texts[0]]['ppl']:.1f}); every model healed for "
            f"{' / '.join(f'{t:,}' for t in tokens)} tokens of Brown; measured by: {', '.join(made)}; {footer(h['meta'])}.")


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


BLOCKS: dict[str, Callable[[Path], str]] = {"headline": headline, "baseline": baseline, "claims": claims,
                                            "frontier": frontier, "speed": speed, "recovery": recovery,
                                            "healed_frontier": healed_frontier, "loss_study": loss_study,
                                            **{n: partial(long_run_block, n) for n in LONG_RUNS},
                                            "long_run_tasks": partial(tasks_block, "long_run_tasks.json"),
                                            "heal_long_tasks": partial(tasks_block, "heal_long_tasks.json")}
_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(\n<!-- /generated:\2 -->)", re.S)


def render(readme: str, results_dir: Path) -> str:
    """``readme`` with every generated block rewritten from ``results_dir``."""
    def sub(m):
        name = m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"README block 'generated:{name}' has no generator: use one of {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[name](Path(results_dir)) + m.group(4)
    return _BLOCK.sub(sub, readme)


def check(readme: str, results_dir: Path) -> list[str]:
    """The generated blocks whose text differs from what ``results_dir`` gives (empty: all agree);
    a block named in :data:`BLOCKS` but missing from the README is a problem too."""
    found = {m.group(2): m.group(3) for m in _BLOCK.finditer(readme)}
    problems = [f"block '{n}' is missing (add <!-- generated:{n} --> ... <!-- /generated:{n} -->)"
                for n in BLOCKS if n not in found]
    for n, body in found.items():
        want = BLOCKS[n](Path(results_dir)) if n in BLOCKS else None
        if body != want:
            problems.append(f"block '{n}' differs from {results_dir}: run `python -m compactify.readme` "
                            "(make reproduce does it when it publishes)")
    return problems


def section(readme_path: Path, title: str) -> str:
    """The README's section under the heading ``title`` (to its next heading of any level), so a
    notebook can show it without keeping a second copy."""
    text = Path(readme_path).read_text()
    m = re.search(rf"^(#+) {re.escape(title)}\s*$\n(.*?)(?=^#+ |\Z)", text, flags=re.M | re.S)
    if not m:
        raise KeyError(f"README has no section '{title}'")
    return m.group(2).strip()


def update(readme_path: Path, results_dir: Path) -> bool:
    """Rewrite the README's generated blocks in place (atomically); True if anything changed."""
    path = Path(readme_path)
    old = path.read_text()
    new = render(old, results_dir)
    if new != old:
        atomic_write_bytes(path, new.encode())
    return new != old


if __name__ == "__main__":
    from .config import REPO_ROOT

    changed = update(REPO_ROOT / "README.md", REPO_ROOT / "data" / "results")
    print("README.md: generated blocks " + ("rewritten from data/results/" if changed else "already agree with data/results/"))
