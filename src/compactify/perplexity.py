"""Held-out perplexity: a model scored on English prose in non-overlapping windows of ``seq_len``
tokens (:func:`perplexity`), the held-out texts of a config (:func:`heldout_ids_for`), and the
compute precision of every measurement (:func:`autocast_dtype`, :func:`fast_bf16`).

Perplexity is the cheap profiling signal later steps call hundreds of times, so callers tokenise
once with :func:`tokenize_for_ppl` and pass the ids. :mod:`compactify.evaluate` re-exports all
of this beside the benchmarks.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from .models import HALF_DTYPES


class EvalError(ValueError):
    """An evaluation request that cannot be run as given; the message names the fix."""


AUTOCAST = HALF_DTYPES  # the dtypes autocast may compute in (compactify.models.DTYPES)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native here: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16
    (elsewhere bf16 is emulated and slower than fp32, so "auto" precision stays fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # private helpers of torch.cpu; absent on other builds -> assume not
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:
            return False
    return False


def autocast_dtype(autocast: str | None, device: torch.device | str = "cpu"):
    """None (compute in the model's dtype) or the torch dtype named by ``autocast``; "auto" is
    bfloat16 where :func:`fast_bf16`, else None."""
    if autocast in (None, "", "none", "null"):
        return None
    if autocast == "auto":
        return torch.bfloat16 if fast_bf16(torch.device(device)) else None
    if str(autocast) not in AUTOCAST:
        raise EvalError(f"Unknown autocast '{autocast}'. Use null (the model's own dtype), auto, or one of "
                        f"{', '.join(AUTOCAST)}.")
    return AUTOCAST[str(autocast)]


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def tokenize_for_ppl(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D LongTensor, cut to ``max_tokens``."""
    if not isinstance(text, str) or not text.strip():
        raise EvalError("The perplexity text is empty. Pass held-out English prose, e.g. "
                        "compactify.corpus.text('heldout').")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, tokenizer, text_or_ids, seq_len: int = 256, max_tokens: int | None = None,
               batch_size: int = 8, autocast: str | None = None, text_name: str | None = None) -> dict:
    """Perplexity of ``model`` on a text (or pre-tokenised ids) in non-overlapping windows.

    The first ``max_tokens`` tokens are cut into ``windows = tokens // seq_len`` windows of
    ``seq_len`` tokens (the remainder is dropped); within each window every token but the first
    is predicted from the ones before it, so ``tokens = windows * (seq_len - 1)`` are scored.
    ``nll`` is their mean negative log-likelihood in nats and ``ppl = exp(nll)``; ``window_nll``
    holds each window's mean, for paired comparisons and bootstrap intervals
    (:mod:`compactify.compare`). ``text`` names the held-out text (:mod:`compactify.heldout`) and
    ``ids_sha`` hashes the ids, so two results are paired only if they scored the same tokens.
    Windows carry no context across their boundary: numbers compare only at the same ``seq_len``.
    ``autocast`` ("bfloat16"/"float16") computes under ``torch.autocast``, as in :func:`run_tasks`.
    """
    from .heldout import ids_digest

    if isinstance(text_or_ids, str):
        ids = tokenize_for_ppl(tokenizer, text_or_ids, max_tokens)
    elif isinstance(text_or_ids, torch.Tensor):
        ids = text_or_ids.reshape(-1).long()
    else:
        raise EvalError(f"perplexity() takes a str or a LongTensor of token ids, not {type(text_or_ids).__name__}.")
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    if seq_len < 2:
        raise EvalError(f"seq_len must be at least 2 (one token of context, one to predict), not {seq_len}.")
    from .models import check_seq_len

    check_seq_len(model, seq_len, "eval.perplexity.seq_len")
    windows = ids.numel() // seq_len
    if windows == 0:
        raise EvalError(f"The text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}. "
                        "Pass more text (or a smaller seq_len).")
    device = next(model.parameters()).device
    ac = autocast_dtype(autocast, device)
    batches = ids[: windows * seq_len].view(windows, seq_len)
    was_training = model.training
    model.eval()
    per_window = []
    try:
        # no_grad rather than inference_mode: compressed layers may cache tensors that a later
        # training step must be able to use.
        with torch.no_grad(), torch.autocast(device.type, dtype=ac or torch.bfloat16, enabled=ac is not None):
            for start in range(0, windows, batch_size):
                x = batches[start:start + batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits[:, :-1]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                      reduction="none").view(x.shape[0], -1).mean(1)
                per_window += nll.tolist()
    finally:
        model.train(was_training)
    scored = windows * (seq_len - 1)
    nll = sum(per_window) / windows
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "seq_len": seq_len, "windows": windows,
            "text": text_name, "ids_sha": ids_digest(batches.reshape(-1)), "autocast": _dtype_name(ac),
            "window_nll": [round(x, 6) for x in per_window]}


def heldout_ids_for(tokenizer, cfg: Mapping) -> dict[str, torch.Tensor]:
    """``{text: token ids}`` for each held-out text of ``eval.perplexity.texts``
    (:mod:`compactify.heldout`), cut to ``eval.perplexity.max_tokens`` (one number for all texts,
    or a mapping per text; null = the whole text): every run and model scores the same tokens."""
    from . import heldout

    pc = cfg["eval"]["perplexity"]
    names = [heldout.check_name(n) for n in pc["texts"]]
    if not names:
        raise EvalError("eval.perplexity.texts is empty: name at least one held-out text "
                        f"({', '.join(heldout.TEXTS)}).")
    cut = pc["max_tokens"]
    if isinstance(cut, Mapping):
        unknown = set(cut) - set(names)
        if unknown:
            raise EvalError(f"eval.perplexity.max_tokens names {sorted(unknown)}, not in eval.perplexity.texts {names}.")
    out = {}
    for name in names:
        n = cut.get(name) if isinstance(cut, Mapping) else cut
        if n is not None and int(n) < pc["seq_len"]:
            raise EvalError(f"eval.perplexity.max_tokens for '{name}' is {n}, shorter than one window "
                            f"(seq_len={pc['seq_len']}). Use at least {pc['seq_len']} tokens.")
        out[name] = heldout.token_ids(name, tokenizer, n)
    return out


def heldout_perplexities(model, tokenizer, texts: Mapping[str, torch.Tensor], cfg: Mapping,
                         contract: bool = True) -> dict[str, dict]:
    """:func:`perplexity` of each held-out text (``{name: ids}``, from :func:`heldout_ids_for`) with
    the windows of ``eval.perplexity``: how every notebook scores a model on held-out prose. With
    ``contract`` each MPO layer is contracted once to its dense matrix while scoring (the same
    function at dense speed; :func:`compactify.mpo_modes.contracted`)."""
    import contextlib

    from .mpo_modes import contracted

    pc = cfg["eval"]["perplexity"]
    with contracted(model) if contract else contextlib.nullcontext():
        return {name: perplexity(model, tokenizer, ids, seq_len=pc["seq_len"], batch_size=pc["batch_size"],
                                 autocast=cfg["eval"]["autocast"], text_name=name) for name, ids in texts.items()}
