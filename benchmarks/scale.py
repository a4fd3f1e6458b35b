"""LLaMA-2-7B at paper scale, side by side in one run: decomposition time, bytes, speed, healing.

A LLaMA-2-7B-shaped model (hidden 4096, MLP 11008, 32 blocks, 32 heads, vocab 32000) with
random weights is built in ``--dtype``; all 7 x 32 = 224 block matrices are tensorized with the
project's engine (``compactify.tensorize``, 3-core MPOs at ``--ratio 0.3``: 70% fewer parameters
in those matrices) and measured against the dense model, each model in the same process:

1. decomposition time of all block matrices (target: <= 30 s on one H100);
2. bytes of dense (fp32 computed, ``--dtype`` measured), MPO, 8-bit, 4-bit and mixed (MPO in
   16 bits, the embedding and head, the only dense layers left, in NF4) vs the paper's Table I,
   with ``compactify.quantize.model_size``; where bitsandbytes cannot run, the reason is recorded;
3. prefill tokens/s and batch-1 decode tokens/s of dense, MPO, 4-bit and mixed, round-robin
   (target: MPO decode >= 1.5x dense; the paper claims 1.25x);
4. one healing step (forward + backward + AdamW) under FSDP2 (``compactify.heal.wrap_model``,
   world size 1): tokens/s and peak memory, MPO vs dense (targets: >= 1.5x, <= 50%).

Random weights: times and bytes do not depend on the values (the MPOs' errors, recorded for block
0, are those of Gaussian noise). ``--scale`` divides hidden, MLP and heads and ``--blocks`` sets
the depth, so the same code runs on a CPU; the vocabulary scales so that embedding + head keep
their 7B share of the parameters (unless ``--vocab``). Read the MPO/dense ratios, measured side by
side; a profile of ``MPOLinear``'s contraction steps at the 7B shapes, batch 1, names the bottleneck.

Usage (CPU: ~1-2 min at 1 thread, niced, on a busy 2-core machine; data/results/scale/cpu_scaled.json)::

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/scale.py --device cpu --dtype bfloat16 \\
        --scale 0.25 --blocks 4 --repeats 5 --heal-steps 3 --out data/results/scale/cpu_scaled.json
    .venv/bin/python benchmarks/scale.py --plot data/results/scale/*.json   # one figure from several runs

GPU launcher note (one H100 80 GB, ~60 GB at the peak: the dense healing step, pure bf16, with
its gradients and AdamW state, after the MPO, 4-bit and mixed copies are freed)::

    make env TORCH_SPEC="torch>=2.6"     # a CUDA build of torch; bitsandbytes >= 0.46 with CUDA
    .venv/bin/python benchmarks/scale.py --device cuda --dtype bfloat16 --out data/results/scale/h100.json

It needs only this package's dependencies (torch with CUDA, transformers, tensorly, bitsandbytes);
no weights are downloaded. Decode runs eager ``generate``: at batch 1 on a GPU it is partly bound by
kernel launches (an MPO layer launches 2-3 einsums where nn.Linear launches one).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads on a shared CPU: see mpo_linear.py

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from compactify.progress import progress as tqdm  # noqa: E402

from compactify.config import REPO_ROOT  # noqa: E402
from compactify.mpo import MPOError, MPOLinear, bond_dims, chi_for_ratio, count_params, factorize  # noqa: E402
from compactify.speed import stats  # noqa: E402

from compactify import paper  # noqa: E402
from compactify.models import DTYPES as _MODEL_DTYPES  # noqa: E402
from compactify.paper import LLAMA2_7B  # noqa: E402

# The targets at the 7B shape, beside the paper's own (compactify.paper: 1 / 0.75 and "about 2x").
TARGETS = {"decomposition_s": 30.0, "decode_ratio": 1.5, "paper_decode_ratio": paper.speed_ratio("88%"),
           "heal_tokens_ratio": 1.5, "paper_heal_ratio": paper.claims()["healing_speedup_tensorized"]["value"],
           "heal_peak_memory_ratio": 0.5}
TRAINABLE = ["mpo", "dense", "norms"]  # heal's default: the blocks train, embedding and head do not
DTYPES = {k: v for k, v in _MODEL_DTYPES.items() if k in ("float32", "bfloat16", "float16")}  # the long names


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


def _seconds(fn, device) -> float:
    """Wall time of ``fn()``, with the GPU's queue drained before and after (kernels are asynchronous)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _free(device):
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None


# ---------------------------------------------------------------- 1. decomposition
def decompose_all(dense, shape: Shape, ratio: float, cores: int, device) -> tuple:
    """Tensorize a copy of ``dense``, one matrix type at a time (all blocks), timing each."""
    from compactify.tensorize import MATRICES, Plan, size_report, tensorize

    mpo = copy.deepcopy(dense)
    seconds = {}
    for kind in shape.matrices():
        plan = Plan.uniform(shape.blocks, target_ratio=ratio, matrices=(kind,), cores=cores)
        # errors=False: recording each matrix's error would rebuild it, which is not part of decomposing
        seconds[kind] = _seconds(lambda: tensorize(mpo, plan, progress=True, errors=False), device)
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


# ---------------------------------------------------------------- 2. bytes
def build_variants(dense, mpo, dtype) -> tuple[dict, dict]:
    """8-bit, 4-bit and mixed copies (bitsandbytes), and every model's bytes; failures recorded."""
    from compactify.quantize import NF4_BITS_DQ, mixed, model_size, quantize

    half = dtype if dtype in (torch.bfloat16, torch.float16) else "auto"
    makers = {"8bit": lambda: quantize(copy.deepcopy(dense), 8),
              "4bit": lambda: quantize(copy.deepcopy(dense), 4),
              # all seven block matrices are MPOs, so the only dense layers left are the embedding and the
              # head: both go to NF4 (paper_table1_check's first candidate for Table I's 2.1 GB)
              "mixed": lambda: mixed(copy.deepcopy(mpo), 4, half=half, embeddings=True)}
    params = sum(p.numel() for p in dense.parameters())
    sizes = {"dense_fp32": {"bytes": 4 * params, "params": params, "how": "computed: 4 bytes x parameters"},
             "dense": {**model_size(dense), "how": f"measured (model_size), {str(dtype)[6:]}"},
             "mpo": {**model_size(mpo), "how": f"measured (model_size), MPO cores in {str(dtype)[6:]}"}}
    models = {}
    for name, make in makers.items():
        try:
            models[name] = make().eval()
            sizes[name] = {**model_size(models[name]), "how": "measured (model_size), bitsandbytes NF4 double-quant"
                           if name != "8bit" else "measured (model_size), bitsandbytes LLM.int8"}
        except Exception as e:  # noqa: BLE001 - a bitsandbytes build without this device's kernels: say why
            sizes[name] = {"bytes": None, "error": _err(e)}
    sizes["nf4_bits_per_param"] = NF4_BITS_DQ
    return models, sizes


def bytes_at_7b(ratio: float, cores: int) -> dict:
    """Bytes of each model at the real LLaMA-2 7B shape, computed from the same plan (no weights needed)."""
    from compactify.quantize import NF4_BITS_DQ, PAPER_TABLE1, paper_table1_check

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


# ---------------------------------------------------------------- 3. speed
def measure_speed(models: dict, device, vocab: int, prefill: int, prompt: int, new_tokens: int, repeats: int,
                  seed: int) -> dict:
    """Prefill and decode tokens/s, round-robin (``compactify.speed.compare`` on random token ids);
    a model whose first forward fails (a bitsandbytes build without this device's kernels) is
    left out with the reason."""
    from compactify.speed import compare

    g = torch.Generator().manual_seed(seed)
    pre_ids = torch.randint(3, vocab, (1, prefill), generator=g).to(device)
    dec_ids = torch.randint(3, vocab, (1, prompt), generator=g).to(device)
    errors = {}
    for name, m in list(models.items()):
        try:
            with torch.inference_mode():
                m.eval()(input_ids=dec_ids, use_cache=False)
        except Exception as e:  # noqa: BLE001
            errors[name] = _err(e)
            del models[name]
    res = compare(models, None, pre_ids, dec_ids, new_tokens=new_tokens, repeats=repeats, reference="dense",
                  progress=tqdm)
    out = {n: {"prefill_tokens_per_s": res[n]["prefill"], "decode_tokens_per_s": res[n]["decode"],
               "prefill_ratio_to_dense": res[n]["prefill_ratio"], "decode_ratio_to_dense": res[n]["decode_ratio"]}
           for n in models}
    return {"models": out, "errors": errors, "prefill_tokens": prefill, "decode_prompt_tokens": prompt,
            "decode_new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "how": "compactify.speed.compare: decode = (k-1) / (t(generate k) - t(generate 1)), greedy, KV cache, "
                   "batch 1; medians"}


# ---------------------------------------------------------------- 4. healing
def _saved_bytes():
    """A context counting the bytes autograd saves for backward (storages once; parameters excluded)."""
    seen: dict = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[(s.device, s.data_ptr())] = s.nbytes()
        return t

    return seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def measure_heal(model, device, dtype, vocab: int, tokens: int, steps: int, seed: int, checkpointing: bool) -> dict:
    """Heal ``model`` in place for 1 + ``steps`` steps under FSDP2, world size 1; tokens/s from the
    steps after the first (which allocates the AdamW state), and peak memory."""
    from compactify.config import load_config
    from compactify.heal import HealConfig, select_trainable, wrap_model

    torch.manual_seed(seed)
    model.train()
    counts = select_trainable(model, TRAINABLE)
    batch = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    no_ckpt = None
    if device.type == "cpu":  # all activations of one step without checkpointing, to size one recomputed block
        seen, hook = _saved_bytes()
        with hook:
            model(input_ids=batch, labels=batch, use_cache=False).loss
        no_ckpt = sum(seen.values())
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # fp32 parameters on a GPU: heal's recipe (fp32 master weights, bf16 compute). Parameters already in 16
    # bits: no cast policy, so parameters, gradients and AdamW state all stay in --dtype (pure bf16 training;
    # the dense 7B with fp32 master weights and AdamW state would need ~108 GB).
    mp = "bf16" if device.type == "cuda" and dtype == torch.float32 else "fp32"
    hc = HealConfig.from_cfg(load_config(None, {"device": device.type, "heal.strategy": "fsdp2",
                                                "heal.mixed_precision": mp}))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        other = torch.cuda.memory_allocated(device) - param_bytes  # whatever else this process holds
        torch.cuda.reset_peak_memory_stats(device)
    wrapped = wrap_model(model, hc, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    times, losses, saved = [], [], [0]
    for step in tqdm(range(steps + 1), desc="heal (FSDP2, world 1)"):
        def one():
            seen, hook = _saved_bytes()
            with hook:
                loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            saved.append(sum(seen.values()))  # per step: addresses are reused between steps
        times.append(_seconds(one, device))
    local = [p.to_local() if hasattr(p, "to_local") else p for p in wrapped.parameters()]
    state = {"params": sum(t.numel() * t.element_size() for t in local),
             "grads": sum(p.numel() * p.element_size() for p in params),
             "optimizer": sum(v.numel() * v.element_size() for s in optim.state.values() for v in s.values()
                              if torch.is_tensor(v) and v.ndim > 0)}
    ckpt_saved = max(saved)
    record = {"tokens_per_step": tokens, "step_seconds": times, "tokens_per_s": tokens / stats(times[1:])["median"],
              "losses": losses, "trainable_params": counts["trainable"], "total_params": counts["total"],
              "state_bytes": state, "activation_bytes_saved": ckpt_saved, "activation_checkpointing": checkpointing,
              "mixed_precision_policy": "bf16 compute, fp32 params" if mp == "bf16" else f"none (all in {str(dtype)[6:]})"}
    n_blocks = len(model.model.layers)
    if device.type == "cuda":
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - other
        record["peak_method"] = "torch.cuda.max_memory_allocated during wrap + steps, minus memory held by other models"
    else:
        one_block = max(0, no_ckpt - ckpt_saved) / n_blocks if checkpointing else 0
        record.update(activation_bytes_no_checkpointing=no_ckpt, activation_bytes_one_block=one_block,
                      peak_bytes=sum(state.values()) + (ckpt_saved + one_block if checkpointing else no_ckpt),
                      peak_method="counted: parameters + gradients + AdamW state (the tensors after the step) + "
                      "activations saved for backward (saved_tensors_hooks, parameters excluded), an upper bound; with checkpointing, "
                      "the checkpointed block inputs + one recomputed block, (no-checkpointing count - checkpointed "
                      "count) / blocks")
    return record


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
                times = [_seconds(lambda: torch.einsum(eq, a, b), device) for _ in range(repeats + 1)][1:]
                env[name] = torch.einsum(eq, a, b)
                steps.append({"equation": eq, "left": [left, list(a.shape)], "right": [right, list(b.shape)],
                              "flops": _flops(eq, a, b), "seconds_min": min(times), "seconds_median": stats(times)["median"]})
            dense = [_seconds(lambda: torch.nn.functional.linear(x, w), device) for _ in range(repeats + 1)][1:]
            whole = [_seconds(lambda: layer(x), device) for _ in range(repeats + 1)][1:]
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


# ---------------------------------------------------------------- the run
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--scale", type=float, default=1.0, help="divide hidden, MLP and heads by 1/scale (0.25: 1024/2752/8)")
    ap.add_argument("--blocks", type=int, default=LLAMA2_7B["blocks"])
    for k in ("hidden", "intermediate", "heads", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the scaled {k}")
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of block-matrix parameters kept")
    ap.add_argument("--cores", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 2048 on cuda, 128 on cpu")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="decode prompt length")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32 cuda, 8 cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heal-tokens", type=int, default=None, help="tokens per healing step (default 512 cuda, 64 cpu)")
    ap.add_argument("--heal-steps", type=int, default=2, help="timed healing steps after one warm-up step")
    ap.add_argument("--activation-checkpointing", type=int, default=1, choices=(0, 1), help="as heal's default (1)")
    ap.add_argument("--materialize-from", default="default", help="MPOLinear.materialize_from for the MPO models: "
                    "tokens from which W is rebuilt for one GEMM; 'none': always factored; default: the engine's")
    ap.add_argument("--profile", choices=("7b", "run", "none"), default="7b", help="MPOLinear step profile shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default data/results/scale/<device>_<7b|scaled>.json)")
    ap.add_argument("--figures", default=str(REPO_ROOT / "figures" / "scale"), help="figure directory ('' for none)")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only draw one figure from these result files")
    args = ap.parse_args(argv)
    if args.plot:
        return ap, args, None
    from compactify.models import ModelLoadError, resolve_device

    try:
        args.device = resolve_device(args.device)
    except (ModelLoadError, RuntimeError) as e:
        ap.error(f"{e} For this benchmark: --device cpu (with e.g. --scale 0.25 --blocks 4).")
    if args.device.type == "cuda":  # a definite index: NCCL and the memory counters need one
        args.device = torch.device("cuda", args.device.index if args.device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(args.device)
    s = args.scale
    shape = Shape(args.hidden or round(LLAMA2_7B["hidden"] * s), args.intermediate or round(LLAMA2_7B["intermediate"] * s),
                  args.heads or max(1, round(LLAMA2_7B["heads"] * s)), args.blocks, 0)
    # embedding + head keep their 7B share of the parameters: vocab scales with hidden x blocks (multiple of 64)
    shape.vocab = args.vocab or max(256, 64 * round(LLAMA2_7B["vocab"] * shape.hidden / 4096 * shape.blocks / 32 / 64))
    if min(asdict(shape).values()) < 1 or shape.hidden % shape.heads or (shape.hidden // shape.heads) % 2:
        ap.error(f"shape {asdict(shape)}: hidden must split into heads of even size, every size >= 1")
    if args.materialize_from != "default" and (not hasattr(MPOLinear, "materialize_from") or not (
            args.materialize_from == "none" or args.materialize_from.isdigit() and int(args.materialize_from) > 0)):
        ap.error(f"--materialize-from {args.materialize_from}: give a number of tokens >= 1 or 'none' (the engine "
                 f"must have MPOLinear.materialize_from: {hasattr(MPOLinear, 'materialize_from')})")
    if not 0 < args.ratio <= 1 or args.cores < 2:
        ap.error(f"--ratio {args.ratio} must be in (0, 1] (the fraction of block-matrix parameters kept), --cores >= 2")
    for kind, (o, i) in shape.matrices().items():
        try:
            chi_for_ratio([a * b for a, b in zip(factorize(o, args.cores), factorize(i, args.cores))], args.ratio)
        except MPOError as e:
            ap.error(f"{kind} ({o}x{i}) cannot be an MPO as asked: {e}")
    cuda = args.device.type == "cuda"
    args.prefill_tokens = args.prefill_tokens or (2048 if cuda else 128)
    args.new_tokens = args.new_tokens or (32 if cuda else 8)
    args.heal_tokens = args.heal_tokens or (512 if cuda else 64)
    if args.new_tokens < 2 or min(args.repeats, args.heal_steps, args.prompt_tokens) < 1 or \
            max(args.prefill_tokens, args.prompt_tokens + args.new_tokens, args.heal_tokens) > 4096:
        ap.error("--new-tokens must be >= 2, --repeats, --heal-steps, --prompt-tokens >= 1, and every sequence "
                 "<= 4096 tokens (LLaMA-2's context)")
    at_7b = asdict(shape) == LLAMA2_7B
    args.out = Path(args.out or REPO_ROOT / "data" / "results" / "scale" / f"{args.device.type}_{'7b' if at_7b else 'scaled'}.json")
    return ap, args, shape


def run(args, shape: Shape, argv) -> dict:
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from compactify.results import device_info, metadata, write_json

    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    with torch.device(device):
        dense = LlamaForCausalLM._from_config(shape.llama_config(), dtype=dtype).eval()
    mpo, decomposition = decompose_all(dense, shape, args.ratio, args.cores, device)
    if args.materialize_from != "default":  # per instance, so that nothing else in this process changes
        for m in mpo.modules():
            if isinstance(m, MPOLinear):
                m.materialize_from = None if args.materialize_from == "none" else int(args.materialize_from)
    forward_mode = {"materialize_from": getattr(next(m for m in mpo.modules() if isinstance(m, MPOLinear)),
                                                "materialize_from", None), "set_by": args.materialize_from}
    variants, sizes = build_variants(dense, mpo, dtype)
    variants.pop("8bit", None)  # bytes only: the brief times dense, MPO, 4-bit and mixed
    _free(device)
    speed = measure_speed({"dense": dense, "mpo": mpo, **variants}, device, shape.vocab, args.prefill_tokens,
                          args.prompt_tokens, args.new_tokens, args.repeats, args.seed)
    cm = cost_model(mpo, {"decode": 1, "prefill": args.prefill_tokens, "heal": args.heal_tokens})
    profile = [] if args.profile == "none" else profile_mpo(
        (Shape(**LLAMA2_7B) if args.profile == "7b" else shape).matrices(), args.ratio, args.cores, device, dtype,
        max(3, args.repeats), args.seed)
    del variants
    _free(device)
    # healing last, in place (the models are not needed afterwards): MPO first while the dense model
    # waits, then the dense one alone, so that a 7B run fits one 80 GB GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        heal = {"mpo": measure_heal(mpo, device, dtype, shape.vocab, args.heal_tokens, args.heal_steps, args.seed,
                                    bool(args.activation_checkpointing))}
        del mpo
        _free(device)
        heal["dense"] = measure_heal(dense, device, dtype, shape.vocab, args.heal_tokens, args.heal_steps, args.seed,
                                     bool(args.activation_checkpointing))
    finally:
        dist.destroy_process_group()
    sp = speed["models"]
    ratios = {"decode": sp["mpo"]["decode_ratio_to_dense"], "prefill": sp["mpo"]["prefill_ratio_to_dense"],
              "heal_tokens_per_s": heal["mpo"]["tokens_per_s"] / heal["dense"]["tokens_per_s"],
              "heal_peak_memory": heal["mpo"]["peak_bytes"] / heal["dense"]["peak_bytes"],
              "heal_state_memory": sum(heal["mpo"]["state_bytes"].values()) / sum(heal["dense"]["state_bytes"].values()),
              "bytes_mpo": sizes["mpo"]["bytes"] / sizes["dense"]["bytes"], "block_params": decomposition["block_params_ratio"]}
    info = device_info(device)
    if device.type == "cuda":
        import subprocess

        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({_err(e)})"
    result = {"meta": metadata(None, device, model=f"LLaMA-2-7B-shaped, random weights (h{shape.hidden} f{shape.intermediate} {shape.heads} heads {shape.blocks} blocks vocab {shape.vocab})", seed=args.seed,
                               config_name=f"benchmarks/scale.py {args.dtype}", command=argv),
              "what": "decomposition, bytes, speed and one healing step of a LLaMA-2-7B-shaped model, dense vs MPO, one run",
              "config": {"shape": asdict(shape), "llama2_7b": LLAMA2_7B, "at_7b_shape": asdict(shape) == LLAMA2_7B,
                         "dtype": args.dtype, "ratio": args.ratio, "cores": args.cores, "seed": args.seed,
                         "prefill_tokens": args.prefill_tokens, "heal_tokens": args.heal_tokens,
                         "heal_trainable": TRAINABLE, "mpo_forward": forward_mode, "vocab_rule": "given" if args.vocab else "scaled with hidden x blocks"},
              "decomposition": decomposition, "bytes": {"measured": sizes, "llama2_7b_computed": bytes_at_7b(args.ratio, args.cores)},
              "speed": speed, "heal": heal, "cost_model_flops_ratio": cm, "profile": profile, "ratios": ratios}
    result["meta"]["device"] = info
    result["targets"], result["bottleneck"] = judge(result, result["config"]["at_7b_shape"] and device.type == "cuda")
    if device.type == "cuda":
        result["bottleneck"]["decode_eager"] = "decode runs eager generate: batch-1 GPU decode is partly launch-bound"
    write_json(args.out, result)
    return result


def main(argv=None) -> dict | None:
    from compactify.scale_plots import save_scale_figure as plot

    argv = list(sys.argv[1:] if argv is None else argv)
    ap, args, shape = parse(argv)
    if args.plot:
        from compactify.results import read_json

        paths = [Path(p) for p in args.plot]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            ap.error(f"no such result file: {', '.join(missing)}")
        print(f"wrote {plot([read_json(p) for p in paths], args.figures, 'scale_' + '_'.join(p.stem for p in paths))}")
        return None
    result = run(args, shape, shlex.join(["python", "benchmarks/scale.py", *argv]))
    print({k: round(v, 3) for k, v in result["ratios"].items()})
    print({k: v["met"] for k, v in result["targets"].items()})
    print(f"wrote {args.out}")
    if args.figures:
        print(f"wrote {plot([result], args.figures, 'scale_' + args.out.stem)}")
    return result


if __name__ == "__main__":
    main()
