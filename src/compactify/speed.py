"""Inference speed, measured so that models can be compared on a busy machine.

Wall-clock timings on a shared CPU drift by tens of percent from one minute to the next, so a
number measured for one model at 10:00 and another at 10:05 says little. Every comparison here
is made **side by side in one process**: :func:`compare` runs the models round-robin (repeat 1 of
every model, then repeat 2, ...), so slow phases of the machine hit all of them alike, and
reports medians with their interquartile range, and ratios to a reference model.

Two regimes matter for a language model and behave differently:

* **prefill**: one forward pass over a prompt of ``n`` tokens; large matmuls, compute bound.
  Reported as prompt tokens per second.
* **decode**: generating one token at a time with the KV cache; each step multiplies a single
  token's activations by every weight matrix, so it is bound by how fast the weights stream from
  memory. This is where smaller weights (fewer parameters, fewer bits) can pay off. Measured as
  ``(k - 1) / (t(k new tokens) - t(1 new token))`` with greedy ``generate``, which removes the
  prompt's own cost.

Tensorized models run their MPO layers in whichever inference mode they are in
(:mod:`compactify.mpo_layer`: ``factored``, ``contracted``, ``auto``) unless :func:`compare` is
given ``mpo_mode``, which sets it for the measurement only and records what the layers chose.

Also: :func:`round_robin_forward` (forward passes only, e.g. notebook 04's bf16 against fp16),
:func:`table` (a :func:`compare` result as a DataFrame), :func:`timing_setup` (every model timed
under the same conditions, put back afterwards) and :func:`inference_times` (notebook 06's Fig. 4
timings under it).
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Callable, Mapping

import torch


def stats(times: list[float]) -> dict:
    """Median, quartiles, IQR, min and all values of a list of measurements."""
    xs = sorted(times)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": xs[0], "n": len(xs),
            "values": list(times)}


def interleaved(measure: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 1,
                progress: Callable | None = None, rotate: bool = False) -> dict[str, list]:
    """Take each measurement (a call that returns a number, e.g. its seconds) round-robin: one of
    each per round, ``rounds`` counted rounds after ``warmup`` uncounted ones. A load that other
    jobs put on a shared machine then falls on all alike, so their ratio is fair. Returns
    ``{name: [value of each counted round]}``. The one round-robin loop of the study (speed,
    ``MPOLinear``'s ``auto`` decision, the benchmarks). ``progress`` wraps the rounds (a tqdm).
    ``rotate``: the k-th counted round starts with the (k mod n)-th measurement instead of the
    first (warm-up rounds keep the given order), so that over n rounds each takes every position once (an effect of the order within a round, e.g. a
    cache warmed by the previous model, then falls on all alike instead of on the last)."""
    out: dict[str, list] = {n: [] for n in measure}
    names = list(measure)
    steps = range(warmup + rounds)
    for r in steps if progress is None else progress(steps, desc="timing (round-robin)"):
        k = (r - warmup) % len(names) if rotate and r >= warmup else 0
        for n in names[k:] + names[:k]:
            value = measure[n]()
            if r >= warmup:
                out[n].append(value)
    return out


def _sync(t: torch.Tensor) -> None:
    """Drain the GPU's queue (kernels are asynchronous); nothing on a CPU."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _forward_seconds(model, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        _sync(input_ids)
        t = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        _sync(input_ids)
        return time.perf_counter() - t


DECODE_RUNTIMES = ("eager", "compiled")


def _decompose_gemv(largest: int) -> None:
    """Let inductor turn every one-row matmul whose matrix has at most ``largest`` rows and columns
    into a fused multiply-and-sum (its ``decompose_mm_pass``). Why: at batch 1 each weight matrix
    is used in a matrix-vector product, and the BLAS that torch's CPU wheels call (MKL, here on an
    AMD CPU) streams a matrix at less than half the rate a plain read reaches
    (:func:`gemv_probe`, ``benchmarks/decode_compiled.py``); inductor's generated reduction reads at nearly
    the full rate. The pass reads its CPU size limit from module globals set when it is imported,
    so the limit is raised there; a torch without them is refused with a clear error."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_

    for name in ("cpu_max_first_dimension_decomposition", "cpu_max_other_dimension_decomposition"):
        if not hasattr(pass_, name):
            raise RuntimeError(f"torch {torch.__version__} has no inductor setting {name}: compiled decoding "
                               "needs torch's decompose_mm_pass (torch >= 2.6); use decode='eager'.")
    pass_.cpu_max_first_dimension_decomposition = 1
    pass_.cpu_max_other_dimension_decomposition = max(int(largest), pass_.cpu_max_other_dimension_decomposition)


def generate_kwargs(model, runtime: str = "eager", max_cache_len: int = 256) -> dict:
    """Extra ``generate`` arguments for a decode ``runtime``: ``eager`` (none: transformers' default
    dynamic KV cache, every op a separate call) or ``compiled``: transformers' own compiled
    decoding, a static KV cache of ``max_cache_len`` positions and each decode step's forward
    compiled by ``torch.compile`` (inductor, static shapes; prefill stays eager), which fuses the
    step's ~1,700 small ops and, on a CPU, turns each one-row matmul into a fused multiply-and-sum
    (:func:`_decompose_gemv`); on CUDA it replays the step as CUDA graphs ("reduce-overhead").
    The first call compiles (about a minute for SmolLM2 on 2 cores);
    later calls of the same shapes reuse it. Greedy tokens are the same as eager's up to float
    rounding (a test checks a tiny model)."""
    if runtime not in DECODE_RUNTIMES:
        raise ValueError(f"Unknown decode runtime {runtime!r}: use one of {', '.join(DECODE_RUNTIMES)}.")
    if runtime == "eager":
        return {}
    from transformers import CompileConfig

    from .mpo_modes import prepare_compiled

    prepare_compiled(model, tokens=1)   # MPO layers: plan, W or auto's decision made eagerly (batch-1 decoding)
    if next(model.parameters()).device.type == "cpu":
        _decompose_gemv(max(max(p.shape) for p in model.parameters() if p.dim() == 2))
        config = CompileConfig(mode=None, dynamic=False, fullgraph=False,
                               options={"post_grad_fusion_options": {"decompose_mm_pass": {}}})
    else:  # CUDA: cuBLAS's GEMV is fine; what batch-1 decoding loses there is kernel launches, which
        # "reduce-overhead" (CUDA graphs: the step's kernels replayed as one) removes; transformers' default mode
        config = CompileConfig(mode="reduce-overhead", dynamic=False, fullgraph=False)
    config._compile_all_devices = True  # transformers compiles decoding on accelerators only unless asked
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one entry per model
    return {"cache_implementation": "static", "compile_config": config, "max_cache_len": max_cache_len}


def gemv_probe(weights, repeats: int = 9) -> dict:
    """How fast this machine streams ``weights`` (a model's matrices) through three kernels, each
    matrix times one token's activations, the three timed interleaved (:func:`interleaved`):
    ``read`` (``w.sum()``: one plain pass over the bytes, the rate a kernel could reach),
    ``linear`` (torch's ``F.linear``: the BLAS GEMV that eager decoding calls) and ``compiled``
    (the multiply-and-sum inductor generates for it under :func:`generate_kwargs`; one compiled
    call per matrix, so its dispatch cost is in). Returns ``{"bytes", "matrices", way: {"seconds":
    stats, "bytes_per_s"}}`` with the bytes counted from the tensors."""
    weights = [w.detach() for w in weights]
    if not weights or any(w.dim() != 2 for w in weights):
        raise ValueError("gemv_probe needs a non-empty list of matrices (2-D weights).")
    total = sum(w.numel() * w.element_size() for w in weights)
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    fused = torch.compile(lambda x, w: (x * w).sum(-1), dynamic=False)   # what decompose_mm_pass makes of F.linear

    def timed(fn):
        def run():
            with torch.inference_mode():
                _sync(xs[0])
                t = time.perf_counter()
                for x, w in zip(xs, weights):
                    fn(x, w)
                _sync(xs[0])
                return time.perf_counter() - t
        return run

    ways = {"read": timed(lambda x, w: w.sum()), "linear": timed(torch.nn.functional.linear), "compiled": timed(fused)}
    times = interleaved(ways, rounds=repeats, warmup=1)
    out: dict = {"bytes": total, "matrices": len(weights)}
    for way, ts in times.items():
        st = stats(ts)
        out[way] = {"seconds": st, "bytes_per_s": total / st["median"]}
    return out


def _generate_seconds(model, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int | None,
                      extra: Mapping | None = None) -> float:
    with torch.inference_mode():
        _sync(input_ids)
        t = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
                             **(extra or {}))
        _sync(input_ids)
        dt = time.perf_counter() - t
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return dt


def time_forward(model, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> dict:
    """Seconds per forward pass over ``input_ids`` (no KV cache): ``{"median_s", "iqr_s", ...}``."""
    model.eval()
    for _ in range(warmup):
        _forward_seconds(model, input_ids)
    s = stats([_forward_seconds(model, input_ids) for _ in range(repeats)])
    return {"median_s": s["median"], "iqr_s": s["iqr"], "q1_s": s["q1"], "q3_s": s["q3"], "min_s": s["min"],
            "repeats": repeats, "times_s": s["values"]}


def compare(models: Mapping[str, torch.nn.Module], tokenizer, prompt_ids: torch.Tensor,
            decode_prompt: str | torch.Tensor, new_tokens: int = 16, repeats: int = 3, reference: str | None = None,
            progress: Callable | None = None, mpo_mode: str | None = None, rotate: bool = False,
            decode: str | Mapping[str, str] = "eager") -> dict:
    """Prefill and decode tokens/s of several models, measured round-robin in this process.

    ``decode_prompt`` is text (tokenized with ``tokenizer``) or token ids of shape ``(1, n)``;
    ``tokenizer`` may be None with ids (pad id 0: batch 1 never pads). Returns ``{name:
    {"prefill": stats, "decode": stats, "prefill_ratio": x, "decode_ratio": y}}`` where the
    ratios are median tokens/s relative to ``reference`` (default: the first model); a ratio
    above 1 means faster than the reference. ``prefill_ratio_rounds`` / ``decode_ratio_rounds``:
    median and IQR of the per-round ratios (each round times every model back to back).

    ``mpo_mode`` (``factored`` | ``contracted`` | ``auto``; None: leave the models as they are)
    puts every model that has MPO layers in that inference mode before the warm-up (where
    ``auto`` makes its decisions) and back afterwards; ``out["_setup"]["mpo_mode"]`` records it
    and ``out[name]["mpo_mode"]`` the layers' state after timing (:func:`compactify.mpo_layer.mode_summary`:
    paths chosen per bucket of tokens, bytes of cached matrices). ``rotate``: each counted round
    starts one model later (:func:`interleaved`), recorded in ``out["_setup"]["order"]``.
    ``decode``: the decode runtime (:func:`generate_kwargs`: ``eager`` or ``compiled``), for all
    models or per name (a mapping; missing names are eager), in ``out["_setup"]["decode"]``; the
    compilation happens in the warm-up round, which is not counted. One model object may appear
    under two names with two runtimes, timed side by side.
    """
    if new_tokens < 2:  # decode rate = (k - 1) / (t_k - t_1): one new token is the prompt's cost only
        raise ValueError(f"new_tokens must be at least 2 to separate decoding from the prompt, not {new_tokens}.")
    if mpo_mode is not None:
        from .mpo_layer import MPOLinear

        if mpo_mode not in MPOLinear.MODES:
            raise ValueError(f"Unknown MPO inference mode {mpo_mode!r}: use one of {', '.join(MPOLinear.MODES)} "
                             "(or None to time the models as they are).")
        with contextlib.ExitStack() as stack:
            from .mpo_layer import inference_mode_set, mode_summary

            mpo = [n for n, m in models.items() if any(isinstance(x, MPOLinear) for x in m.modules())]
            for n in mpo:
                stack.enter_context(inference_mode_set(models[n], mpo_mode))
            out = compare(models, tokenizer, prompt_ids, decode_prompt, new_tokens, repeats, reference, progress,
                          rotate=rotate, decode=decode)
            for n in mpo:
                out[n]["mpo_mode"] = mode_summary(models[n])
        out["_setup"]["mpo_mode"] = mpo_mode
        return out
    names = list(models)
    reference = reference or names[0]
    if isinstance(decode_prompt, str):
        dec_ids = tokenizer(decode_prompt, return_tensors="pt").input_ids.to(prompt_ids.device)
    else:
        dec_ids = decode_prompt
    pad = 0 if tokenizer is None else tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id

    cache_len = dec_ids.shape[1] + new_tokens  # one static cache size for both calls: one compiled graph
    runtimes = {n: decode if isinstance(decode, str) else decode.get(n, "eager") for n in names}
    extra = {n: generate_kwargs(models[n], runtimes[n], cache_len) for n in names}

    def one_round(m, extra) -> tuple[float, float]:  # prefill tokens/s; decode tokens/s of the tokens after the first
        prefill = prompt_ids.numel() / _forward_seconds(m, prompt_ids)
        one = _generate_seconds(m, dec_ids, 1, pad, extra)
        many = _generate_seconds(m, dec_ids, new_tokens, pad, extra)
        return prefill, (new_tokens - 1) / max(many - one, 1e-9)

    # the warm-up round (not counted): first calls allocate, repack 4-bit weights, build caches
    rounds = interleaved({n: functools.partial(one_round, models[n].eval(), extra[n]) for n in names}, repeats,
                         progress=progress,
                         rotate=rotate)
    pre = {n: [r[0] for r in v] for n, v in rounds.items()}
    dec = {n: [r[1] for r in v] for n, v in rounds.items()}
    out = {n: {"prefill": stats(pre[n]), "decode": stats(dec[n])} for n in names}
    for n in names:
        for k, rates in (("prefill", pre), ("decode", dec)):
            out[n][f"{k}_ratio"] = out[n][k]["median"] / out[reference][k]["median"]
            # the same ratio per round (both models timed back to back): its spread is the ratio's noise
            out[n][f"{k}_ratio_rounds"] = stats([a / b for a, b in zip(rates[n], rates[reference])])
    out["_setup"] = {"reference": reference, "prefill_tokens": int(prompt_ids.numel()),
                     "decode_prompt_tokens": int(dec_ids.shape[1]), "new_tokens": new_tokens, "repeats": repeats,
                     "threads": torch.get_num_threads(), "mpo_mode": None, "decode": runtimes,
                     "order": "rotated (each counted round starts one model later)" if rotate else "fixed"}
    return out


def round_robin_forward(models: Mapping[str, torch.nn.Module], input_ids: torch.Tensor, repeats: int = 5) -> dict:
    """Seconds per forward pass over ``input_ids`` (no KV cache) of each model, the models taken
    round-robin ``repeats`` times after one warm-up round that is not counted: ``{name: stats}``."""
    once = {n: (lambda m=m: time_forward(m, input_ids, repeats=1, warmup=0)["median_s"]) for n, m in models.items()}
    times = interleaved(once, rounds=repeats)
    return {n: stats(v) for n, v in times.items()}


def table(speed: Mapping):
    """:func:`compare`'s result as a DataFrame, one row per model: medians and IQRs of prefill and
    decode tokens/s, their ratios to the reference model, and the spread of the per-round decode ratio."""
    import pandas as pd

    return pd.DataFrame({n: {"prefill tok/s": v["prefill"]["median"], "prefill IQR": v["prefill"]["iqr"],
                             "decode tok/s": v["decode"]["median"], "decode IQR": v["decode"]["iqr"],
                             "prefill vs original": v["prefill_ratio"], "decode vs original": v["decode_ratio"],
                             "decode ratio IQR": v["decode_ratio_rounds"]["iqr"]}
                         for n, v in speed.items() if not n.startswith("_")}).T


@contextlib.contextmanager
def timing_setup(models: Mapping[str, torch.nn.Module], threads: int | None = None, mpo_mode: str | None = None):
    """Every model as it is timed, for the duration of the ``with`` block: 16-bit parameters as exact
    fp32 copies where this machine has no fast bf16 (``compactify.evaluate.upcast_half``: the same
    compute dtype for every format), the MPO layers in ``mpo_mode`` (``auto``: per layer the faster
    of factored and W cached; None: as they are), ``threads`` torch threads (None: as it is). All is
    put back afterwards. Yields ``{name: what upcast_half did, None where nothing}``."""
    from .evaluate import upcast_half
    from .mpo_layer import MPOLinear, inference_mode_set

    kept = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            upcast = {n: stack.enter_context(upcast_half(m)) for n, m in models.items()}
            for m in models.values():
                if mpo_mode and any(isinstance(x, MPOLinear) for x in m.modules()):
                    stack.enter_context(inference_mode_set(m, mpo_mode))
            yield upcast
    finally:
        torch.set_num_threads(kept)


def inference_times(models: Mapping[str, torch.nn.Module], tokenizer, cfg: Mapping, tasks, prompt_ids: torch.Tensor,
                    decode_prompt: str | torch.Tensor) -> dict:
    """Fig. 4's two timings of every model, under :func:`timing_setup` with the config's
    ``quantize.speed`` settings: lm-eval's pass over each of ``tasks`` with ``eval.timing_limit``
    documents (``compactify.evaluate.task_times``, round-robin per task; ``auto``'s one-off decisions
    left out and returned apart), then batch-1 prefill and decode tokens/s (:func:`compare`).
    Returns ``{"upcast", "task_seconds", "task_time_vs_original", "decide_seconds", "speed", "threads"}``."""
    from .evaluate import task_times

    sc = cfg["quantize"]["speed"]
    decide: dict = {}
    with timing_setup(models, sc["threads"], sc["mpo_mode"]) as upcast:
        threads = torch.get_num_threads()
        seconds = task_times(models, tokenizer, cfg, tasks=tasks, decisions=decide)
        speed = compare(models, tokenizer, prompt_ids, decode_prompt, new_tokens=sc["new_tokens"],
                        repeats=sc["repeats"], mpo_mode=sc["mpo_mode"], rotate=sc["order"] == "rotated")
    ref = next(iter(seconds))
    relative = {n: {t: s / seconds[ref][t] for t, s in seconds[n].items()} for n in seconds}
    return {"upcast": upcast, "task_seconds": seconds, "task_time_vs_original": relative, "decide_seconds": decide,
            "speed": speed, "threads": threads}
