"""compactify.mpo / compactify.mpo_layer: factorisation, TT-SVD, the MPO layer and its cost model."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from compactify.config import REPO_ROOT
from compactify.mpo import (MPO, MPOError, MPOLinear, MPOSweep, bond_dims, chi_for_ratio,
                            count_params, decompose, factorize)


def rand(o, i, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o, i, generator=g, dtype=dtype)


@pytest.mark.parametrize("n,k,expected", [(11008, 3, (16, 16, 43)), (576, 3, (8, 8, 9)), (192, 3, (4, 6, 8)),
                                          (1536, 3, (8, 12, 16)), (4096, 3, (16, 16, 16)), (4096, 2, (64, 64)),
                                          (11008, 2, (86, 128)), (216, 3, (6, 6, 6)), (344, 3, (2, 4, 43))])
def test_factorize_balanced(n, k, expected):
    assert factorize(n, k) == expected
    assert math.prod(expected) == n


def test_factorize_prime_is_a_clear_error():
    with pytest.raises(MPOError, match="fewer than 3 prime factors.*fewer cores.*explicitly"):
        factorize(4099, 3)
    with pytest.raises(MPOError):
        decompose(rand(13, 12), cores=2)
    # explicit factors (1s allowed) are the documented way out
    m = decompose(rand(13, 12), cores=2, out_factors=(13, 1), in_factors=(3, 4))
    assert m.out_factors == (13, 1) and m.relative_error(rand(13, 12)) < 1e-5


@pytest.mark.parametrize("shape,cores", [((48, 60), 2), ((48, 60), 3), ((64, 81), 4), ((192, 576), 3)])
def test_exact_at_full_bond(shape, cores):
    w = rand(*shape)
    m = decompose(w, cores=cores)
    assert m.relative_error(w) < 5e-6  # float32 rounding
    w64 = rand(*shape, dtype=torch.float64)
    assert decompose(w64, cores=cores).relative_error(w64) < 1e-12


def test_error_falls_as_chi_rises():
    w = rand(64, 96)
    errors = [decompose(w, chi=chi).relative_error(w) for chi in (1, 2, 4, 8, 16, 24)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-5


def test_num_params_closed_form():
    # The paper's worked example: 216x216, factors 6*6*6, 2*36*chi + 36*chi^2 parameters.
    w = rand(216, 216)
    for chi in (1, 5, 20, 36):
        m = decompose(w, chi=chi)
        assert m.num_params == sum(c.numel() for c in m.cores) == 2 * 36 * chi + 36 * chi ** 2
        assert m.bond_dims == (chi, chi)
        assert count_params([36, 36, 36], bond_dims([36, 36, 36], chi)) == m.num_params


def test_target_ratio_picks_the_largest_chi_that_fits():
    w = rand(576, 576)
    dims = [64, 64, 81]
    m = decompose(w, target_ratio=0.3)
    chi = max(m.bond_dims)
    assert m.num_params <= 0.3 * w.numel() < count_params(dims, bond_dims(dims, chi + 1))
    assert chi == chi_for_ratio(dims, 0.3) == 38


def test_sweep_equals_fresh_decomposition():
    w = rand(96, 120)
    sweep = MPOSweep(w, cores=3)
    for chi in (2, 7, 30):
        a, b = sweep.at(chi), decompose(w, chi=chi)
        assert a.bond_dims == b.bond_dims
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.cores, b.cores))
    assert sweep.at(target_ratio=0.2).num_params == decompose(w, target_ratio=0.2).num_params


def test_dtype_and_11008_wide():
    w = rand(11008, 64)
    m = decompose(w, chi=8)
    assert m.out_factors == (16, 16, 43) and m.shape == (11008, 64)
    assert decompose(w).relative_error(w) < 5e-6
    wt = rand(64, 11008).to(torch.bfloat16)
    assert all(c.dtype == torch.bfloat16 for c in decompose(wt, chi=4).cores)


# ---------------------------------------------------------------- bad input

def test_bad_chi_and_ratio():
    w = rand(48, 60)
    for chi in (0, -3, 2.5):
        with pytest.raises(MPOError, match="positive integer"):
            decompose(w, chi=chi)
    with pytest.warns(UserWarning, match="clamped"):
        m = decompose(w, chi=10_000)
    assert m.relative_error(w) < 5e-6
    with pytest.raises(MPOError, match="unreachable.*chi=1"):
        decompose(rand(576, 576), target_ratio=1e-4)
    for ratio in (0, 1.5, -0.1):
        with pytest.raises(MPOError, match=r"\(0, 1\]"):
            decompose(w, target_ratio=ratio)
    with pytest.raises(MPOError, match="not both"):
        decompose(w, chi=4, target_ratio=0.5)
    with pytest.raises(MPOError, match="at least 2 cores"):
        decompose(w, cores=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weight(bad):
    w = rand(48, 60)
    w[3, 7] = bad
    with pytest.raises(MPOError, match="NaN or Inf"):
        decompose(w, chi=4)
    with pytest.raises(MPOError, match="2-D"):
        decompose(torch.zeros(4, 4, 4))


# ---------------------------------------------------------------- the layer

@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5), (512,)])
def test_layer_forward_equals_dense(lead):
    torch.manual_seed(0)
    linear = torch.nn.Linear(60, 48)
    layer = MPOLinear.from_linear(linear, chi=6)
    x = torch.randn(*lead, 60)
    ref = x @ layer.to_mpo().to_matrix().T + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer(x).shape == (*lead, 48)


def test_layer_without_bias_and_four_cores():
    w = rand(64, 81)
    layer = MPOLinear.from_mpo(decompose(w, chi=5, cores=4))
    x = torch.randn(3, 81)
    assert layer.bias is None and len(layer.cores) == 4
    assert torch.allclose(layer(x), x @ layer.to_mpo().to_matrix().T, atol=1e-5)


def test_gradients_reach_every_core():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(torch.nn.Linear(60, 48), chi=4)
    layer(torch.randn(5, 60)).square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    small = MPOLinear.from_mpo(decompose(rand(12, 18, dtype=torch.float64), chi=2, cores=2), torch.zeros(12, dtype=torch.float64))
    assert torch.autograd.gradcheck(small, (torch.randn(3, 18, dtype=torch.float64, requires_grad=True),))


def test_plan_never_rebuilds_the_dense_matrix():
    layer = MPOLinear.from_mpo(decompose(rand(64, 81), chi=3, cores=4))
    for batch in (1, 64, 10 ** 7):  # at 10^7 tokens rebuilding would be cheapest: still forbidden
        lineage = {"x": {"x"}, **{f"c{k}": {k} for k in range(4)}}
        for out, left, right, _, _ in layer.plan(batch)[1]:
            lineage[out] = lineage[left] | lineage[right]
            assert "x" in lineage[out] or len(lineage[out]) < 4


def test_flop_count_two_cores_closed_form():
    layer = MPOLinear.from_mpo(decompose(rand(48, 60), chi=5, cores=2))
    (o0, o1), (i0, i1), r = layer.out_factors, layer.in_factors, 5
    for z in (1, 9):
        right_first = 2 * z * (i0 * i1 * r * o1 + i0 * o1 * r * o0)
        left_first = 2 * z * (i0 * i1 * o0 * r + i1 * o0 * r * o1)
        assert layer.flops(z) == min(right_first, left_first)
        assert layer.dense_flops(z) == 2 * z * 48 * 60
    assert layer.dense_bytes(1) == 4 * (48 * 60 + 60 + 48)
    assert layer.bytes(1) < layer.dense_bytes(1)


def test_mpo_dataclass_roundtrip():
    w = rand(24, 30)
    m = decompose(w, chi=3)
    again = MPO([c.clone() for c in m.cores])
    assert again.shape == (24, 30) and again.bond_dims == m.bond_dims
    assert torch.equal(again.to_matrix(), m.to_matrix())


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    """The benchmark's --quick mode runs in seconds and writes the documented structure."""
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "mpo_linear.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "mpo_linear.json").read_text())
    assert {"meta", "layer", "decomposition", "targets", "settings"} <= set(data)
    row = data["layer"][0]
    assert {"shape", "chi", "batch", "dense_fwd_s", "mpo_fwd_s", "fwd_ratio", "fwd_ratio_min", "mpo_fwdbwd_s",
            "flops_ratio", "bytes_ratio"} <= set(row)
    assert data["decomposition"]["smollm2_matrices"] > 0
    assert (tmp_path / "mpo_linear.png").stat().st_size > 1000


def test_two_cores_is_low_rank_svd_of_rearranged_matrix():
    from compactify.mpo import cut_spectra, error_bound, kronecker_terms, low_rank_curve

    w = rand(48, 60)
    s = cut_spectra(w, cores=2)[0]
    for chi in (3, 10):
        m = decompose(w, chi=chi, cores=2)
        svd_error = math.sqrt(float(s[chi:].square().sum() / s.square().sum()))
        assert m.relative_error(w) == pytest.approx(svd_error, rel=1e-4)
        assert torch.allclose(sum(torch.kron(a, b) for a, b in kronecker_terms(m)), m.to_matrix(), atol=1e-5)
    spectra = cut_spectra(w, cores=3)
    for chi in (2, 5, 12):
        m = decompose(w, chi=chi)
        assert m.relative_error(w) <= error_bound(spectra, m.bond_dims) + 1e-6  # Oseledets' bound
    with pytest.raises(MPOError, match="2-core"):
        kronecker_terms(decompose(w, chi=2))
    params, errors = low_rank_curve(w)
    assert params[0] == 48 + 60 and errors[-1] == pytest.approx(0, abs=1e-6)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))


def test_contracted_view_is_the_same_function_and_is_undone():
    from compactify.mpo_layer import MPOLinear as Layer, contracted

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 36)
    layer = Layer.from_linear(lin, chi=4, cores=3)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), Layer.from_linear(torch.nn.Linear(36, 48), chi=3, cores=2))
    x = torch.randn(5, 7, 48)
    factored = model(x)
    with contracted(model) as n:
        assert n == 2
        dense = model(x)
        assert layer._dense is not None and layer._dense.shape == (36, 48)
    torch.testing.assert_close(dense, factored, rtol=1e-4, atol=1e-5)
    assert layer._dense is None                     # undone: training sees the cores again
    model(x).sum().backward()
    assert layer.cores[0].grad is not None


def test_materialized_and_factored_forward_agree_with_gradients():
    from compactify.mpo_layer import MPOLinear as Layer

    torch.manual_seed(1)
    a = Layer.from_linear(torch.nn.Linear(48, 36), chi=4, cores=3)
    b = Layer.from_linear(torch.nn.Linear(48, 36), chi=4, cores=3)
    b.load_state_dict(a.state_dict())
    b.materialize_from = None                      # always factored
    x = torch.randn(2, 40, 48)                     # 80 tokens >= a.materialize_from: one GEMM
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    (ya ** 2).sum().backward()
    (yb ** 2).sum().backward()
    for ca, cb in zip(a.cores, b.cores):
        torch.testing.assert_close(ca.grad, cb.grad, rtol=1e-3, atol=1e-4)


def test_a_low_rank_layer_stays_factored_where_its_chain_is_cheaper_than_dense(monkeypatch):
    """A rank-r factorisation (2 cores of trivial factors) never rebuilds W: its two thin GEMMs
    need r (in + out) / (in out) of the dense FLOPs; a 3-core MPO whose chain costs more rebuilds it."""
    from compactify import mpo_layer
    from compactify.mpo import MPO

    torch.manual_seed(2)
    low = mpo_layer.MPOLinear.from_mpo(MPO([torch.randn(1, 36, 1, 4), torch.randn(4, 1, 48, 1)]))
    mpo = mpo_layer.MPOLinear.from_linear(torch.nn.Linear(48, 36), chi=8, cores=3)
    assert low.plan(80)[0] <= low.factored_below * low.dense_flops(80) < mpo.plan(80)[0]
    assert not low.materializes(80) and mpo.materializes(80) and not mpo.materializes(4)
    built = []
    real = mpo_layer.cores_to_matrix
    monkeypatch.setattr(mpo_layer, "cores_to_matrix", lambda cores: built.append(len(cores)) or real(cores))
    x = torch.randn(2, 40, 48)
    y = low(x)
    mpo(x)
    assert built == [3]                             # only the 3-core MPO rebuilt W
    w = low.cores[0].reshape(36, 4) @ low.cores[1].reshape(4, 48)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)  # from_mpo without a bias
    low.factored_below = 0.0                        # the rule off: W rebuilt like any MPO
    torch.testing.assert_close(low(x), y, rtol=1e-4, atol=1e-4)
    assert built == [3, 2]
