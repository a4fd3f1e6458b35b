#!/usr/bin/env python
"""Does the study reproduce on another machine? Two runs of ``make reproduce``, paired measurement by measurement.

Both runs use the same config and seed, so every held-out perplexity and benchmark score of one
pairs with the other's on the same windows and documents (``compactify.crossrun``). Writes the
paired ratios with their intervals, whether notebook 03's sensitivity plan came out the same, each
claim's verdict in both runs, and the other run's notebook timings, atomically, with provenance::

    .venv/bin/python scripts/compare_runs.py --other /tmp/clone/data/results \\
        --timings /tmp/clone/runs/default/timings.json --names "AVX512-BF16 (bf16)" "AVX2 (fp32)" \\
        --out data/results/crossrun/avx2_fp32.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=str(ROOT / "data" / "results"), help="the reference results folder")
    ap.add_argument("--other", required=True, help="the other run's results folder (its data/results or run_dir/results)")
    ap.add_argument("--names", nargs=2, default=["reference", "other"], metavar=("REF", "OTHER"))
    ap.add_argument("--timings", default=None, help="the other run's run_dir/timings.json (scripts/run_notebooks.py)")
    ap.add_argument("--note", default="", help="how the other run was made (clone, commit, machine, date)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from compactify.crossrun import compare_runs
    from compactify.results import read_json, save_results

    for p in (args.ref, args.other):
        if not Path(p).is_dir():
            ap.error(f"{p} is not a folder: give a run's results folder (data/results or runs/<name>/results)")
    out = compare_runs(Path(args.ref), Path(args.other), names=tuple(args.names))
    out["timings"] = read_json(args.timings) if args.timings else None
    out["note"] = args.note
    path = save_results(args.out, out)
    for label, texts in out["headline"].items():
        print(f"{label}: " + "; ".join(f"{x} {r['ppl_a']:,.1f} vs {r['ppl_b']:,.1f} (x{r['ppl_ratio']:.3f} "
                                       f"[{r['ppl_ratio_lo']:.3f}, {r['ppl_ratio_hi']:.3f}])" for x, r in texts.items()))
    print(f"plan the same: {out['plan_same']}; verdicts differing: "
          f"{[c for c, v in out['verdicts'].items() if len(set(v.values())) > 1] or 'none'}; unpaired: {len(out['unpaired'])}")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
