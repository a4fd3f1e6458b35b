#!/usr/bin/env python
"""Next-token loss or distillation: which keeps more of the model beyond the healing text?

Notebook 05 heals with the next-token loss (``heal.loss: lm``) on Brown. Tuning on Brown mostly
heals Brown: the dense model healed the same way gets better on Brown and worse on Wikipedia. A
distillation loss (``kd``: KL divergence from the original model's next-token distribution,
``compactify.distill``) asks the student to imitate the teacher rather than the text, so it may keep
more of what the model knew. This heals notebook 03's main start (``runs/<config>/models/tensorized``,
the paper's TT-SVD MPO) once per ``--variants`` entry (a loss, optionally on another healing text:
``lm@brown-wiki`` adds Wikipedia's vital-article leads to Brown) for the default healing budget
(``heal_study.variant_comparison``: same data, schedule, lr and seed), keeps each healed model under
``runs/<config>/loss_study/<variant>/model`` for ``scripts/eval_models.py`` (benchmarks), and pairs each,
on the same held-out windows, with notebook 05's next-token healing of the same start. Writes
``data/results/heal/loss_study.json`` (atomic, with provenance)::

    .venv/bin/python scripts/loss_study.py --set run_dir=runs/default
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
    ap.add_argument("--variants", nargs="+", default=["kd", "mix"], metavar="LOSS[@DATA]",
                    help="each healed once: a heal.loss (lm | kd | mix: heal.kd_weight of kd, the rest lm), optionally "
                         "@ a heal.data source (heal | wiki-vital | brown-wiki; default: the config's)")
    ap.add_argument("--tokens", type=int, default=None, help="healing tokens per loss (default: heal.tokens)")
    ap.add_argument("--subdir", default="loss_study", help="folder of the run directory the healed models go to "
                    "(<run_dir>/<subdir>/<variant>/model); a variant's earlier folder there is replaced")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "heal" / "loss_study.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    args = ap.parse_args(argv)

    from compactify import run
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import paired_with_run, variant_comparison
    from compactify.results import save_results

    cfg = load_config(args.config, parse_overrides(args.set))
    start = Path(args.start) if Path(args.start).is_dir() else run.require(cfg, args.start)
    tokens = int(args.tokens or cfg["heal"]["tokens"])
    h = cfg["heal"]
    variants = {}
    for v in args.variants:
        loss, _, data = v.partition("@")
        if loss not in ("lm", "kd", "mix"):
            ap.error(f"variant {v!r}: the loss must be lm, kd or mix")
        variants[v] = {"heal.loss": loss, **({"heal.data": data} if data else {})}
    r = variant_comparison(start, run_dir(cfg) / args.subdir, cfg, variants, tokens, keep_models=True)
    r["recipe"] = {"data": h["data"], "tokens": tokens, "lr": h["lr"], "batch_per_rank": h["batch_per_rank"], "seq_len": h["seq_len"],
                   "kd_temperature": h["kd_temperature"], "kd_weight (mix)": h["kd_weight"],
                   "teacher_mode": h["teacher_mode"]}
    heal_json = run.path(cfg, "heal")
    if args.start == "tensorized" and heal_json.exists():  # notebook 05's next-token healing, paired
        r["vs_notebook_05"] = paired_with_run(heal_json, r["variants"])
    save_results(args.out, r, cfg, device=cfg["device"], start=str(start))
    for name, v in r["variants"].items():
        line = f"{name}: {v['tokens_per_s']:.0f} tok/s"
        for text, p in v["perplexity"].items():
            line += f"; {text} {p['ppl']:.1f}"
            if "vs_notebook_05" in r:
                q = r["vs_notebook_05"]["by_variant"][name][text]
                line += f" = x{q['ppl_ratio']:.3f} [{q['ppl_ratio_lo']:.3f}, {q['ppl_ratio_hi']:.3f}] notebook 05's"
        print(line + f"; model {v['model_dir']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
