#!/usr/bin/env python
"""Why do the frontier's NF4-stored factors at 50% kept score so differently on two machines?

The bf16 reference run (AVX512-BF16) and the fp32 AVX2 run of the same study agree on every frontier
point but the 50%-kept NF4 ones (data/results/crossrun/avx2_fp32.json). This rebuilds one of them
(activation-aware SVD, 50% kept, factors stored in NF4: notebook 07's point 5) on *this* machine and
scores the first ``--tokens`` held-out tokens in fp32 and under bf16 autocast, beside both runs'
per-window NLLs of that point. Equal fp32 and bf16 numbers here mean bf16 scoring is not the cause::

    .venv/bin/python scripts/nf4_scoring_check.py --other /tmp/clone/data/results --out data/results/crossrun/nf4_check.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--other", required=True, help="the other run's results folder (its 07_frontier.json)")
    ap.add_argument("--method", default="asvd")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from compactify import frontier as F
    from compactify import heldout as heldout_text
    from compactify.config import load_config
    from compactify.evaluate import perplexity
    from compactify.models import embedded_dir, load_model
    from compactify.results import read_json, save_results

    cfg = load_config(args.config, {})
    fc = cfg["frontier"]
    torch.manual_seed(cfg["seed"])
    model, tok = load_model(str(embedded_dir()))
    model.eval()
    calib = F.calibration_ids(tok, fc["calib_split"], fc["calib_tokens"], cfg["seed"])
    stats = F.input_stats(model, calib, seq_len=fc["calib_seq_len"], batch_size=fc["batch_size"], block_ids=fc["blocks"])
    weights, _ = F.compress_model(model, args.method, [args.keep], stats, errors=False, quantize=True,
                                  workers=fc["workers"], progress=False)
    ids = heldout_text.token_ids("brown-heldout", tok, fc["ppl_tokens"])[:args.tokens]
    here = {}
    for name, ac in (("fp32", None), ("bf16 autocast", "bfloat16")):
        t0 = time.perf_counter()
        with F.swapped(model, weights[("nf4", args.keep)]):
            r = perplexity(model, tok, ids, seq_len=fc["ppl_seq_len"], batch_size=2, autocast=ac)
        here[name] = {"window_nll": r["window_nll"], "seconds": time.perf_counter() - t0}
        print(name, [round(x, 3) for x in r["window_nll"]], flush=True)
    n = len(here["fp32"]["window_nll"])

    def first(results):
        p = next(p for p in read_json(Path(results) / "07_frontier.json")["points"]
                 if p["method"] == args.method and p["keep"] == args.keep and p["precision"] == "nf4")
        return {"window_nll": p["window_nll"][:n], "autocast": p.get("autocast"),
                "device": read_json(Path(results) / "07_frontier.json")["meta"]["device"]}
    out = {"method": args.method, "keep": args.keep, "tokens": args.tokens, "windows": n, "here": here,
           "reference": first(ROOT / "data" / "results"), "other": first(args.other)}
    print("reference run:", [round(x, 3) for x in out["reference"]["window_nll"]],
          "other run:", [round(x, 3) for x in out["other"]["window_nll"]])
    print("wrote", save_results(args.out, out, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
