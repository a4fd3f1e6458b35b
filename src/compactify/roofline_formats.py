"""The formats of a roofline (:mod:`compactify.roofline`, which re-exports all of this): their names,
how each is built from the dense fp32 model by the package's own functions, on which device,
and the random-weight SmolLM2-135M that stands in for the real one where its weights cannot go.

A format that needs a library this machine lacks (bitsandbytes for int8/NF4) is not built:
:func:`build_formats` records it as ``{"skipped": "<why>"}``, so a run on a machine without it
measures everything else. (The MPO formats need tensorly, but so does ``import compactify``
itself: where the package imports, they can be built.)
"""
from __future__ import annotations

import copy
import importlib.util
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

KEEPS = (0.7, 0.5, 0.3)
ALL_FORMATS = ("fp32", "bf16", "int8", "nf4", *(f"{m}-{round(k * 100)}" for m in ("mpo2", "mpo3", "svd") for k in KEEPS))
QUICK_FORMATS = ("fp32", "int8", "nf4", "mpo3-30", "svd-30")
DEVICES = ("cpu", "cuda")
_FORMAT = re.compile(r"^(fp32|bf16|int8|nf4|(mpo[23]|svd)-(\d{1,2}))$")


class RooflineError(ValueError):
    """A format, model, device or result that the roofline cannot handle; the message names the fix."""


def check_device(device: str | torch.device) -> torch.device:
    """``"cpu"`` or ``"cuda"`` as a :class:`torch.device`; anything else, or CUDA without a CUDA device, is an error."""
    name = str(device)
    if name not in DEVICES:
        raise RooflineError(f"Unknown device {name!r}: the roofline runs on {' or '.join(DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise RooflineError(f"--device cuda: no CUDA device is available here (torch {torch.__version__}, CUDA "
                            f"{torch.version.cuda}); nothing was measured or written. Use --device cpu.")
    return torch.device(name)


def parse_format(name: str) -> dict:
    """``"mpo3-30"`` -> ``{"kind": "mpo", "cores": 3, "keep": 0.3}``; an unknown name is an error."""
    m = _FORMAT.match(str(name))
    if not m or (m.group(2) and int(m.group(3)) not in [round(k * 100) for k in KEEPS]):
        raise RooflineError(f"Unknown format {name!r}. Use one of {', '.join(ALL_FORMATS)} (mpo2/mpo3/svd keep "
                            f"{'/'.join(str(round(k * 100)) for k in KEEPS)}% of the block parameters).")
    if not m.group(2):
        return {"kind": name}
    kind = m.group(2)
    return {"kind": "svd" if kind == "svd" else "mpo", "cores": int(kind[3]) if kind != "svd" else None,
            "keep": int(m.group(3)) / 100}


def check_formats(names: Iterable[str]) -> list[str]:
    """The names, each checked by :func:`parse_format` (the first unknown one raises)."""
    names = list(names)
    for n in names:
        parse_format(n)
    return names


def lowrank_model(model: nn.Module, keep: float, method: str = "svd", types: Iterable[str] | None = None) -> nn.Module:
    """Replace (in place) each decoder-block matrix by its rank-r factors ``A B`` as
    ``nn.Sequential(Linear(in, r), Linear(r, out))`` (:func:`compactify.lowrank.compress`)."""
    from . import lowrank
    from .models import MATRIX_PATHS, MATRIX_TYPES, blocks

    if lowrank.parse_method(method)[0] != "svd":
        raise RooflineError(f"lowrank_model builds plain low-rank factors; method must be 'svd', not {method!r} "
                            "(activation-aware methods need calibration statistics).")
    for block in blocks(model):
        for t in types or MATRIX_TYPES:
            lin = block.get_submodule(MATRIX_PATHS[t])
            c = lowrank.compress(method, lin.weight.detach(), keep)
            A, B = c.factors
            first = nn.Linear(lin.in_features, A.shape[1], bias=False, dtype=A.dtype, device=A.device)
            second = nn.Linear(A.shape[1], lin.out_features, bias=lin.bias is not None, dtype=A.dtype, device=A.device)
            with torch.no_grad():
                first.weight.copy_(B)
                second.weight.copy_(A)
                if lin.bias is not None:
                    second.bias.copy_(lin.bias)
            block.set_submodule(MATRIX_PATHS[t], nn.Sequential(first, second))
    return model


def build_format(base: nn.Module, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of the dense fp32 ``base`` (on the CPU) in format ``name``, made by the package's own
    functions, on ``device``: bitsandbytes formats are quantized there (its kernels for that
    device), the others built on the CPU and moved (``model.to(device)``). A format whose
    library is not installed raises ImportError naming it."""
    from . import quantize
    from .models import blocks
    from .tensorize import Plan, tensorize

    spec = parse_format(name)
    kind = spec["kind"]
    if kind in ("int8", "nf4") and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{name} needs the package 'bitsandbytes', which is not installed here")
    model = copy.deepcopy(base).eval()
    if kind == "bf16":
        model = quantize.to_half(model, "bfloat16")
    elif kind in ("int8", "nf4"):
        model = model.to(device)
        return quantize.quantize(model, 8 if kind == "int8" else 4, quant_type="nf4", device=device).eval()
    elif kind == "mpo":
        plan = Plan.uniform(len(blocks(model)), target_ratio=spec["keep"], cores=spec["cores"])
        model = tensorize(model, plan, errors=False)
    elif kind == "svd":
        model = lowrank_model(model, spec["keep"])
    return model.to(device).eval()


def build_formats(base: nn.Module, names: Iterable[str], device: str | torch.device = "cpu",
                  build: Callable | None = None, log: Callable = print) -> tuple[dict, dict]:
    """Every format of ``names`` built by ``build`` (default :func:`build_format`), as ``(models,
    records)``: ``records[name]`` is ``{"build_s": seconds}``, or ``{"skipped": why}`` where the
    builder raised ImportError (a library missing on this machine: that format is not in ``models``)."""
    build = build or build_format
    models, records = {}, {}
    for n in check_formats(names):
        t = time.perf_counter()
        try:
            models[n] = build(base, n, device)
        except ImportError as e:
            records[n] = {"skipped": f"not built: {e}"}
            log(f"skipped {n}: {e}")
            continue
        records[n] = {"build_s": time.perf_counter() - t}
        log(f"built {n} in {records[n]['build_s']:.0f} s")
    return models, records


def smollm2_meta_dir() -> Path:
    """Where SmolLM2-135M's config.json and tokenizer lie without its weights: the folder that
    scripts/gpu_wheels.sh carries to the GPU machine, else the local model cache."""
    from .config import REPO_ROOT

    dirs = [REPO_ROOT / "data/cache/gpu-carry/smollm2-meta", REPO_ROOT / "data/cache/models/SmolLM2-135M-Instruct-fp32"]
    for d in dirs:
        if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
            return d
    raise RooflineError(f"No SmolLM2 config.json + tokenizer.json in {' or '.join(map(str, dirs))}; run "
                        "scripts/gpu_wheels.sh (it copies them from the model cache) or give --meta DIR.")


def random_model(meta: str | Path | None = None, seed: int = 0):
    """``(model, tokenizer)``: SmolLM2-135M's architecture from ``meta``'s config.json with random
    weights (``torch.manual_seed(seed)``, fp32, on the CPU), and its tokenizer; no weight file is
    read. Where the weights cannot travel (the GPU machine), speed and bytes are the same."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = Path(meta) if meta is not None else smollm2_meta_dir()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(meta)
