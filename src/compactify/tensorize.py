"""A whole Llama-family model with some of its block matrices replaced by MPOs.

The paper tensorizes the seven matrices of each decoder block: attention ``q, k, v, o`` and
MLP ``gate, up, down``. A :class:`Plan` says which (block, matrix) pairs become MPOs and how
hard (a bond dimension ``chi`` or a ``target_ratio`` of parameters kept); everything else
stays dense. :func:`tensorize` applies it in place, :func:`size_report` counts parameters
and bytes before/after, and :func:`tensorize_matrix` swaps one matrix temporarily (for the
sensitivity scan: tensorize, measure, ``restore()``).

Saving and loading use the normal Hugging Face API. A tensorized model becomes an instance
of a registered subclass (``CompactLlamaForCausalLM``, config ``model_type =
"compactify_llama"``; also for Mistral and Qwen2), whose config records every MPO's factors
and bond dimensions. So ``model.save_pretrained(d)`` writes the cores as safetensors and,
after ``import compactify.tensorize``, ``AutoModelForCausalLM.from_pretrained(d)`` rebuilds
the skeleton on the meta device (dense weights of tensorized matrices are never allocated),
swaps in empty MPO layers and loads the cores: same logits, compressed parameter count.
:func:`load_compressed` does the same after checking the files against the config. No
``trust_remote_code`` modeling file is written: the classes live in this package.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .mpo import MPOLinear, MPOSweep, decompose

MATRICES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
WITHOUT_DOWN = ("q", "k", "v", "o", "gate", "up")  # the paper advises leaving the block's output (down) dense
FAMILIES = ("llama", "mistral", "qwen2")  # same block layout; each gets a registered compact class


class PlanError(ValueError):
    """A plan that does not fit the model (unknown block or matrix, bad chi/ratio)."""


class CompressedCheckpointError(ValueError):
    """A saved compressed model whose tensors do not match the MPO layout in its config."""


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Which matrices become MPOs: ``entries["<block>.<matrix>"] = {"chi": 32}`` or
    ``{"target_ratio": 0.3}``; a (block, matrix) absent from ``entries`` stays dense.
    ``cores`` is the number of MPO cores for every matrix."""

    entries: dict[str, dict] = field(default_factory=dict)
    cores: int = 3

    def __post_init__(self):
        for key, spec in self.entries.items():
            block, _, matrix = str(key).partition(".")
            if not block.isdigit() or matrix not in MATRICES:
                raise PlanError(f"Plan entry '{key}' must be '<block>.<matrix>' with matrix one of {list(MATRICES)}, e.g. '3.q'.")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("chi", "target_ratio"):
                raise PlanError(f"Plan entry '{key}': {spec!r} must be {{'chi': int}} or {{'target_ratio': float}}.")
            value = next(iter(spec.values()))
            if "chi" in spec and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise PlanError(f"Plan entry '{key}': chi={value!r} must be a positive integer.")
            if "target_ratio" in spec and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise PlanError(f"Plan entry '{key}': target_ratio={value!r} must be in (0, 1].")
        if int(self.cores) < 2:
            raise PlanError(f"cores={self.cores} must be >= 2.")

    @classmethod
    def uniform(cls, num_blocks: int, chi: int | None = None, target_ratio: float | None = None, blocks=None,
                matrices=tuple(MATRICES), cores: int = 3) -> "Plan":
        """The same ``chi`` (or ``target_ratio``) for ``matrices`` in ``blocks`` (default: all)."""
        if (chi is None) == (target_ratio is None):
            raise PlanError("Give exactly one of chi or target_ratio.")
        spec = {"chi": chi} if chi is not None else {"target_ratio": target_ratio}
        blocks = range(num_blocks) if blocks is None else blocks
        return cls({f"{b}.{m}": dict(spec) for b in blocks for m in matrices}, cores)

    def items(self):
        """``(block, matrix, spec)`` in block order."""
        for key, spec in sorted(self.entries.items(), key=lambda kv: (int(kv[0].split(".")[0]), list(MATRICES).index(kv[0].split(".")[1]))):
            block, matrix = key.split(".")
            yield int(block), matrix, spec

    def to_dict(self) -> dict:
        return {"entries": {k: dict(v) for k, v in self.entries.items()}, "cores": int(self.cores)}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        unknown = set(data) - {"entries", "cores"}
        if unknown:
            raise PlanError(f"Unknown plan keys {sorted(unknown)}; a plan has 'entries' and 'cores'.")
        return cls(dict(data.get("entries", {})), int(data.get("cores", 3)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- registered compact classes

def _compact_init(self, config):
    """``__init__`` of a compact model: the base model, then an empty MPO layer in place of
    every tensorized matrix (on the meta device under ``from_pretrained``: no dense weights)."""
    super(type(self), self).__init__(config)
    for name, spec in (getattr(config, "compactify", None) or {}).get("modules", {}).items():
        old = self.get_submodule(name)
        ref = next(old.parameters())
        self.set_submodule(name, MPOLinear(spec["out_factors"], spec["in_factors"], spec["bond_dims"],
                                           bias=spec["bias"], device=ref.device, dtype=ref.dtype))


def _register(family: str):
    """Create and register ``Compact<Model>`` / ``Compact<Config>`` for one model family."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_cfg = CONFIG_MAPPING[family]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    cfg_cls = type(f"Compact{base_cfg.__name__}", (base_cfg,), {"model_type": f"compactify_{family}", "__module__": __name__})
    model_cls = type(f"Compact{base_model.__name__}", (base_model,),
                     {"config_class": cfg_cls, "__init__": _compact_init, "__module__": __name__})
    AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    return base_model, model_cls


_COMPACT = dict(_register(f) for f in FAMILIES)          # base model class -> compact class
_BASE = {v: k for k, v in _COMPACT.items()}              # compact class -> base model class
globals().update({c.__name__: c for c in _BASE})         # importable: compactify.tensorize.CompactLlamaForCausalLM


def _sync(model: nn.Module) -> None:
    """Record the live MPO layers in ``model.config.compactify`` and switch the model (and its
    config, in place, so every layer keeps sharing it) to the compact class, or back."""
    modules = {name: {"out_factors": list(m.out_factors), "in_factors": list(m.in_factors),
                      "bond_dims": list(m.bond_dims), "bias": m.bias is not None}
               for name, m in model.named_modules() if isinstance(m, MPOLinear)}
    base = _BASE.get(type(model), type(model))
    if base not in _COMPACT:
        raise PlanError(f"{type(model).__name__} is not a supported family ({', '.join(FAMILIES)}).")
    info = getattr(model.config, "compactify", None) or {}
    if modules:
        kept = {k: v for k, v in info.get("plan", {}).get("entries", {}).items() if _module_name(model, *k.split(".")) in modules}
        errors = {k: v for k, v in info.get("relative_errors", {}).items() if k in modules}
        model.config.compactify = {"plan": {"entries": kept, "cores": info.get("plan", {}).get("cores", 3)},
                                   "modules": modules, "relative_errors": errors}
        model.__class__ = _COMPACT[base]
    else:
        if hasattr(model.config, "compactify"):
            del model.config.compactify
        model.__class__ = base
    model.config.__class__ = model.__class__.config_class


# ---------------------------------------------------------------- tensorizing

def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise PlanError(f"{type(model).__name__} has no .model.layers; expected a Llama-family *ForCausalLM.")
    return inner.layers


def _module_name(model: nn.Module, block, matrix: str) -> str:
    layers = _layers(model)
    block = int(block)
    if not 0 <= block < len(layers):
        raise PlanError(f"Block {block} does not exist: the model has blocks 0..{len(layers) - 1}.")
    if matrix not in MATRICES:
        raise PlanError(f"Unknown matrix '{matrix}'; use one of {list(MATRICES)}.")
    return f"model.layers.{block}.{MATRICES[matrix]}"


def tensorize(model: nn.Module, plan: Plan, progress: bool = False, errors: bool = True) -> nn.Module:
    """Replace every matrix named in ``plan`` by an :class:`MPOLinear` (TT-SVD of its weight),
    in place; return the model. Validates the whole plan before touching anything.
    ``errors``: also record each matrix's relative error (rebuilds it once; a few seconds per
    LLaMA-7B matrix) in ``model.config.compactify["relative_errors"]``."""
    targets = []
    for block, matrix, spec in plan.items():
        name = _module_name(model, block, matrix)
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise PlanError(f"{name} is a {type(layer).__name__}, not a dense nn.Linear (already tensorized?).")
        targets.append((f"{block}.{matrix}", name, layer, spec))
    info = getattr(model.config, "compactify", None) or {}
    entries = {**info.get("plan", {}).get("entries", {}), **plan.entries}
    rel_errors = dict(info.get("relative_errors", {}))
    if progress:
        from tqdm.auto import tqdm
        targets = tqdm(targets, desc="tensorize")
    for key, name, layer, spec in targets:
        mpo = decompose(layer.weight, cores=plan.cores, **spec)
        if errors:
            rel_errors[name] = round(mpo.relative_error(layer.weight), 6)
        model.set_submodule(name, MPOLinear.from_mpo(mpo, layer.bias))
    model.config.compactify = {"plan": {"entries": entries, "cores": plan.cores}, "relative_errors": rel_errors}
    _sync(model)
    return model


@dataclass
class Swap:
    """One matrix temporarily tensorized by :func:`tensorize_matrix`; ``restore()`` (or leaving
    a ``with`` block) puts the original dense layer back, bit for bit."""

    model: nn.Module
    name: str
    original: nn.Module
    layer: MPOLinear
    relative_error: float

    def restore(self) -> None:
        if self.model.get_submodule(self.name) is self.layer:
            self.model.set_submodule(self.name, self.original)
            _sync(self.model)

    def __enter__(self) -> "Swap":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def matrix_sweep(model: nn.Module, block: int, matrix: str, cores: int = 3) -> MPOSweep:
    """The first-cut SVD of one matrix, to be reused by :func:`tensorize_matrix` at many chi."""
    return MPOSweep(model.get_submodule(_module_name(model, block, matrix)).weight, cores=cores)


def tensorize_matrix(model: nn.Module, block: int, matrix: str, chi: int | None = None,
                     target_ratio: float | None = None, cores: int = 3, sweep: MPOSweep | None = None) -> Swap:
    """Tensorize one matrix now; return a :class:`Swap` whose ``restore()`` undoes it.

    With ``sweep=matrix_sweep(model, block, matrix)`` the first (largest) SVD is reused, and
    the result equals a fresh decomposition at this chi (see :class:`compactify.mpo.MPOSweep`).
    """
    name = _module_name(model, block, matrix)
    original = model.get_submodule(name)
    if not isinstance(original, nn.Linear):
        raise PlanError(f"{name} is a {type(original).__name__}, not a dense nn.Linear (already tensorized?).")
    mpo = (sweep.at(chi, target_ratio) if sweep is not None
           else decompose(original.weight, chi=chi, target_ratio=target_ratio, cores=cores))
    layer = MPOLinear.from_mpo(mpo, original.bias)
    model.set_submodule(name, layer)
    _sync(model)
    return Swap(model, name, original, layer, mpo.relative_error(original.weight))


# ---------------------------------------------------------------- what it saves

def size_report(model: nn.Module) -> dict:
    """Parameters and bytes before/after, per matrix (``rows``), per block and in total.

    "Before" is the dense model this one came from (an MPO layer counts ``out*in`` + bias
    before). The totals cover the whole model, embeddings and head included, with tied
    weights counted once.
    """
    errors = (getattr(model.config, "compactify", None) or {}).get("relative_errors", {})
    rows = []
    for block in range(len(_layers(model))):
        for matrix in MATRICES:
            name = _module_name(model, block, matrix)
            layer = model.get_submodule(name)
            bias = 0 if layer.bias is None else layer.bias.numel()
            el = next(layer.parameters()).element_size()
            before = layer.out_features * layer.in_features + bias
            after = sum(p.numel() for p in layer.parameters())
            row = {"block": block, "matrix": matrix, "shape": [layer.out_features, layer.in_features],
                   "tensorized": isinstance(layer, MPOLinear), "params_before": before, "params_after": after,
                   "bytes_before": before * el, "bytes_after": after * el, "ratio": after / before}
            if isinstance(layer, MPOLinear):
                row.update(bond_dims=list(layer.bond_dims), out_factors=list(layer.out_factors),
                           in_factors=list(layer.in_factors), relative_error=errors.get(name))
            rows.append(row)
    blocks = []
    for block in range(len(_layers(model))):
        mine = [r for r in rows if r["block"] == block]
        sums = {k: sum(r[k] for r in mine) for k in ("params_before", "params_after", "bytes_before", "bytes_after")}
        blocks.append({"block": block, "tensorized": sum(r["tensorized"] for r in mine), **sums,
                       "ratio": sums["params_after"] / sums["params_before"]})
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = sum(r["params_before"] - r["params_after"] for r in rows)
    saved_bytes = sum(r["bytes_before"] - r["bytes_after"] for r in rows)
    totals = {"matrices_tensorized": sum(r["tensorized"] for r in rows), "matrices": len(rows),
              "block_params_before": sum(r["params_before"] for r in rows),
              "block_params_after": sum(r["params_after"] for r in rows),
              "model_params_before": params + saved, "model_params_after": params,
              "model_bytes_before": nbytes + saved_bytes, "model_bytes_after": nbytes,
              "model_ratio": params / (params + saved)}
    return {"rows": rows, "blocks": blocks, "totals": totals}


# ---------------------------------------------------------------- loading

def is_compressed_dir(path) -> bool:
    """True for a directory written by ``save_pretrained`` of a tensorized model."""
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return str(data.get("model_type", "")).startswith("compactify_") and "compactify" in data


def _check_files(path: Path) -> None:
    """Every MPO in the config has its cores, of the right shapes, and no dense weight;
    every dense block matrix has its weight."""
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    shapes = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressedCheckpointError(f"No *.safetensors in {path}; save with model.save_pretrained(dir).")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    modules = config["compactify"].get("modules", {})
    problems = []
    for name, spec in modules.items():
        r = [1, *spec["bond_dims"], 1]
        for k, (o, i) in enumerate(zip(spec["out_factors"], spec["in_factors"])):
            key, want = f"{name}.cores.{k}", (r[k], o, i, r[k + 1])
            if shapes.get(key) != want:
                problems.append(f"{key}: expected {want}, found {shapes.get(key, 'nothing')}")
        if f"{name}.weight" in shapes:
            problems.append(f"{name}.weight: a dense weight for a matrix the config says is an MPO")
    for key in shapes:
        if ".cores." in key and key.split(".cores.")[0] not in modules:
            problems.append(f"{key}: MPO cores for a matrix the config says is dense")
    for block in range(int(config.get("num_hidden_layers", 0))):
        for attr in MATRICES.values():
            name = f"model.layers.{block}.{attr}"
            if name not in modules and f"{name}.weight" not in shapes:
                problems.append(f"{name}.weight: missing (the config says this matrix is dense)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CompressedCheckpointError(f"{path} does not match the MPO layout in its config.json: {shown}. "
                                        "Re-save the model with model.save_pretrained(dir).")


def load_compressed(path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """Load a tensorized model saved with ``save_pretrained``, after checking its files.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` (which works too
    once this module is imported), plus the layout check, ``.to(device)`` and ``.eval()``.
    """
    path = Path(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not is_compressed_dir(path):
        raise CompressedCheckpointError(f"{path} is not a compressed model directory (no config.json with "
                                        "model_type 'compactify_*'); load dense models with compactify.models.load_model.")
    _check_files(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()
