"""The library behind ``benchmarks/scale.py`` (LLaMA-2-7B at paper scale, dense vs MPO, one run):
the model shape (:class:`Shape`), decomposing every block matrix with timing
(:func:`decompose_all`), bytes at the real 7B shape from a plan alone (:func:`bytes_at_7b`),
a FLOP cost model of the MPO forward the engine runs (:func:`cost_model`), a per-step profile of
``MPOLinear``'s contraction at batch 1 (:func:`profile_mpo`), and the verdict on the issue's
targets with the reason for each miss (:func:`judge`). The benchmark script measures speed and a
healing step and writes the JSON; these parts are tested on their own (tests/test_scale.py).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from . import paper
from .mpo import MPOLinear, bond_dims, chi_for_ratio, count_params, factorize
from .paper import LLAMA2_7B
from .speed import stats

# The targets at the 7B shape, beside the paper's own (compactify.paper: 1 / 0.75 and "about 2x").
TARGETS = {"decomposition_s": 30.0, "decode_ratio": 1.5, "paper_decode_ratio": paper.speed_ratio("88%"),
           "heal_tokens_ratio": 1.5, "paper_heal_ratio": paper.claims()["healing_speedup_tensorized"]["value"],
           "heal_peak_memory_ratio": 0.5}


@dataclass
class Shape:
    hidden: int
    intermediate: int
    heads: int
    blocks: int
    vocab: int

    def matrices(self) -> dict:
        h, f = self.hidden, self.intermediate
        return {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.blocks,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads, vocab_size=self.vocab,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def timed(fn, device) -> float:
    """Wall time of ``fn()``, with the GPU's queue drained before and after (kernels are asynchronous)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


# ---------------------------------------------------------------- 1. decomposition
def decompose_all(dense, shape: Shape, ratio: float, cores: int, device) -> tuple:
    """Tensorize a copy of ``dense``, one matrix type at a time (all blocks), timing each."""
    from .tensorize import MATRICES, Plan, size_report, tensorize

    mpo = copy.deepcopy(dense)
    seconds = {}
    for kind in shape.matrices():
        plan = Plan.uniform(shape.blocks, target_ratio=ratio, matrices=(kind,), cores=cores)
        # errors=False: recording each matrix's error would rebuild it, which is not part of decomposing
        seconds[kind] = timed(lambda: tensorize(mpo, plan, progress=True, errors=False), device)
    report = size_report(mpo)
    rows0 = {r["matrix"]: r for r in report["rows"] if r["block"] == 0}
    per_type = {k: {"shape": list(s), "seconds": seconds[k], "seconds_per_matrix": seconds[k] / shape.blocks,
                    "bond_dims": rows0[k]["bond_dims"], "out_factors": rows0[k]["out_factors"],
                    "in_factors": rows0[k]["in_factors"], "params_ratio": rows0[k]["ratio"],
                    "relative_error_block0": mpo.get_submodule(f"model.layers.0.{MATRICES[k]}").to_mpo().relative_error(
                        dense.get_submodule(f"model.layers.0.{MATRICES[k]}").weight)}
                for k, s in shape.matrices().items()}
    t = report["totals"]
    return mpo, {"seconds": sum(seconds.values()), "matrices": t["matrices"], "matrices_tensorized": t["matrices_tensorized"],
                 "matrices_per_type": {k: sum(r["tensorized"] for r in report["rows"] if r["matrix"] == k) for k in seconds},
                 "block_params_dense": t["block_params_before"], "block_params_mpo": t["block_params_after"],
                 "block_params_ratio": t["block_params_after"] / t["block_params_before"],
                 "model_params_dense": t["model_params_before"], "model_params_mpo": t["model_params_after"],
                 "ratio_asked": ratio, "cores": cores, "svd": "gram (compactify.mpo.gram_svd, float64 on the device)",
                 "per_type": per_type}


def bytes_at_7b(ratio: float, cores: int) -> dict:
    """Bytes of each model at the real LLaMA-2 7B shape, computed from the same plan (no weights needed)."""
    from .quantize import NF4_BITS_DQ, PAPER_TABLE1, paper_table1_check

    check = paper_table1_check()
    p = check["params"]
    mpo_block = 0
    for kind, (o, i) in Shape(**LLAMA2_7B).matrices().items():
        dims = [a * b for a, b in zip(factorize(o, cores), factorize(i, cores))]
        mpo_block += LLAMA2_7B["blocks"] * count_params(dims, bond_dims(dims, chi_for_ratio(dims, ratio)))
    rest = p["embedding_and_head"] + p["norms"]
    gb = {"dense_fp32": 4 * p["total"], "dense": 2 * p["total"], "8bit": check["rows"]["8-bit"]["bnb_gb"] * 1e9,
          "4bit": check["rows"]["4-bit"]["bnb_gb"] * 1e9, "mpo": 2 * (mpo_block + rest),
          "mixed": 2 * (mpo_block + p["norms"]) + p["embedding_and_head"] * NF4_BITS_DQ / 8}
    return {"bytes": {k: round(v) for k, v in gb.items()}, "params_mpo_model": mpo_block + rest,
            "params_dense_model": p["total"], "paper_table1_gb": {k: v[0] for k, v in PAPER_TABLE1.items()},
            "how": "computed: fp32/16-bit 4/2 bytes per parameter; 8-bit and 4-bit as bitsandbytes stores them "
                   "(paper_table1_check); MPO parameters from the plan's bond dimensions at the 7B shapes"}


# ---------------------------------------------------------------- profile: what dominates at batch 1
def _flops(eq: str, a: torch.Tensor, b: torch.Tensor) -> int:
    size = dict(zip(eq.split("->")[0].split(",")[0], a.shape)) | dict(zip(eq.split("->")[0].split(",")[1], b.shape))
    return 2 * math.prod(size.values())


def profile_mpo(shapes: dict, ratio: float, cores: int, device, dtype, repeats: int, seed: int) -> list:
    """Time each contraction step of ``MPOLinear`` at batch 1 (random cores) against nn.Linear."""
    torch.manual_seed(seed)
    rows = []
    for shape in dict.fromkeys(shapes.values()):
        out_f, in_f = factorize(shape[0], cores), factorize(shape[1], cores)
        dims = [o * i for o, i in zip(out_f, in_f)]
        layer = MPOLinear(out_f, in_f, bond_dims(dims, chi_for_ratio(dims, ratio)), bias=False, device=device, dtype=dtype)
        for p in layer.cores:
            torch.nn.init.normal_(p, std=(p.shape[0] * p.shape[2]) ** -0.5)
        w = torch.randn(shape, device=device, dtype=dtype) * 0.02
        x = torch.randn(1, shape[1], device=device, dtype=dtype)
        flops, program = layer.plan(1)
        # the steps of MPOLinear.forward, replayed one by one so that each can be timed
        env = {f"c{k}": c.detach() for k, c in enumerate(layer.cores)}
        env["c0"], env[f"c{cores - 1}"] = env["c0"].squeeze(0), env[f"c{cores - 1}"].squeeze(-1)
        env["x"] = x.reshape(1, *in_f)
        steps = []
        with torch.inference_mode():
            for name, left, right, eq, _ in program:
                a, b = env[left], env[right]
                times = [timed(lambda: torch.einsum(eq, a, b), device) for _ in range(repeats + 1)][1:]
                env[name] = torch.einsum(eq, a, b)
                steps.append({"equation": eq, "left": [left, list(a.shape)], "right": [right, list(b.shape)],
                              "flops": _flops(eq, a, b), "seconds_min": min(times), "seconds_median": stats(times)["median"]})
            dense = [timed(lambda: torch.nn.functional.linear(x, w), device) for _ in range(repeats + 1)][1:]
            whole = [timed(lambda: layer(x), device) for _ in range(repeats + 1)][1:]
        total = sum(s["seconds_min"] for s in steps)
        for s in steps:
            s["share_of_steps"] = s["seconds_min"] / total
        rows.append({"shape": list(shape), "bond_dims": list(layer.bond_dims), "params_ratio": layer.num_cores_params / math.prod(shape),
                     "flops_ratio": flops / layer.dense_flops(1), "bytes_ratio": layer.bytes(1) / layer.dense_bytes(1),
                     "dense_seconds_min": min(dense), "mpo_seconds_min": min(whole),
                     "time_ratio_min": min(whole) / min(dense), "steps": steps})
    return rows


def cost_model(mpo, tokens: dict) -> dict:
    """FLOPs of all MPO layers over their dense FLOPs, per regime, for the forward the layer really runs:
    factored (``MPOLinear.flops``), or, from ``materialize_from`` tokens on where the engine has that
    switch, W rebuilt from the cores (estimated as a left-to-right contraction) then one dense GEMM."""
    layers = [m for m in mpo.modules() if isinstance(m, MPOLinear)]
    dense = {k: sum(m.dense_flops(t) for m in layers) for k, t in tokens.items()}

    def build(m):  # merging cores 0..k (prod d_0..d_k x r_{k+1}) with core k+1 (r_{k+1}, d_{k+1}, r_{k+2})
        d, r = [o * i for o, i in zip(m.out_factors, m.in_factors)], [1, *m.bond_dims, 1]
        return sum(2 * math.prod(d[:k + 1]) * r[k + 1] * d[k + 1] * r[k + 2] for k in range(len(d) - 1))

    out = {}
    for k, t in tokens.items():
        threshold = getattr(layers[0], "materialize_from", None)
        materialized = threshold is not None and t >= threshold
        factored = sum(m.flops(t) for m in layers) / dense[k]
        rebuilt = sum(build(m) for m in layers) / dense[k] + 1
        out[k] = {"tokens": t, "forward": "materialized" if materialized else "factored",
                  "flops_ratio": rebuilt if materialized else factored, "factored_flops_ratio": factored,
                  "materialized_flops_ratio": rebuilt}
    return out


# ---------------------------------------------------------------- targets and why they were missed
def judge(result: dict, at_7b_gpu: bool) -> tuple[dict, dict]:
    r, prof = result["ratios"], result.get("profile") or []
    spec = {"decomposition_s": (result["decomposition"]["seconds"], "<=", TARGETS["decomposition_s"], None),
            "decode_ratio": (r["decode"], ">=", TARGETS["decode_ratio"], TARGETS["paper_decode_ratio"]),
            "heal_tokens_ratio": (r["heal_tokens_per_s"], ">=", TARGETS["heal_tokens_ratio"], TARGETS["paper_heal_ratio"]),
            "heal_peak_memory_ratio": (r["heal_peak_memory"], "<=", TARGETS["heal_peak_memory_ratio"], None)}
    targets = {k: {"target": f"{op} {t}", "paper": p, "measured": v, "met": v <= t if op == "<=" else v >= t}
               for k, (v, op, t, p) in spec.items()}
    if not at_7b_gpu:  # 30 s is a target for 224 matrices of the 7B shapes on an H100, nothing else
        targets["decomposition_s"].update(met=None, note="the target is for the 7B shape on one H100, not this run")
    cm, notes = {k: v["flops_ratio"] for k, v in result["cost_model_flops_ratio"].items()}, {}
    if targets["decode_ratio"]["met"] is False and prof:
        worst = max(prof, key=lambda p: p["time_ratio_min"])
        step = max(worst["steps"], key=lambda s: s["seconds_min"])
        notes["decode_ratio"] = (
            f"compute: at batch 1 the MPO layers need {cm['decode']:.0f}x the FLOPs of the dense matrices at this run's "
            f"shapes and {worst['flops_ratio']:.0f}x at {worst['shape'][0]}x{worst['shape'][1]} (bonds {worst['bond_dims']}), "
            f"while moving {worst['bytes_ratio']:.2f}x the bytes; there one MPO forward took {worst['time_ratio_min']:.1f}x "
            f"nn.Linear, {step['share_of_steps']:.0%} of it in '{step['equation']}' ({step['left'][0]} {step['left'][1]} "
            f"with {step['right'][0]} {step['right'][1]}; c<k> are cores (r, o, i, r), x the input, t<k> intermediates): "
            f"{step['flops'] / 2 / math.prod(worst['shape']):.0f} multiply-adds per dense weight in that step alone")
    if targets["heal_tokens_ratio"]["met"] is False:
        f, how = cm["heal"], result["cost_model_flops_ratio"]["heal"]["forward"]
        notes["heal_tokens_ratio"] = (
            f"compute: at {result['config']['heal_tokens']} tokens the MPO layers run {how} "
            + ("(W rebuilt from the cores at every call, then one GEMM, and back through the contraction) " if how ==
               "materialized" else "") + f"and need {f:.1f}x the dense FLOPs forward (cost model)" if f >= 1 else
            f"efficiency: the MPO layers need {f:.2f}x the dense FLOPs (cost model, {how}) but run as several small "
            "einsums per matrix, whose permuted intermediates are copied, written and read back")
    if targets["heal_peak_memory_ratio"]["met"] is False:
        h = result["heal"]
        act = {k: h[k]["peak_bytes"] - sum(h[k]["state_bytes"].values()) for k in ("mpo", "dense")}
        notes["heal_peak_memory_ratio"] = (
            "activations: MPO layers keep their einsum intermediates for backward; activations (and buffers) at the peak "
            f"{_mib(act['mpo'])} (MPO) vs {_mib(act['dense'])} (dense), parameters + gradients + AdamW state "
            f"{_mib(sum(h['mpo']['state_bytes'].values()))} vs {_mib(sum(h['dense']['state_bytes'].values()))}")
    return targets, notes


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


