#!/usr/bin/env python
"""Benchmark accuracy of saved models on more documents than notebook 06 affords, paired with the first.

Notebook 06 scores each model on a few dozen documents per task (its budget holds seven models),
which cannot resolve a few points. This scores a handful of saved models (the dense original first,
then e.g. the healed models of ``scripts/heal_long.py`` and ``scripts/recovery_curve.py``) on the
same ``--limit`` documents of ``--tasks`` and the held-out texts, exactly as notebook 06 does
(``evaluate.evaluate_model``: MPO layers contracted, the config's autocast), and pairs each with the
first (``compare.paired``: accuracy difference with its 95% interval, McNemar's p, and the held-out
perplexity ratio). Writes ``--out`` atomically, with provenance::

    .venv/bin/python scripts/eval_models.py --set run_dir=runs/default \\
        --models dense=embedded healed=runs/default/heal/tensorized/model \\
        --tasks lambada arc_easy --limit lambada=500 arc_easy=570 --out data/results/heal/long_run_tasks.json
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
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                    help="models to score, the first the reference (DIR: a saved model, or 'embedded' / a hub id)")
    ap.add_argument("--tasks", nargs="+", default=["lambada", "arc_easy"])
    ap.add_argument("--limit", nargs="*", default=[], metavar="TASK=N", help="documents per task (eval.limit)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)

    from compactify import compare as C
    from compactify.config import load_config, parse_overrides
    from compactify.evaluate import evaluate_model, heldout_ids_for
    from compactify.models import load_model
    from compactify.results import save_results

    models = dict(m.split("=", 1) for m in args.models if "=" in m)
    if len(models) != len(args.models) or len(models) < 2:
        ap.error("--models needs at least two distinct NAME=DIR entries, the reference first")
    cfg = load_config(args.config, parse_overrides(args.set))
    for item in args.limit:
        task, n = item.split("=", 1)
        cfg["eval"]["limit"][task] = int(n)
    evaluations, seconds, texts = {}, {}, None
    for name, src in models.items():
        t0 = time.perf_counter()
        model, tok = load_model(src)  # a bad path or id: load_model's error names it
        texts = texts or heldout_ids_for(tok, cfg)  # tokenised once: pairing needs the same ids for every model
        evaluations[name] = evaluate_model(model.eval(), tok, cfg, heldout_ids=texts, tasks=args.tasks)
        seconds[name] = time.perf_counter() - t0
        del model
        print(f"{name}: " + ", ".join(f"{t} {100 * r['value']:.1f}%" for t, r in evaluations[name]["tasks"].items()
                                      if isinstance(r, dict) and "value" in r)
              + f" ({seconds[name]:.0f} s)", flush=True)
    ref = next(iter(models))
    paired = {name: dict(zip(("tasks", "texts"), C.paired(evaluations[ref], e, ref, name, seed=cfg["seed"])))
              for name, e in evaluations.items() if name != ref}
    for name, p in paired.items():
        for task, d in p["tasks"].items():
            print(f"{name} - {ref}, {task}: {d['diff']:+.1f} points [{d['lo']:+.1f}, {d['hi']:+.1f}] over {d['n']} "
                  f"documents")
    save_results(args.out, {"models": models, "reference": ref, "tasks": args.tasks,
                            "limit": {t: cfg["eval"]["limit"].get(t) for t in args.tasks},
                            "evaluations": evaluations, "paired": paired, "seconds": seconds},
                 cfg, device=cfg["device"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
