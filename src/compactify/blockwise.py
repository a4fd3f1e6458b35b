"""Block-wise distillation: every compressed decoder block trained, alone, to give the dense
block's output, before the whole model is healed end to end.

End-to-end healing learns from one number per token (the loss at the LM head) and pays for the
LM head and the whole depth at every step. Here each block of the compressed model gets a
576-number target per token (the dense block's output on the same text) and a step costs one
block's forward and backward. It is the block-wise reconstruction of post-training quantization
(BRECQ, Li et al. 2021; OmniQuant, Shao et al. 2023) applied to the compressed layers, in
GPTQ's sequential order: block ``b`` is trained on the inputs the *already trained* compressed
blocks ``0..b-1`` give it, towards what the dense block makes of the *dense* inputs, so it also
learns to undo the error that reaches it (:mod:`compactify.aa_seq` does the same in closed form
for one matrix at a time; this trains the whole block, attention and MLP, by gradient descent).

The loss is the squared error *relative to each token's target norm*, averaged over tokens. A
plain squared error would be ruled by one token: SmolLM2's residual stream carries a massive
activation on the first token of every window from block 11 on (norm ~24,000 against a median of
~130, 99% of the squared norm), and a block fitted on the plain error serves that token (a first
draft: from block 11 on every block's plain error stayed at ~0.85 of its target; held-out perplexity
2,149 against 1,952 with the per-token loss at the same small budget).

What trains: every parameter inside the block (MPO cores, the matrices left dense, the RMSNorm
scales), the same parts as ``heal.trainable``'s default. One AdamW per block, cosine decay to
zero over ``epochs`` passes of the calibration windows, gradient norm clipped to 1. The text is
the healing data's (never held-out text). Nothing here is distributed: one block at a time fits
on one device at any scale the dense model itself fits.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from .aa_seq import block0_inputs, run_block
from .models import blocks


@dataclass
class BlockwiseConfig:
    tokens: int = 32768      # calibration tokens (whole windows of seq_len), from the healing data
    epochs: int = 4          # passes over them per block
    lr: float = 5e-3         # AdamW peak learning rate per block (cosine to zero)
    batch_size: int = 4      # windows per step
    seq_len: int = 256
    # which rows of the (shuffled) healing data: "first" (the rows healing then starts on: its first
    # tokens/(batch x seq_len) steps revisit text the blocks were fitted to) or "last" (rows a healing
    # of under one epoch never reaches)
    rows: str = "first"
    warmup: float = 0.0      # fraction of each block's steps with a linear warm-up to lr (0: none, the reference run's)

    def check(self) -> "BlockwiseConfig":
        bad = [f"{k}={v!r}" for k, v in asdict(self).items()
               if k not in ("rows", "warmup") and not (isinstance(v, (int, float)) and v > 0)]
        if bad:
            raise ValueError(f"blockwise settings must be positive numbers; got {', '.join(bad)}.")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ValueError(f"blockwise.warmup={self.warmup!r}: give a fraction of the steps in [0, 1), e.g. 0.05.")
        if self.rows not in ("first", "last"):
            raise ValueError(f"blockwise.rows={self.rows!r}: give 'first' or 'last' (rows of the healing data).")
        if self.tokens < self.seq_len:
            raise ValueError(f"blockwise.tokens={self.tokens} is less than one window of seq_len={self.seq_len}: "
                             "give at least seq_len tokens.")
        return self


def relative_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||y - t||^2 / ||t||^2`` (see the module docstring for why per token)."""
    y, target = y.float(), target.float()
    return ((y - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _cosine(step: int, total: int, lr: float, warmup: int = 0) -> float:
    """``lr`` after a linear warm-up of ``warmup`` steps, then cosine to zero at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def distill_blocks(dense, model, ids: torch.Tensor, cfg: BlockwiseConfig | None = None, autocast=None,
                   seed: int = 0, progress: bool = False) -> dict:
    """Train ``model``'s decoder blocks in place, one after the other, towards ``dense``'s (see
    the module docstring). ``ids``: token ids of the calibration text (cut into ``seq_len``
    windows). ``autocast``: a torch dtype to compute in (bf16 where fast) or None. Returns the
    record: settings, seconds, and per block the relative error on its inputs before and after
    training and the error that leaves it along the compressed model (``"sequential"``)."""
    from .progress import progress as tqdm

    cfg = (cfg or BlockwiseConfig()).check()
    layers_d, layers_c = blocks(dense), blocks(model)
    if len(layers_d) != len(layers_c):
        raise ValueError(f"the dense model has {len(layers_d)} blocks and the compressed one {len(layers_c)}: "
                         "distill a model from the dense model it was compressed from.")
    device = next(dense.parameters()).device
    ids = ids.reshape(-1)
    n = min(ids.numel(), cfg.tokens) // cfg.seq_len
    if n == 0:
        raise ValueError(f"{ids.numel()} calibration tokens are fewer than one window of seq_len={cfg.seq_len}.")
    windows = ids[: n * cfg.seq_len].view(n, cfg.seq_len).to(device)
    batches = [windows[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    amp = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    was = dense.training, model.training
    dense.eval()
    model.eval()  # no dropout; MPO layers still take gradients (eval only picks their inference path when no grad)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    t0, record = time.perf_counter(), []
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad(), amp:
            dense_in = [(h.float(), kw) for h, kw in block0_inputs(dense, batches)]
        comp_in = [(h.clone(), kw) for h, kw in dense_in]
        for b in tqdm(range(len(layers_d)), desc="block-wise distillation", disable=not progress):
            with torch.no_grad(), amp:
                target = [run_block(layers_d[b], h, kw).float() for h, kw in dense_in]
            params = [p for p in layers_c[b].parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            total, step, first, losses = cfg.epochs * len(batches), 0, None, []
            warm = round(cfg.warmup * total)
            for _ in range(cfg.epochs):
                for i in torch.randperm(len(batches), generator=gen).tolist():
                    for g in opt.param_groups:
                        g["lr"] = _cosine(step, total, cfg.lr, warm)
                    h, kw = comp_in[i]
                    with amp:
                        y = run_block(layers_c[b], h, kw)
                    loss = relative_error(y, target[i])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    step += 1
                    first = loss.item() if first is None else first
                    losses.append(loss.item())
            for p in params:
                p.requires_grad_(False)
            del opt
            with torch.no_grad(), amp:
                comp_in = [(run_block(layers_c[b], h, kw).float(), kw) for h, kw in comp_in]
            seq = sum(relative_error(c, t).item() for (c, _), t in zip(comp_in, target)) / len(target)
            k = max(1, len(batches))  # the last epoch's mean: what the block reached
            record.append({"block": b, "first_step": first, "last_epoch": sum(losses[-k:]) / len(losses[-k:]),
                           "sequential": seq})
            dense_in = [(t, kw) for t, (_, kw) in zip(target, dense_in)]
    finally:
        for p in frozen:
            p.requires_grad_(True)
        dense.train(was[0])
        model.train(was[1])
    return {"settings": asdict(cfg), "windows": n, "tokens": n * cfg.seq_len,
            "autocast": None if autocast is None else str(autocast).replace("torch.", ""),
            "seconds": time.perf_counter() - t0, "blocks": record}


def equal_time_tokens(step_seconds: float, tokens_per_s: float, tokens: int, per_step: int) -> int:
    """Healing tokens of the equal-time control of a block-wise start: the ``tokens`` its healing
    had, plus what the step's seconds would have bought at that healing's measured speed, in whole
    optimizer steps of ``per_step`` tokens."""
    if step_seconds < 0 or tokens_per_s <= 0 or tokens <= 0 or per_step <= 0:
        raise ValueError(f"equal_time_tokens: seconds {step_seconds}, tokens/s {tokens_per_s}, tokens {tokens} and "
                         f"tokens per step {per_step} must be positive (seconds may be 0).")
    return int(tokens) + round(step_seconds * tokens_per_s / per_step) * int(per_step)


def settings_from(cfg) -> BlockwiseConfig | None:
    """``heal.blockwise`` of a run config as a :class:`BlockwiseConfig` (None when off); the batch
    and window size are healing's (``heal.batch_per_rank``, ``heal.seq_len``)."""
    hc = cfg["heal"]
    bw = hc.get("blockwise")
    if not bw:
        return None
    allowed = ("tokens", "epochs", "lr", "warmup")
    if not isinstance(bw, dict) or set(bw) - set(allowed):
        raise ValueError(f"heal.blockwise is {bw!r}: give null (off) or a mapping of {', '.join(allowed)}, "
                         "e.g. {tokens: 32768, epochs: 4, lr: 5.0e-3}.")
    return BlockwiseConfig(**{k: type(getattr(BlockwiseConfig, k))(v) for k, v in bw.items()},
                           batch_size=int(hc["batch_per_rank"]), seq_len=int(hc["seq_len"])).check()


def start_from_config(start_dir, dest, cfg, device="cpu", progress: bool = True, rows: str = "first") -> dict:
    """Notebook 05's block-wise step: the compressed model in ``start_dir`` distilled block by block
    from the config's original model on the first ``heal.blockwise.tokens`` of the healing data,
    saved to ``dest`` (atomically) with its record in ``dest/blockwise.json``. A ``dest`` made from
    the same start file with the same settings is reused, not made again. ``rows="last"`` distils on
    the last rows of the healing data instead (``BlockwiseConfig.rows``; a measurement, not yet a
    config setting)."""
    from pathlib import Path

    from .heal_data import packed_data
    from .models import load_model, save_model_dir
    from .perplexity import autocast_dtype
    from .results import read_json, write_json
    from .tensorize import load_compressed

    bw = settings_from(cfg)
    if bw is None:
        raise ValueError("heal.blockwise is off (null): set it, e.g. {tokens: 32768, epochs: 4, lr: 5.0e-3}.")
    bw = replace(bw, rows=rows).check()
    hc, start_dir, dest = cfg["heal"], Path(start_dir), Path(dest)
    weights = start_dir / "model.safetensors"
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
    # (keys made before rows and warmup existed: their defaults are left out, so those starts are reused)
    settings = {k: v for k, v in asdict(bw).items() if (k, v) not in (("rows", "first"), ("warmup", 0.0))}
    key = {"start": str(start_dir), "start_file": stamp, "settings": settings, "data": hc["data"],
           "model": str(cfg["model"]), "seed": int(cfg["seed"])}
    sidecar = dest / "blockwise.json"
    if sidecar.is_file() and (dest / "config.json").is_file():
        rec = read_json(sidecar)
        if rec.get("key") == key:
            return {**rec, "model_dir": str(dest), "reused": True}
    dense, tok = load_model(cfg["model"], dtype=cfg["dtype"], device=device)
    model = load_compressed(start_dir, device=device)
    ids = packed_data(tok, hc["data"], bw.seq_len, int(cfg["seed"]))   # the healing text, never held-out
    if bw.rows == "last":  # rows the healing meets only at the end of its first epoch
        ids = ids[-max(1, bw.tokens // bw.seq_len):]
    amp = autocast_dtype("auto" if hc["mixed_precision"] == "bf16" else None, device)
    rec = {"key": key, **distill_blocks(dense, model, ids, bw, autocast=amp, seed=int(cfg["seed"]), progress=progress)}
    save_model_dir(model, tok, dest)
    write_json(sidecar, rec)
    return {**rec, "model_dir": str(dest), "reused": False}
