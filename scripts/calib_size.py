#!/usr/bin/env python
"""Does more calibration text give the activation-aware SVD a better start?

Notebook 03 builds the improved start (``tensorize.compare_init: asvd``) from ``frontier.calib_tokens``
(2,048) tokens of the Brown heal split; SVD-LLM calibrated on 256 x 2048. With fewer tokens than a
matrix has inputs (down_proj: 1,536) the input second moment ``C`` is rank-deficient, so notebook 07
guessed that more text would help. This builds the same start (the published plan of
``data/results/03_tensorize.json``, the same seed and split) from each ``--tokens`` and scores it on
the held-out texts before any healing, paired with the first size over the same windows.
Writes ``data/results/heal/calib_size.json`` (atomic) with the usual meta block.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--plan", default=str(ROOT / "data" / "results" / "03_tensorize.json"),
                    help="a notebook-03 result whose main plan is used")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "calib_size.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)

    import torch

    from compactify import aa_init
    from compactify import compare as C
    from compactify.config import load_config, parse_overrides
    from compactify.models import load_model
    from compactify.perplexity import heldout_ids_for, heldout_perplexities
    from compactify.results import read_json, save_results
    from compactify.tensorize import Plan, tensorize

    if len(set(args.tokens)) != len(args.tokens) or min(args.tokens) <= 0:
        ap.error(f"--tokens {args.tokens}: give distinct positive token counts")
    base = load_config(args.config, parse_overrides(args.set))
    plan = Plan.from_dict(read_json(args.plan)["main"]["plan"])
    dense, tok = load_model(base["model"], dtype=base["dtype"])
    heldout = heldout_ids_for(tok, base)
    sizes = {}
    for n in args.tokens:
        cfg = copy.deepcopy(base)
        cfg["frontier"]["calib_tokens"] = n
        t0 = time.perf_counter()
        stats, calibration = aa_init.activation_stats(dense, tok, cfg, plan)
        model = tensorize(copy.deepcopy(dense), plan, init="asvd", stats=stats, calibration=calibration)
        seconds = time.perf_counter() - t0
        ppl = heldout_perplexities(model, tok, heldout, cfg)
        sizes[n] = {"calibration": calibration, "seconds": seconds, "perplexity": ppl}
        print(f"{n:>6} calibration tokens ({seconds:.0f} s): "
              + ", ".join(f"{x} {p['ppl']:,.0f}" for x, p in ppl.items()), flush=True)
        del model
    first = args.tokens[0]
    paired = {n: {x: C.compare_nll(sizes[first]["perplexity"][x], p, f"{first} tokens", f"{n} tokens")
                  for x, p in sizes[n]["perplexity"].items()} for n in args.tokens[1:]}
    for n, per in paired.items():
        print(f"{n} vs {first} tokens: " + ", ".join(
            f"{x} x{r['ppl_ratio']:.3f} [{r['ppl_ratio_lo']:.3f}, {r['ppl_ratio_hi']:.3f}]" for x, r in per.items()))
    save_results(args.out, {"init": "asvd", "plan_from": str(Path(args.plan).relative_to(ROOT)) if Path(args.plan).is_relative_to(ROOT)
                            else args.plan, "keep_ratio": read_json(args.plan)["main"]["keep_ratio"],
                            "sizes": sizes, f"paired_vs_{first}": paired, "threads": torch.get_num_threads()}, base)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
