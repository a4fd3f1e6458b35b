"""Sequential calibration of the activation-aware SVD: each block fitted on the inputs the
*compressed* model gives it, towards the outputs the *dense* model gives.

The activation-aware SVD (:mod:`compactify.aa_init`, ``init="asvd"``) fits every matrix
independently on the dense model's calibration inputs ``X``: it minimises ``||X (W - W')^T||``.
But in the compressed model a matrix never sees ``X``: it sees ``X'``, what the compressed blocks
before it (and the compressed matrices before it in its own block) make of the same text. The
errors of 210 independent fits add up along the depth. GPTQ (Frantar et al. 2022) quantizes
"sequentially" for this reason, feeding each block the already-quantized model's outputs.

For a low-rank factorisation the right fit on ``X'`` has a closed form. We want the rank-``r``
``M`` closest to the dense layer's outputs on the compressed inputs,
``min ||X W^T - X' M^T||_F``. With ``C' = X'^T X' = S S^T`` (Cholesky) and the cross moment
``K = X'^T X``, the unconstrained least-squares solution is ``M0 = W K^T C'^{-1}``, and
``||X W^T - X' M^T||^2 = const + ||(M0 - M) S||^2``, so ``M = [M0 S]_r S^{-1}`` with
``M0 S = W K^T S^{-T}`` (reduced-rank regression). When ``X' = X`` (``K = C'``) this is exactly
the activation-aware SVD, ``[W S]_r S^{-1}``. Nothing here is new mathematics: it is ASVD /
SVD-LLM's whitening with GPTQ's order of work.

How: the inputs of block 0 are recorded once per calibration batch (hidden states and the
block's keyword arguments: rotary embeddings, mask), and every block is run alone on them
(GPTQ's "Catcher"), dense and compressed side by side. Within a block the matrices are fitted
in the order the block reads them (``q, k, v`` -> ``o`` -> ``gate, up`` -> ``down``), each stage
on inputs from the block's already-compressed stages. The result is an ordinary ``asvd`` model
(2-core MPOs of trivial factors): saved, loaded and healed by the same code.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch

from .models import MATRIX_PATHS, blocks
from .tensorize import Plan, tensorize

STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # the order a Llama block reads its matrices


class _Stop(Exception):
    pass


def _linear(layer, matrix: str):
    return layer.get_submodule(MATRIX_PATHS[matrix])


@torch.no_grad()
def block0_inputs(model, batches):
    """Per batch: (hidden states, keyword arguments) that block 0 receives (the rest is not run)."""
    layer0, got = blocks(model)[0], []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        got.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(input_ids=x, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def run_block(layer, hidden, kw):
    out = layer(hidden, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _moments(dense_layer, comp_layer, dense_in, comp_in, matrices, ridge: float = 0.0
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{matrix: (C', K)}``: ``C' = X'^T X' / n`` (plus ``ridge`` x its mean diagonal) and
    ``K = X'^T X / n`` of the stage's input (the matrices of a stage share one input)."""
    reader = matrices[0]
    sums, n, cap = [None, None], 0, {}

    def grab(key):
        def h(module, args):
            cap[key] = args[0].reshape(-1, args[0].shape[-1]).float()
            raise _Stop
        return h

    hd = _linear(dense_layer, reader).register_forward_pre_hook(grab("d"))
    hc = _linear(comp_layer, reader).register_forward_pre_hook(grab("c"))
    try:
        for (xd, kwd), (xc, kwc) in zip(dense_in, comp_in):
            for layer, x, kw in ((dense_layer, xd, kwd), (comp_layer, xc, kwc)):
                try:
                    run_block(layer, x, kw)
                except _Stop:
                    pass
            d, c = cap["d"], cap["c"]
            parts = ((c.T @ c).double(), (c.T @ d).double())
            sums = [p if s is None else s + p for s, p in zip(sums, parts)]
            n += c.shape[0]
    finally:
        hd.remove()
        hc.remove()
    C, K = (s / n for s in sums)
    C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    return {m: (C, K) for m in matrices}


def sequential_asvd(dense, plan: Plan, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4,
                    ridge: float = 1e-2, calibration: Mapping | None = None, progress: bool = False):
    """A copy of ``dense`` with every matrix of ``plan`` replaced by its activation-aware rank-r
    factorisation (the budget of ``init="asvd"``), fitted block by block on the compressed
    model's own inputs towards the dense outputs (see the module docstring). ``dense`` is not
    changed. ``ids``: calibration token ids (never the held-out text). ``ridge``: the regression's
    damping, relative to the mean diagonal of ``C'``: the least-squares map ``M0`` has ``in x in``
    free directions per output, which a few thousand calibration tokens overfit (SmolLM2 at 30%
    kept, 2,048 tokens: 4.3e8 held-out perplexity at 1e-6, 1,929 at 1e-2; data/results/heal/seq_start.json)."""
    from .progress import progress as tqdm

    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{ids.numel()} calibration tokens are fewer than one window of seq_len={seq_len}: "
                         "pass more text or a smaller seq_len.")
    windows = ids[: n * seq_len].view(n, seq_len).to(next(dense.parameters()).device)
    batches = [windows[i:i + batch_size] for i in range(0, n, batch_size)]
    model, was_training = copy.deepcopy(dense), dense.training
    dense.eval()
    model.eval()
    calibration = {**dict(calibration or {}), "sequential": True, "ridge": ridge}
    by_block: dict[int, list[str]] = {}
    for b, m, _ in plan.items():
        by_block.setdefault(b, []).append(m)
    try:
        dense_in = block0_inputs(dense, batches)
        comp_in = [(h.clone(), kw) for h, kw in dense_in]
        layers_d, layers_c = blocks(dense), blocks(model)
        for b in tqdm(range(len(layers_d)), desc="sequential asvd", disable=not progress):
            for stage in STAGES:
                todo = [m for m in stage if m in by_block.get(b, [])]
                if not todo:
                    continue
                stats = {(b, m): v for m, v in _moments(layers_d[b], layers_c[b], dense_in, comp_in, todo, ridge).items()}
                sub = Plan({f"{b}.{m}": plan.entries[f"{b}.{m}"] for m in todo}, plan.cores, plan.allow_growth)
                tensorize(model, sub, init="asvd", stats=stats, calibration=calibration)
                layers_c = blocks(model)
            with torch.no_grad():
                dense_in = [(run_block(layers_d[b], h, kw), kw) for h, kw in dense_in]
                comp_in = [(run_block(layers_c[b], h, kw), kw) for h, kw in comp_in]
    finally:
        dense.train(was_training)
    return model.train(was_training)
