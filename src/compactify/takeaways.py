"""The takeaway that ends each chapter (issue 16): what the notebook showed, our number, the
paper's number and a verdict, in 2-4 sentences of Markdown.

Built from the chapter's own result JSON alone, plus the paper's numbers as ``data/paper/*.csv``
gives them (Table I, Table II, ``claims.csv``); verdicts on headline claims come from
:func:`compactify.report.claims` / :func:`~compactify.report.accuracy_claims`, so a notebook and
the claims table never disagree. A section an older or smaller run lacks is named in the text.
"""
from __future__ import annotations

import csv
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from . import compare as C, report
from .aa_init import label
from .config import REPO_ROOT
from .results import ResultFileError, read_json
from .run import PRODUCERS

FILES = {n[:2]: (n, PRODUCERS.get(n, n.removesuffix(".json"))) for n in (
    "00_baseline.json", "01_mpo_primer.json", "02_layer_sensitivity.json", "03_tensorize.json", "04_quantize.json",
    "05_heal.json", "06_evaluate.json", "07_frontier.json")}  # chapter -> (result file, notebook)


class _Missing(KeyError):  # a section the takeaway needs is not in the result JSON (its dotted path)
    pass


def _at(d, *keys):
    """``d[k1][k2]...``; a missing or null entry raises :class:`_Missing` naming its path."""
    for i, k in enumerate(keys):
        if not isinstance(d, dict) or d.get(k) is None:
            raise _Missing(".".join(map(str, keys[: i + 1])))
        d = d[k]
    return d


def _absent(d: dict, key: str) -> str:
    return f"`{key}` is null" if key in d else f"`{key}` is missing from the results"


def fmt_ppl(x) -> str:
    """A perplexity for people: 45.81, 1,407, 123,954; beyond a billion 1.48e+13."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}" if x < 1e9 else f"{x:.2e}"


def _ppl_text(name: str, p: dict) -> str:
    """'45.81 [95% CI 43.10-48.75] on brown-heldout (8,160 tokens, seq_len 256)'."""
    ci = (lambda lo, hi: f" [95% CI {fmt_ppl(lo)}–{fmt_ppl(hi)}]")(*C.ppl_interval(p)) \
        if len(p.get("window_nll") or []) > 1 else ""
    return f"{fmt_ppl(p['ppl'])}{ci} on {name} ({p['tokens']:,} tokens, seq_len {p['seq_len']})"


def _ratio_text(r: dict) -> str:
    """A paired perplexity ratio with its interval, as a factor down or up."""
    if r["ppl_ratio"] < 1:
        return f"divided by {1 / r['ppl_ratio']:,.2f} [95% CI {1 / r['ppl_ratio_hi']:,.2f}, {1 / r['ppl_ratio_lo']:,.2f}]"
    return f"multiplied by {r['ppl_ratio']:,.2f} [95% CI {r['ppl_ratio_lo']:,.2f}, {r['ppl_ratio_hi']:,.2f}]"


def paper_claims() -> dict[str, str]:
    """``data/paper/claims.csv``: claim -> paper_value (as written)."""
    with open(REPO_ROOT / "data" / "paper" / "claims.csv") as f:
        return {r["claim"]: r["paper_value"] for r in csv.DictReader(f)}


def _claim_rows(results_dir: Path, name: str) -> dict[str, dict]:
    """:func:`report.claims` on this chapter's result file alone: claim -> row."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(Path(results_dir) / name, Path(tmp) / name)
        try:
            return {r["claim"]: r for r in report.claims(Path(tmp))}
        except (KeyError, TypeError) as e:
            raise _Missing(str(e).strip("'")) from None


def _t00(d, rdir):
    b, m = _at(d, "baseline"), _at(d, "model")
    tasks = _at(b, "tasks")
    _, t2 = report.paper_tables(REPO_ROOT)
    shared = [t for t in t2 if t in tasks]
    ours = ", ".join(f"{t} {100 * tasks[t]['value']:.1f} ± {100 * (tasks[t]['stderr'] or 0):.1f} (n={tasks[t]['n']})"
                     for t in shared)
    texts = b.get("perplexity_texts") or ({b["perplexity"]["text"]: b["perplexity"]} if b.get("perplexity") else {})
    ppl = ("held-out perplexity " + "; ".join(_ppl_text(x, p) for x, p in texts.items())) if texts else \
        f"no held-out perplexity in this run ({_absent(b, 'perplexity_texts')})"
    above = [t for t, x in tasks.items() if not C.at_chance(x)]
    paper = ", ".join(f"{t} {t2[t]['original']:.1f}" for t in shared)
    return (f"The dense model ({m.get('name', '?')}, {m['params']['total'] / 1e6:.1f} M parameters) is the reference "
            f"every later chapter is measured against: {ppl}. "
            f"On the paper's tasks it scores {ours or 'nothing (none of them was run)'} (accuracy %, ± stderr); "
            f"the paper's LLaMA-2 7B original scores {paper or '–'} "
            f"(Table II). It is above chance on {', '.join(above) or 'no task'} ({len(above)} of {len(tasks)} tasks): "
            "only those can show a drop later. Verdict: not testable here, by design: a baseline reproduces no claim, "
            "and a 135M model is not LLaMA-2 7B; it fixes the reference for chapters 03-06.")


def _t01(d, rdir):
    c70, at30 = _at(d, "real_matrix", "chi70"), _at(d, "block_at_30_percent", "relative_errors")
    name = d["real_matrix"]["name"]
    kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
    svd = at30[kind]["svd"] if kind in at30 else None
    svd_wins = sum(r["svd"] < min(r["mpo3"], r["mpo2"]) for r in at30.values())
    toy = [r for r in d.get("toy") or [] if r.get("paper_formula") is not None]
    same = bool(toy) and all(r["params"] == r["paper_formula"] for r in toy)
    formula = (f"Our parameter count matches the paper's closed form for its 216 × 216 example at all {len(toy)} bond "
               "dimensions" if same else "The paper's closed form for its 216 × 216 example "
               + ("does not match ours" if toy else "was not checked in this run"))
    keep = 1 - float(paper_claims()["parameters_removed"])
    return (f"{formula}. At {keep:.0%} of the parameters kept (the paper's \"{1 - keep:.0%} fewer\", claims.csv), the "
            f"3-core MPO of `{name}` has relative error {c70['rel_error']:.2f}"
            + (f" against {svd:.2f} for a truncated SVD of the same size" if svd is not None else "")
            + f"; over block {d['block_at_30_percent']['block']}'s {len(at30)} matrices the SVD is more accurate for "
            f"{svd_wins} of {len(at30)}. As a layer at one token the MPO needs {c70['flops_ratio_batch1']:.2f}x the dense "
            f"FLOPs while moving {c70['bytes_ratio_batch1']:.2f}x the bytes. Verdict: the paper's parameter formula is "
            f"{'reproduced' if same else 'not reproduced' if toy else 'not checked'}; MPO against SVD is not testable against "
            "the paper (it makes no such comparison), and on this model's weights the plain SVD "
            f"{'wins' if svd_wins > len(at30) / 2 else 'does not win'}.")


def _t02(d, rdir):
    cl = _at(d, "claims")
    key = next((k for k in cl if k.startswith("ratio_")), None)
    if key is None:
        raise _Missing("claims.ratio_*")
    c, level = cl[key], float(key.split("_", 1)[1])
    rows = _claim_rows(rdir, FILES["02"][0])
    rho = c["spearman_depth_all"]
    return (f"Compressing one matrix at a time to keep {level:.0%} of its parameters raises the calibration "
            f"{d.get('metric', 'ppl')} (dense {fmt_ppl(d['dense_ppl'])}, {d['tokens']:,} tokens) by "
            f"+{c['mean_increase_first_third_%']:,.0f}% on average in the first third of the blocks and "
            f"+{c['mean_increase_last_third_%']:,.0f}% in the last third; Spearman(depth, increase) = "
            f"{'n/a' if rho is None else f'{rho:.2f}'}, and the most sensitive type by mean is `{c['most_sensitive_type']}` "
            f"(ranking {', '.join(c['type_ranking'])}). The paper (Fig. 5 and text, LLaMA-2 7B, MMLU): deeper blocks "
            "tolerate more compression, and L7 (`down`) is the most sensitive. Verdict: deeper layers more compressible: "
            f"{rows['deeper layers more compressible']['verdict']}; L7 most sensitive: "
            f"{rows['last MLP matrix (L7) most sensitive']['verdict']}.")


def _t03(d, rdir):
    comp, main = _at(d, "comparison"), _at(d, "main")
    keep, tot = main["keep_ratio"], _at(main, "size_report", "totals")
    at = {r["plan"]: r for r in comp if math.isclose(r["keep_target"], keep)}
    s, u = at["sensitivity"], at.get("uniform")
    texts = (main.get("evaluation") or {}).get("perplexity_texts") or {}
    text = next(iter(texts), None)
    sens = _ppl_text(text, texts[text]) if text and math.isclose(texts[text]["ppl"], s["ppl"]) else fmt_ppl(s["ppl"])
    imp = d.get("improved")
    if imp and (imp.get("evaluation") or {}).get("perplexity_texts", {}).get(text):
        a = imp["evaluation"]["perplexity_texts"][text]["ppl"]
        improved = (f"The {label(imp['init'])} start of the same plan (the same parameter budget per matrix) starts at "
                    f"{fmt_ppl(a)}, {a / s['ppl']:,.2f}x the TT-SVD start's.")
    else:
        improved = f"No activation-aware start in this run ({_absent(d, 'improved')})."
    row = _claim_rows(rdir, FILES["03"][0])["70% fewer parameters"]
    removed = float(paper_claims()["parameters_removed"])
    return (f"At {keep:.0%} of the block parameters kept, before healing, the sensitivity plan's held-out perplexity is "
            f"{sens}" + (f" against {fmt_ppl(u['ppl'])} for the uniform plan ({u['ppl'] / s['ppl']:,.2f}x higher)"
                         if u else " (no uniform plan at this budget)")
            + f"; dense {fmt_ppl(d['dense_ppl'])}. {improved} The saved model keeps "
            f"{100 * tot['block_params_after'] / tot['block_params_before']:.1f}% of the block parameters and "
            f"{100 * tot['model_ratio']:.1f}% of the whole model's (tied embedding kept); the paper removes "
            f"{removed:.0%} (claims.csv). Verdict: 70% fewer parameters: {row['verdict']}; the plan comparison is not "
            "testable against the paper, which reports no perplexity before healing.")


def _t04(d, rdir):
    ms, sp = _at(d, "models"), _at(d, "speed_claims")
    t1, _ = report.paper_tables(REPO_ROOT)
    fp32 = float(t1["original"]["size_gb"])
    sized = [n for n in ("8-bit", "4-bit", "88%", "93%") if n in ms]
    mem = ", ".join(f"{n} {ms[n]['memory_ratio_vs_fp32']:.2f} (paper {float(t1[n]['size_gb']) / fp32:.2f})" for n in sized)
    agree = ", ".join(f"{n} {100 * ms[n]['top1_agreement']:.0f}% (KL {ms[n]['kl_to_original']:.2f} nats)" for n in sized)
    pc = paper_claims()
    speed = "; ".join(f"{n} decode takes {1 / sp[n]['decode_ratio']:.2f}x the original's time per token (paper "
                      f"{float(pc[k]):.2f}x{', an upper bound' if n == '88%' else ''})"
                      for n, k in (("4-bit", "inference_time_4bit"), ("88%", "inference_time_tensorized")) if n in sp)
    smaller = all(ms[n]["memory_ratio_vs_fp32"] <= float(t1[n]["size_gb"]) / fp32 + 0.02 for n in sized)
    why = "" if smaller else (" (the tied embedding is left unquantized, as bitsandbytes does)"
                              if not (d.get("settings") or {}).get("embeddings") else "")
    speeds = ", ".join(f"{n}: {'direction reproduced' if v['direction_holds']['decode'] else 'not reproduced on this CPU'}"
                       for n, v in sp.items())
    return (f"Bytes in memory relative to fp32: {mem} (Table I). Top-1 next-token agreement with the original: {agree}; "
            f"perplexity comes in chapter 06. Speed (claims.csv for the paper): {speed or 'not measured'}. Verdict: "
            f"memory ratios {'reproduced' if smaller else 'not reproduced'}{why}; speed {speeds or 'not measured'}.")


def _t05(d, rdir):
    b, a, pn = _at(d, "before", "perplexity_texts"), _at(d, "after", "perplexity_texts"), d.get("paired_nll") or {}
    h = _at(d, "heal")
    per = "; ".join(f"{x} {fmt_ppl(b[x]['ppl'])} → {fmt_ppl(a[x]['ppl'])}" + (f", {_ratio_text(pn[x])}" if x in pn else "")
                    + f" ({a[x]['tokens']:,} tokens, seq_len {a[x]['seq_len']})" for x in a if x in b)
    imp = d.get("improved")
    if imp and imp.get("after"):
        x = next(iter(imp["after"]["perplexity_texts"]))
        r = (imp.get("paired_nll_vs_tt_svd") or {}).get(x)
        own = imp.get("lr") and imp["lr"] != (d.get("settings") or {}).get("lr")
        lr = f" (at its own peak rate, {imp['lr']:.0e})" if own else ""
        alike = "Healed the same way but without the block-wise step" if d.get("blockwise") else "Healed alike"
        improved = (f"{alike}{lr}, the {label(imp['init'])} start reaches "
                    f"{fmt_ppl(imp['after']['perplexity_texts'][x]['ppl'])} on {x}"
                    + (f", its perplexity {_ratio_text(r)} relative to the healed TT-SVD start." if r else "."))
    else:
        improved = f"No activation-aware start healed in this run ({_absent(d, 'improved')})."
    ctl = d.get("dense_control") or {}
    if ctl.get("after") and ctl.get("paired_nll_vs_tt_svd"):
        x = next(iter(ctl["paired_nll_vs_tt_svd"]))
        r0, r1 = ctl["paired_nll"][x], ctl["paired_nll_vs_tt_svd"][x]
        control = (f" The original dense model healed the same way goes from {fmt_ppl(r0['ppl_a'])} to "
                   f"{fmt_ppl(r0['ppl_b'])} on {x}; against it, the healed TT-SVD start's perplexity is {_ratio_text(r1)}.")
    else:
        control = ""
    bw = d.get("blockwise")
    row = _claim_rows(rdir, FILES["05"][0])["healing ~2x faster"]
    lr = (d.get("settings") or {}).get("lr")
    heal = f"({h['tokens_this_run']:,} tokens, {h['loss']} loss{f', lr {lr:g}' if lr else ''})"
    if bw and bw.get("perplexity"):
        x = next(iter(bw["perplexity"]))
        steps = (f"Block-wise distillation ({bw['tokens']:,} healing tokens x {bw['settings']['epochs']} passes per block, "
                 f"{bw['seconds'] / 60:.1f} min) took the TT-SVD start to {fmt_ppl(bw['perplexity'][x]['ppl'])} on {x}, and "
                 f"healing {heal} went on from there; from the start to the healed model, the held-out perplexity went from ")
    else:
        steps = f"Healing {heal} took the held-out perplexity from "
    return (f"{steps}{per}.{control} {improved} The tensorized model healed at {d['speed_ratio_tensorized_vs_dense']:.2f}x the dense model's "
            f"tokens/s ({h['world_size']} {h['device'].split(':')[0].upper()} process(es)); the paper: about "
            f"{float(paper_claims()['healing_speedup_tensorized']):.1f}x (claims.csv, 8 A10G). Verdict: healing speed "
            f"{row['verdict']}; whether healing wins back the paper's 2-3 points is chapter 06's test.")


def _t06(d, rdir):
    ev, pn = _at(d, "evaluations"), (d.get("paired_nll") or {}).get("88%") or {}
    rows = {r["claim"]: r for r in report.accuracy_claims(d)}
    _, t2 = report.paper_tables(REPO_ROOT)
    parts, verdicts = [], []
    for m in ("88%", "93%"):
        pr, row = (d.get("paired") or {}).get(m), rows.get(f"2-3 point accuracy drop ({m})")
        if not pr or not row:
            continue
        paper = sum(t2[t]["original"] - t2[t][m] for t in t2) / len(t2)
        ok = [t for t in pr if not C.at_chance(ev["original"]["tasks"][t])]
        x = C.mean_drop(pr, ok) if ok else None
        parts.append(f"{m} {x['drop']:.1f} points [95% CI {x['lo']:.1f}, {x['hi']:.1f}] (paper {paper:.1f})" if x else
                     f"{m}: no task above chance (paper {paper:.1f})")
        verdicts.append(f"{row['verdict'].split(' (')[0]} ({m})")
    acc = (f"The healed model's mean accuracy drop against the original, paired document by document over the tasks "
           f"where the original is above chance ({', '.join(ok)}), is " + ", ".join(parts) +
           f"; the paper's numbers are LLaMA-2 7B's Table II mean over {len(t2)} tasks.") if parts else \
        "No paired per-document comparison in this run (`paired` is missing from the results): rerun notebook 06."
    ppl = (lambda x, r: f" The 88% model's held-out perplexity is {_ratio_text(r)} on {x} ({fmt_ppl(r['ppl_a'])} → "
           f"{fmt_ppl(r['ppl_b'])}, {r['tokens']:,} tokens).")(*next(iter(pn.items()))) if pn else \
        " No paired perplexity ratio in this run (`paired_nll` is missing from the results)."
    cl, pc = _claim_rows(rdir, FILES["06"][0]), paper_claims()
    fast, slow = cl["inference >25% faster (tensorized)"], cl["4-bit 13% slower"]
    return (f"{acc}{ppl} Speed: 88% {fast['ours']} (paper: at most {float(pc['inference_time_tensorized']):.2f}x the "
            f"time), 4-bit {slow['ours']} (paper: {float(pc['inference_time_4bit']):.2f}x the time). Verdict: 2-3 point "
            f"drop: {', '.join(verdicts) or 'not measured'}; inference >25% faster: {fast['verdict']}; 4-bit slower: "
            f"{slow['verdict']}.")


def _t07(d, rdir):
    w, dense = _at(d, "winners"), _at(d, "dense")
    if not w:
        raise _Missing("winners")
    keeps = sorted(w, key=float, reverse=True)
    win = "; ".join(f"{float(k):.0%} kept: {w[k]['winner']} ({fmt_ppl(dict(w[k]['ranking'])[w[k]['winner']])})"
                    for k in keeps)
    target = 1 - float(paper_claims()["parameters_removed"])
    keep = min(keeps, key=lambda k: abs(float(k) - target))
    rank = dict(w[keep]["ranking"])
    mpo = min((m for m in rank if m.startswith("mpo")), key=rank.get, default=None)
    mpo_wins = sum(w[k]["winner"].startswith("mpo") for k in keeps)
    where = "the paper's budget" if math.isclose(float(keep), target) else f"nearest to the paper's {target:.0%}"
    paper_mpo = (f" The paper's TT-SVD MPO does best as `{mpo}` at {float(keep):.0%} kept ({where}, claims.csv): "
                 f"{fmt_ppl(rank[mpo])}, {rank[mpo] / rank[w[keep]['winner']]:,.2f}x the winner's perplexity."
                 if mpo else " No plain MPO method was run at the paper's budget.")
    return (f"Each of {d.get('n_matrices', '?')} block matrices compressed to the same share of its parameters, before "
            f"healing, the lowest held-out perplexity (dense {fmt_ppl(dense['ppl'])}, {dense['tokens']:,} tokens) goes to "
            f"{win}.{paper_mpo} Verdict: not testable against the paper, which compares MPOs with no other format; here "
            f"the paper's TT-SVD MPO wins at {mpo_wins} of {len(keeps)} budgets.")


CHAPTERS: dict[str, Callable[[dict, Path], str]] = {"00": _t00, "01": _t01, "02": _t02, "03": _t03, "04": _t04,
                                                     "05": _t05, "06": _t06, "07": _t07}


def takeaway(chapter: str, results_dir) -> str:
    """The takeaway of notebook ``chapter`` ("00".."07") from the result JSON in ``results_dir``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}: the valid chapters are {', '.join(CHAPTERS)}")
    name, notebook = FILES[chapter]
    path = Path(results_dir) / name
    try:
        d = read_json(path)
    except FileNotFoundError:
        return f"**Takeaway unavailable:** {path} is missing: run notebook {notebook} first."
    except ResultFileError as e:
        return f"**Takeaway unavailable:** {e}"
    try:
        from .figures import model_name

        return "**Takeaway.** " + model_name(CHAPTERS[chapter](d, Path(results_dir)))
    except (_Missing, KeyError) as e:
        return (f"**Takeaway incomplete:** `{name}` is missing `{e.args[0]}` (an older or smaller run than this "
                f"notebook writes): rerun notebook {notebook}.")
