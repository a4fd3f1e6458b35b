"""One weight matrix as a Matrix Product Operator (MPO), the paper's building block.

A dense ``out x in`` matrix ``W`` is viewed as a tensor with one output factor and one input
factor per *core*: ``out = o_1*...*o_n`` and ``in = i_1*...*i_n``, so
``W[(o_1..o_n), (i_1..i_n)] = sum_r G_1[o_1,i_1,r_1] G_2[r_1,o_2,i_2,r_2] ... G_n[r_{n-1},o_n,i_n]``.
Core ``k`` is a 4-index tensor of shape ``(r_{k-1}, o_k, i_k, r_k)`` (tensorly's TT-matrix
layout, ``r_0 = r_n = 1``). The cores are found by sequential SVDs (TT-SVD): pair each
``o_k`` with its ``i_k``, cut the tensor after core 1, keep the ``chi`` largest singular
values, move on to the next cut. ``chi``, the *bond dimension*, caps every ``r_k`` and sets
the size: the paper's 216x216 example with factors 6*6*6 has ``2*36*chi + 36*chi**2``
parameters. tensorly's ``tensor_train_matrix`` does the SVDs; this module chooses the
factors, resolves ``chi`` (or a target parameter ratio) into per-bond ranks, and wraps the
result (:class:`MPO`, :class:`MPOLinear`).

Conventions chosen here (hyper-parameters the paper leaves open):
  * factors are balanced (as equal as the prime factorisation allows) and sorted ascending,
    so core ``k`` pairs the k-th smallest output factor with the k-th smallest input factor;
  * a dimension with fewer prime factors than ``cores`` (a prime, say) is an error
    (:class:`MPOError`), never a silent fallback: pass fewer ``cores`` or explicit
    ``out_factors``/``in_factors`` (which may contain 1s);
  * ``chi`` above the largest bond the factors allow is clamped with a :class:`UserWarning`
    (the MPO is then exact). Bonds near the ends are always capped by their own full rank.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train, tensor_train_matrix
from tensorly.tenalg.svd import svd_interface


class MPOError(ValueError):
    """A matrix, bond dimension or ratio that cannot be turned into an MPO as asked."""



# ---------------------------------------------------------------- factors and bond dimensions

@contextlib.contextmanager
def single_thread():
    """Run CPU LAPACK (SVD, eigh, QR) on one torch thread inside this block: on a small machine that
    anything else also uses, multi-threaded LAPACK at these matrix sizes loses far more to OpenMP's
    waiting threads than it gains; on an idle one, one thread costs at most the thread count.
    CUDA work is unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def factorize(n: int, k: int) -> tuple[int, ...]:
    """The most balanced split of ``n`` into ``k`` factors >= 2, ascending.

    >>> factorize(11008, 3), factorize(576, 3), factorize(192, 3), factorize(1536, 3)
    ((16, 16, 43), (8, 8, 9), (4, 6, 8), (8, 12, 16))

    "Balanced" minimises the sum of squared log-factors (their product is fixed), i.e. the
    factors' spread. Raises :class:`MPOError` if ``n`` has fewer than ``k`` prime
    factors (e.g. a prime with ``k >= 2``).
    """
    if k < 1 or n < 1:
        raise MPOError(f"Cannot factorize {n} into {k} factors: both must be >= 1.")
    if len(prime_factors(n)) < k:
        raise MPOError(
            f"{n} = {'*'.join(map(str, prime_factors(n))) or '1'} has fewer than {k} prime factors, so it "
            f"cannot be split over {k} cores. Use fewer cores, or pass the factors explicitly "
            f"(out_factors=/in_factors=, where a factor of 1 is allowed).")

    def splits(m: int, parts: int, low: int):
        if parts == 1:
            if m >= low:
                yield (m,)
            return
        d = low
        while d ** parts <= m:
            if m % d == 0:
                for rest in splits(m // d, parts - 1, d):
                    yield (d, *rest)
            d += 1

    return min(splits(n, k, 2), key=lambda f: (sum(math.log(x) ** 2 for x in f), f))


def _check_factors(name: str, factors: Sequence[int], dim: int, cores: int) -> tuple[int, ...]:
    factors = tuple(int(f) for f in factors)
    if len(factors) != cores or any(f < 1 for f in factors) or math.prod(factors) != dim:
        raise MPOError(f"{name}={factors} must be {cores} positive integers whose product is "
                                 f"{dim}; got product {math.prod(factors)} over {len(factors)} factors.")
    return factors


def max_bond_dims(dims: Sequence[int]) -> list[int]:
    """Full rank of each cut: ``min(d_1*...*d_k, d_{k+1}*...*d_n)`` for ``d_k = o_k*i_k``."""
    return [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]


def bond_dims(dims: Sequence[int], chi: int) -> list[int]:
    """The ranks TT-SVD keeps with every bond capped at ``chi`` (tensorly's own rule:
    ``r_k = min(chi, r_{k-1}*d_k, d_{k+1}*...*d_n)``)."""
    ranks, r = [], 1
    for k in range(len(dims) - 1):
        r = min(chi, r * dims[k], math.prod(dims[k + 1:]))
        ranks.append(r)
    return ranks


def count_params(dims: Sequence[int], bonds: Sequence[int]) -> int:
    """Parameters of an MPO: ``sum_k r_{k-1} * o_k * i_k * r_k``."""
    r = [1, *bonds, 1]
    return sum(r[k] * d * r[k + 1] for k, d in enumerate(dims))


def chi_for_ratio(dims: Sequence[int], target_ratio: float) -> int:
    """The largest ``chi`` whose MPO keeps at most ``target_ratio`` of the dense parameters."""
    dense = math.prod(dims)
    if not 0 < target_ratio <= 1:
        raise MPOError(f"target_ratio={target_ratio} must be in (0, 1] (the fraction of parameters kept).")
    smallest = count_params(dims, bond_dims(dims, 1))
    if smallest > target_ratio * dense:
        raise MPOError(f"target_ratio={target_ratio} is unreachable: chi=1 already keeps {smallest} of {dense} "
                       f"parameters (ratio {smallest / dense:.3g}). Use a larger ratio or more cores.")
    lo, hi = 1, max(max_bond_dims(dims))  # params(chi) is non-decreasing: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_params(dims, bond_dims(dims, mid)) <= target_ratio * dense:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _resolve(shape: tuple[int, int], chi, cores, target_ratio, in_factors, out_factors):
    """Factors and bond ranks for a matrix of ``shape`` = (out, in), after all the checks."""
    if int(cores) < 2:
        raise MPOError(f"cores={cores}: an MPO needs at least 2 cores (1 core is the dense matrix).")
    out_f = factorize(shape[0], cores) if out_factors is None else _check_factors("out_factors", out_factors, shape[0], cores)
    in_f = factorize(shape[1], cores) if in_factors is None else _check_factors("in_factors", in_factors, shape[1], cores)
    dims = [o * i for o, i in zip(out_f, in_f)]
    if chi is not None and target_ratio is not None:
        raise MPOError("Give chi or target_ratio, not both.")
    full = max(max_bond_dims(dims))
    if target_ratio is not None:
        chi = chi_for_ratio(dims, target_ratio)
    elif chi is None:
        chi = full
    elif int(chi) != chi or chi <= 0:
        raise MPOError(f"chi={chi} must be a positive integer (the bond dimension).")
    elif chi > full:
        warnings.warn(f"chi={chi} exceeds the largest bond these factors allow ({full}); clamped to {full} "
                      f"(the MPO is exact).", UserWarning, stacklevel=3)
        chi = full
    return out_f, in_f, bond_dims(dims, int(chi))


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise MPOError(f"Expected a 2-D weight tensor (out x in); got {getattr(weight, 'shape', type(weight))}.")
    w = weight.detach().double()  # TT-SVD in float64: see gram_svd
    if not torch.isfinite(w.sum()):  # one reduction instead of an elementwise mask: NaN/Inf propagate
        raise MPOError(f"The weight ({tuple(weight.shape)}) contains NaN or Inf; an SVD of it is meaningless. "
                       "Check the checkpoint or the dtype it was loaded in.")
    return w


# ---------------------------------------------------------------- the decomposition

def gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_) -> tuple[torch.Tensor, ...]:
    """Truncated SVD from the eigen-decomposition of the *smaller* Gram matrix.

    Hand-written because it is measurably faster: TT-SVD unfoldings are very wide (e.g.
    256 x 65536 for a 4096x4096 matrix on 3 cores), where LAPACK's full SVD (tensorly's default
    ``truncated_svd``) does the work of the long side, and tensorly 0.10's own ``symeig_svd``
    eigen-decomposes the *larger* Gram matrix (65536 x 65536 here); this one works on the
    256 x 256 side (``benchmarks/scale.py`` times all 224 LLaMA-2 7B matrices with it). Squaring
    the matrix squares its condition number, so call it in float64 (``decompose`` does):
    singular values are then accurate to ~1e-16 * (s_max / s)**2 relative. Returns
    ``(U, S, V)`` like tensorly's SVD functions, largest first; ``S * V`` (all that TT-SVD
    uses of ``V``) is ``U.T @ matrix``.
    """
    rows, cols = matrix.shape
    k = min(rows, cols) if n_eigenvecs is None else min(n_eigenvecs, rows, cols)
    wide = rows <= cols
    lam, vecs = torch.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    vecs = vecs.flip(-1)[:, :k]
    s = lam.flip(-1)[:k].clamp_min(0).sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if wide:  # vecs = U;  V = U.T A / S
        return vecs, s, (vecs.T @ matrix) / safe[:, None] * (s > 0)[:, None]
    return (matrix @ vecs) / safe * (s > 0), s, vecs.T  # vecs = V (as columns)


@dataclass
class MPO:
    """The cores of one matrix. Core ``k`` has shape ``(r_{k-1}, o_k, i_k, r_k)``."""

    cores: list[torch.Tensor]

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(c.shape[2] for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.out_factors), math.prod(self.in_factors)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """The interior ranks ``(r_1, ..., r_{n-1})``."""
        return tuple(c.shape[-1] for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def to_matrix(self) -> torch.Tensor:
        """Contract all cores back into the dense ``out x in`` matrix (for checks, not for use)."""
        return cores_to_matrix(self.cores)  # tensorly's tt_matrix_to_matrix in plain torch (same bits)

    def relative_error(self, weight: torch.Tensor) -> float:
        """``||W - MPO||_F / ||W||_F``."""
        w = weight.detach().to(self.cores[0].dtype)
        return float(torch.linalg.norm(w - self.to_matrix()) / torch.linalg.norm(w))


def decompose(weight: torch.Tensor, chi: int | None = None, cores: int = 3, target_ratio: float | None = None,
              in_factors: Sequence[int] | None = None, out_factors: Sequence[int] | None = None,
              svd="gram") -> MPO:
    """TT-SVD of a dense ``out x in`` weight into an :class:`MPO` with every bond <= ``chi``.

    ``chi=None`` and ``target_ratio=None`` give the exact (full-bond) MPO. ``target_ratio``
    (fraction of ``out*in`` parameters to keep) picks the largest ``chi`` that fits. The SVDs
    run in tensorly's pytorch backend on the weight's device, in float64, and the cores come
    back in the weight's dtype. ``svd="gram"`` uses :func:`gram_svd` (fast); any name tensorly
    knows (``"truncated_svd"``: LAPACK's full SVD then the top ``chi``; ``"randomized_svd"``)
    or a callable is passed to tensorly as is.
    """
    w = _as_matrix(weight)
    out_f, in_f, bonds = _resolve(tuple(w.shape), chi, cores, target_ratio, in_factors, out_factors)
    with tl.backend_context("pytorch"):
        tt = tensor_train_matrix(w.reshape(*out_f, *in_f), rank=[1, *bonds, 1], svd=gram_svd if svd == "gram" else svd)
    return MPO([f.to(weight.dtype).contiguous() for f in tt.factors])


class MPOSweep:
    """TT-SVD of one matrix at many ``chi`` for the price of one big SVD.

    Truncating a large-chi MPO is *not* the TT-SVD at a smaller chi (the second SVD acts on
    a matrix whose rows depend on how many first-cut vectors were kept). What can be reused
    exactly is the first cut's SVD: TT-SVD at any chi keeps its top ``r_1`` vectors. So this
    computes that SVD once; :meth:`at` then runs the remaining cuts with tensorly's
    ``tensor_train`` and returns the same MPO as ``decompose(weight, chi)`` (to rounding).
    It saves the largest SVD per chi (most of the time for 2-3 cores with a large first
    cut); the later cuts are still paid for each chi.
    """

    def __init__(self, weight: torch.Tensor, cores: int = 3, in_factors=None, out_factors=None, svd="gram"):
        w = _as_matrix(weight)
        self.dtype = weight.dtype
        self.out_f, self.in_f, _ = _resolve(tuple(w.shape), None, cores, None, in_factors, out_factors)
        self.dims = [o * i for o, i in zip(self.out_f, self.in_f)]
        n = len(self.dims)
        # The same interleaving (o_1,i_1,o_2,i_2,...) that tensor_train_matrix performs.
        t = w.reshape(*self.out_f, *self.in_f).permute(*[j for k in range(n) for j in (k, n + k)])
        with tl.backend_context("pytorch"):
            self.U, self.S, self.V = svd_interface(t.reshape(self.dims[0], -1), n_eigenvecs=max_bond_dims(self.dims)[0],
                                                   method=gram_svd if svd == "gram" else svd)
        self.svd = svd

    def at(self, chi: int | None = None, target_ratio: float | None = None) -> MPO:
        _, _, bonds = _resolve(self.shape, chi, len(self.dims), target_ratio, self.in_f, self.out_f)
        r1, o, i = bonds[0], self.out_f, self.in_f
        first = self.U[:, :r1].reshape(1, o[0], i[0], r1)
        rest = (self.S[:r1, None] * self.V[:r1]).reshape(r1 * self.dims[1], *self.dims[2:])
        if len(self.dims) == 2:
            factors = [rest.reshape(r1, self.dims[1], 1)]
        else:
            with tl.backend_context("pytorch"):
                factors = list(tensor_train(rest, rank=[1, *bonds[1:], 1], svd=gram_svd if self.svd == "gram" else self.svd).factors)
        r = [1, *bonds, 1]
        cores = [first] + [f.reshape(r[k + 1], o[k + 1], i[k + 1], r[k + 2]) for k, f in enumerate(factors)]
        return MPO([c.to(self.dtype).contiguous() for c in cores])

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.out_f), math.prod(self.in_f)


# ---------------------------------------------------------------- looking inside (the primer uses these)

def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (largest first) from the eigenvalues of the smaller Gram matrix, in
    float64: the eigen-decomposition of the small side is much cheaper than LAPACK's SVD of a
    wide matrix. Values below ~1e-8 * s_max are rounding noise."""
    m = matrix.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def cut_spectra(weight: torch.Tensor, cores: int = 3, in_factors=None, out_factors=None) -> list[torch.Tensor]:
    """Singular values at each cut of the reshaped matrix: cut ``k`` separates cores 1..k
    from the rest, i.e. the unfolding with rows ``(o_1 i_1)...(o_k i_k)``. TT-SVD at bond
    ``chi`` keeps the top ``chi`` at every cut (the later cuts of the *truncated* tensor,
    whose spectra are close to these)."""
    w = _as_matrix(weight)
    out_f, in_f, _ = _resolve(tuple(w.shape), None, cores, None, in_factors, out_factors)
    n, dims = len(out_f), [o * i for o, i in zip(out_f, in_f)]
    t = w.reshape(*out_f, *in_f).permute(*[j for k in range(n) for j in (k, n + k)]).reshape(dims)
    return [singular_values(t.reshape(math.prod(dims[:k]), -1)).float() for k in range(1, n)]


def error_bound(spectra: Sequence[torch.Tensor], bonds: Sequence[int]) -> float:
    """Oseledets' TT-SVD bound on the relative error: ``||W - MPO||^2 <= sum over cuts of the
    squared singular values dropped there``, divided by ``||W||^2``."""
    total = float(spectra[0].square().sum())
    return math.sqrt(sum(float(s[r:].square().sum()) for s, r in zip(spectra, bonds)) / total)


def kronecker_terms(mpo: MPO) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 2-core MPO as ``sum_r kron(A_r, B_r)``: ``A_r`` is ``o_1 x i_1``, ``B_r`` is ``o_2 x i_2``.
    So a 2-core MPO with bond chi is the rank-chi SVD of the rearranged matrix whose rows are
    ``(o_1, i_1)`` and columns ``(o_2, i_2)`` (Van Loan and Pitsianis' nearest Kronecker sum)."""
    if len(mpo.cores) != 2:
        raise MPOError(f"kronecker_terms needs a 2-core MPO; this one has {len(mpo.cores)} cores.")
    first, second = mpo.cores
    return [(first[0, :, :, r], second[r, :, :, 0]) for r in range(first.shape[-1])]


def low_rank_curve(weight: torch.Tensor) -> tuple[list[int], list[float]]:
    """Plain truncated SVD, the baseline the paper omits: parameters ``r*(out+in)`` and
    relative error at every rank ``r``."""
    s2 = singular_values(_as_matrix(weight)).square()
    tail = (s2.sum() - s2.cumsum(0)).clamp_min(0) / s2.sum()
    out, inp = weight.shape
    return [r * (out + inp) for r in range(1, len(s2) + 1)], tail.sqrt().tolist()


from .mpo_layer import MPOLinear, cores_to_matrix  # noqa: E402,F401  (the layer lives in its own module; re-exported here)
