"""A whole Llama-family model with some of its block matrices replaced by MPOs.

The paper tensorizes the seven matrices of each decoder block: attention ``q, k, v, o`` and
MLP ``gate, up, down``. A :class:`Plan` says which (block, matrix) pairs become MPOs and how
hard (a bond dimension ``chi`` or a ``target_ratio`` of parameters kept); everything else
stays dense. :func:`tensorize` applies it in place and :func:`size_report` counts parameters
and bytes before/after. (The sensitivity scan's one-matrix-at-a-time swaps copy weights in and
out with :func:`compactify.frontier.swapped`.)

Saving and loading use the normal Hugging Face API. A tensorized model becomes an instance
of a registered subclass (``CompactLlamaForCausalLM``, config ``model_type =
"compactify_llama"``; also for Mistral and Qwen2), whose config records every MPO's factors
and bond dimensions. So ``model.save_pretrained(d)`` writes the cores as safetensors and,
after ``import compactify.tensorize``, ``AutoModelForCausalLM.from_pretrained(d)`` rebuilds
the skeleton on the meta device (dense weights of tensorized matrices are never allocated),
swaps in empty MPO layers and loads the cores: same logits, compressed parameter count.
``save_pretrained`` also writes ``auto_map`` and self-contained ``configuration_compactify.py``
/ ``modeling_compactify.py`` (generated from this package's source, :mod:`compactify.remote_code`),
so ``from_pretrained(d, trust_remote_code=True)`` works where compactify is not installed.
Every route checks the files against the config first (:mod:`compactify.compact_model`): a
missing, extra or truncated tensor is an error, never a matrix at random values.

:func:`tensorize` is all-or-nothing: it checks the whole plan (family, every factorisation,
finite weights, reachable ratios, no matrix larger than dense unless ``allow_growth``) before
decomposing anything, decomposes every matrix before swapping any, and rolls the swaps back
if anything fails, so after an exception the model is exactly as it was.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import aa_init, remote_code
from .models import MATRIX_PATHS
from .compact_model import CompressedCheckpointError, check_checkpoint, compact_from_pretrained, compact_init
from .mpo import MPOError, MPOLinear, _resolve, count_params, decompose, single_thread

MATRICES = MATRIX_PATHS  # matrix type -> its path in a decoder block (compactify.models, the one map)
WITHOUT_DOWN = ("q", "k", "v", "o", "gate", "up")  # the paper advises leaving the block's output (down) dense
FAMILIES = ("llama", "mistral", "qwen2")  # same block layout; each gets a registered compact class


class PlanError(ValueError):
    """A plan that does not fit the model (unknown block or matrix, bad chi/ratio)."""


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Which matrices become MPOs: ``entries["<block>.<matrix>"] = {"chi": 32}`` or
    ``{"target_ratio": 0.3}``; a (block, matrix) absent from ``entries`` stays dense.
    ``cores`` is the number of MPO cores for every matrix. A ``chi`` that would give a matrix
    more parameters than the dense one is refused by :func:`tensorize` unless ``allow_growth``."""

    entries: dict[str, dict] = field(default_factory=dict)
    cores: int = 3
    allow_growth: bool = False

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
        try:
            ok = not isinstance(self.cores, bool) and int(self.cores) == self.cores >= 2
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise PlanError(f"cores={self.cores!r} must be an integer >= 2.")
        self.cores = int(self.cores)
        if not isinstance(self.allow_growth, bool):
            raise PlanError(f"allow_growth={self.allow_growth!r} must be true or false.")

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
        out = {"entries": {k: dict(v) for k, v in self.entries.items()}, "cores": int(self.cores)}
        return {**out, "allow_growth": True} if self.allow_growth else out

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        unknown = set(data) - {"entries", "cores", "allow_growth"}
        if unknown:
            raise PlanError(f"Unknown plan keys {sorted(unknown)}; a plan has 'entries', 'cores' and 'allow_growth'.")
        return cls(dict(data.get("entries", {})), data.get("cores", 3), data.get("allow_growth", False))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- registered compact classes

_compact_init = compact_init  # the compact classes' __init__ (compactify.compact_model)


def _save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a compact model, plus the custom-code files and ``auto_map``
    (:func:`compactify.remote_code.write`) that let any tool load it with ``trust_remote_code``."""
    super(type(self), self).save_pretrained(save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", args[0] if args else True):
        remote_code.write(self, save_directory)


def _register(family: str):
    """Create and register ``Compact<Model>`` / ``Compact<Config>`` for one model family."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_cfg = CONFIG_MAPPING[family]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    cfg_cls = type(f"Compact{base_cfg.__name__}", (base_cfg,), {"model_type": f"compactify_{family}", "__module__": __name__})
    model_cls = type(f"Compact{base_model.__name__}", (base_model,),
                     {"config_class": cfg_cls, "__init__": compact_init, "__module__": __name__,
                      "from_pretrained": classmethod(compact_from_pretrained), "save_pretrained": _save_pretrained})
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
        model.config.compactify = {"plan": {**info.get("plan", {}), "entries": kept, "cores": info.get("plan", {}).get("cores", 3)},
                                   "modules": modules, "relative_errors": errors, **aa_init.sync(info, modules)}
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


def _family(model: nn.Module) -> type:
    base = _BASE.get(type(model), type(model))
    if base not in _COMPACT:
        raise PlanError(f"{type(model).__name__} is not a supported model family: tensorize knows "
                        f"{', '.join(c.__name__ for c in _COMPACT)} ({', '.join(FAMILIES)}), whose blocks hold the "
                        "seven matrices q, k, v, o, gate, up, down. Use a model of one of these families.")
    return base


def check_plan(model: nn.Module, plan: Plan) -> list[tuple]:
    """Everything :func:`tensorize` needs to know before it changes anything: the family is
    supported, every entry names a dense ``nn.Linear`` of this model, every shape factorises
    over ``plan.cores``, every ratio is reachable, every weight is finite, and no MPO has more
    parameters than its dense matrix (unless ``plan.allow_growth``). Returns
    ``[(key, module name, layer, spec, bond dims)]``; raises the first problem found, naming
    the plan entry and the fix (:class:`PlanError`, or :class:`~compactify.mpo.MPOError` /
    ``MPOError`` from the MPO engine)."""
    _family(model)
    targets, clamped = [], []
    for block, matrix, spec in plan.items():
        key, name = f"{block}.{matrix}", _module_name(model, block, matrix)
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise PlanError(f"{name} is a {type(layer).__name__}, not a dense nn.Linear (already tensorized?).")
        shape = tuple(layer.weight.shape)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out_f, in_f, bonds = _resolve(shape, spec.get("chi"), plan.cores, spec.get("target_ratio"), None, None)
        except MPOError as e:
            raise type(e)(f"Plan entry '{key}' ({name}, {shape[0]}x{shape[1]}): {e}") from None
        clamped += [key] if caught else []
        params = count_params([o * i for o, i in zip(out_f, in_f)], bonds) + (0 if layer.bias is None else layer.bias.numel())
        dense = shape[0] * shape[1] + (0 if layer.bias is None else layer.bias.numel())
        if params > dense and not plan.allow_growth:
            raise PlanError(f"Plan entry '{key}' ({name}, {shape[0]}x{shape[1]}): {spec} gives an MPO with bonds "
                            f"{list(bonds)} and {params} parameters, more than the dense matrix's {dense} "
                            f"({params / dense:.3f}x): it would not compress. Use a smaller chi or a target_ratio "
                            "< 1, or set allow_growth=True in the plan to allow it.")
        if layer.weight.is_meta or not torch.isfinite(layer.weight).all():
            raise MPOError(f"Plan entry '{key}': the weight of {name} contains NaN or Inf (or no data); an SVD of "
                           "it is meaningless. Check the checkpoint or the dtype it was loaded in; nothing was changed.")
        targets.append((key, name, layer, spec, bonds))
    if clamped:
        warnings.warn(f"{len(clamped)} plan entries ({', '.join(clamped[:5])}{', ...' if len(clamped) > 5 else ''}) ask "
                      "for a chi above the largest bond their factors allow; clamped (those MPOs are exact).",
                      UserWarning, stacklevel=3)
    return targets


def tensorize(model: nn.Module, plan: Plan, progress: bool = False, errors: bool = True, init: str = "tt_svd",
              stats=None, aa_options=None, calibration=None) -> nn.Module:
    """Replace every matrix named in ``plan`` by an :class:`MPOLinear` (TT-SVD of its weight),
    in place; return the model. All or nothing: :func:`check_plan` validates the whole plan
    first, every matrix is decomposed before any is swapped, and a failure (or an interrupt)
    at any point leaves the model, its class and its config exactly as they were.
    ``errors``: also record each matrix's relative error (rebuilds it once; a few seconds per
    LLaMA-7B matrix) in ``model.config.compactify["relative_errors"]``.
    ``init="activation_aware"`` fits each MPO, at the same bonds, to the layer's calibration
    inputs (``stats[(block, matrix)] = C``; ``aa_options``: AAMPO's sweeps/inner/damping;
    ``calibration``: a record of the text, kept in the config); ``init="asvd"`` puts the
    activation-aware low-rank factorisation within each MPO's budget in its place instead (the
    low-rank peer, a 2-core MPO of trivial factors): see :mod:`compactify.aa_init`."""
    targets = check_plan(model, plan)
    info = copy.deepcopy(getattr(model.config, "compactify", None))
    aa = aa_init.prepare(init, targets, stats, aa_options, calibration, info)
    act_errors = dict((info or {}).get("activation_errors", {}))
    entries = {**(info or {}).get("plan", {}).get("entries", {}), **plan.entries}
    rel_errors = dict((info or {}).get("relative_errors", {}))
    if progress:
        from .progress import progress as tqdm
        targets = tqdm(targets, desc="tensorize")
    new = []
    with warnings.catch_warnings(), single_thread():
        warnings.filterwarnings("ignore", message="chi=.* exceeds the largest bond")  # said once by check_plan
        for key, name, layer, spec, bonds in targets:
            if aa is None:
                mpo = decompose(layer.weight, cores=plan.cores, **spec)
                act_errors.pop(name, None)
            else:
                mpo, act_errors[name] = aa_init.decompose(aa, key, layer.weight, plan.cores, bonds)
            if errors:
                rel_errors[name] = round(mpo.relative_error(layer.weight), 6)
            new.append((name, layer, MPOLinear.from_mpo(mpo, layer.bias)))
    base, cfg_cls, swapped = type(model), type(model.config), []
    try:
        for name, layer, mpo_layer in new:
            model.set_submodule(name, mpo_layer)
            swapped.append((name, layer))
        kept = {"entries": entries, "cores": plan.cores, **({"allow_growth": True} if plan.allow_growth else {})}
        model.config.compactify = {"plan": kept, "relative_errors": rel_errors, "activation_errors": act_errors,
                                   "activation_aware": aa.record() if aa else (info or {}).get("activation_aware")}
        _sync(model)
    except BaseException:
        for name, layer in reversed(swapped):
            model.set_submodule(name, layer)
        if info is None:
            model.config.__dict__.pop("compactify", None)
        else:
            model.config.compactify = info
        model.__class__ = base
        model.config.__class__ = cfg_cls
        raise
    return model


# ---------------------------------------------------------------- loading

def is_compressed_dir(path) -> bool:
    """True for a directory written by ``save_pretrained`` of a tensorized model."""
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return str(data.get("model_type", "")).startswith("compactify_") and "compactify" in data


_check_files = check_checkpoint  # the files against the config (compactify.compact_model)


def load_compressed(path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """Load a tensorized model saved with ``save_pretrained``, after checking its files.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` (which works too
    once this module is imported, and makes the same checks), plus ``.to(device)`` and ``.eval()``.
    """
    path = Path(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not is_compressed_dir(path):
        raise CompressedCheckpointError(f"{path} is not a compressed model directory (no config.json with "
                                        "model_type 'compactify_*'); load dense models with compactify.models.load_model.")
    check_checkpoint(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


from .sizes import size_report  # noqa: E402,F401  (re-exported: it reads the layout defined above)
