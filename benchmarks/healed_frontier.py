"""The speed-quality frontier after equal healing: which healed compressed model to deploy?

``scripts/recovery_curve.py`` heals every start (the paper's TT-SVD MPO, the activation-aware MPO,
the activation-aware SVD) at 70%, 50% and 30% of the block parameters kept, for the same tokens,
and scores them on the held-out texts. This loads each of those healed models (from the run
directory that script used) beside the dense model and times them all round-robin in one process
(:func:`compactify.speed.compare`: batch-1 prefill and greedy decode with the KV cache, medians
and the per-round ratio's quartiles), with every MPO layer in ``--mode`` (default ``auto``: per
layer the faster of factored and the contracted matrix, decided by measurement during the
warm-up). A second copy of the dense model (loaded last) is the A/A control: its ratio to the
first copy is the harness's own error, and a model counts as slower than dense only below it. The
order rotates (``--order rotated``, the default since 2026-12-06): each round starts one model
later, so every model, the control included, takes every position in a round equally often; in the
fixed order of earlier runs the control was always timed last. Same dtype for all (fp32), same thread count. With the healed perplexities of
``recovery_curve.json`` it writes the frontier: quality against decode speed and against bytes.

Writes ``data/results/benchmarks/healed_frontier.json`` and ``figures/healed_frontier.png``::

    .venv/bin/python benchmarks/healed_frontier.py --set run_dir=runs/default   # ~10 min on 2 cores
    .venv/bin/python benchmarks/healed_frontier.py --figure-only
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mpo_linear.py: spinning threads on 2 cores

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTROL = "dense (second copy)"


def healed_dir(run: Path, point: dict) -> Path:
    """Where the healed model of one recovery-curve point lies in the run directory. Notebook 05 heals
    the paper's start under heal/tensorized and its improved start (``tensorize.compare_init``, which
    has changed over time) under heal/tensorized_aa: the model's own record of its init must match."""
    if point["source"] != "05_heal.json":
        return run / "recovery" / f"keep{point['keep']:g}_{point['start']}" / "heal" / "model"
    path = run / "heal" / ("tensorized" if point["start"] == "tt_svd" else "tensorized_aa") / "model"
    config = path / "config.json"
    init = json.loads(config.read_text()).get("compactify", {}).get("init") if config.is_file() else None
    if init is not None and init != point["start"]:
        sys.exit(f"{path} holds a {init} start, but the recovery curve's point at {point['keep']:.0%} kept is a "
                 f"{point['start']} start: this run directory is not the one the curve was measured on; rerun "
                 "scripts/recovery_curve.py on it first.")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    ap.add_argument("--recovery", default=str(ROOT / "data" / "results" / "heal" / "recovery_curve.json"))
    ap.add_argument("--mode", default="auto", help="MPO inference mode: factored | contracted | auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds after one warm-up round "
                    "(default: with --order rotated twice the number of models, so each takes every position twice; "
                    "fixed: 9)")
    ap.add_argument("--order", choices=["rotated", "fixed"], default="rotated",
                    help="rotated: each round starts one model later; fixed: the same order every round (before 2026-12-06)")
    ap.add_argument("--no-control", action="store_true", help="leave out the second copy of the dense model")
    ap.add_argument("--new-tokens", type=int, default=16, help="k of the decode rate (k-1)/(t_k - t_1)")
    ap.add_argument("--prefill", type=int, default=64, help="prompt tokens of the prefill measurement")
    ap.add_argument("--out", default=str(ROOT / "data" / "results" / "benchmarks" / "healed_frontier.json"))
    ap.add_argument("--figure", default=str(ROOT / "figures" / "healed_frontier.png"))
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from --out")
    args = ap.parse_args(argv)

    from compactify import figures
    from compactify.results import read_json, save_results

    if not args.figure_only:
        rec = Path(args.recovery)
        if not rec.is_file():
            sys.exit(f"{rec} does not exist: run scripts/recovery_curve.py (after make reproduce) first.")
        data, cfg = measure(args, read_json(rec))
        save_results(args.out, data, cfg, device="cpu")
    elif not Path(args.out).is_file():
        sys.exit(f"{args.out} does not exist: run benchmarks/healed_frontier.py without --figure-only first.")
    data = read_json(args.out)
    path = figures.save(figures.healed_frontier(data), Path(args.figure).parent, Path(args.figure).stem, data["meta"])
    print(f"healed frontier: wrote {args.out} and {path}")
    return 0


def measure(args, rec: dict) -> tuple[dict, dict]:
    """The timings and the frontier's points, and the config they were made with."""
    import torch

    from compactify import speed
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.models import load_model
    from compactify.progress import progress
    from compactify.roofline import stored_bytes

    cfg = load_config(args.config, parse_overrides(args.set))
    run = run_dir(cfg)
    dirs = {f"{p['start']}@{p['keep']:g}": healed_dir(run, p) for p in rec["points"]}
    missing = [str(d) for d in dirs.values() if not (d / "config.json").is_file()]
    if missing:
        sys.exit(f"{len(missing)} healed models are missing ({', '.join(missing[:3])}...): run "
                 f"scripts/recovery_curve.py with --set run_dir={run} (this reads that run's models).")
    t0, load_before = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(args.threads)
    dense, tok = load_model(cfg["model"])
    models = {"dense": dense.float().eval()}
    for name, d in progress(dirs.items(), desc="load healed models"):
        models[name] = load_model(d)[0].float().eval()
    if not args.no_control:
        # The A/A control: the dense model again, loaded the same way. Its ratio to the first copy
        # is the harness's own error: timed last in every round (the fixed order) it measured 0.92x,
        # in the rotated order 1.01x (README, healed frontier).
        models[CONTROL] = load_model(cfg["model"])[0].float().eval()
    prompt = "The history of the English language"
    prefill_ids = tok("Linear algebra is the branch of mathematics concerning linear equations and their "
                      "representations in vector spaces and through matrices. " * 6,
                      return_tensors="pt").input_ids[:, : args.prefill]
    rotate = args.order == "rotated"
    repeats = args.repeats or (2 * len(models) if rotate else 9)
    res = speed.compare(models, tok, prefill_ids, prompt, new_tokens=args.new_tokens, repeats=repeats,
                        reference="dense", mpo_mode=args.mode, rotate=rotate)
    dense_bytes = stored_bytes(dense)
    control = None
    if CONTROL in res:
        c = res[CONTROL]
        control = {"decode_ratio": c["decode_ratio"], "decode_ratio_rounds": c["decode_ratio_rounds"],
                   "prefill_ratio": c["prefill_ratio"], "prefill_ratio_rounds": c["prefill_ratio_rounds"],
                   "decode_tokens_per_s": c["decode"],
                   "position": "every position equally often" if rotate else "last in each round"}
        q = c["decode_ratio_rounds"]
        print(f"{CONTROL:22s} decode x{c['decode_ratio']:.2f} (IQR of rounds {q['q1']:.2f}-{q['q3']:.2f}): "
              "the harness's own error", flush=True)
    points = []
    for p in rec["points"]:
        name = f"{p['start']}@{p['keep']:g}"
        r, size = res[name], stored_bytes(models[name])
        points.append({"start": p["start"], "keep": p["keep"], "lr": p["lr"], "tokens": p["tokens"],
                       "model_dir": str(dirs[name]), "after": {t: {k: v[k] for k in ("ppl", "tokens", "seq_len")}
                                                                for t, v in p["after"].items()},
                       "after_vs_dense": p["after_vs_dense"], "bytes": size, "bytes_ratio": size / dense_bytes,
                       "decode_tokens_per_s": r["decode"], "prefill_tokens_per_s": r["prefill"],
                       "decode_ratio": r["decode_ratio"], "decode_ratio_rounds": r["decode_ratio_rounds"],
                       "prefill_ratio": r["prefill_ratio"], "prefill_ratio_rounds": r["prefill_ratio_rounds"],
                       "mpo_mode": r.get("mpo_mode")})
        print(f"{name:22s} healed x{p['after_vs_dense'][next(iter(p['after']))]['ppl_ratio']:.2f} dense | decode "
              f"x{r['decode_ratio']:.2f} (IQR of rounds {r['decode_ratio_rounds']['q1']:.2f}-"
              f"{r['decode_ratio_rounds']['q3']:.2f}) | bytes x{points[-1]['bytes_ratio']:.2f}", flush=True)
    return {"settings": {"mode": args.mode, "threads": args.threads, "repeats": repeats, "order": args.order,
                         "dtype": "float32",
                         "new_tokens": args.new_tokens, "prefill_tokens": int(prefill_ids.shape[1]), "decode_prompt": prompt,
                         "run_dir": str(run), "recovery": str(args.recovery),
                         "recovery_commit": rec["meta"].get("git_commit"),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_before": load_before,
                         "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0},
            "dense": {"bytes": dense_bytes, "decode_tokens_per_s": res["dense"]["decode"],
                      "prefill_tokens_per_s": res["dense"]["prefill"],
                      "perplexity": {t: {k: v[k] for k in ("ppl", "tokens", "seq_len")} for t, v in rec["dense"].items()}},
            "control": control, "points": points}, cfg


if __name__ == "__main__":
    sys.exit(main())
