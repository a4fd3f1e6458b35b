"""The steps of the MPO primer (notebook 01) that are more than a call: the chi sweep of the toy
matrices, the error-against-size curves of a real matrix, and the record the notebook saves.

Everything here is computed by :mod:`compactify.mpo`; these functions only run it over a grid
and collect the numbers in the shape the notebook prints, plots and writes to its result JSON.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .models import MATRIX_PATHS, load_model
from .mpo import (MPO, MPOSweep, bond_dims, count_params, cut_spectra, decompose, error_bound, factorize, low_rank_curve,
                  max_bond_dims)

CURVE_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # fractions of parameters kept along each MPO curve


def toy_sweep(smooth: torch.Tensor, noise: torch.Tensor, chis: Sequence[int], cores: int = 3) -> list[dict]:
    """One row per bond dimension chi for the two toy matrices (same square shape): parameters
    of the MPO counted on its cores and by the closed form ``count_params``, the paper's
    ``2*36*chi + 36*chi**2`` where it applies (216 x 216 on 3 cores, else None), the fraction of
    parameters kept, the relative error of the smooth matrix next to its TT-SVD bound
    (``error_bound`` of its cut spectra), and the relative error of the random matrix.

    A chi above the largest bond the factors allow is left out: ``decompose`` would clamp it
    (the MPO is then exact), so its row would repeat the full-bond one.
    """
    n = smooth.shape[0]
    dims = [o * i for o, i in zip(factorize(n, cores), factorize(n, cores))]  # decompose's default factors
    spectra = cut_spectra(smooth, cores)
    rows = []
    for chi in [c for c in chis if c <= max(max_bond_dims(dims))]:
        m = decompose(smooth, chi=chi, cores=cores)
        rows.append({"chi": chi, "params": m.num_params, "closed_form": count_params(dims, bond_dims(dims, chi)),
                     "paper_formula": 2 * 36 * chi + 36 * chi ** 2 if cores == 3 and n == 216 else None,
                     "kept": m.num_params / n ** 2, "error_smooth": m.relative_error(smooth),
                     "bound_smooth": error_bound(spectra, m.bond_dims),
                     "error_random": decompose(noise, chi=chi, cores=cores).relative_error(noise)})
    return rows


def load_block(model_name: str, block: int) -> dict[str, torch.Tensor]:
    """The seven weight matrices of one decoder block (``{type: weight}``, float32 on the CPU,
    copies), the model itself released: the primer needs its matrices, not the model."""
    model, _ = load_model(model_name, dtype=torch.float32, device="cpu")
    weights = {t: model.get_submodule(f"model.layers.{block}.{path}").weight.detach().clone()
               for t, path in MATRIX_PATHS.items()}
    del model
    return weights


def error_curves(weight: torch.Tensor, ratios: Sequence[float] = CURVE_RATIOS,
                 cores: Sequence[int] = (3, 2)) -> dict[str, list[tuple[float, float, int]]]:
    """Relative error against the fraction of parameters kept, for MPOs of each number of
    ``cores`` (TT-SVD at each target ratio, the first SVD shared through :class:`MPOSweep`) and
    for the plain truncated SVD of the matrix at every rank that is not larger than the matrix.
    Each point is ``(fraction kept, relative error, chi or rank)``; the keys are the legend labels
    ("MPO, 3 cores", ..., "truncated SVD of W")."""
    dense = weight.numel()
    curves = {}
    for k in cores:
        sweep = MPOSweep(weight, cores=k)
        pts = [sweep.at(target_ratio=r) for r in ratios]
        curves[f"MPO, {k} cores"] = [(m.num_params / dense, m.relative_error(weight), max(m.bond_dims)) for m in pts]
    params, errors = low_rank_curve(weight)
    curves["truncated SVD of W"] = [(p / dense, e, r + 1) for r, (p, e) in enumerate(zip(params, errors)) if p <= dense]
    return curves


def real_matrix_result(name: str, weight: torch.Tensor, curves: Mapping[str, Sequence[tuple]], mpo: MPO,
                       layer) -> dict:
    """The record of section 5 for the result JSON: the matrix, its curves (points as
    ``{kept, rel_error, chi_or_rank}``) and, for ``mpo`` (the MPO keeping 30% of the parameters)
    and its ``layer`` (:class:`MPOLinear`), the bonds, the error and the forward FLOPs and bytes
    moved at one token, relative to the dense layer."""
    return {"name": name, "shape": list(weight.shape),
            "curves": {k: [{"kept": p[0], "rel_error": p[1], "chi_or_rank": p[2]} for p in v] for k, v in curves.items()},
            "chi70": {"bond_dims": list(mpo.bond_dims), "rel_error": mpo.relative_error(weight),
                      "flops_ratio_batch1": layer.flops(1) / layer.dense_flops(1),
                      "bytes_ratio_batch1": layer.bytes(1) / layer.dense_bytes(1)}}
