"""Healing's settings and the pure helpers around a run: the ``heal`` config section as a
dataclass (:class:`HealConfig`), which parameters train (:func:`select_trainable`), the learning
rate schedule (:func:`lr_at`), a model fingerprint for safe resumption, how many processes
one machine may run (:func:`check_nproc`), the compute precision (:func:`compute_mode`) and the
held-out perplexity tracked during a run (:func:`heldout_point`). :mod:`compactify.heal` runs the
training itself.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import fields, make_dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import defaults
from .distill import LOSSES, TEACHER_MODES
from .heal_data import HealError

TRAINABLE_GROUPS = ("mpo", "dense", "norms", "embeddings", "all")


# Keys of the heal section that notebook 05 reads around a healing run, not the run itself.
NOTEBOOK_KEYS = ("compare_steps", "dense_control", "compare_losses", "compare_loss_tokens", "lr_sweep",
                 "lr_sweep_tokens", "improved_lr", "blockwise")


class _HealSettings:
    """The ``heal`` section of the config + run seed and device, checked (:class:`HealConfig`)."""

    @classmethod
    def from_cfg(cls, cfg: dict) -> "HealConfig":
        mine = {f.name for f in fields(cls)}  # the section may hold keys for notebooks too (compare_steps)
        hc = cls(**{k: v for k, v in cfg["heal"].items() if k in mine}, seed=int(cfg["seed"]),
                 device=str(cfg["device"]))
        if hc.teacher is None:  # the original model this study compressed
            hc.teacher = str(cfg.get("model", "embedded"))
        for key, allowed in (("loss", LOSSES), ("teacher_mode", TEACHER_MODES)):
            if getattr(hc, key) not in allowed:
                raise HealError(f"heal.{key} '{getattr(hc, key)}' is not one of {', '.join(allowed)}.")
        if not 0 <= float(hc.kd_weight) <= 1 or float(hc.kd_temperature) <= 0:
            raise HealError(f"heal.kd_weight must be in [0, 1] (got {hc.kd_weight}) and heal.kd_temperature > 0 "
                            f"(got {hc.kd_temperature}).")
        if hc.strategy not in ("fsdp2", "ddp"):
            raise HealError(f"heal.strategy '{hc.strategy}' is not one of fsdp2, ddp.")
        if hc.mixed_precision not in ("bf16", "fp32"):
            raise HealError(f"heal.mixed_precision '{hc.mixed_precision}' is not one of bf16, fp32.")
        groups = [hc.trainable] if isinstance(hc.trainable, str) else list(hc.trainable)
        bad = [g for g in groups if g not in TRAINABLE_GROUPS]
        if bad or not groups:
            raise HealError(f"heal.trainable {hc.trainable} must be a non-empty list of: "
                            f"{', '.join(TRAINABLE_GROUPS)}.")
        hc.trainable = groups
        for key in ("nproc", "seq_len", "batch_per_rank", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(hc, key) is not None and int(getattr(hc, key)) < 1:
                raise HealError(f"heal.{key} must be at least 1, got {getattr(hc, key)}.")
        return hc


# One field per key of defaults/heal.yaml that the run reads (documented there), then seed and device.
HealConfig = make_dataclass("HealConfig", [(k, Any) for k in defaults()["heal"] if k not in NOTEBOOK_KEYS]
                            + [("seed", int), ("device", str)], bases=(_HealSettings,))


def select_trainable(model: torch.nn.Module, groups: list[str]) -> dict:
    """Set ``requires_grad`` by parameter group; return counts. Groups, matched generically:

    ``mpo``: parameters of modules whose class is named ``MPOLinear`` (the cores);
    ``dense``: ``nn.Linear`` layers other than the LM head (the matrices left uncompressed);
    ``norms``: modules whose class name ends in ``Norm`` (RMSNorm / LayerNorm scales);
    ``embeddings``: the input embedding and the output head (one tensor when tied);
    ``all``: every floating-point parameter. Integer (quantized) weights never train.
    """
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    chosen: set[int] = set()
    for module in model.modules():
        cls = type(module).__name__
        params = list(module.parameters(recurse=cls == "MPOLinear"))
        if ("mpo" in groups and cls == "MPOLinear"
                or "dense" in groups and isinstance(module, torch.nn.Linear) and cls != "MPOLinear"
                or "norms" in groups and cls.endswith("Norm")):
            chosen |= {id(p) for p in params if id(p) not in emb}
    if "embeddings" in groups:
        chosen |= emb
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point() and ("all" in groups or id(p) in chosen))
    unique = {id(p): p for p in model.parameters()}.values()
    counts = {"trainable": sum(p.numel() for p in unique if p.requires_grad),
              "total": sum(p.numel() for p in unique), "groups": list(groups)}
    if counts["trainable"] == 0:
        raise HealError(f"heal.trainable={groups} selects no parameters of this model (a dense model has no "
                        "MPOLinear modules). For a dense fine-tune use heal.trainable=[dense, norms] or [all].")
    return counts


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor's name, shape, dtype and first 4096 values: which model this is."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lr_at(step: int, total: int, hc: HealConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup over ``warmup`` x total steps, then cosine
    decay to ``min_lr_ratio`` x lr. A pure function of the step, so resuming needs no scheduler state."""
    warm = max(1, round(hc.warmup * total)) if hc.warmup > 0 else 0
    if step < warm:
        return hc.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return hc.lr * (hc.min_lr_ratio + (1 - hc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def available_devices(device: torch.device) -> int:
    """GPUs on CUDA, usable CPU cores on CPU: the most processes one node should run."""
    return torch.cuda.device_count() if device.type == "cuda" else len(os.sched_getaffinity(0))


def check_nproc(nproc: int, device: torch.device) -> None:
    have = available_devices(device)
    if nproc > have:
        what = "CUDA GPUs" if device.type == "cuda" else "CPU cores"
        raise HealError(f"{nproc} processes asked for but this machine has {have} {what}. Use heal.nproc <= {have} "
                        "(one process per GPU, or per core on CPU).")


def compute_mode(hc: HealConfig, device: torch.device) -> str:
    """What the forward computes in: "fsdp-bf16" (CUDA FSDP2 policy), "autocast-bf16" (DDP on CUDA,
    or a CPU with fast bf16: AMX / AVX512-BF16), or "fp32". Master weights, gradients and AdamW stay fp32."""
    from .evaluate import fast_bf16

    if hc.mixed_precision != "bf16" or not fast_bf16(device):
        return "fp32"
    return "fsdp-bf16" if device.type == "cuda" and hc.strategy == "fsdp2" else "autocast-bf16"


def global_mean(*xs) -> list:
    """Mean over ranks of scalar tensors (None stays None): every rank's batch has the same token count."""
    t = torch.stack([x.float() if x is not None else torch.zeros(()) for x in xs])
    dist.all_reduce(t)
    t = (t / dist.get_world_size()).tolist()
    return [None if x is None else v for x, v in zip(xs, t)]


def heldout_point(model, tokenizer, texts: dict, cfg, step: int, tokens: int) -> dict:
    """Held-out perplexity of the model being healed (``heal.eval_every``): each text of
    ``eval.perplexity`` scored as notebook 00 scores it. Every rank scores every window (an FSDP
    forward is collective, so all ranks must run the same batches); the numbers are the same on
    each. MPO layers are contracted for speed unless FSDP has sharded their cores (then the layers
    run as in training; contracting a sharded core would need its other shards)."""
    from .perplexity import heldout_perplexities

    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    ppl = heldout_perplexities(model, tokenizer, texts, cfg, contract=not sharded)
    return {"step": int(step), "tokens": int(tokens), "perplexity": ppl}
