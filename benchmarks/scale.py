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
import shlex  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from compactify.progress import progress as tqdm  # noqa: E402

from compactify.config import REPO_ROOT, defaults  # noqa: E402
from compactify.mpo import MPOError, MPOLinear, chi_for_ratio, factorize  # noqa: E402
from compactify.scale import Shape, bytes_at_7b, cost_model, decompose_all, judge, profile_mpo, timed  # noqa: E402
from compactify.speed import stats  # noqa: E402

from compactify.models import DTYPES as _MODEL_DTYPES  # noqa: E402
from compactify.paper import LLAMA2_7B  # noqa: E402

TRAINABLE = defaults()["heal"]["trainable"]  # the study's healing: the blocks train, embedding and head do not
DTYPES = {k: v for k, v in _MODEL_DTYPES.items() if k in ("float32", "bfloat16", "float16")}  # the long names


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _free(device):
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None


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
        times.append(timed(one, device))
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


# ---------------------------------------------------------------- the run
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--scale", type=float, default=1.0, help="divide hidden, MLP and heads by 1/scale (0.25: 1024/2752/8)")
    ap.add_argument("--blocks", type=int, default=LLAMA2_7B["blocks"])
    for k in ("hidden", "intermediate", "heads", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the scaled {k}")
    ap.add_argument("--ratio", type=float, default=defaults()["tensorize"]["main_keep_ratio"],
                    help="fraction of block-matrix parameters kept (default: the study's tensorize.main_keep_ratio)")
    ap.add_argument("--cores", type=int, default=defaults()["mpo"]["cores"], help="MPO cores (default: the study's mpo.cores)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 2048 on cuda, 128 on cpu")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="decode prompt length")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32 cuda, 8 cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heal-tokens", type=int, default=None, help="tokens per healing step (default 512 cuda, 64 cpu)")
    ap.add_argument("--heal-steps", type=int, default=2, help="timed healing steps after one warm-up step")
    ap.add_argument("--activation-checkpointing", type=int, default=1, choices=(0, 1), help="1: recompute each block's activations in the backward pass (at the 7B shape, "
                    "for memory; the study's heal.activation_checkpointing is off at SmolLM2 size)")
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
    from compactify.figures import save_scale_figure as plot

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
