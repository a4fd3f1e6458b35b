"""Notebook 03's experiments, as functions a reader can rerun and test.

* :func:`plans`: one budget's two plans -- the sensitivity plan (notebook 02's profile, spent by
  :func:`compactify.sensitivity.allocate`) and the uniform plan with the same parameters.
* :func:`compare_plans`: every plan of every budget of ``tensorize.keep_ratios`` built from the
  dense model and scored on held-out prose; the main plan's model is kept.
* :func:`improved_start`: the main plan again, cores fitted to calibration activations
  (``tensorize.compare_init``, :mod:`compactify.aa_init`).
* :func:`table1` and :func:`fig1a`: the paper's Table I columns and one real matrix for Fig. 1a.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Mapping, Sequence

from . import aa_init, sensitivity as S
from .tensorize import MATRICES, Plan, size_report, tensorize


def plans(choices: Sequence[S.Choice], keep: float, n_blocks: int, cores: int,
          leave_down_dense: bool) -> tuple[dict[str, Plan], dict, float]:
    """The sensitivity plan and the uniform plan that keep ``keep`` of the block parameters, the
    allocation behind the first, and its predicted NLL increase (the sum of the chosen options' costs).
    With ``leave_down_dense`` the uniform plan leaves down_proj dense too and compresses the rest
    harder, so both plans keep the same share."""
    alloc = S.allocate(choices, keep_ratio=keep)
    planned = Plan({f"{b}.{t}": {"target_ratio": r} for (b, t), r in alloc.items() if r < 1.0}, cores=cores)
    if leave_down_dense:
        share = sum(c.dense_params for c in choices if c.type == "down") / sum(c.dense_params for c in choices)
        uniform = Plan.uniform(n_blocks, target_ratio=(keep - share) / (1 - share),
                               matrices=[m for m in MATRICES if m != "down"], cores=cores)
    else:
        uniform = Plan.uniform(n_blocks, target_ratio=keep, cores=cores)
    predicted = sum(c.cost[c.ratios.index(alloc[(c.block, c.type)])] for c in choices)
    return {"sensitivity": planned, "uniform": uniform}, alloc, predicted


def row(keep: float, plan: str, model, ppl: float, dense_ppl: float, seconds: float,
        predicted: float | None = None) -> dict:
    """One line of notebook 03's comparison table: what a plan kept and what it cost."""
    rep = size_report(model)["totals"]
    return {"keep_target": keep, "plan": plan, "block_params_kept": rep["block_params_after"] / rep["block_params_before"],
            "model_params": rep["model_params_after"], "ppl": ppl, "ppl_increase_%": 100 * (ppl / dense_ppl - 1),
            "matrices_tensorized": rep["matrices_tensorized"], "decompose_seconds": seconds,
            "predicted_delta_nll": predicted, "measured_delta_nll": math.log(ppl / dense_ppl)}


def compare_plans(dense, tokenizer, choices: Sequence[S.Choice], cfg: Mapping, score: Callable, dense_ppl: float
                  ) -> tuple[list[dict], dict]:
    """Build every plan of every budget (``tensorize.keep_ratios``) from a copy of ``dense`` with the
    configured init and score it (``score(model) -> perplexity``). Returns the table rows and the
    main model (``tensorize.main_keep_ratio``, ``main_plan``) with its plan and allocation."""
    tc, cores = cfg["tensorize"], cfg["mpo"]["cores"]
    rows, built = [], {}
    for keep in tc["keep_ratios"]:
        both, alloc, predicted = plans(choices, keep, len(dense.model.layers), cores, tc["leave_down_dense"])
        for name, plan in both.items():
            t0 = time.perf_counter()
            model = aa_init.tensorize_from_config(copy.deepcopy(dense), tokenizer, plan, cfg)  # tensorize.init
            seconds = time.perf_counter() - t0
            rows.append(row(keep, name, model, score(model), dense_ppl, seconds,
                            predicted if name == "sensitivity" else None))
            if keep == tc["main_keep_ratio"] and name == tc["main_plan"]:
                built = {"model": model, "plan": plan, "alloc": alloc}
            else:
                del model
    return rows, built


def improved_start(dense, tokenizer, plan: Plan, cfg: Mapping) -> tuple[object, float]:
    """The same plan and bond dimensions from ``tensorize.compare_init`` (the activation-aware MPO:
    cores fitted to the matrices' calibration inputs), and the seconds it took, calibration included."""
    t0 = time.perf_counter()
    init = cfg["tensorize"]["compare_init"]
    if init == "asvd_seq":
        return aa_init.sequential_from_config(dense, tokenizer, plan, cfg), time.perf_counter() - t0
    stats, calibration = aa_init.activation_stats(dense, tokenizer, cfg, plan)
    model = tensorize(copy.deepcopy(dense), plan, init=init, stats=stats, calibration=calibration,
                      aa_options=aa_init.options_from_config(cfg) if init == "activation_aware" else None)
    return model, time.perf_counter() - t0


def table1(dense, model, cfg: Mapping):
    """The paper's Table I columns (bytes, parameters, precision) for the original and the tensorized model."""
    import pandas as pd

    from .models import model_bytes

    tc, tot = cfg["tensorize"], size_report(model)["totals"]
    t = pd.DataFrame([
        {"model": "original", "bytes": model_bytes(dense), "parameters": tot["model_params_before"], "precision": cfg["dtype"]},
        {"model": f"tensorized ({tc['main_plan']} plan, {100 * tc['main_keep_ratio']:.0f}% of block params)",
         "bytes": model_bytes(model), "parameters": tot["model_params_after"], "precision": cfg["dtype"]},
    ])
    t["MB"] = (t["bytes"] / 1e6).round(1)
    t["parameters (M)"] = (t["parameters"] / 1e6).round(2)
    return t


def fig1a(dense, alloc: Mapping, cfg: Mapping) -> dict:
    """Fig. 1a's real matrix: the k_proj of the middle block, decomposed at the share the plan gave it
    (the main budget if the plan left it dense): its factors, bonds, error and cut spectra."""
    from . import mpo as M

    b, t = len(dense.model.layers) // 2, "k"
    w = dense.model.layers[b].self_attn.k_proj.weight
    r = alloc.get((b, t), 1.0)
    m = M.decompose(w, target_ratio=r if r < 1.0 else cfg["tensorize"]["main_keep_ratio"], cores=cfg["mpo"]["cores"])
    return {"name": f"block {b} k_proj", "shape": list(w.shape), "out_factors": list(m.out_factors),
            "in_factors": list(m.in_factors), "bond_dims": list(m.bond_dims), "chi": max(m.bond_dims),
            "params": m.num_params, "dense_params": w.numel(), "rel_error": m.relative_error(w),
            "spectra": [x.tolist() for x in M.cut_spectra(w, len(m.out_factors), in_factors=m.in_factors,
                                                           out_factors=m.out_factors)]}
