#!/usr/bin/env python
"""Does a better start heal better? The sequential activation-aware SVD against notebook 05's.

Notebook 03's improved start (``tensorize.compare_init: asvd``) fits every matrix on the dense
model's inputs. :mod:`compactify.aa_seq` fits them block by block on the compressed model's own
inputs towards the dense outputs (``tensorize.init: asvd_seq``), which gives a much lower
perplexity before healing. This script

1. builds that start for the reference run's plan (``results/03_tensorize.json`` of ``run_dir``)
   at each ``--grid`` point (calibration tokens : ridge), scoring each on the held-out texts
   paired with notebook 03's activation-aware SVD start (same windows);
2. heals the one of ``tensorize.seq_calib_tokens`` / ``seq_ridge`` with notebook 05's recipe and
   tokens at each ``--lrs`` (``heal_study.lr_sweep``: same data, order and seed), and pairs each
   with notebook 05's two healed models (TT-SVD at ``heal.lr``, the activation-aware SVD at its rate).

Writes ``data/results/heal/seq_start.json`` (atomic, with the usual meta block).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _grid(text: str) -> tuple[int, float]:
    tokens, _, ridge = text.partition(":")
    try:
        return int(tokens), float(ridge)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give TOKENS:RIDGE, e.g. 2048:1e-2") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--grid", type=_grid, nargs="*", default=[(2048, 1e-6), (2048, 1e-2), (8192, 1e-2)],
                    help="extra starts scored before healing only, TOKENS:RIDGE")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-4, 3e-4])
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "seq_start.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    from compactify import aa_init
    from compactify import compare as C
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import lr_sweep, notebook_03_05, paired_with_refs, print_paired
    from compactify.models import load_model, save_model_dir
    from compactify.perplexity import heldout_ids_for, heldout_perplexities
    from compactify.results import save_results
    from compactify.tensorize import Plan

    cfg = load_config(args.config, parse_overrides(args.set))
    t03, t05 = notebook_03_05(cfg)
    if (t03.get("improved") or {}).get("init") != "asvd" or (t05.get("improved") or {}).get("init") != "asvd":
        sys.exit("This compares with notebook 03/05's activation-aware SVD start (tensorize.compare_init: asvd); "
                 f"the run in {run_dir(cfg)} has another. Rerun notebooks 03 and 05 with compare_init: asvd.")
    plan = Plan.from_dict(t03["main"]["plan"])
    dense, tok = load_model(cfg["model"], dtype=cfg["dtype"])
    heldout = heldout_ids_for(tok, cfg)
    asvd_before = t03["improved"]["evaluation"]["perplexity_texts"]
    tc = cfg["tensorize"]
    main_point = (int(tc["seq_calib_tokens"]), float(tc["seq_ridge"]))
    starts, model_dir = {}, run_dir(cfg) / "models" / "tensorized_seq"
    for tokens, ridge in [*[g for g in args.grid if g != main_point], main_point]:
        c = copy.deepcopy(cfg)
        c["tensorize"].update(seq_calib_tokens=tokens, seq_ridge=ridge)
        t0 = time.perf_counter()
        model = aa_init.sequential_from_config(dense, tok, plan, c)
        seconds = time.perf_counter() - t0
        ppl = heldout_perplexities(model, tok, heldout, cfg)
        starts[f"{tokens}:{ridge:g}"] = {"tokens": tokens, "ridge": ridge, "seconds": seconds, "perplexity": ppl,
                                         "vs_asvd": {t: C.compare_nll(asvd_before[t], ppl[t], "asvd", "asvd_seq")
                                                     for t in ppl}}
        print(f"{tokens:>6} tokens, ridge {ridge:g} ({seconds:.0f} s): "
              + ", ".join(f"{t} {p['ppl']:,.1f}" for t, p in ppl.items()), flush=True)
        if (tokens, ridge) == main_point:
            save_model_dir(model, tok, model_dir)
        del model
    del dense
    sweep = lr_sweep(model_dir, run_dir(cfg) / "seq_start", cfg, args.lrs, int(cfg["heal"]["tokens"]), heldout)
    refs = {f"tt_svd at lr {cfg['heal']['lr']:g}": t05["after"]["perplexity_texts"],
            f"asvd at lr {t05['improved']['lr']:g}": t05["improved"]["after"]["perplexity_texts"]}
    sweep["vs_notebook_05"] = paired_with_refs(sweep["lrs"], refs, "asvd_seq at lr")
    out = {"plan_from": "results/03_tensorize.json of run_dir", "main_start": f"{main_point[0]}:{main_point[1]:g}",
           "starts": starts, "healing": sweep, "notebook_05_tokens": t05["heal"]["plan"]["tokens"]}
    save_results(args.out, out, cfg, device=cfg["device"], start=str(model_dir))
    print_paired(sweep["vs_notebook_05"], digits=3)
    print(f"sequential start: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
