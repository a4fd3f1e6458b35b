"""What tensorizing saved: parameters and bytes before and after, per matrix, per block and for
the whole model (:func:`size_report`; re-exported by :mod:`compactify.tensorize`)."""
from __future__ import annotations

from torch import nn

from .mpo import MPOLinear


def size_report(model: nn.Module) -> dict:
    """Parameters and bytes before/after, per matrix (``rows``), per block and in total.

    "Before" is the dense model this one came from (an MPO layer counts ``out*in`` + bias
    before). The totals cover the whole model, embeddings and head included, with tied
    weights counted once. A tensorized matrix with more parameters than its dense original
    (only under a plan with ``allow_growth``) is flagged ``larger_than_dense`` and counted in
    ``totals["matrices_larger_than_dense"]``, with a ``totals["warning"]`` that says so.
    """
    from .tensorize import MATRICES, _layers, _module_name

    errors = (getattr(model.config, "compactify", None) or {}).get("relative_errors", {})
    rows = []
    for block in range(len(_layers(model))):
        for matrix in MATRICES:
            name = _module_name(model, block, matrix)
            layer = model.get_submodule(name)
            bias = 0 if layer.bias is None else layer.bias.numel()
            el = next(layer.parameters()).element_size()
            before = layer.out_features * layer.in_features + bias
            after = sum(p.numel() for p in layer.parameters())
            row = {"block": block, "matrix": matrix, "shape": [layer.out_features, layer.in_features],
                   "tensorized": isinstance(layer, MPOLinear), "params_before": before, "params_after": after,
                   "bytes_before": before * el, "bytes_after": after * el, "ratio": after / before,
                   "larger_than_dense": after > before}
            if isinstance(layer, MPOLinear):
                row.update(bond_dims=list(layer.bond_dims), out_factors=list(layer.out_factors),
                           in_factors=list(layer.in_factors), relative_error=errors.get(name))
            rows.append(row)
    blocks = []
    for block in range(len(_layers(model))):
        mine = [r for r in rows if r["block"] == block]
        sums = {k: sum(r[k] for r in mine) for k in ("params_before", "params_after", "bytes_before", "bytes_after")}
        blocks.append({"block": block, "tensorized": sum(r["tensorized"] for r in mine), **sums,
                       "ratio": sums["params_after"] / sums["params_before"]})
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = sum(r["params_before"] - r["params_after"] for r in rows)
    saved_bytes = sum(r["bytes_before"] - r["bytes_after"] for r in rows)
    totals = {"matrices_tensorized": sum(r["tensorized"] for r in rows), "matrices": len(rows),
              "block_params_before": sum(r["params_before"] for r in rows),
              "block_params_after": sum(r["params_after"] for r in rows),
              "model_params_before": params + saved, "model_params_after": params,
              "model_bytes_before": nbytes + saved_bytes, "model_bytes_after": nbytes,
              "model_ratio": params / (params + saved),
              "matrices_larger_than_dense": sum(r["larger_than_dense"] for r in rows)}
    if totals["matrices_larger_than_dense"]:
        grown = [f"{r['block']}.{r['matrix']}" for r in rows if r["larger_than_dense"]]
        totals["warning"] = (f"{len(grown)} tensorized matrices ({', '.join(grown[:5])}{', ...' if len(grown) > 5 else ''}) "
                             "have MORE parameters than their dense originals: the plan allowed growth; "
                             f"block matrices are {totals['block_params_after'] / totals['block_params_before']:.3f}x dense.")
    return {"rows": rows, "blocks": blocks, "totals": totals}
