"""Healing by distillation: the original model's next-token distribution as the target.

The paper heals with the plain next-token loss. Practitioners who recover compressed models
often distil from the original instead (Minitron: the KL divergence of the logits alone;
Arcee's DistillKit: online, or offline from stored top-k logits). :func:`kd_loss` is that KL
divergence, KL(teacher || student) at temperature T (scaled by T^2 so that its gradient does
not shrink with T), averaged over tokens.

Two teacher modes:

* ``online``: the original dense model, frozen, runs beside the student on every rank (in
  bf16 where the hardware has fast bf16). Exact, and costs one forward per step.
* ``topk``: the teacher's ``k`` largest logits for every healing token are written once to a
  file (:func:`precompute_topk`) and streamed during healing (:class:`TopKTeacher`). At paper
  scale a 13.5 GB bf16 teacher on every rank may not fit; the file does (k = 32: 6 bytes x 32
  per token). Its KL is over the teacher's top-k renormalised, a standard approximation.

A teacher must speak the student's language: same vocabulary size and the same token ids
(:func:`check_teacher`); a top-k file must have been made for the very rows this run trains on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .heal_data import HealError
from .results import atomic_write_bytes

LOSSES = ("lm", "kd", "mix")
TEACHER_MODES = ("online", "topk")



def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            topk: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 KL(p_teacher || p_student), both at temperature T.

    ``student_logits``: ``[..., V]``. Give the teacher either as full ``teacher_logits`` (same
    shape) or as ``topk = (values, indices)`` of shape ``[..., k]``: then the teacher's
    distribution is its softmax over those k logits, and the student's log-probabilities (over
    the full vocabulary) are read at the same k ids."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_logits is not None:
        p_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (p_log.exp() * (p_log - s)).sum(-1)
    elif topk is not None:
        values, idx = topk
        p_log = F.log_softmax(values.float() / t, dim=-1)
        kl = (p_log.exp() * (p_log - s.gather(-1, idx.long()))).sum(-1)
    else:
        raise HealError("kd_loss needs teacher_logits or topk=(values, indices).")
    return kl.mean() * t * t


def vocab_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's token -> id map: two tokenizers agree iff it is equal."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode()).hexdigest()[:16]


def check_teacher(student, student_tok, teacher, teacher_tok, where: str) -> None:
    """Refuse a teacher whose output vocabulary or token ids differ from the student's."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise HealError(f"The teacher {where} has a vocabulary of {vt} tokens, the student {vs}: distillation "
                           "compares next-token distributions id by id, so both must share one tokenizer. Use the "
                           "original model the compressed one was made from (heal.teacher: null), or heal.loss=lm.")
    if vocab_fingerprint(student_tok) != vocab_fingerprint(teacher_tok):
        raise HealError(f"The teacher {where} has {vt} tokens like the student but maps them to different ids "
                           "(another tokenizer). Use the original model the compressed one was made from "
                           "(heal.teacher: null), or heal.loss=lm.")


def load_teacher(source, student, student_tok, device: torch.device, bf16: bool):
    """The frozen teacher model (eval mode, no gradients; bf16 weights if ``bf16``), checked."""
    from .models import load_model

    teacher, tok = load_model(source, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
    check_teacher(student, student_tok, teacher, tok, f"'{source}'")
    teacher.eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_logits(teacher, batch: torch.Tensor) -> torch.Tensor:
    return teacher(input_ids=batch, use_cache=False).logits


def data_sha(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def precompute_topk(teacher, data: torch.Tensor, rows: torch.Tensor, k: int, path: Path, batch_size: int = 8,
                    progress: bool = True) -> Path:
    """Write the teacher's top-``k`` logits (bf16) and ids (int32) for ``data[rows]`` to ``path``
    (atomically: a stopped run leaves no half file). Keyed by row index and the data's hash."""
    from .progress import progress as tqdm

    rows = torch.as_tensor(rows, dtype=torch.long).unique()
    device = next(teacher.parameters()).device
    vals, ids = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher top-k", disable=not progress, mininterval=2):
        x = data[rows[start:start + batch_size]].to(device)
        v, i = teacher_logits(teacher, x).float().topk(int(k), dim=-1)
        vals.append(v.to(torch.bfloat16).cpu())
        ids.append(i.to(torch.int32).cpu())
    import io

    buf = io.BytesIO()
    torch.save({"rows": rows, "values": torch.cat(vals), "indices": torch.cat(ids), "k": int(k),
                "seq_len": int(data.shape[1]), "data_sha": data_sha(data),
                "vocab_size": int(teacher.config.vocab_size)}, buf)
    return atomic_write_bytes(path, buf.getvalue())


class TopKTeacher:
    """A precomputed top-k file, checked against this run's packed data and rows, looked up by row."""

    def __init__(self, path: Path, data: torch.Tensor, rows: torch.Tensor, vocab_size: int):
        path = Path(path)
        if not path.is_file():
            raise HealError(f"The top-k teacher file {path} does not exist. Leave heal.teacher_file empty to have "
                               "the run write it, or point it to a file made for this healing data.")
        try:
            d = torch.load(path, weights_only=True)
        except Exception as e:  # truncated or not a torch file
            raise HealError(f"{path} is not a readable top-k teacher file ({type(e).__name__}: {e}). Delete it "
                               "and let the run recompute it.") from e
        fix = f"Delete {path} (the run rewrites it) or point heal.teacher_file to a file made for this data."
        if d.get("data_sha") != data_sha(data) or d.get("seq_len") != data.shape[1]:
            raise HealError(f"{path} was made for other healing data (data hash {d.get('data_sha')}, seq_len "
                               f"{d.get('seq_len')}) than this run's ({data_sha(data)}, {data.shape[1]}). {fix}")
        if d.get("vocab_size") != vocab_size:
            raise HealError(f"{path} holds logits over {d.get('vocab_size')} tokens, the student has "
                               f"{vocab_size}. {fix}")
        missing = set(torch.as_tensor(rows).tolist()) - set(d["rows"].tolist())
        if missing:
            raise HealError(f"{path} lacks the teacher's logits for {len(missing)} of the rows this run trains on "
                               f"(a longer budget than it was made for). {fix}")
        self.k = d["k"]
        self.values, self.indices = d["values"], d["indices"]
        self.where = {int(r): n for n, r in enumerate(d["rows"].tolist())}

    def lookup(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.tensor([self.where[int(r)] for r in rows])
        return self.values[at].to(device), self.indices[at].to(device)
