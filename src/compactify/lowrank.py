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
                 aware: bool | None = None):
        self.weight = _check_weight(weight)
        self.aware = C is not None if aware is None else aware
        self.method = "asvd" if self.aware else "svd"
        w = self.weight.double()
        out, inp = w.shape
        self.left = out <= inp
        if not self.aware:
            self.vecs = _eigh_desc(w @ w.T if self.left else w.T @ w)
            self.S = None
        else:
            c = _check_stats(C, self.weight, "asvd")
            if self.left:        # U_r = top eigenvectors of W C W^T; W' = U_r U_r^T W
                self.vecs, self.S = _eigh_desc(w @ c @ w.T), None
            else:                # V_r = top eigenvectors of (W S)^T (W S); W' = W S V_r V_r^T S^{-1}
                c = c + damping * c.diagonal().mean() * torch.eye(inp, dtype=c.dtype)
                self.S = torch.linalg.cholesky(c)
                ws = w @ self.S
                self.vecs = _eigh_desc(ws.T @ ws)

    def at(self, keep: float) -> Compressed:
        return self.rank(lowrank_rank(tuple(self.weight.shape), keep), keep)

    def rank(self, r: int, keep: float | None = None) -> Compressed:
        """The rank-``r`` truncation (``r = min(out, in)`` reproduces ``W``)."""
        if not 1 <= r <= min(self.weight.shape):
            raise CompressError(f"rank={r} must be between 1 and {min(self.weight.shape)} for a "
                                f"{tuple(self.weight.shape)} matrix.")
        w, v = self.weight.double(), self.vecs[:, :r]
        if self.left:
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
        return Compressed(self.method, keep, params, self.weight.numel(), A @ B, (A, B), {"rank": r})


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


def kron_factors(C: torch.Tensor, in_factors: tuple[int, ...]) -> list[torch.Tensor]:
    """The Kronecker-factored approximation ``C ~ C_1 (x) ... (x) C_n`` matched to the cores'
    input factors: ``C_k`` is the *partial trace* of ``C`` over every input factor but the k-th
    (the second moment of the k-th input "digit", as K-FAC approximates curvature). Each is
    symmetric positive semi-definite because ``C`` is."""
    n = len(in_factors)
    t = C.reshape(*in_factors, *in_factors)
    letters = "abcdefgh"
    out = []
    for k in range(n):
        left, right = letters[:n], list(letters[:n])
        right[k] = "z"
        out.append(torch.einsum(f"{left}{''.join(right)}->{left[k]}z", t))
    return out


def _modewise(t: torch.Tensor, mats: list[torch.Tensor], first_mode: int, solve: bool) -> torch.Tensor:
    """Apply ``mats[k]`` (``i_k x i_k``) along mode ``first_mode + k`` of ``t``: ``x -> M_k^T x``
    (a product with the Kronecker matrix from the right), or ``x -> L_k^{-1} x`` if ``solve``
    (lower-triangular ``L_k``). Costs ``sum_k numel * i_k`` instead of ``numel * prod_k i_k``."""
    for k, m in enumerate(mats):
        x = t.movedim(first_mode + k, -1)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x = torch.linalg.solve_triangular(m, x.T, upper=False).T if solve else x @ m
        t = x.reshape(shape).movedim(-1, first_mode + k)
    return t


class AAMPO:
    """Activation-aware MPO: exact MPO cores with the plain MPO's bond dimensions, fitted to
    minimise ``f(M) = ||X (W - M)^T||_F^2 = tr((W - M) C (W - M)^T)`` instead of ``||W - M||_F``.

    **Why not just whiten?** ASVD decomposes ``W S`` and multiplies by ``S^{-1}`` afterwards. For
    an MPO that last step destroys the structure: ``S^{-1}`` is a dense ``in x in`` matrix, and an
    MPO times a dense matrix is no longer an MPO with the same bonds.

    **Step 1, Kronecker-factored whitening (keeps the MPO).** An MPO's input index is split into
    digits ``i = (i_1, ..., i_n)``, one per core. If the whitening matrix is a Kronecker product
    ``L = L_1 (x) ... (x) L_n`` (``L_k`` of size ``i_k x i_k``), then multiplying an MPO by ``L^{-1}``
    only multiplies core ``k``'s input leg by ``L_k^{-1}``: still an MPO, same bond dimensions. So
    approximate ``C ~ C_1 (x) ... (x) C_n`` (:func:`kron_factors`), take ``L_k = chol(C_k)`` (with a
    relative ``damping`` on the diagonal), run TT-SVD on ``W' = W L`` and un-whiten each core. In
    this *whitened frame* the objective is exactly ``f = tr((W' - M') C' (W' - M')^T)`` with
    ``C' = L^{-1} C L^{-T}``, close to the identity where ``C`` is nearly a Kronecker product.

    **Step 2, alternating least squares by conjugate gradients (exact objective).** With all
    cores but one fixed, ``M`` is *linear* in the free core ``G_k``, so ``f`` is a convex quadratic in
    ``G_k``: the classic ALS sub-problem. Its normal equations are too large to form (a middle
    core has ``r * o_k * i_k * r`` unknowns and the full ``C'`` couples them all), so we take
    ``inner`` steps of linear conjugate gradients on it. As in DMRG, the other cores are first put
    in canonical form (QR "gauge" moves that leave ``M`` unchanged: cores left of ``k``
    left-orthonormal, right of ``k`` right-orthonormal), which makes the sub-problem's Hessian the
    identity when ``C' = I``, so that CG converges in a few steps when ``C'`` is near it. A
    ``sweep`` is one pass over the cores, alternately right to left and left to right. A CG step
    costs one product ``M_d C'`` (``M C'`` is kept up to date incrementally) plus contractions
    with the fixed cores' environments (:func:`_env`; the adjoint of "core -> dense matrix" is a
    contraction with the same environments). Every step is an exact line search on a convex quadratic,
    so ``f`` never increases: the result is at least as good as its start, the better (under ``f``)
    of the whitened and the plain TT-SVD, hence never worse than the plain MPO.
    """

    def __init__(self, weight: torch.Tensor, C: torch.Tensor | None = None, cores: int = 3, sweeps: int = 1,
                 inner: int = 3, damping: float = 1e-2):
        self.weight = _check_weight(weight)
        c = _check_stats(C, self.weight, f"aa_mpo{cores}")
        if int(sweeps) < 0 or int(inner) < 0:
            raise CompressError(f"sweeps={sweeps} and inner={inner} must be >= 0 (0 = whitened TT-SVD only).")
        self.cores, self.sweeps, self.inner = cores, int(sweeps), int(inner)
        self.method = f"aa_mpo{cores}"
        self.plain = mpo_mod.MPOSweep(self.weight, cores=cores)
        in_f, n = self.plain.in_f, cores
        self.L = [torch.linalg.cholesky(f + damping * f.diagonal().mean() * torch.eye(len(f), dtype=f.dtype))
                  for f in kron_factors(c, in_f)]
        out = self.weight.shape[0]
        # The whitened frame: W' = W L, C' = L^{-1} C L^{-T}, P' = W' C', applied factor by factor.
        self.Wp = _modewise(self.weight.double().reshape(out, *in_f), self.L, 1, False).reshape(out, -1).float()
        cp = _modewise(c.reshape(*in_f, *in_f), self.L + self.L, 0, True).reshape(c.shape)
        self.Cp = ((cp + cp.T) / 2).float()
        self.Pp = self.Wp @ self.Cp
        self.whitened = mpo_mod.MPOSweep(self.Wp, cores=n, in_factors=in_f, out_factors=self.plain.out_f)

    def objective(self, cores: list[torch.Tensor], MC: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """``f`` in the whitened frame (the true ``tr((W - M) C (W - M)^T)``) and ``M C'``."""
        M = mpo_mod.MPO(cores).to_matrix()
        MC = M @ self.Cp if MC is None else MC
        e = self.Wp - M
        return float((e * (self.Pp - MC)).sum(dtype=torch.float64)), MC

    def at(self, keep: float) -> Compressed:
        plain = _mpo_at(self.plain, keep, self.weight)
        white = _mpo_at(self.whitened, keep, self.weight).cores
        plain_w = [torch.einsum("aoib,ij->aojb", g, lk.float()) for g, lk in zip(plain.cores, self.L)]
        (f_plain, mc_plain), (f_white, mc_white) = self.objective(plain_w), self.objective(white)
        start, mc = (white, mc_white) if f_white <= f_plain else (plain_w, mc_plain)
        f_start = min(f_plain, f_white)
        cores, mc = als_sweeps(start, self.Cp, self.Pp, self.sweeps, self.inner, mc)
        f_end = self.objective(cores, mc)[0]
        if f_end > f_start:           # only float rounding can do this (CG never increases f): keep the start
            cores, f_end = start, f_start
        out = [torch.linalg.solve_triangular(lk.float(), g.movedim(2, 3), upper=False, left=False).movedim(3, 2)
               for g, lk in zip(cores, self.L)]  # G[a,o,i,b] = sum_j G'[a,o,j,b] (L_k^{-1})[j,i]
        m = mpo_mod.MPO([g.to(self.weight.dtype).contiguous() for g in out])
        norm = float((self.Pp * self.Wp).sum(dtype=torch.float64))
        return Compressed(self.method, keep, m.num_params, self.weight.numel(), m.to_matrix().to(self.weight.dtype), m,
                          {"cores": self.cores, "bond_dims": list(m.bond_dims),
                           "start": "whitened" if start is white else "plain", "sweeps": self.sweeps,
                           "inner": self.inner, "act_error_plain": math.sqrt(f_plain / norm),
                           "act_error_start": math.sqrt(f_start / norm),
                           "act_error": math.sqrt(max(f_end, 0.0) / norm)})


def _shift(cores: list[torch.Tensor], k: int, right: bool) -> None:
    """Move the orthogonality centre from core ``k`` to ``k+1`` (``right``) or ``k-1`` by a QR."""
    a, o, i, b = cores[k].shape
    if right:
        q, r = torch.linalg.qr(cores[k].reshape(a * o * i, b))
        cores[k] = q.reshape(a, o, i, -1)
        cores[k + 1] = torch.einsum("xb,boic->xoic", r, cores[k + 1])
    else:
        q, r = torch.linalg.qr(cores[k].reshape(a, o * i * b).T)
        cores[k] = q.T.reshape(-1, o, i, b)
        cores[k - 1] = torch.einsum("xoia,ya->xoiy", cores[k - 1], r)


def _env(cores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right environments of core ``k``: cores ``< k`` contracted to ``(O<, I<, r_{k-1})``
    and cores ``> k`` to ``(r_k, O>, I>)`` (``O<`` = product of the output factors left of ``k``...)."""
    left = cores[0].new_ones(1, 1, 1)
    for g in cores[:k]:
        p, q, _ = left.shape
        left = torch.einsum("pqa,aoib->poqib", left, g).reshape(p * g.shape[1], q * g.shape[2], g.shape[3])
    right = cores[0].new_ones(1, 1, 1)
    for g in reversed(cores[k + 1:]):
        _, s, t = right.shape
        right = torch.einsum("aoib,bst->aosit", g, right).reshape(g.shape[0], g.shape[1] * s, g.shape[2] * t)
    return left, right


def _cg_core(cores: list[torch.Tensor], k: int, C: torch.Tensor, P: torch.Tensor, MC: torch.Tensor,
             inner: int) -> torch.Tensor:
    """``inner`` linear-CG steps on core ``k`` (others fixed); updates ``cores[k]``, returns new ``M C``."""
    left, right = _env(cores, k)
    (p, q, _), (_, s, t) = left.shape, right.shape
    _, o, i, _ = cores[k].shape

    def dense(d):                     # the matrix M would be with core k = d (linear in d)
        x = torch.einsum("pqa,aoib->pqoib", left, d)
        y = (x.reshape(-1, d.shape[3]) @ right.reshape(d.shape[3], -1)).reshape(p, q, o, i, s, t)
        return y.permute(0, 2, 4, 1, 3, 5).reshape(p * o * s, q * i * t)

    def adjoint(G):                   # the transpose of `dense`: an out x in matrix -> core shape
        z = torch.einsum("posqit,bst->poqib", G.reshape(p, o, s, q, i, t), right)
        return torch.einsum("pqa,poqib->aoib", left, z)

    r = adjoint(P - MC)               # minus half the gradient of f w.r.t. core k
    d, rr = r.clone(), float((r * r).sum())
    for it in range(inner):
        Md = dense(d)
        MdC = Md @ C
        dAd = float((Md * MdC).sum())  # curvature along d (>= 0 since C is PSD)
        if dAd <= 0 or rr == 0:
            break
        alpha = rr / dAd               # exact minimiser along d
        cores[k] = cores[k] + alpha * d
        MC = MC + alpha * MdC          # M is linear in core k: no new product needed
        if it == inner - 1:
            break
        r = r - alpha * adjoint(MdC)
        rr_new = float((r * r).sum())
        d, rr = r + (rr_new / rr) * d, rr_new
    return MC


def als_sweeps(cores: list[torch.Tensor], C: torch.Tensor, P: torch.Tensor, sweeps: int, inner: int,
               MC: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Minimise ``tr((W - M) C (W - M)^T)`` (``P = W C``) over the cores of ``M`` by ``sweeps``
    passes of one-core CG in canonical gauge (see :class:`AAMPO`): the first pass visits the
    cores right to left, the next left to right, and so on (a pass does not revisit the core
    it turned on). ``MC`` is ``M C`` if already known. Returns the cores and the final ``M C``."""
    cores = [g.clone() for g in cores]
    n = len(cores)
    if MC is None:
        MC = mpo_mod.MPO(cores).to_matrix() @ C
    if sweeps <= 0 or inner <= 0:
        return cores, MC
    for k in range(n - 1):            # left-canonical (QR moves leave M unchanged): the centre is the last core
        _shift(cores, k, right=True)
    k, step = n - 1, -1
    MC = _cg_core(cores, k, C, P, MC, inner)
    for _ in range(sweeps):
        for _ in range(n - 1):
            _shift(cores, k, right=step > 0)
            k += step
            MC = _cg_core(cores, k, C, P, MC, inner)
        step = -step
    return cores, MC


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
    return AAMPO(weight, C, cores=cores, sweeps=sweeps, inner=inner, damping=damping)


def compress(method: str, weight: torch.Tensor, keep: float, C: torch.Tensor | None = None, **opts) -> Compressed:
    """One matrix, one method, one budget: ``compress("aa_mpo3", W, 0.5, C)``."""
    return compressor(method, weight, C, **opts).at(keep)
