"""The README's blocks of the recovery curve (``scripts/recovery_curve.py``): the plain healings of
each start and budget, the same starts distilled block by block first, and the checks of the
block-wise points (the plain start healed for the same seconds; the curve measured at another seed)."""
from __future__ import annotations

from pathlib import Path

from . import compare as C
from .figures import footer
from .readme_heal import _j, _ppl, _ratio


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
    made = sorted({(f"the reference run of {p['run_commit']} (its 05_heal.json)" if p.get("run_commit")
                    else "the reference run (05_heal.json)") if p["source"] == "05_heal.json"
                   else f"commit {p.get('commit', h['meta']['git_commit'])}" for p in pts})
    tokens = sorted({p["tokens"] for p in pts})
    return ("\n".join(rows) + f"\n\nPerplexities on `{texts[0]}` ({h['dense'][texts[0]]['tokens']:,} tokens, windows of "
            f"{h['dense'][texts[0]]['seq_len']}; dense {h['dense'][texts[0]]['ppl']:.1f}); every model healed for "
            f"{' / '.join(f'{t:,}' for t in tokens)} tokens of Brown; measured by: {', '.join(made)}; {footer(h['meta'])}.")


def recovery_blockwise(r: Path) -> str:
    """``scripts/recovery_curve.py --blockwise``: each start distilled block by block before the same
    healing, its perplexity after the step and after healing, paired with dense and with the same
    start's plain healing (``recovery_curve.json``)."""
    from .figures_heal import STARTS
    from .recovery import SUFFIX

    h = _j(Path(r) / "heal", "recovery_curve_bw.json")
    if h is None:
        return "(the block-wise recovery curve has not been published: scripts/recovery_curve.py --blockwise)"
    texts = list(h["dense"])
    vs = {(v["keep"], v["start"] + SUFFIX): v["after"] for v in h.get("vs_plain", [])}
    plain = _j(Path(r) / "heal", "recovery_curve.json")  # the low-rank peer healed plainly at the same budget
    peer = {p["keep"]: p["after"][texts[0]] for p in (plain or {}).get("points", []) if p["start"] == "asvd"}
    rows = ["| block params kept | start (peak lr) | before | after the block-wise step (s) | healed | "
            f"healed / dense, {texts[0]} | " + " | ".join(f"healed / plain healing's, {t}" for t in texts)
            + f" | healed / activation-aware SVD's (plain), {texts[0]} |", "|---" * (7 + len(texts)) + "|"]
    for p in sorted(h["points"], key=lambda p: (-p["keep"], list(STARTS).index(p["start"]))):
        bw, twin = p["blockwise"], vs.get((p["keep"], p["start"]), {})
        low = _ratio(C.compare_nll(peer[p["keep"]], p["after"][texts[0]])) if p["keep"] in peer else "–"
        rows.append(f"| {100 * p['keep']:.0f}% | {STARTS[p['start']][0]} ({p['lr']:.0e}) | "
                    f"{_ppl(p['before'][texts[0]]) if 'before' in p else '–'} | "
                    f"{_ppl(bw['perplexity'][texts[0]])} ({bw['seconds']:.0f}) | {_ppl(p['after'][texts[0]])} | "
                    f"{_ratio(p['after_vs_dense'][texts[0]])} | "
                    + " | ".join(_ratio(twin[t]) if t in twin else "–" for t in texts) + f" | {low} |")
    made = sorted({f"the reference run of {p['run_commit']} (its 05_heal.json)" if p["source"] == "05_heal.json"
                   else f"commit {p.get('commit', h['meta']['git_commit'])}" for p in h["points"]})
    st = h["points"][0]["blockwise"]["settings"]
    return ("\n".join(rows) + f"\n\nThe block-wise step: {st['tokens']:,} tokens of the healing text, {st['epochs']} "
            f"passes, peak lr {st['lr']:g} per block; then {' / '.join(f'{t:,}' for t in sorted({p['tokens'] for p in h['points']}))} "
            f"tokens of healing, as the plain points of the table above. Perplexities on `{texts[0]}` "
            f"({h['dense'][texts[0]]['tokens']:,} tokens, windows of {h['dense'][texts[0]]['seq_len']}); paired over the "
            f"same windows; measured by: {', '.join(made)}; {footer(h['meta'])}.")


def recovery_checks(r: Path) -> str:
    """Two checks of the block-wise points: each against its plain start healed for the same seconds
    (``--equal-time``: ``vs_equal_time``), and the points measured again at another seed
    (``recovery_curve_bw_seed<N>.json``), with the low-rank start's lead over the MPO at each seed."""
    from .figures_heal import STARTS
    from .recovery import seed_pairs, seed_repeats

    h = _j(Path(r) / "heal", "recovery_curve_bw.json")
    if h is None:
        return "(the block-wise recovery curve has not been published: scripts/recovery_curve.py --blockwise)"
    texts = list(h["dense"])
    out = []
    timed = sorted((p for p in h["points"] if "vs_equal_time" in p), key=lambda p: (-p["keep"], p["start"]))
    if timed:
        rows = ["| block params kept | start | block-wise step + healing: s, perplexity | plain start healed for "
                "the same seconds: tokens, perplexity | block-wise / plain, " + " | block-wise / plain, ".join(texts)
                + " |", "|---" * (4 + len(texts)) + "|"]
        for p in timed:
            c, v = p["equal_time_control"], p["vs_equal_time"]
            secs = p["blockwise"]["seconds"] + p["tokens"] / p["heal"]["tokens_per_s"]
            rows.append(f"| {100 * p['keep']:.0f}% | {STARTS[p['start']][0]} | {secs:,.0f}, "
                        f"{_ppl(p['after'][texts[0]])} | {c['tokens']:,}, {_ppl(c['after'][texts[0]])} | "
                        + " | ".join(_ratio(v[t]) for t in texts) + " |")
        made = sorted({c["equal_time_control"]["commit"] for c in timed})
        out.append("\n".join(rows) + f"\n\nEqual time: the plain start (same plan, same rate) healed for its "
                   "block-wise twin's healing tokens plus the step's seconds converted to tokens at that healing's "
                   f"measured speed; perplexities on `{texts[0]}`, paired over the same windows; controls measured "
                   f"by commit {', '.join(made)}.")
    reps = seed_repeats(Path(r) / "heal")
    if reps:
        rows = ["| block params kept | start | seed 0 | seed " + "/".join(sorted({str(p["seed"]) for p in reps}))
                + " | other seed / seed 0 (paired) | low rank / MPO at seed 0 | low rank / MPO at the other seed |",
                "|---|---|---|---|---|---|---|"]
        for q in seed_pairs(h["points"], reps, texts[0]):
            rows.append(f"| {100 * q['keep']:.0f}% | {STARTS[q['start']][0]} | "
                        f"{_ppl(q['first']) if q['first'] else '–'} | {_ppl(q['after'])} | "
                        f"{_ratio(q['vs_first']) if q['vs_first'] else '–'} | "
                        f"{_ratio(q['low_rank_vs_mpo_first']) if 'low_rank_vs_mpo_first' in q else ''} | "
                        f"{_ratio(q['low_rank_vs_mpo']) if 'low_rank_vs_mpo' in q else ''} |")
        files = sorted({p["file"] for p in reps})
        meta = _j(Path(r) / "heal", files[-1])["meta"]
        out.append("\n".join(rows) + f"\n\nThe same plans, step and healing at another seed (its calibration draw, "
                   "the step's rows, the healing's order); perplexities on "
                   f"`{texts[0]}`, paired over the same windows (`{'`, `'.join(files)}`; {footer(meta)}). Low rank / MPO: "
                   "the activation-aware SVD's perplexity over the paper's MPO's, both with the block-wise step, at the "
                   "same seed and budget.")
    if not out:
        return ("(no check of the block-wise points has been published: scripts/recovery_curve.py --blockwise "
                "--equal-time, or --seed 1)")
    return "\n\n".join(out)
