"""Per-matrix compressors (compactify.lowrank) and the whole-model frontier helpers (compactify.frontier)."""
from __future__ import annotations

import math

import pytest
import torch

from compactify import frontier as F
from compactify import lowrank as LR
from compactify.mpo import MPO, decompose

from conftest import tiny_llama

METHODS = ["svd", "asvd", "mpo2", "mpo3", "mpo4", "aa_mpo2", "aa_mpo3", "aa_mpo4"]


def anisotropic_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Calibration-like inputs: correlated, a few channels with huge variance (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[:3]] = 20.0
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scale


def problem(out: int, inp: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(out, inp, generator=g) / math.sqrt(inp)
    X = anisotropic_inputs(4 * inp, inp, seed)
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(48, 64), (96, 32)])
def test_every_method_meets_its_budget(method, shape):
    W, C = problem(*shape)
    comp = LR.compressor(method, W, C)
    for keep in (0.3, 0.5, 0.7):
        c = comp.at(keep)
        assert c.params <= keep * W.numel(), (method, keep, c.params)
        assert c.params >= 0.5 * keep * W.numel()   # and uses a fair share of it
        assert c.weight.shape == W.shape and c.weight.dtype == W.dtype
        assert c.method == method and c.dense_params == W.numel()
        if isinstance(c.factors, tuple):
            A, B = c.factors
            assert A.numel() + B.numel() == c.params
            torch.testing.assert_close(A @ B, c.weight)
        else:
            assert c.factors.num_params == c.params
            torch.testing.assert_close(c.factors.to_matrix(), c.weight, rtol=1e-4, atol=1e-5)


def test_svd_full_rank_is_exact_and_truncation_is_eckart_young():
    W, _ = problem(40, 24)
    full = LR.LowRank(W).rank(24)   # full rank (more parameters than W itself: no budget reaches it)
    torch.testing.assert_close(full.weight, W, rtol=1e-5, atol=1e-5)
    assert LR.compress("svd", W, 1.0).info["rank"] == 15   # 15 * (40 + 24) <= 960 < 16 * 64
    c = LR.compress("svd", W, 0.3)
    s = torch.linalg.svdvals(W.double())
    r = c.info["rank"]
    best = math.sqrt(float((s[r:] ** 2).sum() / (s ** 2).sum()))
    assert abs(LR.relative_error(W, c.weight) - best) < 1e-6


@pytest.mark.parametrize("shape", [(32, 64), (96, 32)])  # out <= in (left form) and out > in (Cholesky form)
def test_asvd_is_svd_llm_and_beats_svd_on_activations(shape):
    W, C = problem(*shape)
    for keep in (0.3, 0.6):
        a, s = LR.compress("asvd", W, keep, C), LR.compress("svd", W, keep)
        assert a.info["rank"] == s.info["rank"]
        assert LR.activation_error(W, a.weight, C) <= LR.activation_error(W, s.weight, C) - 0.02
        assert LR.relative_error(W, a.weight) >= LR.relative_error(W, s.weight)   # it trades weight error away
        # SVD-LLM written out: Cholesky S of C, SVD of W S, truncate, multiply by S^{-1}.
        S = torch.linalg.cholesky(C.double())
        U, sig, Vh = torch.linalg.svd(W.double() @ S)
        r = a.info["rank"]
        ref = (U[:, :r] * sig[:r]) @ Vh[:r] @ torch.linalg.inv(S)
        torch.testing.assert_close(a.weight.double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cores", [2, 3, 4])
def test_aa_mpo_is_a_valid_mpo_with_the_plain_bond_dims_and_lower_activation_error(cores):
    W, C = problem(48, 64, seed=cores)
    for keep in (0.3, 0.6):
        plain = decompose(W, cores=cores, target_ratio=keep)
        c = LR.compress(f"aa_mpo{cores}", W, keep, C, sweeps=1, inner=2)
        m = c.factors
        assert isinstance(m, MPO) and len(m.cores) == cores
        assert m.bond_dims == plain.bond_dims and c.info["bond_dims"] == list(plain.bond_dims)
        assert m.out_factors == plain.out_factors and m.in_factors == plain.in_factors
        for k, g in enumerate(m.cores):   # a chain: each core's right bond is the next core's left bond
            assert g.ndim == 4 and (k == 0 or g.shape[0] == m.cores[k - 1].shape[3])
        assert m.cores[0].shape[0] == 1 and m.cores[-1].shape[3] == 1
        assert m.num_params == plain.num_params == c.params
        err_aa = LR.activation_error(W, c.weight, C)
        err_plain = LR.activation_error(W, plain.to_matrix(), C)
        assert err_aa < err_plain - 0.01, (err_aa, err_plain)
        assert abs(err_aa - c.info["act_error"]) < 1e-3
        assert c.info["act_error"] <= c.info["act_error_start"] + 1e-6 <= c.info["act_error_plain"] + 2e-6


def test_aa_mpo_more_sweeps_never_hurt():
    W, C = problem(48, 64, seed=7)
    errs = [LR.compress("aa_mpo3", W, 0.4, C, sweeps=s, inner=2).info["act_error"] for s in (0, 1, 3)]
    assert errs[0] >= errs[1] - 1e-6 >= errs[2] - 2e-6 and errs[2] < errs[0]


def test_kronecker_whitening_is_exact_for_kronecker_stats():
    """If C = A (x) B exactly, the whitened frame's C' is the identity (up to scale): whitened
    TT-SVD is then the activation-optimal MPO as far as TT-SVD is optimal."""
    A = anisotropic_inputs(64, 8, 1).T @ anisotropic_inputs(64, 8, 1) / 64
    B = anisotropic_inputs(64, 8, 2).T @ anisotropic_inputs(64, 8, 2) / 64
    C = torch.kron(A, B)
    fa, fb = LR.kron_factors(C.double(), (8, 8))
    torch.testing.assert_close(fa / fa.trace(), A.double() / A.trace(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fb / fb.trace(), B.double() / B.trace(), rtol=1e-4, atol=1e-6)
    W = torch.randn(64, 64)
    aa = LR.AAMPO(W, C, cores=2, sweeps=0, damping=0.0)
    Cp = aa.Cp.double()
    torch.testing.assert_close(Cp / Cp.diagonal().mean(), torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-3)


def test_bad_input_gives_clear_errors():
    W, C = problem(48, 64)
    with pytest.raises(LR.CompressError, match="unreachable"):
        LR.compress("svd", W, 0.01)          # rank 1 keeps 112/3072 = 3.6%
    with pytest.raises(LR.CompressError, match="unreachable"):
        LR.compress("mpo2", W, 0.005)
    with pytest.raises(LR.CompressError, match=r"\(0, 1\]"):
        LR.compress("svd", W, 1.5)
    for method in ("asvd", "aa_mpo3"):
        with pytest.raises(LR.CompressError, match="input_stats"):
            LR.compress(method, W, 0.5)
    with pytest.raises(LR.CompressError, match="do not match"):
        LR.compress("asvd", W, 0.5, C[:10, :10])
    with pytest.raises(LR.CompressError, match="Unknown method"):
        LR.compress("tucker", W, 0.5)
    with pytest.raises(LR.CompressError, match="NaN"):
        LR.compress("svd", torch.full((4, 4), float("nan")), 0.5)
    with pytest.raises(LR.CompressError, match="sweeps"):
        LR.compress("aa_mpo2", W, 0.5, C, sweeps=-1)


# ------------------------------------------------------------------ whole model (tiny random Llama)

@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(vocab_size=256)
    ids = torch.randint(0, 256, (512,))
    return model, ids


def test_input_stats_are_the_layer_input_second_moments(tiny):
    model, ids = tiny
    stats = F.input_stats(model, ids, seq_len=64, batch_size=4, progress=False)
    assert set(stats) == {(b, t) for b in range(2) for t in F.MATRIX_TYPES}
    assert stats[(0, "q")] is stats[(0, "k")] is stats[(0, "v")] and stats[(1, "gate")] is stats[(1, "up")]
    assert stats[(0, "down")].shape == (96, 96) and stats[(0, "o")].shape == (64, 64)
    with torch.no_grad():  # block 0's attention input is input_layernorm(embedding), computed independently
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids.view(8, 64))).reshape(-1, 64)
    torch.testing.assert_close(stats[(0, "q")], x.T @ x / 512, rtol=1e-4, atol=1e-6)
    with pytest.raises(F.FrontierError, match="fewer than one window"):
        F.input_stats(model, ids[:10], seq_len=64)


def test_compress_model_swap_and_restore(tiny):
    model, ids = tiny
    stats = F.input_stats(model, ids, seq_len=64, progress=False)
    x = ids[:64].view(1, 64)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    weights, records = F.compress_model(model, "aa_mpo2", [0.5, 1.0], stats, options={"sweeps": 1, "inner": 1},
                                        quantize=True, progress=False)
    assert len(records) == 2 * 14 and {r["keep"] for r in records} == {0.5, 1.0}
    half = [r for r in records if r["keep"] == 0.5]
    assert all(r["params"] <= 0.5 * r["dense_params"] and r["bytes_nf4"] <= 0.3 * r["bytes_fp16"] + 100 for r in half)
    assert all(r["act_error"] < 1.0 for r in half)
    summary = F.summarize(half)
    assert 0.4 < summary["ratio"] <= 0.5 and summary["bytes_nf4"] < summary["bytes_fp16"]
    with F.swapped(model, weights[0.5]):
        with torch.no_grad():
            compressed = model(input_ids=x).logits
    with torch.no_grad():
        restored = model(input_ids=x).logits
    assert not torch.allclose(compressed, dense, atol=1e-3)
    torch.testing.assert_close(restored, dense)
    with F.swapped(model, weights[1.0]):   # twice the parameters: closer to the dense model
        with torch.no_grad():
            assert (model(input_ids=x).logits - dense).norm() < 0.5 * (compressed - dense).norm()
    with pytest.raises(F.FrontierError, match="activation-aware"):
        F.compress_model(model, "asvd", [0.5], None)
    with pytest.raises(F.FrontierError, match="Unknown matrix types"):
        F.compress_model(model, "svd", [0.5], types=["qkv"])


def test_nf4_bytes_and_error():
    t = torch.randn(96, 64)
    back, nbytes = F.nf4(t)
    assert back.shape == t.shape
    assert 0.5 * t.numel() <= nbytes <= 0.5 * t.numel() * 1.1   # 4 bits + small double-quantized scales
    assert LR.relative_error(t, back) < 0.15


def test_parallel_workers_give_the_same_result(tiny):
    model, ids = tiny
    stats = F.input_stats(model, ids, seq_len=64, progress=False)
    w1, r1 = F.compress_model(model, "asvd", [0.4], stats, block_ids=[1], workers=1, progress=False)
    w2, r2 = F.compress_model(model, "asvd", [0.4], stats, block_ids=[1], workers=2, progress=False)
    assert [(r["block"], r["type"], r["params"]) for r in r1] == [(r["block"], r["type"], r["params"]) for r in r2]
    assert set(w1[0.4]) == {(1, t) for t in F.MATRIX_TYPES}
    for k in w1[0.4]:
        torch.testing.assert_close(w1[0.4][k], w2[0.4][k])
    with pytest.raises(F.FrontierError, match="do not exist"):
        F.compress_model(model, "svd", [0.4], block_ids=[5])


def test_speed_quality_points_take_each_methods_speed_from_its_formats_roofline_timing():
    from compactify import figures_frontier as FP

    def timed(rate, ratio):
        return {"by_threads": {"2": {"decode": {"median": rate}, "decode_ratio_to_fp32": ratio}}}

    roofline = {"formats": {"fp32": timed(20.0, 1.0), "nf4": timed(8.0, 0.4), "svd-50": timed(30.0, 1.5),
                            "mpo3-50": timed(6.0, 0.3)}}
    pts = [{"method": "dense", "keep": 1.0, "precision": "fp32", "ppl": 40.0, "bytes_ratio": 1.0},
           {"method": "dense", "keep": 1.0, "precision": "nf4", "ppl": 50.0, "bytes_ratio": 0.13},
           {"method": "asvd", "keep": 0.5, "precision": "fp16", "ppl": 900.0, "bytes_ratio": 0.25},
           {"method": "asvd", "keep": 0.5, "precision": "nf4", "ppl": 1600.0, "bytes_ratio": 0.06},  # no NF4 timing
           {"method": "aa_mpo3", "keep": 0.5, "precision": "fp16", "ppl": 8000.0, "bytes_ratio": 0.25},
           {"method": "mpo3", "keep": 0.3, "precision": "fp16", "ppl": 1e8, "bytes_ratio": 0.15}]  # 30% not timed
    got = {(p["method"], p["precision"]): (p["format"], p["decode_ratio"]) for p in FP.speed_quality_points(pts, roofline)}
    assert got == {("dense", "fp32"): ("fp32", 1.0), ("dense", "nf4"): ("nf4", 0.4), ("asvd", "fp16"): ("svd-50", 1.5),
                   ("aa_mpo3", "fp16"): ("mpo3-50", 0.3)}
    fig = FP.speed_quality(pts, {"ppl": 40.0, "tokens": 1020}, roofline)
    assert len(fig.axes) == 2


def test_point_labels_of_two_nearby_markers_do_not_cover_each_other_or_the_markers():
    """Two budgets of one format a few pixels apart (the speed-quality figure's activation-aware MPO
    at 50% and 30% kept): each label lands beside its own marker, not over the other's marker or label."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from compactify import figures_frontier as FP

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_yscale("log")
    xy = [(0.25, 8e3), (0.30, 1.5e4), (1.2, 1e3)]
    ax.plot(*zip(*xy), marker="D", ms=5)
    ax.set_xlim(0.2, 1.6)
    ax.set_ylim(10, 1e10)
    FP._label_points(ax, [(x, y, t, "k") for (x, y), t in zip(xy, ("50%", "30%", "70%"))], xy)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in ax.texts]
    assert [a.get_text() for a in ax.texts] == ["50%", "30%", "70%"]
    assert not any(Bbox.intersection(p, q) for i, p in enumerate(boxes) for q in boxes[i + 1:])
    pix = [ax.transData.transform(p) for p in xy]
    for i, box in enumerate(boxes):  # no label covers another point's marker
        assert not any(box.contains(*pix[j]) for j in range(len(xy)) if j != i)
    plt.close(fig)


def test_asvd_raises_its_damping_only_when_the_cholesky_fails():
    """A second moment with fewer calibration tokens than inputs is singular; fp32 sums can push an
    eigenvalue below zero. The activation-aware SVD then raises its damping (recorded) instead of
    failing; a well-conditioned C keeps the damping asked for; an all-zero C is a clear error."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 32, generator=g)                 # out > in: the Cholesky (right) branch
    X = torch.randn(200, 32, generator=g)
    ok = LR.LowRank(W, X.T @ X / 200).rank(8)
    assert ok.info["damping"] == 1e-6
    bad = torch.eye(32, dtype=torch.float64)
    bad[-1, -1] = -1e-3                                  # below what 1e-6 and 1e-4 x the mean diagonal lift
    c = LR.LowRank(W, bad).rank(8)
    assert c.info["damping"] == pytest.approx(1e-2) and torch.isfinite(c.weight).all()
    with pytest.raises(LR.CompressError, match="not positive definite.*calib_tokens"):
        LR.LowRank(W, torch.zeros(32, 32))
