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
from typing import Callable

from . import compare as C
from . import report
from .aa_init import label
from .figures import footer
from .readme_heal import (LONG_RUNS, _j, _ppl, _ratio, healed_frontier, long_run_block, loss_study,  # noqa: F401
                          slower_than_dense_below, tasks_block)
from .readme_recovery import recovery, recovery_blockwise, recovery_checks  # noqa: F401
from .crossrun import readme_block as crossrun_block
from .results import atomic_write_bytes


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
           + (f"; the same plan's {label(t['improved']['init'])} start is at {_ppl(aa)}"
              if aa else "") + "."]
    bw = h.get("blockwise")
    bw = bw if bw and text in (bw.get("perplexity") or {}) else None
    if bw:
        out.append(f"Block-wise distillation (each compressed block trained towards the dense block's outputs, "
                   f"{bw['tokens']:,} tokens of Brown x {bw['settings']['epochs']} passes, {bw['seconds'] / 60:.1f} min) takes "
                   f"the TT-SVD start to {_ppl(bw['perplexity'][text])} on `{text}`.")
    out.append(f"{'Then h' if bw else 'H'}ealing ({hh['plan']['tokens']:,} tokens of Brown, {hh['loss']} loss, lr {hs['lr']:.0e}, {hh['compute']}, "
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
        same = "the same healing without the block-wise step" if bw else "the same recipe"
        out.append(f"The {label(imp['init'])} start heals to {_ppl(imp['after']['perplexity'])} with {same}{own}: "
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


def _iqr(q) -> str:
    """" (q1-q3)" of a per-round ratio's stats, or nothing for a run that did not keep them."""
    return f" ({q['q1']:.2f}-{q['q3']:.2f})" if q else ""


def speed(r: Path) -> str:
    """benchmarks/roofline.py and mpo_modes.py: each format's decode rate, its bound, and the MPO modes."""
    rf, mm = _j(Path(r) / "benchmarks", "roofline.json"), _j(Path(r) / "benchmarks", "mpo_modes.json")
    if rf is None:
        return "(benchmarks/roofline.py has not been published: make benchmarks)"
    key = "2" if "2" in rf["settings"]["passes"] else rf["settings"]["passes"][-1]
    c = rf["ceilings"][key]
    fp32_bytes = rf["formats"]["fp32"]["stored_bytes"]
    rows = [f"Measured on {footer(rf['meta'])}; {key} thread(s): memory bandwidth "
            f"{c['bandwidth_roof']['bytes_per_s'] / 1e9:.1f} GB/s, fp32 GEMM {c['gemm']['float32']['flops_per_s'] / 1e9:.0f} GFLOP/s; "
            f"{rf['settings']['repeats']} round-robin rounds, {rf['settings'].get('order', 'fixed')} order.",
            "", "| format | bytes / fp32 | FLOPs / fp32 (decode) | decode tok/s (IQR) | x dense fp32 (median, IQR of rounds) | "
            "% of its bound | "
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
                    f"{(t.get('decode_ratio_rounds') or {}).get('median', t['decode_ratio_to_fp32']):.2f}"
                    f"{_iqr(t.get('decode_ratio_rounds'))} | "
                    f"{100 * t['decode_fraction_of_bound']:.0f}% | {t['prefill']['median']:.0f} |")
    text = "\n".join(rows)
    if mm:
        runs = mm["runs"]
        def ratio(v):  # with the IQR of the per-round ratios where the run kept them
            return f"{v['decode_ratio_to_dense']:.2f}x" + _iqr(v.get("decode_ratio_rounds"))
        ms = mm["settings"]
        text += ("\n\nMPO layers by inference mode (SmolLM2 at 30% kept, batch-1 decode vs dense, `mpo_modes.json`, "
                 f"{ms.get('order', 'fixed')} order, {ms['repeats']} rounds): "
                 + "; ".join(f"{t} thread(s): " + ", ".join(f"{m} {ratio(v)}" for m, v in run["models"].items() if m != "dense")
                             for t, run in runs.items()) + ".")
    return text


def decode_compiled(r: Path) -> str:
    """benchmarks/decode_compiled.py: the GEMV probe, eager vs compiled decode per format, the bytes fit."""
    d = _j(Path(r) / "benchmarks", "decode_compiled.json")
    if d is None:
        return "(benchmarks/decode_compiled.py has not been published: make benchmarks)"
    st, f = d["settings"], d["formats"]
    rows = [f"Measured on {footer(d['meta'])}; {st['repeats']} round-robin rounds (rotated), {st['new_tokens']} new "
            f"tokens after a {st['decode_prompt_tokens']}-token prompt, MPO layers in {st['mpo_mode']} mode, "
            f"OMP_WAIT_POLICY={st.get('omp_wait_policy')}.", ""]
    for t in (str(x) for x in st["threads"]):
        p, c = d["gemv_probe"][t], d["ceilings"][t]["bandwidth_roof"]["bytes_per_s"]
        rows.append(f"**{t} thread{'s' * (t != '1')}.** Streaming the dense model's {p['matrices']} matrices once "
                    f"({p['bytes'] / 1e6:.0f} MB), one token each: plain read {p['read']['bytes_per_s'] / 1e9:.1f} GB/s, "
                    f"torch linear (MKL GEMV) {p['linear']['bytes_per_s'] / 1e9:.1f}, compiled multiply-sum "
                    f"{p['compiled']['bytes_per_s'] / 1e9:.1f} (triad {c / 1e9:.1f}).")
        fits = [f"{rt}: {v['fixed_ms_per_token']:.1f} ms per token + bytes at {v['bytes_per_s'] / 1e9:.1f} GB/s"
                for rt, v in d.get("bytes_fit", {}).get(t, {}).items() if v]
        if fits:
            rows.append(f"Time per token against bytes per token (dense and SVD): {'; '.join(fits)}.")
        rows += ["", "| format | bound tok/s | eager tok/s (% of bound) | compiled tok/s (% of bound) | eager x dense eager "
                 "(IQR of rounds) | compiled x dense compiled (IQR) | compiled x dense eager |", "|---|---|---|---|---|---|---|"]
        for rec in f.values():
            b = rec["by_threads"][t]
            e, k = b["eager"], b["compiled"]
            rows.append(f"| {rec['label']} | {b['bound']['tokens_per_s']:.1f} | {e['decode']['median']:.1f} "
                        f"({100 * e['fraction_of_bound']:.0f}%) | {k['decode']['median']:.1f} ({100 * k['fraction_of_bound']:.0f}%) | "
                        f"{e['ratio_to_fp32_same_runtime']['median']:.2f}{_iqr(e['ratio_to_fp32_same_runtime'])} | "
                        f"{k['ratio_to_fp32_same_runtime']['median']:.2f}{_iqr(k['ratio_to_fp32_same_runtime'])} | "
                        f"{k['ratio_to_fp32_eager']['median']:.2f} |")
        rows.append("")
    return "\n".join(rows).rstrip()


BLOCKS: dict[str, Callable[[Path], str]] = {"headline": headline, "baseline": baseline, "claims": claims,
                                            "frontier": frontier, "speed": speed, "decode_compiled": decode_compiled,
                                            "recovery": recovery, "recovery_bw": recovery_blockwise,
                                            "recovery_checks": recovery_checks, "crossrun": crossrun_block,
                                            "healed_frontier": healed_frontier, "loss_study": loss_study,
                                            **{n: partial(long_run_block, n) for n in LONG_RUNS},
                                            "long_run_tasks": partial(tasks_block, "long_run_tasks.json"),
                                            "heal_long_tasks": partial(tasks_block, "heal_long_tasks.json"),
                                            "heal_long_lr5e4_tasks": partial(tasks_block, "heal_long_lr5e-4_tasks.json",
                                                                             against=("heal_long_tasks.json", "asvd+wiki@1M")),
                                            "recovery_tasks": partial(tasks_block, "recovery_tasks.json"),
                                            "heal_long_keep07_tasks": partial(tasks_block, "heal_long_keep0.7_tasks.json",
                                                                              against=("heal_long_keep0.7_tasks.json",
                                                                                       "asvd+bw 70% @115k"))}
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
