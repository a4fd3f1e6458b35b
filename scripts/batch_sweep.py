#!/usr/bin/env python
"""Fewer tokens per step, more steps: does the main start heal further for the same tokens?

The default healing (notebook 05) spends ``heal.tokens`` = 114,688 tokens in batches of 4 x 256,
i.e. only 112 optimizer steps. Below a model's critical batch size a smaller batch reaches a lower
loss for the same tokens, at some cost in tokens/s. This heals notebook 03's main start
(``runs/<config>/models/tensorized``, the paper's TT-SVD MPO) once per (``--batches`` x ``--lrs``)
for ``--tokens`` (``heal_study.variant_comparison``: same data, schedule shape, loss and seed) and
compares each, paired on the same held-out windows, with the first variant. Writes
``data/results/heal/batch_sweep.json`` (atomic, with provenance).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--start", default="tensorized", help="which run artefact to heal (run.require name), "
                    "or a model directory")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 2, 1], help="heal.batch_per_rank values; the "
                    "first with the first lr is the reference")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4])
    ap.add_argument("--tokens", type=int, default=32768, help="healing tokens per variant")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "batch_sweep.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    from compactify import run
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import paired_with_run, variant_comparison
    from compactify.results import save_results

    cfg = load_config(args.config, parse_overrides(args.set))
    start = Path(args.start) if Path(args.start).is_dir() else run.require(cfg, args.start)
    seq = int(cfg["heal"]["seq_len"])
    variants = {f"batch {b} x {seq}, lr {lr:g}": {"heal.batch_per_rank": b, "heal.lr": lr}
                for b in args.batches for lr in args.lrs}
    r = variant_comparison(start, run_dir(cfg) / "batch_sweep", cfg, variants, args.tokens)
    for name, v in r["variants"].items():
        v["optimizer_steps"] = args.tokens // (v["settings"]["heal.batch_per_rank"] * seq)
    first_text = next(iter(next(iter(r["variants"].values()))["perplexity"]))
    r["best"] = min(r["variants"], key=lambda k: r["variants"][k]["perplexity"][first_text]["ppl"])
    r["judged_on"] = first_text
    heal_json = run.path(cfg, "heal")
    if args.start == "tensorized" and heal_json.exists():  # notebook 05's healing of the same start, paired
        r["vs_notebook_05"] = paired_with_run(heal_json, r["variants"])
    save_results(args.out, r, cfg, device=cfg["device"], start=str(start))
    ref = next(iter(variants))
    for name, v in r["variants"].items():
        line = (f"{name}: {v['optimizer_steps']} steps, {v['tokens_per_s']:.0f} tok/s, "
                f"{first_text} {v['perplexity'][first_text]['ppl']:.1f}")
        if name != ref:
            p = r["paired_vs_first"][name][first_text]
            line += f" = x{p['ppl_ratio']:.3f} [{p['ppl_ratio_lo']:.3f}, {p['ppl_ratio_hi']:.3f}] the reference's"
        if "vs_notebook_05" in r:
            p = r["vs_notebook_05"]["by_variant"][name][first_text]
            line += f"; x{p['ppl_ratio']:.3f} [{p['ppl_ratio_lo']:.3f}, {p['ppl_ratio_hi']:.3f}] notebook 05's"
        print(line)
    print(f"best on {first_text}: {r['best']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
