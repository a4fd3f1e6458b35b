"""Layer sensitivity profiling (the paper's Method 3, Fig. 5) and a plan built from it.

The paper tensorizes **one** matrix at a time at a maximum bond dimension χ (the paper's ``Dmax``), measures
the model, and puts it back. We do the same, with two savings that change no number:

* **Replay from the block.** Tensorizing a matrix of block ``b`` cannot change what blocks
  ``0..b-1`` compute, so :class:`BlockReplay` records every block's input once on the profiling
  text and re-runs only blocks ``b..`` and the head. On average that halves each measurement.
* **Swap the weight, not the module.** For measuring, the MPO is contracted back into a dense
  matrix (``MPO.to_matrix()``) and copied into the layer's weight; the output is the same
  function as an ``MPOLinear`` forward (to float rounding) and runs at dense speed. The
  original weight is restored after each point.

The default signal is perplexity on held-out prose (cheap, sensitive); any benchmark of
:mod:`compactify.evaluate` can be used instead, as the paper used MMLU (much slower: it runs
the whole model).

From the profile, :func:`allocate` builds a plan that meets a parameter budget by giving less
sensitive matrices smaller MPOs: a quadratic model of the loss increase per matrix,
calibrated by the measured points, and a Lagrangian choice among a grid of sizes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from .progress import progress as tqdm

from . import mpo as mpo_mod
from .frontier import swapped
from .models import MATRIX_PATHS, MATRIX_TYPES, blocks


class SensitivityError(ValueError):
    """A profile request that names blocks or matrices the model does not have, or bad sizes."""


class BlockReplay:
    """The inputs of every decoder block on a fixed text, recorded once.

    ``loss(start)`` re-runs blocks ``start..`` from the recorded input of block ``start`` and
    returns the mean next-token NLL (nats) over all windows; ``loss(0)`` is the full model.
    ``autocast`` (a torch dtype, e.g. ``torch.bfloat16``; None = the model's dtype) runs every
    forward under ``torch.autocast`` (faster where bf16 matmuls are native), and the dense
    reference is measured the same way, so increases compare like with like.
    """

    def __init__(self, model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
                 autocast: torch.dtype | None = None):
        ids = ids.reshape(-1)
        n = ids.numel() // seq_len
        if n == 0:
            raise SensitivityError(f"The profiling text has {ids.numel()} tokens, fewer than one window of "
                                   f"seq_len={seq_len}: pass more text or a smaller seq_len.")
        self.model, self.seq_len, self.autocast = model, seq_len, autocast
        self.windows = ids[: n * seq_len].view(n, seq_len)
        self.layers = blocks(model)
        device = next(model.parameters()).device
        self.batches = [self.windows[i:i + batch_size].to(device) for i in range(0, n, batch_size)]
        self.inputs: list[list[tuple]] = [[] for _ in self.layers]  # per block, per batch: (hidden, kwargs)

        def record(b):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.inputs[b].append((hidden.detach(), kw))
            return hook

        handles = [layer.register_forward_pre_hook(record(b), with_kwargs=True) for b, layer in enumerate(self.layers)]
        try:
            self.dense_loss = self._full()
        finally:
            for h in handles:
                h.remove()

    def _ctx(self):
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    @torch.no_grad()
    def _full(self) -> float:
        with self._ctx():
            return self._full_sum() / self.tokens

    def _full_sum(self) -> float:
        total = 0.0
        for x in self.batches:
            logits = self.model(input_ids=x, use_cache=False).logits
            total += self._nll_sum(logits, x)
        return total

    @property
    def tokens(self) -> int:
        return self.windows.shape[0] * (self.seq_len - 1)

    @staticmethod
    def _nll_sum(logits: torch.Tensor, x: torch.Tensor) -> float:
        logits = logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()

    @torch.no_grad()
    def loss(self, start: int = 0) -> float:
        """Mean NLL with the model as it is now, recomputing only blocks ``start..``."""
        with self._ctx():
            return self._replay_sum(start) / self.tokens

    def _replay_sum(self, start: int) -> float:
        inner = self.model.model
        total = 0.0
        for i, x in enumerate(self.batches):
            hidden, kw = self.inputs[start][i]
            for layer in self.layers[start:]:
                out = layer(hidden, **kw)
                hidden = out[0] if isinstance(out, tuple) else out
            logits = self.model.lm_head(inner.norm(hidden))
            total += self._nll_sum(logits, x)
        return total


def _linear(model, block: int, kind: str) -> torch.nn.Linear:
    return blocks(model)[block].get_submodule(MATRIX_PATHS[kind])


def check_targets(model, block_ids: Iterable[int], types: Iterable[str]) -> tuple[list[int], list[str]]:
    n = len(blocks(model))
    block_ids = [int(b) if b >= 0 else n + int(b) for b in block_ids]
    bad = [b for b in block_ids if not 0 <= b < n]
    if bad:
        raise SensitivityError(f"Blocks {bad} do not exist: the model has blocks 0..{n - 1}.")
    types = list(types)
    unknown = [t for t in types if t not in MATRIX_TYPES]
    if unknown:
        raise SensitivityError(f"Unknown matrix types {unknown}; use some of {list(MATRIX_TYPES)}.")
    return block_ids, types


def paper_blocks(n_blocks: int) -> list[int]:
    """The paper's 0/5/15/31 of 32 blocks, scaled: first, ~1/6, ~1/2 and last."""
    return sorted({0, round(n_blocks * 5 / 32), round(n_blocks * 15 / 32), n_blocks - 1})


def profile(model, replay: BlockReplay, block_ids: Sequence[int], types: Sequence[str], *,
            chis: Sequence[int] = (), ratios: Sequence[float] = (), cores: int = 3,
            metric: Callable[[int], float] | None = None, progress: bool = True) -> list[dict]:
    """Tensorize one matrix at a time, measure, restore. One record per (block, type, level).

    Levels are bond dimensions (``chis``, the paper's Dmax) and/or fractions of parameters kept
    (``ratios``). Each record holds block, type, level kind and value, chi, parameters kept
    and their ratio, the relative Frobenius error of the MPO, the loss (mean NLL on the replay
    text) and perplexity, and their increase over the dense model. ``metric(block)`` replaces
    the loss (it must return a number where higher means *worse*; default: the replay loss).
    """
    block_ids, types = check_targets(model, block_ids, types)
    if not chis and not ratios:
        raise SensitivityError("Give at least one level: chis=[...] (bond dimensions) or ratios=[...].")
    measure = metric or replay.loss
    dense = replay.dense_loss
    records = []
    todo = [(b, t) for b in block_ids for t in types]
    bar = tqdm(total=len(todo) * (len(chis) + len(ratios)), desc="sensitivity", disable=not progress)
    for b, t in todo:
        lin = _linear(model, b, t)
        original = lin.weight.data.clone()
        with mpo_mod.single_thread():
            sweep = mpo_mod.MPOSweep(original, cores=cores)
        levels = [("chi", c) for c in chis] + [("ratio", r) for r in ratios]
        try:
            for kind, value in levels:
                try:
                    with warnings.catch_warnings(), mpo_mod.single_thread():  # a chi above full rank is clamped
                        warnings.simplefilter("ignore", UserWarning)
                        m = sweep.at(chi=int(value)) if kind == "chi" else sweep.at(target_ratio=float(value))
                except mpo_mod.MPOError as e:  # e.g. a ratio below what chi=1 gives for this shape
                    records.append({"block": b, "type": t, "level": kind, "value": value, "error": str(e)})
                    bar.update()
                    continue
                with swapped(model, {(b, t): m.to_matrix().to(original.dtype)}):  # the one swap-and-restore
                    loss = measure(b)
                records.append({"block": b, "type": t, "level": kind, "value": value, "chi": max(m.bond_dims),
                                "bond_dims": list(m.bond_dims), "params": m.num_params,
                                "dense_params": original.numel(), "ratio": m.num_params / original.numel(),
                                "rel_error": m.relative_error(original), "loss": loss, "ppl": math.exp(loss),
                                "delta_loss": loss - dense, "dense_ppl": math.exp(dense)})
                bar.update()
        finally:
            lin.weight.data.copy_(original)  # whatever happened inside, the dense matrix is back
    bar.close()
    return records


def task_metric(model, tokenizer, task: str, limit: int, seed: int = 0, batch_size: int = 8):
    """A ``metric(block)`` for :func:`profile` that runs one benchmark on the whole model (the
    paper profiled with MMLU accuracy). Returns the error rate ``1 - score``: higher is worse."""
    from .evaluate import run_tasks

    def metric(block: int) -> float:
        res = run_tasks(model, tokenizer, [task], limit=limit, batch_size=batch_size, seed=seed)[task]
        return 1.0 - res["value"]

    return metric


def claims(frame, ratios: Sequence[float], n_blocks: int) -> dict:
    """The paper's two claims, read off the whole-model profile at each compression level.

    ``frame`` (a pandas DataFrame) has one row per measured matrix: ``block``, ``type``,
    ``value`` (the fraction of parameters kept) and ``increase_%`` (perplexity increase over the
    dense model). *Deeper blocks are more compressible*: the Spearman correlation between block
    index and increase, per type and over all types (negative: deeper blocks hurt less; NaN with
    fewer than 3 blocks), and the mean increase in the first and the last third of the
    ``n_blocks`` blocks. *The last MLP matrix is the most sensitive*: the types ranked by their
    mean increase. Returns ``{"per_type": {"<type>@<ratio>": ...}, "ratio_<ratio>": ...}``.
    """
    from scipy.stats import spearmanr

    out = {"per_type": {}}
    for level in ratios:
        sub = frame[np.isclose(frame["value"], level)]
        for t, g in sub.groupby("type", sort=False):
            rho = spearmanr(g["block"], g["increase_%"]).statistic if len(g) > 2 else float("nan")
            out["per_type"][f"{t}@{level}"] = {"mean_increase_%": g["increase_%"].mean(),
                                               "median_increase_%": g["increase_%"].median(), "spearman_depth": rho}
        rho_all = spearmanr(sub["block"], sub["increase_%"]).statistic if sub["block"].nunique() > 2 else float("nan")
        means = sub.groupby("type")["increase_%"].mean().sort_values(ascending=False)
        out[f"ratio_{level}"] = {"spearman_depth_all": rho_all,
                                 "mean_increase_first_third_%": sub[sub["block"] < n_blocks / 3]["increase_%"].mean(),
                                 "mean_increase_last_third_%": sub[sub["block"] >= 2 * n_blocks / 3]["increase_%"].mean(),
                                 "most_sensitive_type": means.index[0], "type_ranking": list(means.index)}
    return out


# ------------------------------------------------------------------ from a profile to a plan

@dataclass
class Choice:
    """One matrix's options: parameters and predicted loss increase at each candidate ratio."""
    block: int
    type: str
    dense_params: int
    ratios: list[float]          # candidate fractions kept (1.0 = leave dense)
    params: list[int]
    cost: list[float]            # predicted loss increase (nats) at each ratio


def error_curve(weight: torch.Tensor, ratios: Sequence[float], cores: int = 3) -> dict[float, tuple[int, float]]:
    """Parameters and relative error of the TT-SVD MPO at each ratio (no model run).

    For 2 and 3 cores the error needs no decomposition per ratio. TT-SVD is a chain of
    orthogonal projections, so its squared error is the sum of the squared singular values it
    discards at each cut: at cut 1 those of the reshaped matrix (computed once), at cut 2 those
    of the ``(r1*d2) x d3`` remainder ``S[:r1] V[:r1]``, whose singular values come from the
    eigenvalues of its small ``d3 x d3`` Gram matrix. This avoids decomposing and rebuilding
    the matrix at each ratio, and is exact (a unit test compares it with
    ``MPO.relative_error``). More cores fall back to decomposing.
    """
    sweep = mpo_mod.MPOSweep(weight, cores=cores)
    dims, out = sweep.dims, {}
    normsq = float((weight.double() ** 2).sum())
    s1sq = sweep.S.double() ** 2
    tails1 = torch.flip(torch.cumsum(torch.flip(s1sq, [0]), 0), [0]).tolist() + [0.0]  # tails1[r] = sum_{k>=r}
    gram_cache: dict[int, list[float]] = {}
    if cores == 3:  # Gram of the cut-2 remainder for every r1 at once: G(r1) = sum_{j<r1} S_j^2 V_j^T V_j
        vr = (sweep.S[:, None].double() * sweep.V.double()).reshape(sweep.S.shape[0], dims[1], dims[2])
        grams = torch.cumsum(torch.einsum("jab,jac->jbc", vr, vr), 0)
    for r in ratios:
        try:
            chi = mpo_mod.chi_for_ratio(dims, r)
        except mpo_mod.MPOError:
            continue
        bonds = mpo_mod.bond_dims(dims, chi)
        params = mpo_mod.count_params(dims, bonds)
        if cores == 2:
            err2 = tails1[bonds[0]]
        elif cores == 3:
            r1, r2 = bonds
            if r1 not in gram_cache:
                # numpy's LAPACK: a small matrix, where torch's threaded eigvalsh pays OpenMP's
                # start-up and waiting on every call.
                eig = torch.from_numpy(np.linalg.eigvalsh(grams[r1 - 1].numpy())).flip(0).clamp_min(0)
                gram_cache[r1] = torch.flip(torch.cumsum(torch.flip(eig, [0]), 0), [0]).tolist() + [0.0]
            tail2 = gram_cache[r1]
            err2 = tails1[r1] + tail2[min(r2, len(tail2) - 1)]
        else:
            m = sweep.at(chi=chi)
            out[r] = (m.num_params, m.relative_error(weight))
            continue
        out[r] = (params, math.sqrt(max(err2, 0.0) / normsq))
    return out


def choices_from_profile(model, records: Sequence[Mapping], ratios: Sequence[float], cores: int = 3,
                         allow_dense: bool = True, dense_types: Sequence[str] = ()) -> list[Choice]:
    """See :func:`_choices`; the SVDs run on one thread (:func:`compactify.mpo.single_thread`)."""
    with mpo_mod.single_thread():
        return _choices(model, records, ratios, cores, allow_dense, dense_types)


def _choices(model, records: Sequence[Mapping], ratios: Sequence[float], cores: int = 3,
             allow_dense: bool = True, dense_types: Sequence[str] = ()) -> list[Choice]:
    """Predict every matrix's loss increase on a grid of ratios from its measured point(s).

    Second-order model: near a trained minimum the loss grows with the *square* of a weight
    perturbation, so ``delta_loss(r) ~ c * rel_error(r)**2`` with one curvature ``c`` per
    matrix, fitted (least squares through 0) to that matrix's measured points. Matrices
    without a measured point get the median curvature of their type. Types in
    ``dense_types`` (e.g. the paper's advice for down_proj) are only offered dense.
    """
    fits: dict[tuple[int, str], float] = {}
    pts: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in records:
        if "rel_error" in r and r["rel_error"] > 0:
            pts.setdefault((r["block"], r["type"]), []).append((r["rel_error"] ** 2, max(r["delta_loss"], 0.0)))
    for key, p in pts.items():
        fits[key] = sum(e * d for e, d in p) / sum(e * e for e, _ in p)
    by_type = {t: sorted(v for (b, tt), v in fits.items() if tt == t) for t in MATRIX_TYPES}
    out = []
    for b in range(len(blocks(model))):
        for t in MATRIX_TYPES:
            w = _linear(model, b, t).weight.data
            dense = w.numel()
            c = fits.get((b, t))
            if c is None:
                vals = by_type[t] or sorted(fits.values())
                if not vals:
                    raise SensitivityError("The profile has no measured point to calibrate the plan.")
                c = vals[len(vals) // 2]
            opts_r, opts_p, opts_c = ([1.0], [dense], [0.0]) if (allow_dense or t in dense_types) else ([], [], [])
            if t not in dense_types:
                for r, (params, err) in sorted(error_curve(w, ratios, cores).items()):
                    opts_r.append(r)
                    opts_p.append(params)
                    opts_c.append(c * err ** 2)
            out.append(Choice(b, t, dense, opts_r, opts_p, opts_c))
    return out


def allocate(choices: Sequence[Choice], keep_ratio: float) -> dict[tuple[int, str], float]:
    """Pick one option per matrix so total parameters <= ``keep_ratio`` x dense, minimising the
    summed predicted loss increase (Lagrangian relaxation of the multiple-choice knapsack:
    each matrix minimises ``cost + lam * params``; bisect ``lam`` until the budget holds).
    Returns ``{(block, type): ratio}`` with 1.0 meaning "leave dense".
    """
    budget = keep_ratio * sum(c.dense_params for c in choices)
    smallest = sum(min(c.params) for c in choices)
    if smallest > budget:
        raise SensitivityError(f"keep_ratio={keep_ratio} is unreachable with these options: the smallest choice "
                               f"keeps {smallest / sum(c.dense_params for c in choices):.3f}. Add smaller ratios.")

    def pick(lam: float) -> list[int]:
        return [min(range(len(c.params)), key=lambda i: (c.cost[i] + lam * c.params[i], c.params[i])) for c in choices]

    def total(sel) -> int:
        return sum(c.params[i] for c, i in zip(choices, sel))

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
    sel = pick(hi)
    return {(c.block, c.type): c.ratios[i] for c, i in zip(choices, sel)}
