"""Inference modes of a model's MPO layers: :func:`set_inference_mode`, :func:`mode_summary`,
and the context managers :func:`inference_mode_set` and :func:`contracted`.

The modes themselves (``factored``, ``contracted``, ``auto``), their memory and the rule that
keeps training on the factored path are :class:`~compactify.mpo_layer.MPOLinear`'s and
documented in :mod:`compactify.mpo_layer`; this module sets them on every layer of a model at
once and reports what the layers chose. Imported by ``compactify.mpo_layer`` (the usual place
to import these from).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from torch import nn

from .mpo_layer import MPOLinear

MODE_HELP = ("factored (the cores only, least memory), contracted (W cached once: dense speed, out*in elements "
             "per layer more) or auto (per layer and bucket of tokens, whichever is measured faster)")


def _mpo_layers(model: nn.Module) -> list[MPOLinear]:
    return [m for m in model.modules() if isinstance(m, MPOLinear)]


def mode_summary(model: nn.Module) -> dict:
    """Where a model's MPO layers stand: ``{"layers", "modes": {mode: layers}, "auto_decisions":
    {bucket: {"factored": layers, "contracted": layers}}, "decided_by": {how: decisions},
    "extra_bytes"`` (the cached ``W`` now held), ``"extra_bytes_all_contracted"`` (all of them),
    ``"core_bytes"}``. ``auto`` layers decide lazily, so call this after a run to see its choices."""
    layers = _mpo_layers(model)
    modes: dict[str, int] = {}
    buckets: dict[int, dict[str, int]] = {}
    how: dict[str, int] = {}
    for m in layers:
        modes[m.mode] = modes.get(m.mode, 0) + 1
        if m.mode != "auto":
            continue
        for b, d in sorted(m.auto_decisions.items()):
            row = buckets.setdefault(b, {"factored": 0, "contracted": 0})
            row[d["path"]] += 1
            how[d["decided_by"]] = how.get(d["decided_by"], 0) + 1
    return {"layers": len(layers), "modes": modes, "auto_decisions": dict(sorted(buckets.items())), "decided_by": how,
            "extra_bytes": sum(m._dense.numel() * m._dense.element_size() for m in layers if m._dense is not None),
            "extra_bytes_all_contracted": sum(m.out_features * m.in_features * m.cores[0].element_size() for m in layers),
            "core_bytes": sum(c.numel() * c.element_size() for m in layers for c in m.cores)}


def decide_seconds(model: nn.Module) -> float:
    """Seconds the model's ``auto`` layers have spent deciding so far (timing both paths on the
    first input of each size: a one-off cost, to be left out of a speed measurement). 0 without
    MPO layers."""
    return sum(d.get("decide_s", 0.0) for m in _mpo_layers(model) for d in m.auto_decisions.values())


def set_inference_mode(model: nn.Module, mode: str, tokens: Sequence[int] | None = None) -> dict:
    """Put every :class:`MPOLinear` of ``model`` in ``mode`` (see the module docstring) and
    return :func:`mode_summary`. Earlier ``auto`` decisions and cached matrices are dropped;
    ``contracted`` builds every ``W`` now. With ``auto``, ``tokens`` (e.g. ``(1, 32)``) has the
    buckets of those numbers of tokens decided now, on random inputs, instead of on first use.
    Warns when some decision came from the cost model rather than a measurement."""
    if mode not in MPOLinear.MODES:
        raise ValueError(f"Unknown MPO inference mode {mode!r}: use {MODE_HELP}.")
    tokens = list(tokens or [])
    if tokens and mode != "auto":
        raise ValueError(f"tokens={tokens} pre-decides auto's buckets; mode {mode!r} has none (pass tokens=None).")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tokens):
        raise ValueError(f"tokens must be positive whole numbers of tokens, not {tokens}.")
    layers = _mpo_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MPOLinear layer, so there is no inference mode to set "
                         "(a dense model needs none: call this only on tensorized models).")
    for m in layers:
        m.mode, m.auto_decisions = mode, {}
        m.release_dense()
        if mode == "contracted":
            m.dense_matrix()
        for t in tokens:
            c = m.cores[0]
            x = torch.randn(t, m.in_features, device=c.device, dtype=c.dtype)
            m.auto_decisions[m.bucket(t)] = m.decide(x)
        if tokens and all(d["path"] == "factored" for d in m.auto_decisions.values()):
            m.release_dense()
    summary = mode_summary(model)
    if summary["decided_by"].get("cost model"):
        why = sorted({d.get("why", "") for m in layers for d in m.auto_decisions.values() if d["decided_by"] == "cost model"})
        warnings.warn(f"auto: {summary['decided_by']['cost model']} decision(s) made by the cost model, not measured "
                      f"({'; '.join(why)}).", stacklevel=2)
    return summary


def prepare_compiled(model: nn.Module, tokens: int = 1) -> int:
    """Make every :class:`MPOLinear` of ``model`` ready to be traced by ``torch.compile`` for calls
    of ``tokens`` tokens, in its current mode: its contraction plan made, ``contracted``'s ``W``
    built, ``auto``'s bucket decided (measured eagerly, since nothing can be timed while tracing;
    the decision compares eager paths). Returns how many layers it prepared (0: a dense model)."""
    layers = _mpo_layers(model)
    for m in layers:
        m.plan(tokens)
        if m.mode == "contracted":
            m.dense_matrix()
        elif m.mode == "auto" and m.bucket(tokens) not in m.auto_decisions:
            c = m.cores[0]
            with torch.no_grad():
                m.auto_path(torch.randn(tokens, m.in_features, device=c.device, dtype=c.dtype))
    return len(layers)


@contextlib.contextmanager
def inference_mode_set(model: nn.Module, mode: str, tokens: Sequence[int] | None = None):
    """:func:`set_inference_mode` within a block (yields its summary); afterwards every layer has
    its former mode and decisions back and the cached matrices are freed."""
    layers = _mpo_layers(model)
    before = [(m, m.__dict__.get("mode"), m.auto_decisions) for m in layers]
    try:
        yield set_inference_mode(model, mode, tokens)
    finally:
        for m, old, decisions in before:
            m.release_dense()
            m.auto_decisions = decisions
            if old is None:
                m.__dict__.pop("mode", None)  # back to the class default
            else:
                m.mode = old


@contextlib.contextmanager
def contracted(model: nn.Module):
    """Within this block every :class:`MPOLinear` of ``model`` is in ``contracted`` mode: the
    same function (up to float rounding) at dense speed; yields the number of MPO layers.

    For measuring *quality* (perplexity, benchmark accuracy) under ``torch.no_grad()``: on a
    CPU the factored forward is several times slower than the dense one (many small einsums;
    ``benchmarks/mpo_linear.py`` measures it). Where gradients to the cores are wanted the layers run factored
    (the cache has no gradient path). Afterwards the former modes are back, the matrices freed.
    """
    if not _mpo_layers(model):
        yield 0
        return
    with inference_mode_set(model, "contracted") as summary:
        yield summary["layers"]
