#!/usr/bin/env python
"""`make heal-long`: the reference long healing run, the curve a reader extrapolates from.

Heals notebook 03's main model (the paper's recipe: TT-SVD MPO under the sensitivity plan) with
the config's healing recipe for ``--tokens`` (default 1,048,576: under one epoch of the healing
text) and measures held-out perplexity before, every ``--eval-every`` tokens and at the end
(``heal.eval_every``), each as a ratio to the dense model of notebook 00 on the same windows.
One cosine schedule spans the whole run, so a point in the middle was measured at a higher
learning rate than a run that ends there; notebook 05's full run is drawn beside the curve for
that reason.

Resumable: rerun the same command after a stop and it continues from the newest checkpoint in
``runs/<config>/heal_long``. Writes ``data/results/heal/heal_long.json`` (atomic, with
provenance) and ``figures/heal_long.png``. ``--figure-only`` redraws the figure from the JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def earlier_runs(results: Path, blockwise: bool = False) -> list[dict]:
    """Full-cosine healing runs of the same start at the same peak lr: notebook 05's main run
    ({tokens, ppl} on the primary held-out text), only where it healed the same start: the
    block-wise one (``blockwise``) or notebook 03's model."""
    from compactify.results import read_json

    out = []
    heal = results / "05_heal.json"
    if heal.is_file() and bool((h := read_json(heal)).get("blockwise")) == blockwise:
        out.append({"tokens": h["heal"]["plan"]["tokens"], "ppl": h["after"]["perplexity_texts"]["brown-heldout"]["ppl"],
                    "source": heal.name})
    return sorted(out, key=lambda r: r["tokens"])


def full_runs(start: Path) -> list[dict]:
    """The separate full healing runs of the long run's start (the open circle): notebook 05's for its
    own starts (``models/tensorized``, ``models/tensorized_bw``), the recovery curve's for a start of
    ``scripts/recovery_curve.py``; none for any other start."""
    from compactify.recovery import full_run_of

    start, results = Path(start), ROOT / "data" / "results"
    if start.name in ("tensorized", "tensorized_bw"):
        return earlier_runs(results, blockwise=start.name == "tensorized_bw")
    run = full_run_of(start, results)
    return [run] if run else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--tokens", type=int, default=1_048_576)
    ap.add_argument("--eval-every", type=int, default=49_152, help="tokens between held-out measurements")
    ap.add_argument("--out", default=None, help="default data/results/heal/heal_long.json (--blockwise: heal_long_bw.json)")
    ap.add_argument("--figure", default=None, help="default figures/heal_long.png (--blockwise: heal_long_bw.png)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from --out")
    ap.add_argument("--start", default=None,
                    help="heal this saved model instead of notebook 03's (e.g. a start of scripts/recovery_curve.py); "
                         "its checkpoints go to runs/<config>/heal_long_<folder name of --start's parent>")
    ap.add_argument("--blockwise", action="store_true",
                    help="heal notebook 05's block-wise start (models/tensorized_bw, heal.blockwise) instead of notebook "
                         "03's TT-SVD model: the default study's healing, for longer; its checkpoints go to "
                         "runs/<config>/heal_long_bw, its results to heal_long_bw.json / heal_long_bw.png unless "
                         "--out / --figure say otherwise")
    ap.add_argument("--subdir", default=None,
                    help="the run's folder under runs/<config> instead (a second run of the same start, e.g. on "
                         "another heal.data, needs its own: a run resumes only its own checkpoints)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep every checkpoint (one per two measurements, ~3x the trained weights each) and export "
                         "each as a model directory <run folder>/at_<tokens>, to score the benchmarks along the run "
                         "with scripts/eval_models.py")
    ap.add_argument("--target", type=float, default=3.0,
                    help="the target drawn on the figure and judged in the README, x dense on the primary held-out "
                         "text (default 3: the main model's; the recovery curve's are 1.1 at 70%% kept, 1.3 at 50%%)")
    ap.add_argument("--stop-after-tokens", type=int, default=None,
                    help="end at the last checkpoint at or before this many tokens, on the schedule of --tokens (the "
                         "first part of the same run: a recipe check); the JSON says completed: false; no figure")
    args = ap.parse_args(argv)
    if args.blockwise and args.start:
        ap.error("--blockwise and --start name two starts: give one")
    name = "heal_long_bw" if args.blockwise else "heal_long"
    args.out = args.out or str(ROOT / "data" / "results" / "heal" / f"{name}.json")
    args.figure = args.figure or str(ROOT / "figures" / f"{name}.png")

    from compactify import figures, run

    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.heal_study import export_checkpoints, long_run
    from compactify.results import read_json, save_results

    out = Path(args.out)
    if not args.figure_only:
        cfg = load_config(args.config, parse_overrides(args.set))
        if args.keep_checkpoints:
            cfg["heal"]["keep_checkpoints"] = 1_000_000
        if args.blockwise and not cfg["heal"].get("blockwise"):
            sys.exit("--blockwise: this config has heal.blockwise: null, so notebook 05 made no block-wise start; "
                     "set heal.blockwise (configs/default.yaml has it) or drop --blockwise.")
        model_dir = (Path(args.start) if args.start else
                     run.require(cfg, "tensorized_bw" if args.blockwise else "tensorized"))
        if args.start and not (model_dir / "config.json").is_file():
            sys.exit(f"--start {model_dir}: no saved model there (config.json missing).")
        work = run_dir(cfg) / (args.subdir or (f"heal_long_{model_dir.resolve().parent.name}" if args.start
                                               else name))
        baseline = read_json(run.require(cfg, "baseline"))["baseline"]["perplexity_texts"]
        result = long_run(model_dir, work, cfg, args.tokens, args.eval_every, baseline, stream=sys.stdout,
                          stop_after_tokens=args.stop_after_tokens)
        if result.get("completed") is False:
            save_results(out, {**result, "schedule_tokens": args.tokens}, cfg, device=cfg["device"], start=str(model_dir))
            print(f"heal-long: stopped at {result['stopped_at_tokens']:,} of {args.tokens:,} tokens; wrote {out}")
            return 0
        result["earlier_full_runs"] = full_runs(model_dir)
        result["target"] = args.target
        if args.keep_checkpoints:
            result["exports"] = export_checkpoints(model_dir, work, result["heal"]["plan"]["tokens_per_step"])
        save_results(out, result, cfg, device=cfg["device"], start=str(model_dir))
        print(f"heal-long: wrote {out}")
    elif not out.is_file():
        sys.exit(f"{out} does not exist: run scripts/heal_long.py without --figure-only first.")
    else:  # the cross-references to other runs are refreshed; the run's own numbers are not touched
        from compactify.results import write_json

        result = read_json(out)
        # (kept as stored where today's results hold no full run of the run's start)
        result["earlier_full_runs"] = full_runs(result["meta"].get("start", "")) or result.get("earlier_full_runs", [])
        result.setdefault("target", args.target)
        write_json(out, result)
    result = read_json(out)
    path = figures.save(figures.heal_long_figure(result, target=result.get("target", 3.0)),
                        Path(args.figure).parent, Path(args.figure).stem, result["meta"])  # (make figures redraws it too: compactify.report)
    print(f"heal-long: figure {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
