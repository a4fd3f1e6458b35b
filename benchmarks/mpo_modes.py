"""Decode and prefill speed of a tensorized SmolLM2 in each MPO inference mode, against dense.

SmolLM2-135M-Instruct (fp32, the cached copy) and the same model tensorized with a uniform plan
keeping ``--keep`` of every block matrix's parameters (TT-SVD, 3 cores), copied three times
and put in the ``factored``, ``contracted`` and ``auto`` modes
(:func:`compactify.mpo_layer.set_inference_mode`), and a second copy of the dense model (an A/A
control: the harness's own error). All are timed round-robin in one process by
:func:`compactify.speed.compare` (batch 1, greedy decode with the KV cache), once per torch thread
count, in a rotated order (``--order rotated``, the default since 2026-12-06): each round starts one
model later, so every model takes every position equally often. In the fixed order of earlier runs
``auto`` was always timed last in a round, the position ``benchmarks/healed_frontier.py`` found
~8% slow (README, healed frontier). The JSON keeps every model's tokens/s with quartiles, the ratios to
dense, the paths ``auto`` chose per bucket of tokens (decided during the warm-up) and the
bytes each mode holds beyond the cores.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless already set), as in
``benchmarks/mpo_linear.py``: spinning OpenMP threads distort 2-thread timings on a shared CPU.

Usage::

    .venv/bin/python benchmarks/mpo_modes.py                 # data/results/benchmarks/mpo_modes.json
    .venv/bin/python benchmarks/mpo_modes.py --threads 1 --repeats 2 --out /tmp/x
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from compactify.config import REPO_ROOT  # noqa: E402
from compactify.mpo_layer import mode_summary, set_inference_mode  # noqa: E402
from compactify.results import save_results  # noqa: E402

MODES = ("factored", "contracted", "auto")


CONTROL = "dense (2nd copy)"


def build(keep: float, control: bool = True):
    """The dense model, its tokenizer and the tensorized copies, one per mode (and a second dense copy)."""
    from compactify.models import load_model
    from compactify.tensorize import Plan, tensorize

    dense, tok = load_model("embedded")
    dense = dense.float().eval()
    t = time.perf_counter()
    mpo = tensorize(copy.deepcopy(dense), Plan.uniform(dense.config.num_hidden_layers, target_ratio=keep),
                    errors=False).eval()
    seconds = time.perf_counter() - t
    models = {"dense": dense}
    for mode in MODES:
        m = copy.deepcopy(mpo)
        set_inference_mode(m, mode)
        models[mode] = m
    if control:
        models[CONTROL] = copy.deepcopy(dense)
    return models, tok, seconds


def factored_choices(model) -> dict:
    """``auto``'s exceptions: per bucket of tokens, the layers that chose factored, with their timings."""
    from compactify.mpo_layer import MPOLinear

    out: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, MPOLinear):
            for bucket, d in m.auto_decisions.items():
                if d["path"] == "factored":
                    out.setdefault(str(bucket), {})[name] = {k: d[k] for k in ("factored_s", "contracted_s", "decided_by")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.3, help="fraction of each block matrix's parameters kept")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, one comparison each")
    ap.add_argument("--repeats", type=int, default=None,
                    help="round-robin rounds per comparison (default: twice the number of models when rotated, else 3)")
    ap.add_argument("--order", choices=["rotated", "fixed"], default="rotated",
                    help="rotated: each round starts one model later; fixed: the same order every round (before 2026-12-06)")
    ap.add_argument("--no-control", action="store_true", help="leave out the second dense copy (the A/A control)")
    ap.add_argument("--new-tokens", type=int, default=8, help="k of the decode rate (k-1)/(t_k - t_1)")
    ap.add_argument("--prefill", type=int, default=32, help="prompt tokens of the prefill measurement")
    ap.add_argument("--out", default=None, help="directory for mpo_modes.json (default data/results/benchmarks)")
    args = ap.parse_args(argv)
    if not 0 < args.keep <= 1 or min(args.threads) < 1 or (args.repeats or 1) < 1 or args.new_tokens < 2 or args.prefill < 1:
        ap.error("need 0 < --keep <= 1, --threads >= 1, --repeats >= 1, --new-tokens >= 2, --prefill >= 1")
    from compactify import speed

    t_start, load_before = time.perf_counter(), os.getloadavg()
    models, tok, tensorize_s = build(args.keep, control=not args.no_control)
    rotate = args.order == "rotated"
    repeats = args.repeats or (2 * len(models) if rotate else 3)
    prompt = "The history of the English language"
    prefill_ids = tok("Linear algebra is the branch of mathematics concerning linear equations and their "
                      "representations in vector spaces and through matrices. " * 4,
                      return_tensors="pt").input_ids[:, : args.prefill]
    runs = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m in MODES[1:]:  # auto decides afresh for this thread count (its timings depend on it)
            set_inference_mode(models[m], m)
        res = speed.compare(models, tok, prefill_ids, prompt, new_tokens=args.new_tokens, repeats=repeats,
                            reference="dense", rotate=rotate)
        runs[str(threads)] = {
            "models": {n: {"decode_tokens_per_s": res[n]["decode"], "prefill_tokens_per_s": res[n]["prefill"],
                           "decode_ratio_to_dense": res[n]["decode_ratio"], "prefill_ratio_to_dense": res[n]["prefill_ratio"],
                           "decode_ratio_rounds": res[n].get("decode_ratio_rounds"),
                           **({"mpo_mode": mode_summary(models[n])} if n in MODES else {})} for n in models},
            "auto_factored_layers": factored_choices(models["auto"]), "setup": res["_setup"]}
        print(f"{threads} thread(s): decode x dense " + ", ".join(
            f"{n} {res[n]['decode_ratio']:.2f}" for n in models if n != "dense") + " | prefill x dense " + ", ".join(
            f"{n} {res[n]['prefill_ratio']:.2f}" for n in models if n != "dense"), flush=True)
    data = {"settings": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "keep": args.keep, "cores": 3,
                         "plan": "Plan.uniform (every block matrix)", "threads": args.threads, "repeats": repeats,
                         "order": args.order, "control": None if args.no_control else CONTROL,
                         "new_tokens": args.new_tokens, "prefill_tokens": int(prefill_ids.shape[1]), "decode_prompt": prompt,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_before": load_before,
                         "loadavg_after": os.getloadavg(), "tensorize_s": tensorize_s,
                         "wall_s": time.perf_counter() - t_start},
            "runs": runs}
    out = Path(args.out) if args.out else REPO_ROOT / "data/results/benchmarks"
    path = save_results(out / "mpo_modes.json", data, device="cpu")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
