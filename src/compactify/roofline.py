"""A roofline for every format of a model: bytes and FLOPs per token, the machine's ceilings, and
the rate they allow.

A decoded token multiplies one activation vector by every weight matrix, so its cost is set by
how many bytes stream from memory and how many FLOPs run. Both are **counted from the model
itself**, by walking its modules (:func:`cost`), never from a formula for one architecture:

* ``nn.Linear``: the weight (and bias) read once, the input read and the output written
  (``numel * element_size``); ``2 * in * out`` FLOPs per token (bias adds are not counted).
  A low-rank layer (:func:`lowrank_model`: two ``nn.Linear`` in an ``nn.Sequential``) is two
  such layers.
* :class:`compactify.mpo_layer.MPOLinear`: its own cost model, ``bytes(t)`` / ``flops(t)`` (cores,
  input, every intermediate written and read, output), plus the bias; where the layer
  materializes (``MPOLinear.materializes``: from ``materialize_from`` tokens on, prefill, unless
  its chain is far cheaper than dense) the cores are contracted into the dense matrix first,
  counted as that chain of matmuls, the matrix written and read, and one dense GEMM.
* bitsandbytes ``Linear8bitLt`` / ``Linear4bit``: their stored bytes as
  :func:`compactify.quantize.model_size` counts them (int8 + row scales; packed 4-bit + block
  scales and code books), plus activations. ``dequantized=True`` adds what bitsandbytes 0.50.2
  really does on a CPU without AVX-512 (its default kernels): a dense copy of the weight in the
  activation dtype written and read back every call (``B.float()`` for int8,
  ``dequantize_4bit`` for NF4).
* the input embedding: one row read and written per token; the LM head: its full matrix read per
  token (SmolLM2 ties it to the embedding: the matrix is counted once, as the head's read).
* RMSNorm / LayerNorm: the scale vector and the activations; ``4 * hidden`` FLOPs per token.
* attention over the KV cache, per attention module: for decode at ``context_tokens`` positions,
  K and V of every position read (``2 * ctx * kv_heads * head_dim`` elements) and
  ``4 * ctx * heads * head_dim`` FLOPs (``q k^T`` and ``p v``); for a causal prefill of ``n``
  tokens, K and V read once and ``4 * heads * head_dim * n (n + 1) / 2`` FLOPs.

Element-wise work (SiLU, residual adds, RoPE, softmax) is ``O(hidden)`` per token and left out.
The result, a :class:`Cost`, is broken down by part (``blocks``: the decoder blocks' matrices;
``attention``; ``lm_head``; ``other``: embedding and norms) so that a measured rate can be
explained part by part. :func:`bound` turns it and measured ceilings (:func:`ceilings`: a large
copy/triad/read for bandwidth, a large matmul for FLOP/s) into attainable tokens/s:
``min(bandwidth / bytes, flops_rate / flops)``. :func:`call_overhead` and
:func:`calls_per_token` measure the fixed cost that no roofline sees: Python and dispatcher time
per module call and per operator, times how many of them one decoded token makes.

The ceilings and the overhead are measured on a ``device`` (``cpu``, or ``cuda``: operands on
the GPU, every timing synchronized, no thread counts). The formats themselves, built on that
device, and the random-weight SmolLM2-135M for machines without its weights, are in
:mod:`compactify.roofline_formats` (re-exported here).
"""
from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .mpo_layer import MPOLinear

from .roofline_formats import (ALL_FORMATS, DEVICES, KEEPS, QUICK_FORMATS, RooflineError, build_format,  # noqa: F401
                               build_formats, check_device, check_formats, lowrank_model, parse_format,
                               random_model, smollm2_meta_dir)
from .speed import _sync

PARTS = ("blocks", "attention", "lm_head", "other")


# ----------------------------------------------------------------------------- cost per token

@dataclass
class Cost:
    """Bytes moved and FLOPs for ``tokens`` tokens, by part; per-token totals as properties."""
    tokens: int
    context_tokens: int
    parts: dict = field(default_factory=lambda: {p: {"bytes": 0, "flops": 0} for p in PARTS})

    def add(self, part: str, nbytes: float, flops: float) -> None:
        self.parts[part]["bytes"] += int(nbytes)
        self.parts[part]["flops"] += int(flops)

    @property
    def bytes(self) -> float:
        """Bytes per token."""
        return sum(p["bytes"] for p in self.parts.values()) / self.tokens

    @property
    def flops(self) -> float:
        """FLOPs per token."""
        return sum(p["flops"] for p in self.parts.values()) / self.tokens

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "context_tokens": self.context_tokens, "bytes_per_token": self.bytes,
                "flops_per_token": self.flops, "intensity_flop_per_byte": self.intensity,
                "parts_per_token": {k: {"bytes": v["bytes"] / self.tokens, "flops": v["flops"] / self.tokens}
                                    for k, v in self.parts.items()}}


def _is_bnb(m: nn.Module) -> bool:
    return type(m).__module__.startswith("bitsandbytes")


def _materialize_flops(layer: MPOLinear) -> int:
    """FLOPs of ``cores_to_matrix``: the chain ``(P_k, r_k) @ (r_k, o i r_{k+1})`` over the cores."""
    flops, rows = 0, 1
    for k, c in enumerate(layer.cores):
        r0, o, i, r1 = c.shape
        if k:
            flops += 2 * rows * r0 * o * i * r1
        rows *= o * i
    return flops


def _mpo_cost(m: MPOLinear, tokens: int, act: int, executed: bool = False) -> tuple[int, int]:
    el = m.cores[0].element_size()
    bias = m.bias.numel() * m.bias.element_size() if m.bias is not None else 0
    dense = m.in_features * m.out_features
    if executed and (m.mode == "contracted" or (m.mode == "auto" and m.auto_decisions.get(m.bucket(tokens), {})
                                                .get("path") == "contracted")):   # the cached W, read like a dense layer
        return el * dense + bias + act * tokens * (m.in_features + m.out_features), 2 * tokens * dense
    if not m.materializes(tokens):
        return m.bytes(tokens) + bias, m.flops(tokens)
    return (el * (m.num_cores_params + 2 * dense) + bias + act * tokens * (m.in_features + m.out_features),
            _materialize_flops(m) + 2 * tokens * dense)


def cost(model: nn.Module, tokens: int = 1, context_tokens: int | None = None, dequantized: bool = False,
         executed: bool = False) -> Cost:
    """Bytes and FLOPs of a forward pass over ``tokens`` new tokens (see the module docstring).
    ``executed``: MPO layers as their inference mode runs them (``contracted``, or ``auto``'s
    recorded decision for this many tokens: the cached dense ``W``), not as stored (factored).

    ``tokens=1`` with ``context_tokens`` positions in the KV cache (the new one included) is one
    decode step; ``tokens=n`` with ``context_tokens=None`` is a causal prefill of ``n`` tokens.
    """
    if tokens < 1 or (context_tokens is not None and context_tokens < tokens):
        raise RooflineError(f"tokens={tokens} must be >= 1 and context_tokens={context_tokens} >= tokens (the "
                            "positions attended to include the new ones).")
    from .quantize import model_size

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    act = emb.weight.element_size() if emb.weight.dtype.is_floating_point else 4
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    out = Cost(tokens, context_tokens if context_tokens is not None else tokens)
    seen = set()
    for name, m in model.named_modules():
        part = "lm_head" if m is head else "blocks" if re.search(r"(^|\.)layers\.\d+\.", name) else "other"
        if isinstance(m, MPOLinear):
            out.add(part, *_mpo_cost(m, tokens, act, executed))
        elif _is_bnb(m) and isinstance(m, nn.Linear):
            extra = 2 * m.in_features * m.out_features * act if dequantized else 0
            out.add(part, model_size(m)["bytes"] + extra + act * tokens * (m.in_features + m.out_features),
                    2 * tokens * m.in_features * m.out_features)
        elif isinstance(m, nn.Linear):
            stored = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            out.add(part, stored + act * tokens * (m.in_features + m.out_features),
                    2 * tokens * m.in_features * m.out_features)
        elif isinstance(m, nn.Embedding) and not _is_bnb(m):
            out.add("other", 2 * tokens * m.embedding_dim * act, 0)   # one row read and written per token
        elif type(m).__name__.endswith("RMSNorm") or isinstance(m, nn.LayerNorm):
            w = getattr(m, "weight", None)
            dim = w.numel() if w is not None else cfg.hidden_size
            out.add("other", (w.numel() * w.element_size() if w is not None else 0) + 2 * tokens * dim * act,
                    4 * tokens * dim)
        elif hasattr(m, "q_proj") and hasattr(m, "head_dim"):
            seen.add(name)
            hd = m.head_dim
            if context_tokens is None:   # causal prefill: position p attends to p + 1 positions
                out.add("attention", 2 * tokens * kv_heads * hd * act, 4 * heads * hd * tokens * (tokens + 1) // 2)
            else:
                out.add("attention", 2 * context_tokens * kv_heads * hd * act, 4 * tokens * context_tokens * heads * hd)
    if not seen:
        raise RooflineError(f"{type(model).__name__} has no attention module with q_proj and head_dim, so the KV-cache "
                            "cost cannot be counted; the roofline supports Llama-family models (Llama, Mistral, Qwen2).")
    return out


def decode_cost(model: nn.Module, context_tokens: int = 128, dequantized: bool = False, executed: bool = False) -> Cost:
    """Bytes and FLOPs of one decoded token attending to ``context_tokens`` cached positions."""
    return cost(model, 1, context_tokens, dequantized, executed)


def prefill_cost(model: nn.Module, tokens: int, dequantized: bool = False) -> Cost:
    """Bytes and FLOPs of a causal prefill of ``tokens`` tokens (per-token totals divide by ``tokens``)."""
    return cost(model, tokens, None, dequantized)


def bound(c: Cost, bandwidth: float, flops_rate: float) -> dict:
    """Attainable tokens/s: ``min(bandwidth / bytes, flops_rate / flops)`` per token, and which roof limits."""
    if not (bandwidth > 0 and flops_rate > 0):
        raise RooflineError(f"bandwidth={bandwidth} B/s and flops_rate={flops_rate} FLOP/s must both be positive "
                            "(measure them with ceilings()).")
    mem, comp = bandwidth / c.bytes, flops_rate / c.flops if c.flops else math.inf
    return {"tokens_per_s": min(mem, comp), "memory_tokens_per_s": mem, "compute_tokens_per_s": comp,
            "limited_by": "memory" if mem <= comp else "compute", "bandwidth_bytes_per_s": bandwidth,
            "flops_per_s": flops_rate}


def part_seconds(c: Cost, bandwidth: float, flops_rate: float) -> dict:
    """Seconds per token of each part at the roofs (each part limited by its own roof)."""
    return {k: max(v["bytes"] / bandwidth, v["flops"] / flops_rate) / c.tokens for k, v in c.parts.items()}


# ----------------------------------------------------------------------------- the machine's ceilings

def _median_seconds(fn, seconds: float, min_repeats: int = 3, sync: torch.Tensor | None = None) -> tuple[float, int]:
    """Median seconds of ``fn()`` over repeats for ``seconds``; with ``sync`` (a tensor on the GPU) the
    device's queue is drained before and after every call (:func:`compactify.speed._sync`)."""
    def call():
        if sync is not None:
            _sync(sync)
        t = time.perf_counter()
        fn()
        if sync is not None:
            _sync(sync)
        return time.perf_counter() - t

    call()  # warm-up: page faults, thread pool start, CUDA kernels' first launch
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_repeats or time.perf_counter() < t_end:
        times.append(call())
    return statistics.median(times), len(times)


GEMM_N = {"cpu": {"float32": 2048}, "cuda": {"float32": 8192, "bfloat16": 8192}}
GEMM_N_OTHER = {"cpu": 512, "cuda": 8192}
ARRAY_MIB = {"cpu": 256, "cuda": 1024}


def ceilings(threads: Iterable[int] = (1, 2), dtypes: Iterable[str] = ("float32", "bfloat16"), seconds: float = 2.0,
             mib: int | None = None, gemm_n: Mapping[str, int] | None = None, device: str = "cpu") -> dict:
    """Sustained bandwidth and GEMM FLOP/s of this machine at each thread count (medians of repeats).

    Bandwidth: ``copy`` (``b.copy_(a)``, 2 arrays' bytes), ``triad`` (``a = b + 2 c``, 3 arrays),
    ``read`` (``a.sum()``, 1 array: a decoded token mostly reads), over ``mib`` MiB arrays of
    fp32 (far beyond the last-level cache); the roof used is the largest of the three. GEMM: an
    ``n x n`` matmul per dtype (2 n^3 FLOPs; n = 2048 for fp32, 512 for other types: on a CPU
    without AVX512-BF16 or AMX, bf16 is emulated and a large call would take seconds).

    ``device="cuda"``: arrays and operands on the GPU, every timed call synchronized, arrays of
    1 GiB (beyond any GPU's L2), n = 8192 for every dtype; thread counts do not apply: one pass,
    returned under the key ``"cuda"`` with ``threads: None`` (and ``float32_matmul_precision``:
    ``highest`` = no TF32).
    """
    dev = check_device(device)
    cuda = dev.type == "cuda"
    mib = mib or ARRAY_MIB[dev.type]
    n_el = mib * 2**20 // 4
    a, b, c = (torch.ones(n_el, device=dev) for _ in range(3))
    nbytes = n_el * 4
    sizes = {**GEMM_N[dev.type], **(gemm_n or {})}
    sync = a if cuda else None
    before, out = torch.get_num_threads(), {}
    try:
        for t in ([None] if cuda else threads):
            if t is not None:
                torch.set_num_threads(int(t))
            bw = {}
            for kind, fn, moved in (("copy", lambda: b.copy_(a), 2), ("triad", lambda: torch.add(b, c, alpha=2.0, out=a), 3),
                                    ("read", lambda: a.sum(), 1)):
                s, reps = _median_seconds(fn, seconds / 3, sync=sync)
                bw[kind] = {"bytes_per_s": moved * nbytes / s, "median_s": s, "repeats": reps}
            gemm = {}
            for name in dtypes:
                dt = getattr(torch, name)
                n = sizes.get(name, GEMM_N_OTHER[dev.type])
                x, y = torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt)
                s, reps = _median_seconds(lambda x=x, y=y: x @ y, seconds, sync=sync)
                gemm[name] = {"flops_per_s": 2 * n**3 / s, "n": n, "median_s": s, "repeats": reps}
                del x, y
            roof = max(bw, key=lambda k: bw[k]["bytes_per_s"])
            out["cuda" if cuda else str(t)] = {
                "bandwidth": bw, "bandwidth_roof": {"bytes_per_s": bw[roof]["bytes_per_s"], "from": roof},
                "gemm": gemm, "array_mib": mib, "device": dev.type, "threads": t,
                **({"device_name": torch.cuda.get_device_name(dev),
                    "float32_matmul_precision": torch.get_float32_matmul_precision()} if cuda else {})}
    finally:
        torch.set_num_threads(before)
    return out


def call_overhead(calls: int = 5000, device: str = "cpu") -> dict:
    """Seconds per call of a 1x1 ``nn.Linear`` module and of one 1x1 ``F.linear`` operator: the fixed
    Python and dispatcher cost that every layer call and every operator pays whatever its size
    (on CUDA the launch cost too: each repeat of ``calls`` calls is synchronized at both ends)."""
    dev = check_device(device)
    lin, x = nn.Linear(1, 1).to(dev), torch.ones(1, 1, device=dev)
    w, bias = lin.weight.detach(), lin.bias.detach()
    with torch.inference_mode():
        out = {}
        for kind, fn in (("module_call_s", lambda: lin(x)), ("op_call_s", lambda: nn.functional.linear(x, w, bias))):
            reps = []
            for _ in range(5):
                _sync(x)
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(x)
                reps.append((time.perf_counter() - t) / calls)
            out[kind] = statistics.median(reps)
    return {**out, "calls": calls, "repeats": 5, "device": dev.type}


def calls_per_token(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Module calls and dispatched operators of one decode step after ``input_ids`` (KV cache on)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    modules = [0]
    handles = [m.register_forward_pre_hook(lambda *_: modules.__setitem__(0, modules[0] + 1)) for m in model.modules()]
    try:
        with torch.inference_mode():
            first = model(input_ids=input_ids, use_cache=True)
            key = "cache" if "cache" in first else "past_key_values"   # transformers >= 5.2x names it cache
            modules[0] = 0
            counter = _Count()
            with counter:
                model(input_ids=input_ids[:, -1:], use_cache=True, **{key: first[key]})
    finally:
        for h in handles:
            h.remove()
    return {"module_calls": modules[0], "ops": counter.ops}


def overhead_seconds(calls: Mapping, per_call: Mapping) -> float:
    """Estimated fixed cost per token: every operator pays ``op_call_s``, every module call the rest
    of a 1x1 module call (``module_call_s - op_call_s``)."""
    extra = max(per_call["module_call_s"] - per_call["op_call_s"], 0.0)
    return calls["ops"] * per_call["op_call_s"] + calls["module_calls"] * extra


# ----------------------------------------------------------------------------- results

def stored_bytes(model: nn.Module) -> int:
    """Bytes the model holds (:func:`compactify.quantize.model_size`); without bitsandbytes installed
    (then no quantized layer can exist) every parameter and buffer counted once (tied ones once)."""
    try:
        from .quantize import model_size

        return model_size(model)["bytes"]
    except ImportError:
        seen = {(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size()
                for t in [*model.parameters(), *model.buffers()] if t.numel()}
        return sum(seen.values())


def save_roofline(path: str | Path, data: Mapping, device: str = "cpu", **extra) -> Path:
    """Write the roofline results atomically with provenance (:func:`compactify.results.save_results`),
    after checking every format name under ``data["formats"]`` and that each has a decode cost or
    says why it was skipped (``{"skipped": why}``)."""
    from .results import save_results

    formats = data.get("formats")
    if not isinstance(formats, Mapping) or not formats:
        raise RooflineError("Roofline results need a non-empty 'formats' mapping {format name: results}.")
    check_formats(formats)
    missing = [n for n, f in formats.items() if "decode_cost" not in f and not f.get("skipped")]
    if missing:
        raise RooflineError(f"Formats {missing} have no 'decode_cost' (nor a 'skipped' reason); compute it with "
                            "decode_cost(model) first.")
    return save_results(path, data, device=device, **extra)
