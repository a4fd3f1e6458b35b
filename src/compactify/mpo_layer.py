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

Inference modes (:attr:`MPOLinear.mode`, set for a whole model by :func:`set_inference_mode`;
a run-time choice: the saved model holds only the cores, whatever the mode):

* ``factored`` (the default): the forward above. Least memory: nothing but the cores.
* ``contracted``: ``W`` is contracted from the cores once, cached, and every call is one dense
  matmul (dense speed). Memory: ``out_features * in_features`` elements per layer on top of
  the cores, i.e. the dense model's block matrices again.
* ``auto``: per layer and per bucket of tokens (powers of two), whichever of the two is faster,
  measured the first time the bucket is met (interleaved repeats on the layer's own device and
  dtype, fastest of each) and kept in :attr:`MPOLinear.auto_decisions`; where the layer cannot be timed
  (meta and other devices than CPU and CUDA, or the torch-only copy of this class saved beside
  a model, which has no clock) it decides by the cost model (:meth:`MPOLinear.estimate_seconds`)
  and records ``"decided_by": "cost model"``. Memory: ``W`` is kept only for layers for which
  some bucket chose ``contracted``.

The cached ``W`` serves a call only when no gradient to the cores is wanted (grad disabled, or
no core requires grad): training and healing always take the factored path, so gradients
reach the cores exactly as in ``factored`` mode. It is rebuilt whenever a core changed (another
tensor, or an in-place write: an optimizer step, ``load_state_dict``), and dropped by ``.to()``.
"""
from __future__ import annotations

import math
import time
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
        return 2 * math.prod([size[l] for l in set(x) | set(y)])  # a list: torch.compile traces it

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
        program.append((name, left, right, f"{sub(lab_l)},{sub(lab_r)}->{sub(lab_out)}", math.prod([size[l] for l in lab_out])))
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
    first and does one dense GEMM; autograd takes the gradient back to the cores. Why: many
    small einsums lose to one large GEMM once there are more than a few tokens, and W costs
    ``o*i*chi`` FLOPs once per call, not per token; at one token the factored path wins
    (``benchmarks/materialize.py`` measures both, ``data/results/benchmarks/materialize.json``). Set the class attribute (or the instance's) to ``None`` for always-factored.
    A layer whose chain needs at most ``factored_below`` of the dense FLOPs stays factored at any
    number of tokens (:meth:`materializes`): a rank-r factorisation (2 cores, all outputs on one,
    all inputs on the other) is two thin GEMMs, and training the activation-aware SVD of the
    sensitivity plan that way ran 1.2-1.5x the tokens/s of rebuilding W (30% and 70% kept, 2 CPU
    threads, bf16 autocast; the study's 3-core MPOs all need >= 0.99 of the dense FLOPs and rebuild W).

    ``mode`` (class default ``"factored"``: the forward just described) may be set per instance
    to ``"contracted"`` or ``"auto"``; see the module docstring and :func:`set_inference_mode`.
    """

    materialize_from: int | None = 32
    factored_below: float = 0.8   # ... unless the factored chain needs at most this share of the dense FLOPs
    MODES = ("factored", "contracted", "auto")
    mode: str = "factored"
    auto_repeats: int = 7     # interleaved timings per path when ``auto`` measures a bucket
    auto_timer = None         # a seconds clock; compactify.mpo_layer sets time.perf_counter (None: cost model)
    # Rough rates of the cost model auto falls back to where it cannot time (2 CPU cores, fp32).
    cost_rates = {"flop_per_s": 3e10, "byte_per_s": 1e10, "call_s": 1e-5}

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
        self._dense: torch.Tensor | None = None   # the cached W of contracted / auto (never in the state_dict)
        self._dense_src: list = []                # views of the cores W was built from (their storage kept alive)
        self._dense_key: list | None = None       # their (address, version): the staleness check
        self.auto_decisions: dict[int, dict] = {}  # auto: bucket of tokens -> {"path", "decided_by", ...}

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
        mode = self.mode
        if mode != "factored":
            if mode not in self.MODES:
                raise ValueError(f"MPOLinear.mode is {mode!r}: use one of {', '.join(self.MODES)}.")
            if self.cache_allowed() and (mode == "contracted" or self.auto_path(x) == "contracted"):
                return nn.functional.linear(x, self.dense_matrix(), self.bias)
        return self.forward_factored(x)

    def materializes(self, batch: int) -> bool:
        """Whether the factored forward rebuilds ``W`` for ``batch`` tokens: from ``materialize_from``
        tokens on, unless the chain needs at most ``factored_below`` of the dense FLOPs."""
        return (self.materialize_from is not None and batch >= self.materialize_from
                and self.plan(batch)[0] > self.factored_below * 2 * batch * self.in_features * self.out_features)

    def forward_factored(self, x: torch.Tensor) -> torch.Tensor:
        """The ``factored`` forward: the planned einsum chain, or ``W`` rebuilt per call (with
        its gradient path) where :meth:`materializes`."""
        lead = x.shape[:-1]
        batch = math.prod(lead)
        if self.materializes(batch):
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

    # -- contracted / auto
    def cache_allowed(self) -> bool:
        """Whether the cached ``W`` may serve this call: only when no gradient to the cores is
        wanted (the cache has no gradient path), so training always runs factored."""
        return not (torch.is_grad_enabled() and any(c.requires_grad for c in self.cores))

    def dense_matrix(self) -> torch.Tensor:
        """``W`` (``out x in``, the cores' dtype, built in fp32), cached; rebuilt when a core is
        another tensor or was written in place since (data pointer and version counter). Under
        torch.compile the cached ``W`` is used as it is (traced code reads no data pointers;
        ``compactify.mpo_modes.prepare_compiled`` builds it eagerly first)."""
        if self._dense is not None and torch.compiler.is_compiling():
            return self._dense
        # = list(self.cores), without nn.Module.__getattr__ and ParameterList's indexing (slow per call)
        cores = list(self._modules["cores"]._parameters.values())
        # One list of (address, version) per call, compared at once: this check runs on every
        # contracted forward at batch 1, where a small layer's GEMV takes ~5 us; the generator over
        # zip(cores, views) it replaced took 4-5 us a call, this ~2-3 (min of 9 x 2000 calls).
        key = [(c.data_ptr(), -1 if c.is_inference() else c._version) for c in cores]
        if self._dense is None or key != self._dense_key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                self._dense = None
                self._dense = cores_to_matrix([c.detach().float() for c in cores]).to(cores[0].dtype).contiguous()
                # the views keep the old storage alive, so that its address cannot be reused unnoticed
                self._dense_src, self._dense_key = [c.detach() for c in cores], key
        return self._dense

    def release_dense(self) -> None:
        """Drop the cached ``W`` (the memory of ``contracted``); it is rebuilt when next needed."""
        self._dense, self._dense_src, self._dense_key = None, [], None

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), .cuda(): the cache and auto's timings are for the old device/dtype
        self.release_dense()
        self.auto_decisions = {}
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def bucket(tokens: int) -> int:
        """The bucket of ``auto`` decisions a number of tokens falls in: the next power of two."""
        return 1 << (max(int(tokens), 1) - 1).bit_length()

    def auto_path(self, x: torch.Tensor) -> str:
        """``auto``'s path for ``x``: the bucket's recorded decision, made now if there is none."""
        bucket = self.bucket(x.numel() // self.in_features)
        decision = self.auto_decisions.get(bucket)
        if decision is None and torch.compiler.is_compiling():
            return "factored"  # nothing can be timed while tracing (prepare_compiled decides first)
        if decision is None:
            t0 = time.perf_counter()
            decision = self.decide(x)
            decision["decide_s"] = time.perf_counter() - t0  # a one-off cost: timings of later work can leave it out
            self.auto_decisions[bucket] = decision
            if all(d["path"] == "factored" for d in self.auto_decisions.values()):
                self.release_dense()  # measured, not needed: factored keeps only the cores
        return decision["path"]

    def decide(self, x: torch.Tensor) -> dict:
        """Which path is faster for ``x`` (its number of tokens, this layer's device and dtype):
        both timed on ``x``, interleaved, ``auto_repeats`` times after a warm-up call, and the
        minima compared (a tie goes to factored, the smaller): on a shared CPU a pre-empted call
        can take 10x its cost, which flips medians of a few repeats, while the minimum is the
        uncontended cost (the medians are recorded too). Where no timing is possible, the cost
        model decides and the record says so."""
        tokens = max(x.numel() // self.in_features, 1)
        record = {"tokens": tokens, "device": str(x.device), "dtype": str(self.cores[0].dtype).replace("torch.", "")}
        clock, kind = self.auto_timer, x.device.type
        if clock is None or kind not in ("cpu", "cuda"):
            est = {p: self.estimate_seconds(p, tokens) for p in ("factored", "contracted")}
            why = "no clock in this copy of MPOLinear" if clock is None else f"{kind} device cannot be timed"
            return {**record, "path": "factored" if est["factored"] <= est["contracted"] else "contracted",
                    "decided_by": "cost model", "why": why, "factored_s": est["factored"], "contracted_s": est["contracted"]}

        def sync():
            if kind == "cuda":
                torch.cuda.synchronize(x.device)

        with torch.no_grad():
            w = self.dense_matrix()
            paths = {"factored": lambda: self.forward_factored(x),
                     "contracted": lambda: nn.functional.linear(x, w, self.bias)}
            # compactify.speed.interleaved's loop, written out: this class is also copied, torch-only,
            # into every saved model (compactify.remote_code)
            times: dict[str, list] = {p: [] for p in paths}
            for run in paths.values():  # warm-up: the plan, allocations
                run()
            for _ in range(max(int(self.auto_repeats), 1)):
                for p, run in paths.items():
                    sync()
                    t = clock()
                    run()
                    sync()
                    times[p].append(clock() - t)
        best = {p: min(ts) for p, ts in times.items()}
        return {**record, "path": "factored" if best["factored"] <= best["contracted"] else "contracted",
                "decided_by": "measurement", "factored_s": best["factored"], "contracted_s": best["contracted"],
                **{f"{p}_median_s": sorted(ts)[len(ts) // 2] for p, ts in times.items()}}

    def estimate_seconds(self, path: str, batch: int = 1) -> float:
        """Cost-model seconds of one call of ``path`` for ``batch`` tokens: FLOPs and bytes at
        :attr:`cost_rates` plus a fixed cost per kernel call (rough CPU rates, not calibrated
        per machine: ``auto`` uses this only where it cannot measure)."""
        r = self.cost_rates
        if path == "contracted":
            return self.dense_flops(batch) / r["flop_per_s"] + self.dense_bytes(batch) / r["byte_per_s"] + r["call_s"]
        if path != "factored":
            raise ValueError(f"path {path!r}: the cost model knows 'factored' and 'contracted'.")
        if self.materializes(batch):  # W rebuilt, then one GEMM
            rebuild = 2 * self.out_features * self.in_features * max(self.bond_dims, default=1)
            return ((rebuild + self.dense_flops(batch)) / r["flop_per_s"] + 2 * self.dense_bytes(batch) / r["byte_per_s"]
                    + len(self.cores) * r["call_s"])
        return self.flops(batch) / r["flop_per_s"] + self.bytes(batch) / r["byte_per_s"] + len(self.plan(batch)[1]) * r["call_s"]

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


MPOLinear.auto_timer = staticmethod(time.perf_counter)  # here, not in the class: its torch-only copy has no clock

# The model-level switches live in their own module; imported here, where they always were.
from .mpo_modes import contracted, inference_mode_set, mode_summary, set_inference_mode  # noqa: E402,F401
