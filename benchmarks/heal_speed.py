"""Fig. 3 analogue: how fast each model heals, for the same token budget, side by side.

The paper (Fig. 3) reports healing time on 8 A10G GPUs for the original LLaMA-2 7B, its 8-bit
and 4-bit versions and the tensorized models, and says tensorized models heal about 2x faster.
Here the same healing (``compactify.heal``: the config's processes, gloo, FSDP2 where more than one, its
``heal`` section, the same packed data and number of steps) runs on

* ``original``: the dense model, fine-tuned (``heal.trainable`` selects the same groups:
  on a dense model that is every block matrix and norm);
* ``tensorized``: the MPO-compressed model: ``--tensorized DIR`` (written by ``compactify.tensorize``
  and ``save_pretrained``), or else built here by tensorizing all seven matrices of every block
  to ``--ratio`` of their parameters (the paper's "88%" model keeps 30% of LLaMA-2 7B's
  parameters; SmolLM2's tied embedding is 21% of the model, so ratio 0.2 gives ~37%);

alternately, ``--rounds`` times, so that the load other jobs put on this shared machine hits
both alike, once per healing loss of ``--losses`` (``lm``: next-token loss; ``kd``: distillation,
whose online teacher -- the original model -- runs beside the student and is part of the cost).
Measured per run: wall time (start to healed model saved), training time (the
optimizer steps only), tokens/s (all steps, and steady state without the first, which also
allocates the AdamW state) and peak resident memory per process.

8-bit and 4-bit (bitsandbytes) models are checked for trainability rather than timed: their
weights are integer tensors, which cannot require gradients, so healing them would mean
training adapters beside them (QLoRA), a different method. The check records what really
happens when one tries.

``--lowrank DIR`` adds a third model, a low-rank one (``tensorize.init: asvd``; its layers train as
two thin GEMMs, ``MPOLinear.materializes``). Processes and activation checkpointing default to the
config's ``heal`` section (the study's healing: 1 process, no checkpointing).

Usage::

    .venv/bin/python benchmarks/heal_speed.py [--tensorized DIR | --ratio 0.2] [--lowrank DIR] [--steps 8 --rounds 1] [--losses lm kd]

writes ``data/results/benchmarks/heal_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from compactify.config import REPO_ROOT, load_config, run_dir
from compactify.heal import HealConfig, launch, select_trainable
from compactify.heal_study import _cfg as heal_overrides
from compactify.results import save_results

OUT = REPO_ROOT / "data" / "results" / "benchmarks" / "heal_speed.json"


def summarize(r: dict) -> dict:
    """The numbers of one healing run that Fig. 3 needs."""
    curve = r["loss_curve"]
    tps = r["plan"]["tokens_per_step"]
    steady = sum(c["seconds"] for c in curve[1:])
    return {"wall_seconds": r["wall_seconds"], "train_seconds": r["train_seconds"],
            "tokens": r["tokens_this_run"], "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_steady": tps * (len(curve) - 1) / steady if len(curve) > 1 else None,
            "seconds_per_step": [c["seconds"] for c in curve], "compute": r["compute"], "loss": r["loss"],
            "peak_rss_mib_per_rank": r["peak_rss_mib_per_rank"], "params": r["params"],
            "first_loss": r["first_loss"], "final_loss": r["final_loss"]}


def build_tensorized(model_ref: str, ratio: float, out: Path, cores: int) -> tuple[Path, dict]:
    """Tensorize every block matrix of ``model_ref`` to ``ratio`` of its parameters; save; report sizes."""
    from compactify.models import load_model, save_model_dir
    from compactify.tensorize import MATRICES, Plan, size_report, tensorize

    model, tok = load_model(model_ref)
    plan = Plan.uniform(len(model.model.layers), target_ratio=ratio, matrices=tuple(MATRICES), cores=cores)
    tensorize(model, plan, progress=True)
    totals = size_report(model)["totals"]
    save_model_dir(model, tok, out)
    return out, {"plan": f"all {len(MATRICES)} matrices of every block, target_ratio={ratio}, {cores} cores",
                 **{k: totals[k] for k in ("model_params_before", "model_params_after", "model_ratio")}}


def described(path: Path) -> dict:
    """What a given compressed directory holds, from its config.json (written by compactify.tensorize)."""
    info = json.loads((path / "config.json").read_text()).get("compactify", {})
    specs = sorted({json.dumps(v, sort_keys=True) for v in info.get("plan", {}).get("entries", {}).values()})
    shape = ("rank-r factorisations (2 cores of trivial factors)" if info.get("init") == "asvd"
             else f"{info.get('plan', {}).get('cores')} cores")
    return {"plan": f"given: {path}; {len(info.get('modules', {}))} MPO matrices ({info.get('init', 'tt_svd')}), "
                    f"specs {', '.join(specs)}, {shape}"}


def quantized_trainability(model_ref: str, bits: int, groups: list[str]) -> dict:
    """Quantize with bitsandbytes and try to make its weights trainable, as healing would."""
    from compactify.models import load_model
    from compactify.quantize import quantize

    model, _ = load_model(model_ref)
    quantize(model, bits)
    layer = next(m for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
    try:
        layer.weight.requires_grad_(True)
        error = None
    except RuntimeError as e:
        error = str(e)
    counts = select_trainable(model, groups)
    return {"bits": bits, "layer": type(layer).__name__, "weight_class": type(layer.weight).__name__,
            "weight_dtype": str(layer.weight.dtype), "requires_grad_error": error,
            "trainable_params_with_heal_trainable": counts["trainable"], "total_params": counts["total"],
            "trainable": error is None,
            "why_not": None if error is None else (
                f"bitsandbytes stores the {bits}-bit weights as {layer.weight.dtype} tensors, which cannot require "
                f"gradients ({error}); with heal.trainable={groups} only {counts['trainable']:,} of "
                f"{counts['total']:,} parameters (norms, biases) could train. Healing a quantized model means "
                "training LoRA adapters beside frozen quantized weights (QLoRA), a different method, not timed here.")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--original", default=None, help="the dense model (default: the config's model)")
    ap.add_argument("--tensorized", default=None, help="an MPO-compressed model dir (default: build one, --ratio)")
    ap.add_argument("--ratio", type=float, default=0.2, help="target ratio when building the tensorized model")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (same for every model)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating repetitions")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: the config's heal.nproc)")
    ap.add_argument("--lowrank", default=None,
                    help="also time this low-rank model dir (tensorize.init: asvd, e.g. a start of scripts/recovery_curve.py)")
    ap.add_argument("--losses", nargs="+", default=["lm", "kd"], choices=("lm", "kd", "mix"),
                    help="healing losses to time (each model healed once per loss and round)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--activation-checkpointing", type=int, default=None, choices=(0, 1),
                    help="1: every model recomputes activations (default: the config's heal.activation_checkpointing)")
    ap.add_argument("--skip-quantized", action="store_true")
    ap.add_argument("--compile-loss", choices=("0", "1", "both"), default="0",
                    help="heal.compile_loss for every run (0/1), or both: each model also healed with the loss "
                         "compiled ('<name>+compiled_loss'), alternating, and the speed-up recorded")
    args = ap.parse_args(argv)

    given = {"heal.nproc": args.nproc, "heal.activation_checkpointing": None if args.activation_checkpointing is None
             else bool(args.activation_checkpointing)}
    cfg = load_config(args.config, {"heal.steps": args.steps, "heal.resume": False,  # steps override heal.tokens
                                    "heal.checkpoint_every": 10**6, "device": "cpu",
                                    **{k: v for k, v in given.items() if v is not None}})
    hc = HealConfig.from_cfg(cfg)
    args.nproc = hc.nproc
    work = run_dir(cfg) / "heal_speed"
    original = args.original or cfg["model"]
    if args.tensorized:
        tensorized, compression = Path(args.tensorized), described(Path(args.tensorized))
    else:
        tensorized, compression = build_tensorized(original, args.ratio, work / "tensorized_model",
                                                   cfg["mpo"]["cores"])
    models = {"original": original, "tensorized": str(tensorized), **({"lowrank": args.lowrank} if args.lowrank else {})}
    if args.lowrank:
        compression["lowrank"] = described(Path(args.lowrank))["plan"]
    plain = list(models)
    if args.compile_loss == "both":
        models.update({f"{n}+compiled_loss": models[n] for n in plain})
    load = {"before": os.getloadavg()}
    runs: dict[str, dict] = {loss: {name: [] for name in models} for loss in args.losses}
    for rnd in range(args.rounds):
        for loss in args.losses:
            for name, ref in models.items():
                out = work / f"{name}_{loss}_r{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"== {name}, loss {loss} (round {rnd + 1}/{args.rounds}): {ref}", flush=True)
                fused = args.compile_loss == "1" or name.endswith("+compiled_loss")
                over = heal_overrides(cfg, {"heal.loss": loss, "heal.compile_loss": fused})
                runs[loss][name].append(summarize(launch(ref, out, over, nproc=args.nproc)))
                shutil.rmtree(out, ignore_errors=True)  # checkpoints (~3x the model) and the healed model: not needed
    load["after"] = os.getloadavg()

    def med(loss, name, key):
        return statistics.median(r[key] for r in runs[loss][name])

    def peak(loss, name):
        return statistics.median(max(r["peak_rss_mib_per_rank"]) for r in runs[loss][name])

    ratios = {}
    for loss in args.losses:
        ratios[loss] = {f"original_over_tensorized_{k}": med(loss, "original", k) / med(loss, "tensorized", k)
                        for k in ("wall_seconds", "train_seconds")}
        ratios[loss]["tensorized_over_original_tokens_per_s_steady"] = (
            med(loss, "tensorized", "tokens_per_s_steady") / med(loss, "original", "tokens_per_s_steady"))
        ratios[loss]["tensorized_over_original_peak_rss"] = peak(loss, "tensorized") / peak(loss, "original")
        if "lowrank" in models:
            ratios[loss]["lowrank_over_original_tokens_per_s_steady"] = (
                med(loss, "lowrank", "tokens_per_s_steady") / med(loss, "original", "tokens_per_s_steady"))
            ratios[loss]["lowrank_over_tensorized_tokens_per_s_steady"] = (
                med(loss, "lowrank", "tokens_per_s_steady") / med(loss, "tensorized", "tokens_per_s_steady"))
        if args.compile_loss == "both":
            ratios[loss]["compiled_loss_speedup_tokens_per_s_steady"] = {
                n: med(loss, f"{n}+compiled_loss", "tokens_per_s_steady") / med(loss, n, "tokens_per_s_steady") for n in plain}
    tokens_per_s = {loss: {name: med(loss, name, "tokens_per_s_steady") for name in models} for loss in args.losses}
    quantized = [] if args.skip_quantized else [quantized_trainability(models["original"], b, hc.trainable)
                                                for b in (8, 4)]
    data = {"what": f"healing speed, same data and steps, {args.nproc} CPU process(es) (gloo, {hc.strategy}), alternating runs",
            "paper_claim": "tensorized models heal ~2x faster (Fig. 3, 8x A10G)",
            "models": models, "compression": compression, "steps": args.steps, "rounds": args.rounds, "nproc": args.nproc,
            "tokens_per_step": hc.seq_len * hc.batch_per_rank * args.nproc, "trainable": hc.trainable,
            "activation_checkpointing": hc.activation_checkpointing, "compile_loss": args.compile_loss,
            "losses": args.losses, "load_average": load, "tokens_per_s_steady": tokens_per_s, "runs": runs,
            "ratios": ratios, "quantized": quantized}
    save_results(args.out, data, cfg, device="cpu")
    for loss in args.losses:
        print(loss, {k: round(v, 1) for k, v in tokens_per_s[loss].items()},
              {k: round(v, 3) if isinstance(v, float) else {n: round(x, 3) for n, x in v.items()} for k, v in ratios[loss].items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
