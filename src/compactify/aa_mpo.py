"""The activation-aware MPO (``aa_mpo`` in :mod:`compactify.lowrank`): the paper's cores and bond
dimensions, fitted to minimise the error on real inputs instead of the plain weight error.

:class:`AAMPO` whitens the weight by Kronecker factors of the input second moment
(:func:`kron_factors`), starts from the TT-SVD of the whitened matrix, and refines the cores by
alternating least squares, a few conjugate-gradient steps per core (:func:`als_sweeps`).
"""
from __future__ import annotations

import math

import torch

from . import mpo as mpo_mod
from .lowrank import CompressError, Compressed, _check_stats, _check_weight, _mpo_at


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
