#!/usr/bin/env python
"""Block-wise distillation before healing (:mod:`compactify.blockwise`): does it heal better, per
token and per second?

For each of notebook 03's two starts (the paper's TT-SVD MPO, ``models/tensorized``, and the
activation-aware SVD, ``models/tensorized_aa``) of the run in ``run_dir``, this script

1. trains every compressed block alone towards the dense block's outputs on the first
   ``--tokens`` of the healing data (``--epochs`` passes, peak ``--lr``), and scores the result on
   the held-out texts, paired with the untrained start (notebook 03's scores, same windows);
2. heals it with notebook 05's recipe and tokens at each of ``--lrs`` (default: that start's
   notebook 05 rate), each paired with notebook 05's healed model (equal healing tokens);
3. unless ``--no-control``: heals the *untrained* start at its notebook 05 rate for the same
   tokens plus what the block-wise step's seconds would have bought at the best rate's measured
   speed (equal time), and pairs each healing of the block-wise start with it.

The block-wise start is made by notebook 05's step (``blockwise.start_from_config``), saved as
``models/<start>_bw`` and reused by a later run with the same start and settings.

Writes ``data/results/heal/blockwise_start.json`` (atomic, with the usual meta block).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTS = {"tt_svd": "tensorized", "asvd": "tensorized_aa"}


def main(argv=None) -> int:
    from compactify.blockwise import BlockwiseConfig

    d = BlockwiseConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--starts", nargs="+", choices=list(STARTS), default=["asvd", "tt_svd"])
    ap.add_argument("--tokens", type=int, default=d.tokens, help="block-wise calibration tokens (healing data)")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--rows", choices=("first", "last"), default=d.rows,
                    help="rows of the healing data the step trains on (first: the ones healing starts on)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="peak rates the block-wise start is healed at (default: notebook 05's rate for that start)")
    ap.add_argument("--no-control", action="store_true", help="skip the equal-time healing of the untrained start")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "blockwise_start.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    from compactify import compare as C
    from dataclasses import replace

    from compactify.blockwise import equal_time_tokens, settings_from, start_from_config
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import lr_sweep, notebook_03_05
    from compactify.models import load_model
    from compactify.perplexity import autocast_dtype, heldout_ids_for, heldout_perplexities
    from compactify.results import save_results
    from compactify.tensorize import load_compressed

    cfg = load_config(args.config, parse_overrides(args.set))
    t03, t05 = notebook_03_05(cfg)
    if "asvd" in args.starts and (t05.get("improved") or {}).get("init") != "asvd":
        sys.exit(f"The run in {run_dir(cfg)} has no activation-aware SVD start (tensorize.compare_init: asvd): "
                 "rerun notebooks 03 and 05 with it, or pass --starts tt_svd.")
    if "tt_svd" in args.starts and t05.get("blockwise"):
        sys.exit(f"Notebook 05 of the run in {run_dir(cfg)} already healed a block-wise start (heal.blockwise was on): "
                 "this script pairs the block-wise start with notebook 05's *plain* healing. Use a run made with "
                 "--set heal.blockwise=null, or pass --starts asvd.")
    hc, root = cfg["heal"], run_dir(cfg)
    hc["blockwise"] = {"tokens": args.tokens, "epochs": args.epochs, "lr": args.lr}   # notebook 05's step, these settings
    bw = replace(settings_from(cfg), rows=args.rows)
    rows = "" if args.rows == "first" else f"_{args.rows}"   # (another start: its own folders)
    tok = load_model(cfg["model"], dtype=cfg["dtype"])[1]
    heldout = heldout_ids_for(tok, cfg)
    amp = autocast_dtype("auto" if hc["mixed_precision"] == "bf16" else None)
    tokens = int(hc["tokens"])
    first = next(iter(heldout))   # the primary held-out text: the best rate is judged on it
    per_step = int(hc["batch_per_rank"]) * bw.seq_len * int(hc["nproc"])
    out = {"notebook_05_tokens": tokens, "blockwise": vars(bw) | {"autocast": str(amp)}, "starts": {}}
    for name in args.starts:
        sect = "main" if name == "tt_svd" else "improved"
        before = t03[sect]["evaluation"]["perplexity_texts"]
        healed_05 = (t05["after"] if name == "tt_svd" else t05["improved"]["after"])["perplexity_texts"]
        lr = float(hc["lr"]) if name == "tt_svd" else float(t05["improved"]["lr"])
        start_dir, bw_dir = root / "models" / STARTS[name], root / "models" / f"{STARTS[name]}_bw{rows}"
        print(f"{name}: block-wise distillation on {bw.tokens:,} tokens x {bw.epochs} epochs, lr {bw.lr:g}", flush=True)
        rec = start_from_config(start_dir, bw_dir, cfg, rows=args.rows)   # reused when made before: same start, settings
        if rec["reused"]:
            print(f"  reusing the block-wise start in {bw_dir} ({rec['seconds']:.0f} s when made)", flush=True)
        ppl = heldout_perplexities(load_compressed(bw_dir), tok, heldout, cfg)
        r = {"start": str(start_dir), "notebook_05_lr": lr, "distill": rec, "perplexity": ppl,
             "vs_start": {t: C.compare_nll(before[t], ppl[t], name, f"{name}+blockwise") for t in ppl}}
        print(f"  {rec['seconds']:.0f} s: " + ", ".join(f"{t} {before[t]['ppl']:,.1f} -> {p['ppl']:,.1f}"
                                                      for t, p in ppl.items()), flush=True)
        work = root / "blockwise" / f"{name}{rows}"
        runs = lr_sweep(bw_dir, work, cfg, args.lrs or [lr], tokens, heldout)["lrs"]
        best = min(runs, key=lambda k: runs[k]["perplexity"][first]["ppl"])
        r.update(healed=runs, best_lr=float(best))
        r["vs_notebook_05"] = {k: {t: C.compare_nll(healed_05[t], v["perplexity"][t], f"{name} healed (notebook 05)",
                                                    f"{name}+blockwise healed at lr {k}") for t in v["perplexity"]}
                               for k, v in runs.items()}
        if not args.no_control:  # the plain start at notebook 05's (measured) rate for the same seconds
            extra = equal_time_tokens(rec["seconds"], runs[best]["tokens_per_s"], tokens, per_step) - tokens
            ctrl = lr_sweep(start_dir, work / "control", cfg, [lr], tokens + extra, heldout)["lrs"][f"{lr:g}"]
            r["equal_time_control"] = {"tokens": tokens + extra, "extra_tokens": extra, "lr": lr, **ctrl}
            r["vs_equal_time"] = {k: {t: C.compare_nll(ctrl["perplexity"][t], v["perplexity"][t],
                                                       f"{name} healed {tokens + extra:,} tokens",
                                                       f"{name}+blockwise healed at lr {k}") for t in v["perplexity"]}
                                  for k, v in runs.items()}
        out["starts"][name] = r
        save_results(args.out, out, cfg, device=cfg["device"])  # after each start: a later failure keeps it
        for label, key in (("notebook 05's healed", "vs_notebook_05"), ("equal time", "vs_equal_time")):
            for k, by_text in (r.get(key) or {}).items():
                for t, p in by_text.items():
                    print(f"  lr {k}, healed vs {label}: {t} {p['ppl_b']:.1f} = x{p['ppl_ratio']:.3f} "
                          f"[{p['ppl_ratio_lo']:.3f}, {p['ppl_ratio_hi']:.3f}]", flush=True)
    print(f"block-wise start: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
