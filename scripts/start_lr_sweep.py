#!/usr/bin/env python
"""Does the activation-aware start heal better at its own learning rate?

In the reference run (notebook 05) both starts heal with ``heal.lr`` (1e-3), a rate measured on
the paper's TT-SVD start; the activation-aware start's loss *rose* over its first ~5k tokens
there and it ended x1.24 worse than the TT-SVD start. This heals notebook 03's activation-aware
start (``runs/<config>/models/tensorized_aa``) for the same tokens at each ``--lrs``
(``heal_study.lr_sweep``: same recipe, data and seed) and compares each, paired on the same
held-out windows, with the two healings of notebook 05 (TT-SVD and activation-aware at
``heal.lr``). Writes ``data/results/heal/start_lr_sweep.json`` (atomic, with provenance).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    ap.add_argument("--tokens", type=int, default=None, help="healing tokens per rate (default: heal.tokens)")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "start_lr_sweep.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    from compactify import run
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import lr_sweep, paired_with_refs, print_paired
    from compactify.results import read_json, save_results

    cfg = load_config(args.config, parse_overrides(args.set))
    start = run.require(cfg, "tensorized_aa")
    heal = read_json(run.require(cfg, "heal"))
    tokens = args.tokens or int(cfg["heal"]["tokens"])
    sweep = lr_sweep(start, run_dir(cfg) / "start_lr_sweep", cfg, args.lrs, tokens)
    refs = {f"tt_svd at heal.lr={cfg['heal']['lr']:g}": heal["after"]["perplexity_texts"],
            f"activation_aware at heal.lr={cfg['heal']['lr']:g}": heal["improved"]["after"]["perplexity_texts"]}
    sweep["vs_notebook_05"] = paired_with_refs(sweep["lrs"], refs, "activation_aware at lr")
    sweep["notebook_05_tokens"] = heal["heal"]["plan"]["tokens"]
    save_results(args.out, sweep, cfg, device=cfg["device"], start=str(start))
    print_paired(sweep["vs_notebook_05"])
    print(f"start-lr sweep: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
