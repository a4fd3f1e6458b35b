"""What a compressed model class adds to its Hugging Face base class, and the check of its files.

A tensorized model is an instance of ``Compact<Base>ForCausalLM`` (registered in
:mod:`compactify.tensorize`). Its ``__init__`` (:func:`compact_init`) builds the base model and
puts an empty :class:`~compactify.mpo_layer.MPOLinear` where the config says a matrix is an MPO;
its ``from_pretrained`` (:func:`compact_from_pretrained`) first checks the checkpoint files
against that layout (:func:`check_checkpoint`: every core present with its shape, nothing extra,
no truncated file) and then refuses any tensor transformers reports missing, unexpected or
mismatched, so a damaged directory never loads as a model with random matrices.

This module needs only the standard library, torch (through ``MPOLinear``) and transformers:
:mod:`compactify.remote_code` copies its source, with ``MPOLinear``'s, into the
``modeling_compactify.py`` saved beside every compressed model, so that the same checks run when
the model is loaded with ``trust_remote_code=True`` where compactify is not installed.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .mpo import MPOLinear  # (compactify.mpo_layer.MPOLinear; importing .mpo first avoids a cycle)

BLOCK_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class CompressedCheckpointError(ValueError):
    """A saved compressed model whose tensors do not match the MPO layout in its config."""


def safetensors_shapes(file) -> dict:
    """``{tensor name: shape}`` from a safetensors file's header, after checking that the file
    holds every byte the header promises (a truncated copy fails here, naming the file)."""
    file = Path(file)
    fix = "re-save the model with model.save_pretrained(dir), or copy the file again"
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CompressedCheckpointError(f"{file} is not a readable safetensors file ({e}): it is truncated or "
                                        f"corrupt; {fix}.") from None
    want = 8 + n + max(ends, default=0)
    if size < want:
        raise CompressedCheckpointError(f"{file} is truncated: its header promises {want} bytes, the file has "
                                        f"{size}; {fix}.")
    return shapes


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CompressedCheckpointError(f"{index} is not a readable shard index ({e}); re-save the model "
                                            "with model.save_pretrained(dir).") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CompressedCheckpointError(f"{index} names shard(s) {missing} that are not in {path}; copy them "
                                            "too, or re-save the model with model.save_pretrained(dir).")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressedCheckpointError(f"No *.safetensors in {path}; save with model.save_pretrained(dir).")
    return files


def check_checkpoint(path, config: dict | None = None) -> None:
    """Check a compressed model directory before loading it: every file readable and complete,
    every MPO in ``config.json`` with all its cores of the right shapes and no dense weight, no
    core the config does not describe, every dense block matrix with its weight. Raises
    :class:`CompressedCheckpointError` naming the file(s) and the tensors."""
    path = Path(path)
    if config is None:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CompressedCheckpointError(f"{path / 'config.json'} cannot be read ({e}); re-save the model with "
                                            "model.save_pretrained(dir).") from None
    files = _checkpoint_files(path)
    shapes = {}
    for f in files:
        shapes.update(safetensors_shapes(f))
    modules = (config.get("compactify") or {}).get("modules", {})
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
        if ".cores." in key:
            name, _, k = key.partition(".cores.")
            if name not in modules:
                problems.append(f"{key}: MPO cores for a matrix the config says is dense")
            elif not k.isdigit() or int(k) >= len(modules[name]["out_factors"]):
                problems.append(f"{key}: an extra core (the config gives this MPO "
                                f"{len(modules[name]['out_factors'])} cores)")
    for block in range(int(config.get("num_hidden_layers", 0))):
        for attr in BLOCK_MATRICES:
            name = f"model.layers.{block}.{attr}"
            if name not in modules and f"{name}.weight" not in shapes:
                problems.append(f"{name}.weight: missing (the config says this matrix is dense)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        where = ", ".join(str(f) for f in files)
        raise CompressedCheckpointError(f"{where} does not match the MPO layout in {path / 'config.json'}: {shown}. "
                                        "Re-save the model with model.save_pretrained(dir).")


def compact_init(self, config, *args, **kwargs):
    """``__init__`` of a compact model: the base model, then an empty MPO layer in place of
    every tensorized matrix (on the meta device under ``from_pretrained``: no dense weights)."""
    super(type(self), self).__init__(config, *args, **kwargs)
    for name, spec in (getattr(config, "compactify", None) or {}).get("modules", {}).items():
        old = self.get_submodule(name)
        ref = next(old.parameters())
        self.set_submodule(name, MPOLinear(spec["out_factors"], spec["in_factors"], spec["bond_dims"],
                                           bias=spec["bias"], device=ref.device, dtype=ref.dtype))


def compact_from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    """``from_pretrained`` of a compact model: :func:`check_checkpoint` on a local directory
    first, then the base class's loading, refusing any tensor reported missing, unexpected or
    of the wrong size (transformers would initialise a missing MPO core at random)."""
    path = pretrained_model_name_or_path
    if path is not None and os.path.isdir(str(path)):
        check_checkpoint(path)
    want_info = kwargs.pop("output_loading_info", False)
    model, info = super(cls, cls).from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
    problems = [f"{what} {', '.join(map(str, sorted(info.get(key) or [], key=str)))}"
                for key, what in (("missing_keys", "missing:"), ("unexpected_keys", "unexpected:"),
                                  ("mismatched_keys", "wrong size:")) if info.get(key)]
    if problems:
        raise CompressedCheckpointError(f"The safetensors files at {path} do not match its config.json "
                                        f"({'; '.join(problems)}): transformers would leave a missing tensor at random "
                                        "values and ignore an unexpected one. Re-save the model with "
                                        "model.save_pretrained(dir).")
    return (model, info) if want_info else model
