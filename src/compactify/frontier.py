"""The compression-quality frontier: every block matrix of a model compressed by one method at
one budget, measured; repeated over methods (:mod:`compactify.lowrank`) and budgets.

The paper never compares its MPOs with plain low rank at the same parameter count, nor with
the activation-aware low-rank methods (ASVD, SVD-LLM) that beat plain truncation by orders of
magnitude before any retraining. This module measures all of them the same way:

1. :func:`input_stats` runs the dense model once over calibration text (the healing split,
   never the evaluation text) and sums each layer's input second moment ``C = X^T X`` with
   forward pre-hooks. q/k/v read the same input, as do gate/up, so a block needs four ``C``
   (one per distinct input), not seven.
2. :func:`compress_model` compresses all matrices for a list of budgets (one SVD or TT-SVD per
   matrix, truncated per budget) and returns their dense reconstructions.
3. :func:`swapped` copies those into the model's weights for a measurement and restores the
   originals afterwards: the same function as a factored layer at dense speed (see
   :mod:`compactify.sensitivity`).

"Equal bytes" comparisons use :func:`nf4` (bitsandbytes' NF4 quantize-dequantize, blocks of 64,
double-quantized scales, as :mod:`compactify.quantize` stores them) on the dense matrix or on
each factor / MPO core, and count bytes from what bitsandbytes actually stores.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Sequence

import torch
from .progress import progress as tqdm

from . import lowrank
from .models import MATRIX_PATHS, MATRIX_TYPES, blocks

# Which matrix's input each matrix reads (q/k/v share the attention input, gate/up the MLP input).
INPUT_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


class FrontierError(ValueError):
    """A frontier request that cannot be run as given; the message names the fix."""


def matrices(model, types: Iterable[str] = MATRIX_TYPES,
             block_ids: Iterable[int] | str = "all") -> list[tuple[int, str, torch.nn.Linear]]:
    """``(block, type, linear)`` for every compressible matrix (of ``block_ids``: "all" or a
    list), in block then L1..L7 order."""
    types = list(types)
    bad = [t for t in types if t not in MATRIX_PATHS]
    if bad:
        raise FrontierError(f"Unknown matrix types {bad}; use some of {list(MATRIX_TYPES)}.")
    layers = blocks(model)
    ids = range(len(layers)) if block_ids == "all" else [int(b) for b in block_ids]
    missing = [b for b in ids if not 0 <= b < len(layers)]
    if missing:
        raise FrontierError(f"Blocks {missing} do not exist: the model has blocks 0..{len(layers) - 1}.")
    return [(b, t, layers[b].get_submodule(MATRIX_PATHS[t])) for b in ids for t in types]


@torch.no_grad()
def input_stats(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4, block_ids: Iterable[int] | str = "all",
                progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """Per-matrix input second moments ``C = X^T X / tokens`` over calibration ``ids``.

    Returns ``{(block, type): C}`` for all seven types of ``block_ids``; matrices that read the
    same input share one tensor object. Each batch's ``X^T X`` is computed in fp32, summed in fp64.
    """
    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise FrontierError(f"The calibration text has {ids.numel()} tokens, fewer than one window of "
                            f"seq_len={seq_len}: pass more text or a smaller seq_len.")
    windows = ids[: n * seq_len].view(n, seq_len).to(next(model.parameters()).device)
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def h(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            g = (x.T @ x).double()
            sums[key] = sums[key] + g if key in sums else g
        return h

    readers = sorted(set(INPUT_OF.values()), key=MATRIX_TYPES.index)
    handles = [lin.register_forward_pre_hook(hook((b, t))) for b, t, lin in matrices(model, readers, block_ids)]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc="calibration", disable=not progress):
            model(input_ids=windows[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens = n * seq_len
    shared = {key: (s / tokens).float() for key, s in sums.items()}
    return {(b, t): shared[(b, INPUT_OF[t])] for b, t, _ in matrices(model, MATRIX_TYPES, block_ids)}


def nf4(t: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, int]:
    """NF4 quantize-dequantize with bitsandbytes (double-quantized scales); returns the
    dequantized tensor (same shape and dtype) and the bytes bitsandbytes stores for it."""
    import bitsandbytes.functional as F

    # bitsandbytes 0.50 torch.compiles its CPU dequantize kernel with static shapes: one compile
    # per tensor shape (minutes for a model's worth of cores). Eager mode gives the same numbers.
    with torch.compiler.set_stance("force_eager"):
        q, state = F.quantize_4bit(t.detach().float().contiguous(), blocksize=blocksize, quant_type="nf4",
                                   compress_statistics=True)
        back = F.dequantize_4bit(q, state).to(t.dtype).reshape(t.shape)
    nbytes = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
    return back, nbytes


def _quantized(c: lowrank.Compressed) -> tuple[torch.Tensor, int]:
    """Dense reconstruction of a compressed matrix whose factors / cores are stored in NF4."""
    if isinstance(c.factors, tuple):
        (a, na), (b, nb) = nf4(c.factors[0]), nf4(c.factors[1])
        return a @ b, na + nb
    from .mpo import MPO
    parts = [nf4(g) for g in c.factors.cores]
    return MPO([g for g, _ in parts]).to_matrix().to(c.weight.dtype), sum(n for _, n in parts)


def compress_model(model, method: str, keeps: Sequence[float], stats: Mapping | None = None, *,
                   types: Iterable[str] = MATRIX_TYPES, block_ids: Iterable[int] | str = "all",
                   errors: bool | Sequence[float] = True, quantize: bool = False,
                   options: Mapping | None = None, workers: int = 1, progress: bool = True) -> tuple[dict, list[dict]]:
    """Compress every matrix with ``method`` at each budget in ``keeps``.

    Only ``types`` in ``block_ids`` ("all" or a list: a quick look) are compressed.
    Returns ``(weights, records)``: ``weights[keep][(block, type)]`` is the dense reconstruction
    (and ``weights[("nf4", keep)]`` the one from NF4-stored factors when ``quantize``), and one
    record per matrix and budget with its shape, parameters, bytes (fp16 storage; NF4 too when
    ``quantize``), rank or bond dimensions, seconds, the relative weight error and, at the budgets
    in ``errors`` (True: all), the relative activation error on the calibration stats (one
    ``out x in x in`` product per matrix: the dearest part for the plain methods). ``options`` go to
    :func:`compactify.lowrank.compressor` (``sweeps``, ``inner``, ``damping``).

    ``workers`` matrices are decomposed at once, each in its own Python thread running torch
    single-threaded (torch releases the GIL inside its kernels): LAPACK (SVD/eigh) at these sizes
    gains little from OpenMP threads and loses much when the cores are shared
    (:func:`compactify.mpo.single_thread`), while single-threaded workers use every core.
    """
    keeps = [float(k) for k in keeps]
    if lowrank.needs_stats(method) and stats is None:
        raise FrontierError(f"'{method}' is activation-aware: pass stats=input_stats(model, calibration_ids).")
    todo = matrices(model, types, block_ids)
    opts = dict(options or {})

    def one(item):
        b, t, lin = item
        w = lin.weight.data
        C = stats.get((b, t)) if stats is not None else None
        t0 = time.perf_counter()
        comp = lowrank.compressor(method, w, C, **opts)
        setup = time.perf_counter() - t0
        out = []
        for keep in keeps:
            t0 = time.perf_counter()
            c = comp.at(keep)
            rec = {"method": method, "keep": keep, "block": b, "type": t, "shape": list(w.shape),
                   "params": c.params, "dense_params": c.dense_params, "ratio": c.ratio, "bytes_fp16": 2 * c.params,
                   **{k: v for k, v in c.info.items() if k in ("rank", "cores", "bond_dims", "start")},
                   "rel_error": lowrank.relative_error(w, c.weight)}
            if C is not None and (errors is True or (errors and any(abs(keep - e) < 1e-9 for e in errors))):
                rec["act_error"] = c.info.get("act_error") or lowrank.activation_error(w, c.weight, C)
            q = None
            if quantize:
                q, rec["bytes_nf4"] = _quantized(c)
            rec["seconds"] = setup / len(keeps) + time.perf_counter() - t0
            out.append((keep, c.weight, q, rec))
        return (b, t), out

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            results = list(tqdm(pool.map(one, todo), total=len(todo), desc=method, disable=not progress))
    finally:
        torch.set_num_threads(previous)
    weights: dict = {k: {} for k in keeps}
    if quantize:
        weights.update({("nf4", k): {} for k in keeps})
    records = []
    for key, out in results:
        for keep, w, q, rec in out:
            weights[keep][key] = w
            if quantize:
                weights[("nf4", keep)][key] = q
            records.append(rec)
    return weights, records


def dense_nf4(model, types: Iterable[str] = MATRIX_TYPES, block_ids: Iterable[int] | str = "all") -> tuple[dict, int]:
    """Every matrix NF4 quantize-dequantized (the 4-bit baseline) and the bytes stored."""
    out, total = {}, 0
    for b, t, lin in matrices(model, types, block_ids):
        out[(b, t)], n = nf4(lin.weight.data)
        total += n
    return out, total


@contextlib.contextmanager
def swapped(model, weights: Mapping[tuple[int, str], torch.Tensor]):
    """Copy ``weights`` into the model's matrices for the duration of the block; restore after."""
    found = {(b, t): lin for b, t, lin in matrices(model)}
    missing = [k for k in weights if k not in found]
    if missing:
        raise FrontierError(f"Weights given for matrices the model does not have: {missing[:5]}.")
    originals = {k: found[k].weight.data.clone() for k in weights}
    try:
        for k, w in weights.items():
            found[k].weight.data.copy_(w)
        yield model
    finally:
        for k, w in originals.items():
            found[k].weight.data.copy_(w)


def summarize(records: Sequence[Mapping]) -> dict:
    """Whole-model totals of one (method, budget): parameters, ratio, bytes, mean errors."""
    def mean(key):
        vals = [r[key] for r in records if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    dense = sum(r["dense_params"] for r in records)
    params = sum(r["params"] for r in records)
    out = {"params": params, "dense_params": dense, "ratio": params / dense,
           "bytes_fp16": sum(r["bytes_fp16"] for r in records), "dense_bytes_fp32": 4 * dense,
           "mean_rel_error": mean("rel_error"), "mean_act_error": mean("act_error"),
           "seconds": sum(r["seconds"] for r in records)}
    if all("bytes_nf4" in r for r in records):
        out["bytes_nf4"] = sum(r["bytes_nf4"] for r in records)
    return out


def calibration_ids(tokenizer, split: str = "heal", tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """``tokens`` token ids of calibration prose from ``split`` (spread over genres). Refuses the
    held-out split: calibrating on the evaluation text would flatter the activation-aware methods."""
    from . import corpus
    from .evaluate import tokenize_for_ppl

    if split == "heldout":
        raise FrontierError("frontier.calib_split is 'heldout', the perplexity text: calibrate on 'heal' "
                            "(or any split that is not evaluated).")
    ids = tokenize_for_ppl(tokenizer, corpus.sample(split, max_chars=8 * tokens, seed=seed), tokens)
    if ids.numel() < tokens:
        raise FrontierError(f"Only {ids.numel()} calibration tokens in split '{split}', {tokens} asked for.")
    return ids


def measure(model, tokenizer, weights: Mapping | None, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4,
            tasks: Sequence[str] = (), limit: int | None = None, seed: int = 0, autocast: str | None = None) -> dict:
    """Held-out perplexity (and ``tasks`` via lm-eval, ``limit`` documents each) of the model with
    ``weights`` swapped in (None: the model as it is); ``autocast`` as in
    :func:`compactify.evaluate.perplexity` (the dense reference is measured the same way)."""
    from .evaluate import perplexity, run_tasks

    t0 = time.perf_counter()
    with swapped(model, weights or {}):
        out = {k: v for k, v in perplexity(model, tokenizer, ids, seq_len=seq_len, batch_size=batch_size,
                                                         autocast=autocast).items()}
        for name, res in (run_tasks(model, tokenizer, list(tasks), limit=limit, seed=seed, autocast=autocast)
                          if tasks else {}).items():
            out[name] = res["value"]
            out[f"{name}_stderr"] = res["stderr"]
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def point(method: str, keep: float | None, precision: str, records: Sequence[Mapping], measured: Mapping,
          dense_params: int, nbytes: int | None = None) -> dict:
    """One point of the frontier: what was kept (parameters, bytes as fractions of the dense
    fp32 block matrices) and what was measured."""
    params = sum(r["params"] for r in records) if records else dense_params
    if nbytes is None:
        nbytes = sum(r["bytes_nf4"] for r in records) if precision == "nf4" else 2 * params
    return {"method": method, "keep": keep, "precision": precision, "stage": "before healing", "params": params,
            "ratio": params / dense_params, "bytes": nbytes, "bytes_ratio": nbytes / (4 * dense_params),
            "compress_seconds": sum(r["seconds"] for r in records), **dict(measured)}


def winners(points: Sequence[Mapping], metric: str = "ppl", precision: str = "fp16") -> dict:
    """At each budget, the methods ranked by ``metric`` (lower is better for perplexity)."""
    out = {}
    points = [p for p in points if p["method"] != "dense"]
    for keep in sorted({p["keep"] for p in points}, reverse=True):
        pts = sorted((p for p in points if p["keep"] == keep and p["precision"] == precision and p.get(metric)),
                     key=lambda p: p[metric])
        out[str(keep)] = {"winner": pts[0]["method"] if pts else None,
                          "ranking": [(p["method"], p[metric]) for p in pts]}
    return out
