"""Dense vs MPO vs low-rank at the same block-parameter budget: prefill and decode tokens/s.

``benchmarks/scale.py`` times dense, MPO, 4-bit and mixed; the other way to keep 30% of a
matrix's parameters is a rank-r factorisation ``W ~ A B`` (two ``nn.Linear``), which this
benchmark adds, side by side in one process (``compactify.speed.compare``, round-robin):

* ``dense``: a LLaMA-2-7B-shaped model (``--scale``/``--blocks`` shrink it, as in scale.py);
* ``mpo``: all seven matrices of every block as ``MPOLinear`` with the bond dimensions
  scale.py's plan picks for ``--keep`` (``chi_for_ratio``), random cores;
* ``lowrank``: the same matrices as ``Linear(in, r) -> Linear(r, out)`` at the largest rank
  within ``--keep`` (``compactify.lowrank.lowrank_rank``), random factors.

Why random weights and no decomposition: speed does not depend on the values, and scale.py
already times the decomposition; building the compressed layers directly keeps this run short
(the question it answers is "which 70%-fewer format decodes fastest", target >= 1.5x dense).

Usage::

    .venv/bin/python benchmarks/lowrank_speed.py --device cuda --dtype bfloat16 --out data/results/gpu/lowrank.json
    .venv/bin/python benchmarks/lowrank_speed.py --device cpu --scale 0.015625 --blocks 1 --out /tmp/lr.json
"""
from __future__ import annotations

import argparse
import shlex
import sys

import torch
from torch import nn

from compactify.lowrank import CompressError, lowrank_rank
from compactify.mpo import MPOError, bond_dims, chi_for_ratio, factorize
from compactify.mpo_layer import MPOLinear

from compactify.models import MATRIX_PATHS as MATRICES
from compactify.models import DTYPES as _MODEL_DTYPES  # noqa: E402
from compactify.paper import LLAMA2_7B
DTYPES = {k: v for k, v in _MODEL_DTYPES.items() if k in ("float32", "bfloat16", "float16")}  # the long names


def mpo_layer(out_f: int, in_f: int, keep: float, cores: int, device, dtype) -> MPOLinear:
    """An ``MPOLinear`` of shape ``out_f x in_f`` at the bond dimensions that keep ``keep``, random cores."""
    of, inf = factorize(out_f, cores), factorize(in_f, cores)
    dims = [o * i for o, i in zip(of, inf)]
    layer = MPOLinear(of, inf, bond_dims(dims, chi_for_ratio(dims, keep)), bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        for p in layer.cores:  # unit-variance outputs, so that activations stay finite through the blocks
            p.normal_(0, (p.shape[0] * p.shape[2]) ** -0.5)
    return layer


def lowrank_layer(out_f: int, in_f: int, keep: float, device, dtype) -> nn.Sequential:
    """``Linear(in, r) -> Linear(r, out)`` at the largest rank within ``keep`` of the parameters."""
    r = lowrank_rank((out_f, in_f), keep)
    return nn.Sequential(nn.Linear(in_f, r, bias=False, device=device, dtype=dtype),
                         nn.Linear(r, out_f, bias=False, device=device, dtype=dtype))


def replace_blocks(model: nn.Module, make) -> int:
    """Swap every block matrix for ``make(out, in)``; returns the block parameters after the swap."""
    params = 0
    for layer in model.model.layers:
        for path in MATRICES.values():
            parent_name, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, child)
            new = make(old.out_features, old.in_features)
            setattr(parent, child, new)
            params += sum(p.numel() for p in new.parameters())
    return params


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--scale", type=float, default=1.0, help="divide hidden, MLP and heads by 1/scale")
    ap.add_argument("--blocks", type=int, default=LLAMA2_7B["blocks"])
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 at the 7B shape, else scaled (>= 256)")
    ap.add_argument("--keep", type=float, default=0.3, help="fraction of block-matrix parameters kept (0.3: 70%% fewer)")
    ap.add_argument("--cores", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 2048 on cuda, 32 on cpu")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 on cuda, 4 on cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode", default="eager", choices=["eager", "compiled", "both"],
                    help="decode runtime (compactify.speed.generate_kwargs); both: each model in each, side by side")
    ap.add_argument("--out", required=True, help="result JSON path")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here; use --device cpu with a small --scale")
    if not 0 < args.keep < 1 or args.cores < 2 or args.repeats < 1 or args.blocks < 1 or not 0 < args.scale <= 1:
        ap.error("--keep must be in (0, 1), --cores >= 2, --repeats >= 1, --blocks >= 1, --scale in (0, 1]")
    s = args.scale
    shape = {"hidden": round(LLAMA2_7B["hidden"] * s), "intermediate": round(LLAMA2_7B["intermediate"] * s),
             "heads": max(1, round(LLAMA2_7B["heads"] * s)), "blocks": args.blocks}
    shape["vocab"] = args.vocab or (LLAMA2_7B["vocab"] if s == 1 else max(256, 64 * round(LLAMA2_7B["vocab"] * s / 64)))
    if shape["hidden"] % shape["heads"] or (shape["hidden"] // shape["heads"]) % 2:
        ap.error(f"shape {shape}: hidden must split into heads of even size; choose another --scale")
    for o, i in ((shape["hidden"], shape["hidden"]), (shape["intermediate"], shape["hidden"])):
        try:
            lowrank_rank((o, i), args.keep)
            chi_for_ratio([a * b for a, b in zip(factorize(o, args.cores), factorize(i, args.cores))], args.keep)
        except (CompressError, MPOError) as e:
            ap.error(f"a {o}x{i} matrix cannot keep {args.keep} of its parameters as asked: {e}")
    cuda = args.device.startswith("cuda")
    args.prefill_tokens = args.prefill_tokens or (2048 if cuda else 32)
    args.new_tokens = args.new_tokens or (32 if cuda else 4)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed is a difference of two generate calls)")
    return args, shape


def main(argv=None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from compactify.results import device_info, metadata, write_json
    from compactify.speed import compare

    argv = list(sys.argv[1:] if argv is None else argv)
    args, shape = parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["blocks"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], vocab_size=shape["vocab"], max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    models, params = {}, {}
    for name in ("dense", "mpo", "lowrank"):
        with torch.device(device):
            m = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
        if name == "dense":
            params[name] = sum(getattr(m.model.layers[0].get_submodule(p), "weight").numel()
                               for p in MATRICES.values()) * shape["blocks"]
        elif name == "mpo":
            params[name] = replace_blocks(m, lambda o, i: mpo_layer(o, i, args.keep, args.cores, device, dtype))
        else:
            params[name] = replace_blocks(m, lambda o, i: lowrank_layer(o, i, args.keep, device, dtype))
        models[name] = m.eval()
    g = torch.Generator().manual_seed(args.seed)
    pre = torch.randint(3, shape["vocab"], (1, args.prefill_tokens), generator=g).to(device)
    dec = torch.randint(3, shape["vocab"], (1, args.prompt_tokens), generator=g).to(device)
    runtimes = ["eager", "compiled"] if args.decode == "both" else [args.decode]
    timed = {f"{n}@{r}": m for r in runtimes for n, m in models.items()}   # one model object under each runtime
    res = compare(timed, None, pre, dec, new_tokens=args.new_tokens, repeats=args.repeats, reference="dense@" + runtimes[0],
                  decode={k: k.split("@")[1] for k in timed}, rotate=True)
    by_runtime = {}
    for r in runtimes:
        ref = res[f"dense@{r}"]
        by_runtime[r] = {n: {"prefill_tokens_per_s": res[f"{n}@{r}"]["prefill"], "decode_tokens_per_s": res[f"{n}@{r}"]["decode"],
                             "prefill_ratio_to_dense": res[f"{n}@{r}"]["prefill"]["median"] / ref["prefill"]["median"],
                             "decode_ratio_to_dense": res[f"{n}@{r}"]["decode"]["median"] / ref["decode"]["median"],
                             "block_params": params[n], "block_params_ratio": params[n] / params["dense"]} for n in models}
    out = by_runtime[runtimes[0]]
    # the target compares formats within one runtime (compressed vs dense, both eager or both compiled)
    fastest = max(((r, n) for r in runtimes for n in ("mpo", "lowrank")),
                  key=lambda rn: by_runtime[rn[0]][rn[1]]["decode_ratio_to_dense"])
    result = {"meta": metadata(None, device, seed=args.seed, command=shlex.join(["python", "benchmarks/lowrank_speed.py", *argv]),
                               model=f"LLaMA-2-7B-shaped, random weights {shape}"),
              "what": "prefill/decode tokens/s of dense vs MPO vs low-rank at the same block-parameter budget",
              "config": {"shape": shape, "at_7b_shape": shape == LLAMA2_7B, "dtype": args.dtype, "keep": args.keep,
                         "cores": args.cores, "prefill_tokens": args.prefill_tokens, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "repeats": args.repeats, "decode": runtimes},
              "models": out, "decode_runtimes": by_runtime,
              "fastest_compressed_decode": {"model": fastest[1], "runtime": fastest[0], "decode_ratio_to_dense":
                                            by_runtime[fastest[0]][fastest[1]]["decode_ratio_to_dense"]},
              "how": "compactify.speed.compare, round-robin in one process (rotated order); random weights (speed does "
                     "not depend on the values); MPO bonds from chi_for_ratio, low-rank rank from lowrank_rank; "
                     "ratios against dense in the same decode runtime"}
    result["meta"]["device"] = device_info(device)
    write_json(args.out, result)
    print({r: {n: round(v["decode_ratio_to_dense"], 3) for n, v in by.items()} for r, by in by_runtime.items()},
          f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
