"""Four ways to shrink one weight matrix to a parameter budget, with one interface.

A linear layer computes ``y = W x`` with ``W`` of shape ``out x in``. Each compressor below
returns an approximation ``W'`` that keeps at most ``keep * out * in`` parameters:

``svd``      truncated SVD, ``W' = A B`` with ``A: out x r``, ``B: r x in``: the best rank-r
             approximation in the plain weight error ``||W - W'||_F`` (Eckart-Young).
``asvd``     activation-aware SVD, SVD-LLM's "truncation-aware data whitening" (Wang et al.
             2024, Sec. 3.1, without its later LoRA-style parameter update): minimise the error
             on real inputs, ``||X (W - W')^T||_F`` where the rows of ``X`` are calibration
             inputs of the layer. With ``C = X^T X = S S^T`` (Cholesky) this is
             ``||(W - W') S||_F``, so SVD ``W S = U Sigma V^T``, keep the top ``r`` and undo the
             whitening: ``W' = U_r Sigma_r V_r^T S^{-1}``, the exact optimum among rank-r
             matrices. We compute it through the smaller Gram matrix: when ``out <= in``,
             ``W' = U_r U_r^T W`` with ``U_r`` the top eigenvectors of ``W C W^T`` (the left
             singular vectors of ``W S``; no inverse, so a singular ``C`` is fine); when
             ``out > in``, ``V_r`` from the eigenvectors of ``S^T W^T W S`` (``C`` gets a tiny
             relative ``damping`` on its diagonal so that ``S`` is invertible).
``mpo``      the paper's MPO by TT-SVD (:mod:`compactify.mpo`), 2, 3 or 4 cores, the largest
             bond dimension ``chi`` that fits the budget.
``aa_mpo``   activation-aware MPO: the same cores and bond dimensions, fitted to minimise the
             same activation error as ``asvd``. See :class:`AAMPO` for the maths.

The plain methods ignore calibration data; the ``a*`` ones need the layer's input second
moment ``C`` (``in x in``), which :func:`compactify.frontier.input_stats` collects for a whole
model in one pass. ``Compressor(weight, C).at(keep)`` does the expensive part (an SVD, a
TT-SVD) once per matrix and truncates cheaply for each budget; :func:`compress` is the one-shot
form.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from . import mpo as mpo_mod


class CompressError(ValueError):
    """A budget, method or input that cannot be compressed as asked; the message says the fix."""


@dataclass
class Compressed:
    """One compressed matrix: its dense reconstruction (for measuring), its factors, its size."""
    method: str
    keep: float                 # the budget asked for (fraction of parameters)
    params: int                 # parameters actually kept (<= keep * dense_params)
    dense_params: int
    weight: torch.Tensor        # W' contracted back to out x in, in the input's dtype
    factors: object             # (A, B) with W' = A @ B, or an mpo.MPO
    info: dict = field(default_factory=dict)   # rank, or cores and bond dims

    @property
    def ratio(self) -> float:
        return self.params / self.dense_params


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CompressError(f"Expected a 2-D weight (out x in); got {getattr(weight, 'shape', type(weight))}.")
    if not torch.isfinite(weight).all():
        raise CompressError(f"The weight {tuple(weight.shape)} has NaN/Inf entries; check the checkpoint.")
    return weight.detach()


def _check_stats(C: torch.Tensor | None, weight: torch.Tensor, method: str) -> torch.Tensor:
    if C is None:
        raise CompressError(f"'{method}' is activation-aware and needs the layer's input second moment C = X^T X "
                            f"({weight.shape[1]} x {weight.shape[1]}); collect it with "
                            "compactify.frontier.input_stats(model, calibration_ids) and pass stats=C.")
    if C.shape != (weight.shape[1], weight.shape[1]):
        raise CompressError(f"Calibration stats of shape {tuple(C.shape)} do not match the weight's input size "
                            f"{weight.shape[1]}: pass the second moment of THIS layer's inputs.")
    if not torch.isfinite(C).all():
        raise CompressError("The calibration stats contain NaN/Inf (overflow in the calibration forward?).")
    return C.double()


def lowrank_rank(shape: tuple[int, int], keep: float) -> int:
    """The largest rank ``r`` with ``r * (out + in) <= keep * out * in``."""
    out, inp = shape
    if not 0 < keep <= 1:
        raise CompressError(f"keep={keep} must be in (0, 1]: the fraction of the matrix's parameters kept.")
    r = min(int(keep * out * inp // (out + inp)), min(out, inp))
    if r < 1:
        raise CompressError(f"keep={keep} is unreachable for a {out}x{inp} matrix with a low-rank factorisation: "
                            f"rank 1 already keeps {(out + inp) / (out * inp):.3g} of its parameters.")
    return r


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W'||_F / ||W||_F``: what plain truncation minimises."""
    return float(torch.linalg.norm(weight.float() - approx.float()) / torch.linalg.norm(weight.float()))


def activation_error(weight: torch.Tensor, approx: torch.Tensor, C: torch.Tensor) -> float:
    """``||X (W - W')^T||_F / ||X W^T||_F`` from ``C = X^T X``: the relative error of the layer's
    *outputs* on the calibration inputs, what the activation-aware methods minimise."""
    e, w, c = (weight - approx).float(), weight.float(), C.float()   # fp32: ample for a relative error
    return math.sqrt(max(float(((e @ c) * e).sum(dtype=torch.float64)), 0.0) / float(((w @ c) * w).sum(dtype=torch.float64)))


def _eigh_desc(G: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric matrix, largest eigenvalue first (fp64)."""
    _, vecs = torch.linalg.eigh(G)
    return vecs.flip(-1)


class LowRank:
    """Truncated SVD (``C=None``) or SVD-LLM activation-aware SVD (``C`` given) of one matrix.

    The eigendecomposition is done once; :meth:`at` truncates it for any budget. Both use the
    Gram matrix of the smaller side (same result as an SVD, faster for these shapes).
    """

    def __init__(self, weight: torch.Tensor, C: torch.Tensor | None = None, damping: float = 1e-6,
                 aware: bool | None = None, cross: torch.Tensor | None = None):
        self.weight = _check_weight(weight)
        self.aware = C is not None if aware is None else aware
        self.method = "asvd" if self.aware else "svd"
        w = self.weight.double()
        out, inp = w.shape
        self.left = out <= inp
        self.target = None
        if cross is not None:    # sequential calibration (compactify.aa_seq): fit the dense outputs on other inputs
            if not self.aware:
                raise CompressError("cross= (a sequential calibration's K = X'^T X) needs the activation-aware SVD: pass C.")
            c, k = _check_stats(C, self.weight, "asvd"), _check_stats(cross, self.weight, "asvd")
            self.S, self.left = self._cholesky(c, damping), False
            # M0 S = W K^T S^{-T}: the least-squares map on the compressed inputs, whitened by them
            self.target = w @ torch.linalg.solve_triangular(self.S, k, upper=False).T
            self.vecs = _eigh_desc(self.target.T @ self.target)
        elif not self.aware:
            self.vecs = _eigh_desc(w @ w.T if self.left else w.T @ w)
            self.S = None
        else:
            c = _check_stats(C, self.weight, "asvd")
            if self.left:        # U_r = top eigenvectors of W C W^T; W' = U_r U_r^T W
                self.vecs, self.S = _eigh_desc(w @ c @ w.T), None
            else:                # V_r = top eigenvectors of (W S)^T (W S); W' = W S V_r V_r^T S^{-1}
                self.S = self._cholesky(c, damping)
                ws = w @ self.S
                self.vecs = _eigh_desc(ws.T @ ws)

    def _cholesky(self, c: torch.Tensor, damping: float) -> torch.Tensor:
        """Cholesky factor of ``C`` plus ``damping`` x its mean diagonal. With fewer calibration tokens
        than inputs ``C`` is singular, and the fp32 rounding of its sums can leave eigenvalues below
        a small damping: then the damping is raised a hundredfold at a time (as SVD-LLM's code adds
        to the diagonal when its Cholesky fails) and the value used is kept in ``self.damping``."""
        eye, scale = torch.eye(c.shape[0], dtype=c.dtype), c.diagonal().mean()
        for d in (damping, damping * 1e2, damping * 1e4, damping * 1e6):
            S, info = torch.linalg.cholesky_ex(c + d * scale * eye)
            if int(info) == 0:
                self.damping = d
                return S
        raise CompressError(f"The calibration second moment of a {tuple(self.weight.shape)} matrix is not positive "
                            f"definite even with damping {d:g} x its mean diagonal: is it all zeros or not finite? "
                            "Collect it over more calibration text (frontier.calib_tokens).")

    def at(self, keep: float) -> Compressed:
        return self.rank(lowrank_rank(tuple(self.weight.shape), keep), keep)

    def rank(self, r: int, keep: float | None = None) -> Compressed:
        """The rank-``r`` truncation (``r = min(out, in)`` reproduces ``W``)."""
        if not 1 <= r <= min(self.weight.shape):
            raise CompressError(f"rank={r} must be between 1 and {min(self.weight.shape)} for a "
                                f"{tuple(self.weight.shape)} matrix.")
        w, v = self.weight.double(), self.vecs[:, :r]
        if self.target is not None:   # [M0 S]_r S^{-1}: A = (M0 S) V_r, B = V_r^T S^{-1}
            A = self.target @ v
            B = torch.linalg.solve_triangular(self.S.T, v, upper=True).T
        elif self.left:
            A, B = v, v.T @ w
        elif self.S is None:
            A, B = w @ v, v.T
        else:
            A = w @ self.S @ v
            B = torch.linalg.solve_triangular(self.S.T, v, upper=True).T  # (S^{-T} V_r)^T = V_r^T S^{-1}
        dt = self.weight.dtype
        A, B = A.to(dt).contiguous(), B.to(dt).contiguous()
        params = A.numel() + B.numel()
        keep = params / self.weight.numel() if keep is None else keep
        info = {"rank": r, **({"damping": self.damping} if self.S is not None else {})}
        return Compressed(self.method, keep, params, self.weight.numel(), A @ B, (A, B), info)


class PlainMPO:
    """The paper's MPO (TT-SVD) with ``cores`` cores at the largest ``chi`` within the budget."""

    def __init__(self, weight: torch.Tensor, cores: int = 3, C: torch.Tensor | None = None):
        self.weight = _check_weight(weight)
        self.cores, self.method = cores, f"mpo{cores}"
        self.sweep = mpo_mod.MPOSweep(self.weight, cores=cores)

    def at(self, keep: float) -> Compressed:
        m = _mpo_at(self.sweep, keep, self.weight)
        return Compressed(self.method, keep, m.num_params, self.weight.numel(), m.to_matrix().to(self.weight.dtype), m,
                          {"cores": self.cores, "bond_dims": list(m.bond_dims)})


def _mpo_at(sweep: mpo_mod.MPOSweep, keep: float, weight: torch.Tensor) -> mpo_mod.MPO:
    try:
        return sweep.at(target_ratio=keep)
    except mpo_mod.MPOError as e:
        raise CompressError(f"keep={keep} is unreachable for a {tuple(weight.shape)} MPO: {e}") from None


METHOD = re.compile(r"^(svd|asvd|mpo([234])|aa_mpo([234]))$")
AWARE = ("asvd", "aa_mpo")


def parse_method(method: str) -> tuple[str, int | None]:
    """``"mpo3"`` -> ("mpo", 3), ``"asvd"`` -> ("asvd", None); an unknown name is an error."""
    m = METHOD.match(str(method))
    if not m:
        raise CompressError(f"Unknown method '{method}'. Use svd, asvd, mpo2/mpo3/mpo4 or aa_mpo2/aa_mpo3/aa_mpo4.")
    cores = m.group(2) or m.group(3)
    return re.sub(r"\d$", "", m.group(1)), int(cores) if cores else None


def needs_stats(method: str) -> bool:
    return parse_method(method)[0] in AWARE


def compressor(method: str, weight: torch.Tensor, C: torch.Tensor | None = None, *, sweeps: int = 1, inner: int = 3,
               damping: float = 1e-2):
    """The compressor object for ``method`` (``.at(keep)`` gives a :class:`Compressed`)."""
    kind, cores = parse_method(method)
    if kind in AWARE:
        _check_stats(C, _check_weight(weight), method)
    if kind == "svd":
        return LowRank(weight, aware=False)
    if kind == "asvd":
        return LowRank(weight, C, aware=True)
    if kind == "mpo":
        return PlainMPO(weight, cores)
    from .aa_mpo import AAMPO

    return AAMPO(weight, C, cores=cores, sweeps=sweeps, inner=inner, damping=damping)


def compress(method: str, weight: torch.Tensor, keep: float, C: torch.Tensor | None = None, **opts) -> Compressed:
    """One matrix, one method, one budget: ``compress("aa_mpo3", W, 0.5, C)``."""
    return compressor(method, weight, C, **opts).at(keep)


_AA_MPO = ("AAMPO", "als_sweeps", "kron_factors")


def __getattr__(name: str):
    """The activation-aware MPO (:class:`AAMPO`, its ALS sweeps) lives in compactify.aa_mpo."""
    if name in _AA_MPO:
        from . import aa_mpo

        return getattr(aa_mpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
