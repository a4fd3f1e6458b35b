"""The MPO as a layer: :class:`MPOLinear`, a drop-in ``nn.Linear`` that stores trainable cores.

Its forward pass contracts the input with the cores pairwise and never rebuilds the dense
matrix. Which pairs to contract first matters: for ``n`` cores of shape
``(r_{k-1}, o_k, i_k, r_k)`` and ``B`` tokens, sweeping the input through the cores one by
one costs about ``2 B sum_k (prod of the input factors not yet absorbed) * r_{k-1} o_k i_k r_k
* (prod of the output factors already produced)`` FLOPs, and pre-merging two small cores
can be cheaper for long prefills. :func:`_plan` finds the cheapest order for each number of
tokens by dynamic programming over the chain (forbidding only the full merge, which would be
the dense matrix), and the layer caches it. :meth:`MPOLinear.flops` and
:meth:`MPOLinear.bytes` state the cost model next to the dense one.

Mind the scaling: per parameter, an MPO matvec costs more multiply-adds than a dense one
(every core entry meets a whole slice of the input), so the factored forward is cheaper in
FLOPs than ``nn.Linear`` only at small bond dimensions; ``benchmarks/mpo_linear.py`` measures
where the crossover lies.
"""
from __future__ import annotations

import contextlib

import math
from typing import Sequence

import torch
from torch import nn

from .mpo import MPO, MPOError, decompose


def _plan(core_shapes: Sequence[tuple[int, ...]], batch: int) -> tuple[int, list[tuple]]:
    """Cheapest pairwise contraction order of input and cores that never merges *all* cores.

    Interval dynamic programme over the chain of cores: ``seg[a,b]`` is the cheapest way to
    pre-merge cores a..b (a piece of the dense matrix, never the whole of it) and
    ``state[a,b]`` the cheapest way for the input to have absorbed cores a..b; the input may
    absorb any adjacent pre-merged segment on either side. Cost = FLOPs (2 per
    multiply-add). Returns ``(flops, program)``: a list of einsum steps
    ``(out, left, right, equation, out_numel)`` over names ``x``, ``c0``..``c{n-1}`` and
    intermediates, the last of which yields the output laid out as ``(tokens, o_1..o_n)``.
    """
    n = len(core_shapes)
    size = {"z": batch}
    for k, (_, o, i, r) in enumerate(core_shapes):
        size.update({f"o{k}": o, f"i{k}": i, f"r{k}": r})
    x_labels = ["z"] + [f"i{k}" for k in range(n)]

    def seg_labels(a, b):  # open indices of cores a..b merged (boundary bonds of size 1 dropped)
        return ([f"r{a - 1}"] if a else []) + [f"{c}{k}" for k in range(a, b + 1) for c in "oi"] + ([f"r{b}"] if b < n - 1 else [])

    def state_labels(a, b):  # open indices of the input after absorbing cores a..b
        return (["z"] + [f"i{k}" for k in range(n) if not a <= k <= b] + [f"o{k}" for k in range(a, b + 1)]
                + ([f"r{a - 1}"] if a else []) + ([f"r{b}"] if b < n - 1 else []))

    def pair(x, y):
        return 2 * math.prod(size[l] for l in set(x) | set(y))

    seg, state = {}, {}  # (a, b) -> (cost, how)
    for length in range(1, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            seg[a, b] = (0, None) if a == b else min(
                (seg[a, m][0] + seg[m + 1, b][0] + pair(seg_labels(a, m), seg_labels(m + 1, b)), m) for m in range(a, b))
            options = []
            if length < n:  # the input meets cores a..b pre-merged (all n merged would be the dense matrix)
                options.append((seg[a, b][0] + pair(x_labels, seg_labels(a, b)), ("absorb", None)))
            for m in range(a, b):  # an absorbed state grows by an adjacent pre-merged segment
                options.append((state[a, m][0] + seg[m + 1, b][0] + pair(state_labels(a, m), seg_labels(m + 1, b)), ("right", m)))
                options.append((state[m + 1, b][0] + seg[a, m][0] + pair(state_labels(m + 1, b), seg_labels(a, m)), ("left", m)))
            state[a, b] = min(options, key=lambda t: t[0])

    letters: dict[str, str] = {}
    program: list[tuple] = []

    def sub(labels):  # einsum subscripts, one letter per index name
        return "".join(letters.setdefault(l, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(letters)]) for l in labels)

    def emit(left, lab_l, right, lab_r, lab_out):
        name = f"t{len(program)}"
        program.append((name, left, right, f"{sub(lab_l)},{sub(lab_r)}->{sub(lab_out)}", math.prod(size[l] for l in lab_out)))
        return name

    def build_seg(a, b):
        if a == b:
            return f"c{a}"
        m = seg[a, b][1]
        return emit(build_seg(a, m), seg_labels(a, m), build_seg(m + 1, b), seg_labels(m + 1, b), seg_labels(a, b))

    def build_state(a, b):
        kind, m = state[a, b][1]
        if kind == "absorb":
            return emit("x", x_labels, build_seg(a, b), seg_labels(a, b), state_labels(a, b))
        if kind == "right":
            return emit(build_state(a, m), state_labels(a, m), build_seg(m + 1, b), seg_labels(m + 1, b), state_labels(a, b))
        return emit(build_state(m + 1, b), state_labels(m + 1, b), build_seg(a, m), seg_labels(a, m), state_labels(a, b))

    build_state(0, n - 1)
    return state[0, n - 1][0], program


def cores_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract MPO cores ``(r_{k-1}, o_k, i_k, r_k)`` into the dense ``out x in`` matrix.

    Plain torch, the same operations as tensorly's ``tt_matrix_to_matrix`` (so the same bits):
    chain the cores by matrix products over their bonds, then move the output factors in
    front of the input factors. Used by :meth:`compactify.mpo.MPO.to_matrix`, by
    :class:`MPOLinear` for long inputs and by :func:`contracted`; written without tensorly so
    that the modeling file saved beside a compressed model needs only torch.
    """
    res = cores[0]
    for core in cores[1:]:
        res = (res.reshape(-1, res.shape[-1]) @ core.reshape(core.shape[0], -1)).reshape(*res.shape[:-1], *core.shape[1:])
    n = len(cores)
    out_f, in_f = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    full = [d for pair in zip(out_f, in_f) for d in pair]
    order = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return res.reshape(full).permute(order).reshape(math.prod(out_f), -1)


class MPOLinear(nn.Module):
    """A drop-in ``nn.Linear`` whose weight is an MPO, stored as trainable cores.

    For fewer than ``materialize_from`` tokens the forward pass contracts the input with the
    cores pairwise and never rebuilds the dense matrix. The order is chosen per number of
    tokens by :func:`_plan` to minimise FLOPs (decode, 1 token, sweeps the input through the
    cores; long prefills may pre-merge small groups of neighbouring cores first), and cached.
    From ``materialize_from`` tokens on (prefill, training) it contracts the cores into ``W``
    first and does one dense GEMM; autograd takes the gradient back to the cores. Why
    (``benchmarks/materialize.py``, ``data/results/benchmarks/materialize.json``: forward+backward,
    SmolLM2's shapes at 30% kept, 1 thread): at 1 token factored wins (2.5-4.4 vs 4.9-8.4 ms), from
    32 tokens on materialized does (14-20 vs 6-11 ms; at 512 tokens 217-462 vs 15-43 ms, dense
    12-37 ms): many small einsums lose to one large GEMM, and W costs ``o*i*chi`` FLOPs once per
    call, not per token. Set the class attribute (or the instance's) to ``None`` for always-factored.
    """

    materialize_from: int | None = 32

    def __init__(self, out_factors: Sequence[int], in_factors: Sequence[int], bond_dims: Sequence[int],
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.out_factors, self.in_factors = tuple(out_factors), tuple(in_factors)
        self.bond_dims = tuple(int(r) for r in bond_dims)
        if not len(self.out_factors) == len(self.in_factors) == len(self.bond_dims) + 1:
            raise MPOError(f"{len(self.out_factors)} output factors, {len(self.in_factors)} input factors and "
                           f"{len(self.bond_dims)} bonds do not describe one MPO (need n, n, n-1).")
        self.out_features, self.in_features = math.prod(self.out_factors), math.prod(self.in_factors)
        r = [1, *self.bond_dims, 1]
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(nn.Parameter(torch.empty(r[k], o, i, r[k + 1], **kw))
                                      for k, (o, i) in enumerate(zip(self.out_factors, self.in_factors)))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None
        self._plans: dict[int, tuple] = {}
        self._dense: torch.Tensor | None = None   # set only inside contracted(): see there

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None) -> "MPOLinear":
        c0 = mpo.cores[0]
        layer = cls(mpo.out_factors, mpo.in_factors, mpo.bond_dims, bias=bias is not None, device=c0.device, dtype=c0.dtype)
        with torch.no_grad():
            for p, c in zip(layer.cores, mpo.cores):
                p.copy_(c)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, chi: int | None = None, **kwargs) -> "MPOLinear":
        """Decompose ``linear.weight`` (see :func:`decompose` for ``cores``, ``target_ratio``, factors)."""
        return cls.from_mpo(decompose(linear.weight, chi=chi, **kwargs), linear.bias)

    def to_mpo(self) -> MPO:
        return MPO([c.detach() for c in self.cores])

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward
    def plan(self, batch: int) -> tuple[int, list[tuple]]:
        """The (cached) cheapest contraction for ``batch`` tokens: ``(flops, program)``, see :func:`_plan`."""
        if batch not in self._plans:
            self._plans[batch] = _plan([tuple(c.shape) for c in self.cores], batch)
        return self._plans[batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return nn.functional.linear(x, self._dense, self.bias)
        lead = x.shape[:-1]
        batch = math.prod(lead)
        if self.materialize_from is not None and batch >= self.materialize_from:
            return nn.functional.linear(x, cores_to_matrix(list(self.cores)), self.bias)
        n = len(self.cores)
        env = {f"c{k}": c for k, c in enumerate(self.cores)}
        env["c0"] = env["c0"].squeeze(0)  # the boundary bonds r_0 = r_n = 1 carry no index
        env[f"c{n - 1}"] = env[f"c{n - 1}"].squeeze(-1)
        env["x"] = x.reshape(batch, *self.in_factors)
        out = "x"
        for out, left, right, equation, _ in self.plan(batch)[1]:
            env[out] = torch.einsum(equation, env[left], env[right])
        y = env[out].reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    # -- cost model
    def flops(self, batch: int = 1) -> int:
        """FLOPs (2 per multiply-add) of the factored forward for ``batch`` tokens (bias excluded)."""
        return self.plan(batch)[0]

    def dense_flops(self, batch: int = 1) -> int:
        return 2 * batch * self.in_features * self.out_features

    def bytes(self, batch: int = 1) -> int:
        """Bytes the factored forward moves: cores and input read, every intermediate written
        and read back once, the output written."""
        program = self.plan(batch)[1]
        inter = sum(step[-1] for step in program)
        moved = self.num_cores_params + batch * self.in_features + 2 * inter - batch * self.out_features
        return self.cores[0].element_size() * moved

    @property
    def num_cores_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def dense_bytes(self, batch: int = 1) -> int:
        el = self.cores[0].element_size()
        return el * (self.in_features * self.out_features + batch * (self.in_features + self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, out_factors={self.out_factors}, "
                f"in_factors={self.in_factors}, bond_dims={self.bond_dims}, bias={self.bias is not None}")


@contextlib.contextmanager
def contracted(model: nn.Module):
    """Within this block every :class:`MPOLinear` of ``model`` multiplies by its cores contracted
    once into the dense matrix: the same function (up to float rounding) at dense speed.

    For measuring *quality* only (perplexity, benchmark accuracy): on a CPU at batch 1 the
    factored forward is 3-24x slower than the dense one (benchmarks/mpo_linear.py), which made a
    tensorized model's benchmark suite take 5x the dense model's. Speed is always measured
    with the factored forward (``compactify.speed``, ``evaluate.task_times``). Not for training:
    the cache holds no gradient path to the cores.
    """
    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    try:
        with torch.no_grad():
            for m in layers:
                m._dense = cores_to_matrix([c.detach().float() for c in m.cores]).to(m.cores[0].dtype).contiguous()
        yield len(layers)
    finally:
        for m in layers:
            m._dense = None
