#!/usr/bin/env python
"""Does a learning-rate warm-up help the block-wise step (:mod:`compactify.blockwise`)?

The step trains each compressed block with AdamW at a peak rate of 5e-3 from its first step
(cosine to zero, no warm-up). Adam's first updates are full-size steps in the direction of
the first gradients' signs, which can throw an MPO core far from its TT-SVD start. This script
makes the block-wise start of notebook 05's main model (``models/tensorized`` of the run in
``run_dir``) with each warm-up fraction of ``--warmups`` (0 = the reference setting, reused
from notebook 05 where it made it), scores each on the held-out texts, and, unless
``--no-heal``, heals each with notebook 05's recipe and tokens (warm-up 0 where notebook 05
made that start: its own healed model). Every perplexity is paired window by window with the
first warm-up's.

Writes ``data/results/heal/blockwise_warmup.json`` (atomic, after each warm-up, with the usual
meta block).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--warmups", type=float, nargs="+", default=[0.0, 0.05],
                    help="fractions of each block's steps with a linear warm-up (the first is the reference)")
    ap.add_argument("--no-heal", action="store_true", help="only make and score the block-wise starts")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "blockwise_warmup.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    import copy

    from compactify import compare as C
    from compactify.blockwise import start_from_config
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import lr_sweep, notebook_03_05
    from compactify.models import load_model
    from compactify.perplexity import heldout_ids_for, heldout_perplexities
    from compactify.results import save_results
    from compactify.tensorize import load_compressed

    cfg = load_config(args.config, parse_overrides(args.set))
    hc, root = cfg["heal"], run_dir(cfg)
    if not hc.get("blockwise"):
        sys.exit("heal.blockwise is off in this config: this script varies its warm-up, so give a config that uses it.")
    if any(not 0 <= w < 1 for w in args.warmups):
        sys.exit(f"--warmups {args.warmups}: give fractions of the steps in [0, 1), e.g. 0 0.05.")
    _, t05 = notebook_03_05(cfg)
    tok = load_model(cfg["model"], dtype=cfg["dtype"])[1]
    heldout = heldout_ids_for(tok, cfg)
    lr, tokens = float(hc["lr"]), int(hc["tokens"])
    start_dir = root / "models" / "tensorized"
    out = {"start": str(start_dir), "blockwise": dict(hc["blockwise"]), "heal_lr": lr, "heal_tokens": tokens,
           "warmups": {}}
    ref = f"{args.warmups[0]:g}"   # the warm-up every other one is paired with
    for w in args.warmups:
        key = f"{w:g}"
        cfg_w = copy.deepcopy(cfg)
        cfg_w["heal"]["blockwise"] = {**dict(hc["blockwise"]), "warmup": float(w)}
        dest = root / "models" / ("tensorized_bw" if w == 0 else f"tensorized_bw_warmup{key}")
        print(f"warm-up {key}: block-wise step -> {dest}", flush=True)
        rec = start_from_config(start_dir, dest, cfg_w)
        ppl = heldout_perplexities(load_compressed(dest), tok, heldout, cfg)
        r = {"distill_seconds": rec["seconds"], "reused": rec["reused"], "perplexity": ppl,
             "blocks": rec["blocks"]}  # per block: relative error at the first step, the last epoch, along the model
        print(f"  {'reused, ' if rec['reused'] else ''}{rec['seconds']:.0f} s: "
              + ", ".join(f"{t} {p['ppl']:,.1f}" for t, p in ppl.items()), flush=True)
        if w == 0 and rec["reused"] and t05.get("blockwise") and not args.no_heal:
            # notebook 05 healed this very start with this recipe: its healed model is the reference
            r["healed"] = {"perplexity": t05["after"]["perplexity_texts"], "from": "notebook 05 (same start and recipe)"}
        elif not args.no_heal:
            run = lr_sweep(dest, root / "blockwise" / f"warmup{key}", cfg_w, [lr], tokens, heldout)["lrs"][f"{lr:g}"]
            r["healed"] = run
            print(f"  healed {tokens:,} tokens: " + ", ".join(f"{t} {p['ppl']:,.1f}" for t, p in run["perplexity"].items()),
                  flush=True)
        out["warmups"][key] = r
        first = out["warmups"][ref]
        if key != ref:
            r["start_vs_first"] = {t: C.compare_nll(first["perplexity"][t], p, "first", key) for t, p in ppl.items()}
            ratios = sorted(b["sequential"] / a["sequential"] for a, b in zip(first["blocks"], rec["blocks"])
                            if a["sequential"] > 0)  # (a block left dense has no error)
            r["block_error_vs_first"] = {"blocks": len(ratios), "lower": sum(x < 1 for x in ratios),
                                         "median": ratios[len(ratios) // 2], "min": ratios[0], "max": ratios[-1]}
            if "healed" in r and "healed" in first:
                r["healed_vs_first"] = {t: C.compare_nll(first["healed"]["perplexity"][t], p, "first", key)
                                        for t, p in r["healed"]["perplexity"].items()}
        save_results(args.out, out, cfg, device=cfg["device"])
        if "block_error_vs_first" in r:
            e = r["block_error_vs_first"]
            print(f"  error left by each block, against the first: lower in {e['lower']} of {e['blocks']}, median "
                  f"x{e['median']:.3f} (x{e['min']:.3f}-x{e['max']:.3f})", flush=True)
        for name in ("start_vs_first", "healed_vs_first"):
            for t, p in (r.get(name) or {}).items():
                print(f"  {name}: {t} {p['ppl_a']:,.1f} -> {p['ppl_b']:,.1f} = x{p['ppl_ratio']:.3f} "
                      f"[{p['ppl_ratio_lo']:.3f}, {p['ppl_ratio_hi']:.3f}]", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
