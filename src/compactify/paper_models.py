"""The paper's five models (Table I) made from ours, and what notebooks 04 and 06 measure on them.

* :func:`tensorized_start`: the model the 88% and 93% models start from: notebook 05's healed
  model where it was made with this config, else notebook 03's tensorized one, both found with
  :mod:`compactify.run` (without notebook 03's model it says to run notebook 03; no stand-in).
* :func:`builders` and :func:`paper_models`: the recipes, one place for both notebooks (the
  config's ``quantize`` section): 8-bit LLM.int8 and 4-bit NF4 from the original, "88%" = the
  tensorized model in 16 bits, "93%" = that model with every linear layer left dense in 4 bits.
* :func:`build_and_size` (notebook 04): each model built, saved right away, and its bytes.
* :func:`next_token_quality`, :func:`model_rows`, :func:`memory_table`: how far each model's
  next-token distribution moves from the original's, and Table I's columns, measured.
* :func:`speed_claims`: the paper's two speed claims against side-by-side measurements.
* :func:`earlier_evaluations`, :func:`evaluate_all`, :func:`score_table` (notebook 06): the
  benchmarks on every model, reusing what notebooks 00, 03 and 05 scored with the same settings.
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter
from typing import Callable, Mapping

import torch
from torch import nn

SAVE_AS = {"8-bit": "int8", "4-bit": "nf4", "93%": "mixed"}  # run_dir/models/<name>: the models notebook 04 saves


def tensorized_start(cfg: Mapping, device="cpu") -> tuple[nn.Module, str]:
    """``(model, where it came from)``: notebook 05's healed model if it exists and was made with
    this config's settings, else notebook 03's tensorized model. Notebook 04 runs before 05, so a
    first run starts from the unhealed model. Without a notebook-03 model made with these settings
    :func:`compactify.run.require` raises, saying to run notebook 03."""
    from . import run
    from .models import load_model

    try:
        model_dir, source = run.require(cfg, "healed"), "healed (notebook 05)"
    except run.RunInputError as e:
        stale = f"; the healed model is not used: {e}" if run.path(cfg, "healed").exists() else ""
        model_dir = run.require(cfg, "tensorized")
        source = f"unhealed (notebook 03; healing comes in notebook 05{stale})"
    model, _ = load_model(model_dir, dtype=cfg["dtype"], device=device)
    return model, f"{source}: {model_dir}"


def block_matrix_kinds(model: nn.Module) -> dict[str, int]:
    """How many of the blocks' matrices are MPOs and how many are still dense ``Linear`` layers."""
    kinds = Counter(type(m).__name__ for n, m in model.named_modules()
                    if ".layers." in n and type(m).__name__ in ("MPOLinear", "Linear"))
    return dict(kinds.most_common())


def builders(original: nn.Module, tensorized: nn.Module, qc: Mapping) -> dict[str, Callable[[], nn.Module]]:
    """How each of the paper's five models is made from ours, as ``{name: build}`` in Table I's
    order; ``qc`` is the config's ``quantize`` section. Each call builds a new copy (the original is
    returned as it is), so notebook 04 can time and save one model at a time."""
    from . import quantize as Q

    return {
        "original": lambda: original,
        "8-bit": lambda: Q.quantize(copy.deepcopy(original), 8, threshold=qc["int8_threshold"],
                                    embeddings=qc["embeddings"]),
        "4-bit": lambda: Q.quantize(copy.deepcopy(original), 4, quant_type=qc["quant_type"],
                                    double_quant=qc["double_quant"], embeddings=qc["embeddings"]),
        "88%": lambda: Q.to_half(copy.deepcopy(tensorized), qc["half_dtype"]),
        "93%": lambda: Q.mixed(copy.deepcopy(tensorized), 4, qc["quant_type"], qc["half_dtype"], qc["embeddings"],
                               double_quant=qc["double_quant"]),
    }


def paper_models(original: nn.Module, tensorized: nn.Module, qc: Mapping) -> dict[str, nn.Module]:
    """The paper's five models (``compactify.paper.PAPER_MODELS``, in that order), built in eval mode: see :func:`builders`."""
    return {name: build().eval() for name, build in builders(original, tensorized, qc).items()}


def build_and_size(original: nn.Module, tensorized: nn.Module, tokenizer, cfg: Mapping) -> tuple[dict, dict]:
    """Notebook 04: build the five models one by one; returns ``(models, built)`` with, per model,
    ``build_seconds``, ``memory_at_rest`` (:func:`compactify.quantize.model_size` right after
    building) and ``disk`` (safetensors bytes, or ``{"error"}`` where it cannot be saved).

    With ``quantize.save_models`` the 8-bit, 4-bit and 93% models are saved to
    ``run_dir/models/`` (:data:`SAVE_AS`) right away: bitsandbytes repacks 4-bit weights at the
    first forward pass and cannot save them faithfully after that. The others are written to a
    temporary directory just to be measured."""
    from . import quantize as Q
    from .config import run_dir

    qc, models, built = cfg["quantize"], {}, {}
    for name, build in builders(original, tensorized, qc).items():
        t0 = time.perf_counter()
        models[name] = build().eval()
        seconds = time.perf_counter() - t0
        try:
            if qc["save_models"] and name in SAVE_AS:
                disk = Q.save_quantized(models[name], tokenizer, run_dir(cfg) / "models" / SAVE_AS[name])
            else:
                disk = Q.serialized_bytes(models[name])
        except Q.QuantizeError as e:
            disk = {"error": str(e)}
        built[name] = {"build_seconds": seconds, "memory_at_rest": Q.model_size(models[name]), "disk": disk}
    return models, built


def linear4bit_names(model: nn.Module) -> list[str]:
    """Names of the model's bitsandbytes 4-bit linear layers (in the 93% model: the matrices left dense)."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def both_halves(model_88: nn.Module, tensorized: nn.Module) -> dict[str, nn.Module]:
    """The 88% model in bf16 and in fp16 (the one already built, and the other from ``tensorized``),
    to time the two 16-bit formats against each other."""
    from . import quantize as Q

    return {k: model_88 if next(model_88.parameters()).dtype == dtype else Q.to_half(copy.deepcopy(tensorized), k)
            for k, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16))}


def next_token_quality(models: Mapping[str, nn.Module], ids: torch.Tensor, reference: str = "original") -> dict:
    """Per model, against ``reference`` on the tokens ``ids``: ``kl_to_original`` (KL(reference ||
    model) of the next-token distribution, nats, averaged over positions) and ``top1_agreement``
    (share of positions with the same most likely token). A cheap first look at what compression
    costs, before the benchmarks; the forward pass also repacks 4-bit layers as in real use."""
    with torch.inference_mode():
        ref_logp = torch.log_softmax(models[reference](ids).logits.float(), -1)
    out = {}
    for name, m in models.items():
        with torch.inference_mode():
            logp = torch.log_softmax(m(ids).logits.float(), -1)
        out[name] = {"kl_to_original": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
                     "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())}
    return out


def paper_memory_ratios(table1_check: Mapping) -> dict[str, float]:
    """Table I's size of each model relative to the fp32 original's (``paper_table1_check()``'s rows)."""
    rows = table1_check["rows"]
    return {k: v["paper_gb"] / rows["original"]["paper_gb"] for k, v in rows.items()}


def model_rows(built: Mapping, in_use: Mapping, quality: Mapping, table1_check: Mapping) -> dict:
    """Notebook 04's result per model: :func:`build_and_size`'s record, the bytes in use (after a
    forward pass), memory and disk relative to the fp32 original's, Table I's ratio and :func:`next_token_quality`."""
    paper = paper_memory_ratios(table1_check)
    fp32, fp32_disk = built["original"]["memory_at_rest"]["bytes"], built["original"]["disk"]["safetensors_bytes"]
    return {name: {"build_seconds": b["build_seconds"], "memory_at_rest": b["memory_at_rest"],
                   "memory_in_use": in_use[name], "disk": b["disk"], "memory_ratio_vs_fp32": in_use[name]["bytes"] / fp32,
                   "disk_ratio_vs_fp32": b["disk"].get("safetensors_bytes", math.nan) / fp32_disk,
                   "paper_ratio_vs_fp32": paper[name], **quality[name]} for name, b in built.items()}


def memory_table(rows: Mapping):
    """Table I's columns, measured (a DataFrame of :func:`model_rows`): parameters and their
    precisions, MB at rest, in use and on disk, bits per parameter, ours and the paper's ratio to fp32."""
    import pandas as pd

    def row(name, r):
        rest = r["memory_at_rest"]
        return {"model": name, "parameters (M)": rest["params"] / 1e6,
                "precision": ", ".join(f"{k} {v / rest['params']:.0%}" for k, v in rest["params_by_precision"].items()),
                "MB at rest": rest["bytes"] / 1e6, "MB in use": r["memory_in_use"]["bytes"] / 1e6,
                "MB on disk": r["disk"].get("safetensors_bytes", math.nan) / 1e6,
                "bits/param": r["memory_in_use"]["bits_per_param"], "memory vs fp32": r["memory_ratio_vs_fp32"],
                "paper vs fp32": r["paper_ratio_vs_fp32"], "kl_to_original": r["kl_to_original"],
                "top1_agreement": r["top1_agreement"]}

    return pd.DataFrame([row(n, r) for n, r in rows.items()]).set_index("model")


def size_table(sizes: Mapping):
    """Notebook 06's Table I (a DataFrame): MB in memory, parameters and their precisions per model
    (``{model: compactify.quantize.model_size(...)}``), and the memory relative to the original's."""
    import pandas as pd

    table = pd.DataFrame({n: {"MB in memory": s["bytes"] / 1e6, "parameters (M)": s["params"] / 1e6,
                              "precision": ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in s["params_by_precision"].items())}
                          for n, s in sizes.items()}).T
    table["vs fp32"] = (table["MB in memory"] / table.loc["original", "MB in memory"]).round(3)
    return table


def speed_claims(speed: Mapping) -> dict:
    """The paper's speed claims (Fig. 4's text, ``compactify.paper``: 4-bit 13% slower, the
    tensorized model more than 25% faster) against ``speed`` (:func:`compactify.speed.compare`).
    ``paper_ratio`` is the claim as a tokens/s ratio (1 / the paper's time ratio); the direction
    holds where our ratio is on the same side of 1. Models not in ``speed`` are left out."""
    from . import paper

    out = {}
    for name in ("4-bit", "88%"):
        if name not in speed:
            continue
        t = paper.inference_time(name)
        claim = f"{t - 1:.0%} slower" if t > 1 else f"more than {1 - t:.0%} faster"  # 88%: an upper bound on the time
        ratio = paper.speed_ratio(name)
        p, d = speed[name]["prefill_ratio"], speed[name]["decode_ratio"]
        out[name] = {"paper": f"{claim} than the original", "paper_ratio": ratio, "prefill_ratio": p, "decode_ratio": d,
                     "direction_holds": {k: (v < 1) == (ratio < 1) for k, v in (("prefill", p), ("decode", d))}}
    return out


# ----------------------------------------------------------------------------- notebook 06: the benchmarks

EARLIER = {"original": ("baseline", "baseline"), "tensorized (unhealed)": ("tensorize", None),
           "healed (fp32)": ("heal", "after")}  # row name: (compactify.run artefact, key of its evaluation)


def earlier_evaluations(cfg: Mapping) -> tuple[dict, dict]:
    """``(reused, why_not)``: the evaluations notebooks 00 (original), 03 (tensorized, before
    healing) and 05 (after healing, fp32) made, where they were made with this config's settings,
    ``eval`` included; the evaluation is deterministic for a given config and seed, so they need not
    be recomputed. ``why_not`` says, per row, why it is not reused."""
    from . import run
    from .results import read_json

    reused, why_not = {}, {}
    for name, (art, key) in EARLIER.items():
        try:
            data = read_json(run.require(cfg, art))
        except run.RunInputError as e:
            why_not[name] = str(e)
            continue
        if run.differences(data["meta"]["config"], cfg, ["eval"]):
            why_not[name] = "scored with other eval settings"
            continue
        reused[name] = data["main"]["evaluation"] if key is None else data[key]
    return reused, why_not


def evaluate_all(models: Mapping[str, nn.Module], tokenizer, cfg: Mapping, heldout: Mapping,
                 reused: Mapping) -> dict:
    """Every model's evaluation (``compactify.evaluate.evaluate_model``: tasks and held-out
    perplexity), taken from ``reused`` (:func:`earlier_evaluations`) where it is there; the
    reused rows for the tensorized model before and after healing (fp32) are added after the five."""
    from .evaluate import evaluate_model

    evals = {}
    for name, m in models.items():
        if name in reused:
            evals[name] = reused[name]
            continue
        t0 = time.perf_counter()
        evals[name] = evaluate_model(m, tokenizer, cfg, heldout_ids=heldout)
        print(f"{name}: evaluated in {time.perf_counter() - t0:.0f} s")
    return evals | {n: reused[n] for n in EARLIER if n in reused and n not in evals}


def common_tasks(evals: Mapping) -> list[str]:
    """The original's tasks that every evaluation has (reused results may predate a change of the task list)."""
    return [t for t in evals["original"]["tasks"] if all(t in e["tasks"] for e in evals.values())]


def score_table(evals: Mapping):
    """Table II (a DataFrame): every task's score ± stderr (%) and every held-out text's perplexity, per model."""
    import pandas as pd

    tasks, texts = common_tasks(evals), list(evals["original"]["perplexity_texts"])
    return pd.DataFrame({n: {f"{t} (n={e['tasks'][t]['n']})":
                             f"{100 * e['tasks'][t]['value']:.1f} ± {100 * (e['tasks'][t]['stderr'] or 0):.1f}"
                             for t in tasks} | {f"ppl {x}": f"{e['perplexity_texts'][x]['ppl']:,.1f}" for x in texts}
                         for n, e in evals.items()})

