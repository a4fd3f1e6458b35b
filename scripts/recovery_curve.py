#!/usr/bin/env python
"""The recovery curve across compression: how close to dense does each start heal at each budget?

The reference run heals one budget (notebook 03's main model, 30% of the block parameters kept).
This builds the same sensitivity plan at other budgets (``--keeps``, fraction of the block
parameters kept) from notebook 02's profile, with both starts of notebook 03 (the paper's TT-SVD
MPO and the activation-aware MPO, same bonds), heals each with notebook 05's recipe and tokens,
each start at its own peak rate, and scores the held-out texts before and after, paired against
the dense model (notebook 00's windows). The 30% points of the paper's start and of the reference
run's improved start (``tensorize.compare_init``: the activation-aware SVD since 2026-12-07, the
activation-aware MPO before) are the reference run's own (``05_heal.json``). Rates: ``heal.lr``
for TT-SVD, ``heal.improved_lr`` (or ``heal.lr``) for the improved start, ``--rate START=LR`` for
another (the activation-aware MPO's is 3e-4, ``data/results/heal/start_lr_sweep.json``), or
``--sweep 3e-4 1e-3``, which first heals the start at each rate for ``--sweep-tokens`` at the main
budget and keeps the best (recorded under ``lr_sweeps``). ``--starts asvd`` is the low-rank peer (the
activation-aware SVD within each MPO's budget, ``tensorize.init: asvd``). Results go to ``data/results/heal/recovery_curve.json``
after every healing (atomic), so an interrupted run keeps what it measured; a rerun resumes.

``--blockwise`` runs notebook 05's block-wise step (``heal.blockwise``) on each start before its
healing (points ``<start>_bw``, the step's seconds and perplexity recorded), writes
``recovery_curve_bw.json`` and pairs each healed point with the same start's plain healing in
``recovery_curve.json`` (same windows); its 30% TT-SVD point is notebook 05's when notebook 05 ran
the step. Without it, notebook 05's points are taken only from a notebook 05 that healed the plain
starts.

``--seed N`` measures the curve again at another seed (the starts' calibration draw, the block-wise
step's rows and the healing's order), on the same plans and held-out windows, in
``<run>/recovery_seed<N>/``; give it its own ``--out`` (notebook 05's points belong to its own seed only).

``--blockwise --equal-time`` adds each block-wise point's control: its plain start healed at the
same rate for the same seconds (the step's seconds converted to tokens at the healing's measured
speed), paired with the block-wise point (``vs_equal_time``).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--starts", nargs="+", default=["tt_svd", "activation_aware"])
    ap.add_argument("--tokens", type=int, default=None, help="healing tokens per start (default: heal.tokens, as notebook 05)")
    ap.add_argument("--sweep", type=float, nargs="*", default=[], metavar="LR",
                    help="peak rates to try for a start without one in the config (asvd)")
    ap.add_argument("--sweep-tokens", type=int, default=32768, help="healing tokens per rate of --sweep")
    ap.add_argument("--check-rates", type=float, nargs="*", default=[], metavar="LR",
                    help="also heal each --check-starts start at these rates for --sweep-tokens at the main budget "
                         "(recorded under rate_checks, paired against the first rate; the rates used do not change)")
    ap.add_argument("--check-starts", nargs="*", default=[], help="starts for --check-rates")
    ap.add_argument("--rate", nargs="*", default=[], metavar="START=LR",
                    help="a start's peak rate where the config has none for it, e.g. activation_aware=3e-4")
    ap.add_argument("--blockwise", action="store_true",
                    help="distil each start block by block (heal.blockwise) before healing it; results to "
                         "recovery_curve_bw.json, paired with recovery_curve.json's plain healings")
    ap.add_argument("--equal-time", action="store_true",
                    help="with --blockwise: also heal each block-wise point's plain start for the same seconds (its "
                         "healing's tokens plus what the step's seconds would have bought at that healing's speed) "
                         "and pair the two (points measured by an earlier invocation get theirs too)")
    ap.add_argument("--out", default=None, help="default data/results/heal/recovery_curve.json "
                                                "(--blockwise: recovery_curve_bw.json)")
    ap.add_argument("--figure", default=str(ROOT / "figures" / "recovery_curve.png"),
                    help="redrawn with the block-wise points beside the plain ones where both files exist")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. run_dir=...")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the starts' calibration text, the block-wise step and the healing (default: the "
                         "config's); the run directory's notebooks stay checked against the config's seed, so the "
                         "plans and the dense reference are the reference run's. Another seed measures every point itself")
    args = ap.parse_args(argv)

    from compactify import compare as C, heal_study, run, sensitivity as S, tensorize_study as T
    from compactify import aa_init, blockwise, recovery
    from compactify.config import load_config, parse_overrides, run_dir
    from compactify.models import load_model, save_model_dir
    from compactify.perplexity import heldout_ids_for, heldout_perplexities
    from compactify.results import git_commit, read_json, save_results

    results = ROOT / "data" / "results" / "heal"
    args.out = args.out or str(results / ("recovery_curve_bw.json" if args.blockwise else "recovery_curve.json"))
    cfg = load_config(args.config, parse_overrides(args.set))
    if args.equal_time and not args.blockwise:
        ap.error("--equal-time is the control of the block-wise points: pass --blockwise too")
    if args.blockwise and not blockwise.settings_from(cfg):
        ap.error("--blockwise: this config has heal.blockwise: null; set it (configs/default.yaml has it)")
    tc, hc, cores = cfg["tensorize"], cfg["heal"], cfg["mpo"]["cores"]
    dense_ppl = read_json(run.require(cfg, "baseline"))["baseline"]["perplexity_texts"]
    heal05 = read_json(run.require(cfg, "heal"))
    profile = read_json(run.require(cfg, "sensitivity"))
    dense, tok = load_model(cfg["model"], dtype=cfg["dtype"])
    heldout = heldout_ids_for(tok, cfg)
    choices = S.choices_from_profile(dense, profile["panel"] + profile["heatmap"], ratios=tc["ratio_grid"], cores=cores,
                                     allow_dense=tc["allow_dense"], dense_types=["down"] if tc["leave_down_dense"] else [])
    improved = (heal05.get("improved") or {}).get("init")   # the reference run's second start (notebook 05)
    # each start's peak rate: the paper's heal.lr; the reference run's improved start its own (heal.improved_lr,
    # or heal.lr); any other start from --rate or a --sweep (the activation-aware MPO: --rate activation_aware=3e-4,
    # data/results/heal/start_lr_sweep.json)
    lrs = {"tt_svd": float(hc["lr"]), **({improved: float(hc["improved_lr"] or hc["lr"])} if improved else {})}
    for item in args.rate:
        name, _, value = item.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            ap.error(f"--rate {item!r}: give START=LR, e.g. activation_aware=3e-4")
    unknown = set(args.starts + args.check_starts) - {"tt_svd", "activation_aware", "asvd"}
    if unknown:
        ap.error(f"unknown start(s) {sorted(unknown)}: use tt_svd, activation_aware, asvd")
    seed = int(cfg["seed"]) if args.seed is None else args.seed
    own_seed = seed == int(cfg["seed"])   # the seed the run directory's notebooks (05 included) were made with
    run_cfg = copy.deepcopy(cfg)    # the settings the points are made with: the config's, at --seed
    run_cfg["seed"] = seed
    heal_cfg = copy.deepcopy(run_cfg)
    if args.tokens:  # after the inputs were checked against the config they were made with
        heal_cfg["heal"].update(tokens=int(args.tokens), steps=None)

    def versus_dense(ppl: dict) -> dict:
        return {x: C.compare_nll(dense_ppl[x], p, "dense", "compressed") for x, p in ppl.items()}

    out = Path(args.out)
    done = read_json(out) if out.is_file() else {}
    points = [p for p in done.get("points", []) if p["source"] == "scripts/recovery_curve.py"]
    for p in points:  # points of a file written before points carried their commit: the file's commit measured them
        p.setdefault("commit", done["meta"]["git_commit"])
    t03 = read_json(run.require(cfg, "tensorize"))
    befores = {"tt_svd": heal05["before"], improved: (t03.get("improved") or {}).get("evaluation")}
    bw05 = heal05.get("blockwise")  # notebook 05 distilled its TT-SVD start block by block (not its second start)
    # notebook 05's healings are points of this curve only at the seed they were made with (--seed 1
    # measures the curve again, every point its own)
    ref05 = [("tt_svd", heal05["after"])] if bool(bw05) == args.blockwise and own_seed else []
    if not args.blockwise and own_seed:
        ref05.append((improved, (heal05.get("improved") or {}).get("after")))
    suffix = recovery.SUFFIX if args.blockwise else ""
    for start, after in ref05:
        if start and after and not any(p["keep"] == tc["main_keep_ratio"] and p["start"] == start + suffix
                                       for p in points):
            # (the reference run's own budget; a point the script measured itself there is kept)
            before = befores[start]["perplexity_texts"] if befores[start] else None
            points.append({"keep": tc["main_keep_ratio"], "start": start + suffix, "lr": lrs[start],
                           "source": "05_heal.json", "run_commit": (heal05["meta"].get("git_commit") or "")[:7] or None,
                           "tokens": heal05["heal"]["plan"]["tokens"], "after": after["perplexity_texts"],
                           "after_vs_dense": versus_dense(after["perplexity_texts"]),
                           **({"before": before, "before_vs_dense": versus_dense(before)} if before else {}),
                           **({"blockwise": _bw_record(bw05, versus_dense)} if args.blockwise else {})})
    # another seed's starts and healings in their own folders (a healing resumes from its folder's checkpoint)
    work = run_dir(cfg) / ("recovery" if own_seed else f"recovery_seed{seed}")

    def build(start: str, keep: float):
        plan = T.plans(choices, keep, len(dense.model.layers), cores, tc["leave_down_dense"])[0][tc["main_plan"]]
        if start == improved:
            return T.improved_start(dense, tok, plan, _init(run_cfg, start, compare=True))[0]
        return aa_init.tensorize_from_config(copy.deepcopy(dense), tok, plan, _init(run_cfg, start))

    sweeps, checks = done.get("lr_sweeps", {}), done.get("rate_checks", {})

    plain_file = results / "recovery_curve.json"  # --blockwise: the plain healings each point is paired with
    plain = read_json(plain_file)["points"] if args.blockwise and plain_file.is_file() else None

    def write() -> None:  # atomic, after every measurement: an interrupted run keeps what it measured
        save_results(out, {"plan": tc["main_plan"], "dense": dense_ppl, "points": points, "lr_sweeps": sweeps,
                           "rate_checks": checks,
                           **({"vs_plain": recovery.paired_points(plain, points)} if plain is not None else {})},
                     run_cfg, device="cpu")

    for start in [s for s in args.starts if s not in lrs]:
        if start not in sweeps:
            if not args.sweep:
                ap.error(f"the {start} start has no peak rate in the config: pass --rate {start}=LR, or --sweep 3e-4 1e-3 "
                         "to measure one")
            start_dir = save_model_dir(build(start, tc["main_keep_ratio"]), tok, work / f"sweep_{start}" / "start")
            sweeps[start] = {"keep": tc["main_keep_ratio"], **heal_study.lr_sweep(
                start_dir, work / f"sweep_{start}", run_cfg, args.sweep, args.sweep_tokens, heldout)}
            write()
        lrs[start] = sweeps[start]["best"]
        print(f"{start}: peak rate {lrs[start]:g} (best of {', '.join(sweeps[start]['lrs'])} at "
              f"{sweeps[start]['tokens']:,} tokens on {sweeps[start]['judged_on']})", flush=True)
    for start in args.check_starts:  # is the rate a start heals at the best one near it? (edge of a sweep's grid)
        if sorted(checks.get(start, {}).get("lrs", {})) == sorted(f"{lr:g}" for lr in args.check_rates):
            continue
        start_dir = save_model_dir(build(start, tc["main_keep_ratio"]), tok, work / f"check_{start}" / "start")
        checks[start] = {"keep": tc["main_keep_ratio"], "rate_used": lrs.get(start), **heal_study.lr_sweep(
            start_dir, work / f"check_{start}", run_cfg, args.check_rates, args.sweep_tokens, heldout)}
        write()
        for lr, r in checks[start]["paired_vs_first"].items():
            print(f"{start} at {lr} vs {args.check_rates[0]:g} ({args.sweep_tokens:,} tokens): brown-heldout "
                  f"x{r['brown-heldout']['ppl_ratio']:.2f} [{r['brown-heldout']['ppl_ratio_lo']:.2f}, "
                  f"{r['brown-heldout']['ppl_ratio_hi']:.2f}]", flush=True)
    for keep in args.keeps:
        for start in args.starts:
            if any(p["keep"] == keep and p["start"] == start + suffix for p in points):
                continue  # measured by an earlier invocation
            model = build(start, keep)
            before = heldout_perplexities(model, tok, heldout, cfg)
            start_dir = save_model_dir(model, tok, work / f"keep{keep:g}_{start}" / "start")
            del model
            extra = {}
            if args.blockwise:  # notebook 05's step on this start; healing starts from its result
                rec = blockwise.start_from_config(start_dir, work / f"keep{keep:g}_{start}" / "start_bw", run_cfg)
                start_dir = Path(rec["model_dir"])
                rec["perplexity"] = heldout_perplexities(load_model(start_dir)[0], tok, heldout, cfg)
                extra["blockwise"] = _bw_record(rec, versus_dense)
                print(f"keep {keep:g}, {start}: block-wise step {rec['seconds']:.0f} s, brown-heldout "
                      f"{before['brown-heldout']['ppl']:,.1f} -> {rec['perplexity']['brown-heldout']['ppl']:,.1f}",
                      flush=True)
            healed = heal_study.heal_start(start_dir, work / f"keep{keep:g}_{start}" / ("heal" + suffix), heal_cfg,
                                           lr=lrs[start])
            after = heldout_perplexities(load_model(Path(healed["healed_model"]))[0], tok, heldout, cfg)
            points.append({"keep": keep, "start": start + suffix, "lr": lrs[start], "source": "scripts/recovery_curve.py",
                           "commit": git_commit(),
                           "tokens": healed["plan"]["tokens"], "before": before, "after": after,
                           "before_vs_dense": versus_dense(before), "after_vs_dense": versus_dense(after),
                           "heal": heal_study.speed_record(healed), **extra})
            r = points[-1]["after_vs_dense"]["brown-heldout"]
            print(f"keep {keep:g}, {start}: brown-heldout {before['brown-heldout']['ppl']:,.1f} -> "
                  f"{after['brown-heldout']['ppl']:,.1f} = x{r['ppl_ratio']:.2f} [{r['ppl_ratio_lo']:.2f}, "
                  f"{r['ppl_ratio_hi']:.2f}] dense", flush=True)
            write()
    if args.equal_time:  # the plain start healed for the seconds of the step and its healing together
        per_step = int(hc["batch_per_rank"]) * int(hc["seq_len"]) * int(hc["nproc"])
        for p in points:
            start = p["start"].removesuffix(suffix)
            if (p["source"] != "scripts/recovery_curve.py" or "blockwise" not in p or "equal_time_control" in p
                    or p["keep"] not in args.keeps or start not in args.starts):
                continue
            folder = work / f"keep{p['keep']:g}_{start}"
            tokens = blockwise.equal_time_tokens(p["blockwise"]["seconds"], p["heal"]["tokens_per_s"], p["tokens"],
                                                 per_step)
            ctrl_cfg = copy.deepcopy(heal_cfg)
            ctrl_cfg["heal"].update(tokens=tokens, steps=None)
            healed = heal_study.heal_start(folder / "start", folder / "heal_equal_time", ctrl_cfg, lr=p["lr"])
            after = heldout_perplexities(load_model(Path(healed["healed_model"]))[0], tok, heldout, cfg)
            p["equal_time_control"] = {"tokens": healed["plan"]["tokens"], "extra_tokens": tokens - p["tokens"],
                                       "lr": p["lr"], "commit": git_commit(), "after": after,
                                       "after_vs_dense": versus_dense(after), "heal": heal_study.speed_record(healed)}
            p["vs_equal_time"] = {t: C.compare_nll(after[t], p["after"][t], f"{start} healed {tokens:,} tokens",
                                                   f"{start}+blockwise healed {p['tokens']:,} tokens") for t in after}
            r = p["vs_equal_time"]["brown-heldout"]
            print(f"keep {p['keep']:g}, {start}: plain start healed {tokens:,} tokens (equal time) "
                  f"{r['ppl_a']:,.1f}; block-wise {r['ppl_b']:,.1f} = x{r['ppl_ratio']:.3f} [{r['ppl_ratio_lo']:.3f}, "
                  f"{r['ppl_ratio_hi']:.3f}]", flush=True)
            write()
    if args.blockwise:  # also when every point was measured before: the pairing with the plain healings refreshed
        write()
    from compactify import figures

    main_file = plain_file if args.blockwise else out
    if not main_file.is_file():
        print(f"recovery curve: wrote {out}; no figure without the plain curve ({main_file})")
        return 0
    d = read_json(main_file)
    fig = figures.save(figures.recovery_figure(recovery.with_blockwise(d, results)), Path(args.figure).parent,
                       Path(args.figure).stem, d["meta"])
    print(f"recovery curve: wrote {out} and {fig}")
    return 0


def _bw_record(rec: dict, versus_dense) -> dict:
    """The block-wise step of one start as a recovery point keeps it: settings, seconds, and the
    held-out perplexity it reached (against dense)."""
    return {"settings": rec["settings"], "tokens": rec["tokens"], "seconds": rec["seconds"],
            "perplexity": rec["perplexity"], "vs_dense": versus_dense(rec["perplexity"])}


def _init(cfg, init: str, compare: bool = False) -> dict:
    """``cfg`` with ``tensorize.init`` (or, for the improved start, ``tensorize.compare_init``) set to ``init``."""
    out = copy.deepcopy(cfg)
    out["tensorize"]["compare_init" if compare else "init"] = init
    return out


if __name__ == "__main__":
    sys.exit(main())
