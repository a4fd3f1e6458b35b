"""Healing data: documents -> token ids -> fixed-length packed sequences -> per-rank batches.

The paper heals on generic chat data (UltraChat, Alpaca, OpenHermes) for "less than a single
epoch". Offline, the healing text is named by ``heal.data``: ``heal``, the heal split of
:mod:`compactify.corpus` (Brown's 1961 English prose, disjoint from the ``heldout`` split that
perplexity is measured on); ``wiki-vital``, the lead sections of Wikipedia's vital articles
(:mod:`compactify.wiki_corpus`, decontaminated against the held-out texts and the benchmarks); or
``brown-wiki``, both (~2.2M tokens; rows of the two are shuffled together). A config may instead name a
local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file
(one record per line with a ``text`` field or a chat ``messages`` list), e.g. UltraChat
exported where the hub is reachable.

Packing: documents are tokenized, each followed by the end-of-sequence token, concatenated,
and cut into rows of ``seq_len`` tokens (the ragged tail is dropped), and the rows are
shuffled with the run's seed. No padding, so every token in a batch is a training token and
tokens/s means the same thing for every model.

Sharding: :class:`ShardedSampler` deals out the rows in a fixed order, ``batch_per_rank`` rows
to each rank per step, so the batch of any (step, rank) is a pure function of the seed. Its
only state is the step it is at, which is what a checkpoint records to resume the data
stream exactly where it stopped.

Checkpoints (:func:`save_checkpoint`) hold that position with the model, optimizer and RNG
states: a directory ``step_N`` that is written under a temporary name, gets its ``COMPLETE``
marker last and is then renamed, so a half-written one is never mistaken for a whole one.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from .config import ConfigError, resolve_path
from .results import atomic_write_bytes, read_json, write_json

MARKER = "COMPLETE"  # written last into a checkpoint directory


class HealError(ConfigError):
    """A healing run that cannot start as asked; the message says what to change."""



SOURCES = ("heal", "wiki-vital", "brown-wiki")  # named healing texts that ship with packages (see the module docstring)


def load_documents(source: str) -> list[str]:
    """The healing documents: a named source (:data:`SOURCES`) or a local .txt / .jsonl file."""
    if source == "heldout":
        raise HealError("heal.data is 'heldout', the split perplexity is evaluated on: healing on it would "
                            "leak evaluation text into training. Use heal.data=heal (the default).")
    if source in SOURCES:
        from . import corpus, wiki_corpus

        brown = list(corpus.documents("heal")) if source in ("heal", "brown-wiki") else []
        try:
            return brown + (list(wiki_corpus.documents()) if source in ("wiki-vital", "brown-wiki") else [])
        except wiki_corpus.WikiCorpusError as e:
            raise HealError(str(e)) from None
    path = resolve_path(source)
    if not path.is_file():
        raise HealError(f"heal.data '{source}' is neither one of {', '.join(SOURCES)} nor an existing .txt/.jsonl "
                        "file.")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "text" in rec:
                docs.append(rec["text"])
            elif "messages" in rec:  # chat records: keep the turns as plain "role: content" prose
                docs.append("\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"]))
            else:
                raise HealError(f"{path}:{i + 1}: a .jsonl record needs a 'text' or 'messages' field.")
        return docs
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


def tokenize_documents(tokenizer, docs: Sequence[str]) -> list[list[int]]:
    """Token ids per document, each ending with the end-of-sequence token (a document boundary)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HealError("The tokenizer has no eos_token; packing needs one to mark document boundaries.")
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [list(x) + [eos] for x in ids]


def pack_tokens(token_ids_list: Sequence[Sequence[int]], seq_len: int, seed: int) -> torch.Tensor:
    """Concatenate the documents, cut into ``[n_seq, seq_len]`` rows, shuffle rows with ``seed``."""
    if seq_len < 2:
        raise HealError(f"heal.seq_len must be at least 2 (one input and one target token), got {seq_len}.")
    flat = torch.tensor([t for ids in token_ids_list for t in ids], dtype=torch.long)
    n_seq = flat.numel() // seq_len
    if n_seq == 0:
        raise HealError(f"The healing text has {flat.numel()} tokens, fewer than one sequence of "
                            f"heal.seq_len={seq_len}. Use more text or a shorter seq_len.")
    rows = flat[: n_seq * seq_len].view(n_seq, seq_len)
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(int(seed)))
    return rows[order].contiguous()


def plan_steps(n_seq: int, seq_len: int, world_size: int, batch_per_rank: int,
               tokens: int | None, steps: int | None, max_epochs: float) -> dict:
    """How many optimizer steps the budget buys, and how many passes over the data that is.

    ``steps`` wins over ``tokens`` when both are set. A budget needing more than ``max_epochs``
    passes over the packed data is refused (the paper heals for under one epoch); raise
    ``heal.max_epochs`` to repeat the data on purpose (each pass is reshuffled).
    """
    global_batch = world_size * batch_per_rank
    tokens_per_step = global_batch * seq_len
    steps_per_epoch = n_seq // global_batch
    if steps_per_epoch == 0:
        raise HealError(f"The healing data packs into {n_seq} sequences of {seq_len} tokens, fewer than one "
                            f"global batch ({world_size} ranks x heal.batch_per_rank={batch_per_rank}). Use more "
                            "text, a shorter heal.seq_len, or a smaller batch.")
    if steps is None:
        if not tokens or tokens <= 0:
            raise HealError("Set a positive heal.tokens (token budget) or heal.steps.")
        steps = math.ceil(tokens / tokens_per_step)
    if steps <= 0:
        raise HealError(f"heal.steps must be positive, got {steps}.")
    epochs = steps / steps_per_epoch
    if epochs > max_epochs + 1e-9:
        raise HealError(
            f"The budget of {steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step:,} tokens is "
            f"{epochs:.2f} passes over the healing data ({steps_per_epoch * tokens_per_step:,} usable tokens), more "
            f"than heal.max_epochs={max_epochs}. Lower heal.tokens/heal.steps, give more data, or raise "
            "heal.max_epochs to repeat the data (each pass reshuffled).")
    return {"steps": steps, "tokens_per_step": tokens_per_step, "steps_per_epoch": steps_per_epoch,
            "epochs": epochs, "tokens": steps * tokens_per_step}


class ShardedSampler:
    """Deterministic per-rank batches over packed rows, resumable from the step it is at.

    Step ``s`` of epoch ``e = s // steps_per_epoch`` takes the global batch of rows
    ``order_e[k*G:(k+1)*G]`` (``G = world_size * batch_per_rank``, ``k = s mod steps_per_epoch``)
    and rank ``r`` gets its slice ``[r*b:(r+1)*b]``. Epoch 0 keeps the packed (already shuffled)
    order; later epochs reshuffle with ``seed + e``. The ragged end of an epoch is dropped so all
    ranks always see equal batches.
    """

    def __init__(self, n_seq: int, batch_per_rank: int, world_size: int, rank: int, seed: int):
        self.n_seq, self.b, self.world, self.rank, self.seed = n_seq, batch_per_rank, world_size, rank, seed
        self.steps_per_epoch = n_seq // (world_size * batch_per_rank)
        self.position = 0  # the next step to serve

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch == 0:
            order = torch.arange(self.n_seq)
        else:
            order = torch.randperm(self.n_seq, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = k * self.world * self.b + self.rank * self.b
        return order[start:start + self.b]

    def next_batch(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's ``[batch_per_rank, seq_len]`` rows for the current step; advances the position."""
        batch = data[self.indices(self.position)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "n_seq": self.n_seq, "batch_per_rank": self.b,
                "world_size": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("n_seq", "batch_per_rank", "world_size", "seed"):
            if state[key] != mine[key]:
                raise HealError(f"The checkpoint's data stream has {key}={state[key]}, this run {mine[key]}: "
                                    "it cannot resume the same sequence of batches.")
        self.position = int(state["position"])


def packed_data(tokenizer, source: str, seq_len: int, seed: int) -> torch.Tensor:
    """:func:`load_documents` -> :func:`tokenize_documents` -> :func:`pack_tokens`."""
    docs = load_documents(source)
    if not docs:
        raise HealError(f"heal.data '{source}' holds no documents.")
    if source != "heal":  # the built-in split is disjoint by construction (tests); a user's file is checked
        from .heldout import TEXTS, EvalError, check_disjoint

        try:
            for name in TEXTS:
                check_disjoint(name, docs, f"healing data {source}", max_shared=5)
        except EvalError as e:
            raise HealError(str(e)) from None
    return pack_tokens(tokenize_documents(tokenizer, docs), seq_len, seed)


def data_path_hint(source: str) -> str:
    """A stable name for the data source in a run's fingerprint."""
    return source if source in SOURCES + ("heldout",) else str(Path(resolve_path(source)).resolve())


# ---------------------------------------------------------------- checkpoints
def find_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete ``step_N`` under ``root``, and a warning per incomplete one."""
    complete, warnings = [], []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / MARKER).is_file():
            complete.append((int(m[1]), p))
        elif m or p.name.startswith(".step_"):
            warnings.append(f"heal: WARNING ignoring incomplete checkpoint {p} (no {MARKER} marker: the run was "
                            "stopped while writing it)")
    return (max(complete)[1] if complete else None), warnings


def save_checkpoint(root: Path, step: int, model, optim, meta: dict, keep: int) -> Path:
    """DCP model + optimizer, per-rank RNG, rank 0's meta.json; COMPLETE marker last; rename."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, final, tmp = dist.get_rank(), root / f"step_{step}", root / f".step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optim)
    save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_json(tmp / "meta.json", meta)
        atomic_write_bytes(tmp / MARKER, f"step {step}\n".encode())
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same step
        os.rename(tmp, final)
        done = sorted((int(p.name[5:]), p) for p in root.glob("step_*") if (p / MARKER).is_file())
        for _, old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optim) -> dict:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(path / f"rng_rank{dist.get_rank()}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return read_json(path / "meta.json")


def export_weights(model_dir, full_sd: dict, dest: Path) -> None:
    """Rebuild an unsharded model (dense or MPO) from ``model_dir``, load ``full_sd`` (its trained
    weights), save it as a model directory at ``dest``."""
    from .models import load_model, save_model_dir

    fresh, tok = load_model(model_dir)
    missing, unexpected = fresh.load_state_dict(full_sd, strict=False)
    tied = {n for n, _ in fresh.named_parameters(remove_duplicate=False)} - {n for n, _ in fresh.named_parameters()}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"healed state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    save_model_dir(fresh, tok, dest)


def export_checkpoint(model_dir, checkpoint: Path, dest: Path) -> Path:
    """A checkpoint of a healing run (``step_N``, complete) as a model directory at ``dest`` that
    ``models.load_model`` and ``scripts/eval_models.py`` read: the weights of a point in the middle
    of a run, to score on the benchmarks. ``model_dir`` is the run's start (it gives the structure:
    which matrices are MPOs, with which bonds); the checkpoint's optimizer state is not kept."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = Path(checkpoint)
    if not (checkpoint / MARKER).is_file():
        raise HealError(f"{checkpoint} is not a complete healing checkpoint (no {MARKER} marker): pass a "
                        "step_N directory of a run's checkpoints/ folder.")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(checkpoint), str(flat))  # torch.distributed's own reader: full tensors, any world size
        state = torch.load(flat, weights_only=False)["model"]
    export_weights(model_dir, state, Path(dest))
    return Path(dest)


def check_resume(saved: dict, current: dict, where: Path) -> None:
    """Refuse to resume a checkpoint written for another model, data or training plan."""
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise HealError(f"Cannot resume from {where}: it was written for a different model or plan ("
                        + "; ".join(diff) + "). Use a new out_dir, restore those settings, or delete "
                        f"{where.parent} to start over.")
