"""The step functions notebooks 01 and 02 call: the primer's chi sweep and error curves
(compactify.primer), its summary figure (compactify.figures_mpo) and the read-off of the paper's
two sensitivity claims (compactify.sensitivity.claims). Small matrices and hand-made tables."""
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from compactify import figures, figures_mpo, primer  # noqa: E402
from compactify import sensitivity as S  # noqa: E402
from compactify.mpo import MPOLinear, decompose, singular_values  # noqa: E402


def _toy(n):
    torch.manual_seed(0)
    x = torch.linspace(0, 1, n)
    return torch.exp(-(x[:, None] - x[None, :] - 0.1).square() / (2 * 0.15 ** 2)), torch.randn(n, n) / math.sqrt(n)


def test_toy_sweep_counts_parameters_and_respects_the_error_bound():
    smooth, noise = _toy(24)  # 24 = 2*3*4 on 3 cores: bonds at most (4, 16)
    rows = primer.toy_sweep(smooth, noise, [1, 2, 4, 16, 100], cores=3)
    assert [r["chi"] for r in rows] == [1, 2, 4, 16]  # 100 would be clamped to 16: left out
    for r in rows:
        assert r["params"] == r["closed_form"] and r["paper_formula"] is None
        assert r["kept"] == r["params"] / 24 ** 2
        assert r["error_smooth"] <= r["bound_smooth"] + 1e-6
    errors = [r["error_smooth"] for r in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5  # full bond: exact up to float32
    assert rows[0]["error_random"] > 0.5  # no structure: chi = 1 keeps almost nothing of it


def test_toy_sweep_reproduces_the_papers_closed_form():
    smooth, noise = _toy(216)
    rows = primer.toy_sweep(smooth, noise, [1, 3, 8], cores=3)
    assert [r["paper_formula"] for r in rows] == [2 * 36 * c + 36 * c ** 2 for c in (1, 3, 8)]
    assert all(r["params"] == r["paper_formula"] for r in rows)


def test_error_curves_match_decompose_and_the_svd():
    torch.manual_seed(1)
    w = torch.randn(24, 36)
    ratios = (0.1, 0.3, 0.5)
    curves = primer.error_curves(w, ratios=ratios, cores=(3, 2))
    assert list(curves) == ["MPO, 3 cores", "MPO, 2 cores", "truncated SVD of W"]
    for k in (3, 2):
        for (kept, err, chi), r in zip(curves[f"MPO, {k} cores"], ratios):
            m = decompose(w, target_ratio=r, cores=k)
            assert kept == m.num_params / w.numel() <= r
            assert chi == max(m.bond_dims) and err == pytest.approx(m.relative_error(w), abs=1e-6)
    svd = curves["truncated SVD of W"]
    s2 = singular_values(w).square()
    assert [p[2] for p in svd] == list(range(1, 15))  # r*(24+36) <= 864 up to rank 14
    for kept, err, rank in svd:
        assert kept == rank * 60 / 864
        assert err == pytest.approx(math.sqrt(float(s2[rank:].sum() / s2.sum())), abs=1e-6)


def test_real_matrix_result_is_the_saved_record():
    torch.manual_seed(2)
    w = torch.randn(24, 36)
    m = decompose(w, target_ratio=0.3, cores=3)
    layer = MPOLinear.from_mpo(m)
    curves = {"MPO, 3 cores": [(0.25, 0.5, 3)], "truncated SVD of W": [(0.1, 0.9, 1), (0.2, 0.8, 2)]}
    rec = primer.real_matrix_result("w", w, curves, m, layer)
    assert rec["shape"] == [24, 36] and rec["name"] == "w"
    assert rec["curves"]["truncated SVD of W"][1] == {"kept": 0.2, "rel_error": 0.8, "chi_or_rank": 2}
    assert rec["chi70"]["bond_dims"] == list(m.bond_dims) and rec["chi70"]["rel_error"] == m.relative_error(w)
    assert rec["chi70"]["flops_ratio_batch1"] == layer.flops(1) / layer.dense_flops(1)


@pytest.mark.slow
def test_load_block_copies_the_seven_matrices(tiny_llama_dir):
    from compactify.models import MATRIX_PATHS, load_model

    weights = primer.load_block(str(tiny_llama_dir), 1)
    model, _ = load_model(str(tiny_llama_dir))
    assert list(weights) == list(MATRIX_PATHS)
    for t, path in MATRIX_PATHS.items():
        ref = model.get_submodule(f"model.layers.1.{path}").weight
        assert weights[t].dtype == torch.float32 and torch.equal(weights[t], ref)


def test_error_vs_kept_draws_one_line_per_method_and_is_reexported():
    curves = {"MPO, 3 cores": [(0.1, 0.6, 2), (0.3, 0.4, 5)], "MPO, 2 cores": [(0.1, 0.7, 3), (0.3, 0.5, 9)],
              "truncated SVD of W": [(0.05, 0.5, 1), (0.1, 0.3, 2), (0.2, 0.1, 4)]}
    assert figures.error_vs_kept is figures_mpo.error_vs_kept
    fig = figures.error_vs_kept(curves, title="q (24×36)")
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() in curves]
    assert [ln.get_label() for ln in lines] == list(curves)
    assert list(lines[2].get_xdata()) == [0.05, 0.1, 0.2] and list(lines[2].get_ydata()) == [0.5, 0.3, 0.1]
    assert ax.get_title() == "q (24×36)" and ax.get_xlim() == (0, 1)
    with pytest.raises(KeyError):  # a method without a style is an error, not a default colour
        figures.error_vs_kept({"other": [(0.1, 0.5, 1)]}, title="")


def _profile_table():
    """Blocks 0..5 of a 6-block model at 30% kept: q hurts less with depth, down more, and down
    most on average; gate measured on two blocks only; one row at another level."""
    rows = []
    for b in range(6):
        rows.append({"block": b, "type": "q", "value": 0.3, "increase_%": 10.0 - b})
        rows.append({"block": b, "type": "down", "value": 0.1 + 0.2, "increase_%": 20.0 + 3 * b})
    rows += [{"block": 0, "type": "gate", "value": 0.3, "increase_%": 1.0},
             {"block": 5, "type": "gate", "value": 0.3, "increase_%": 2.0},
             {"block": 3, "type": "q", "value": 0.5, "increase_%": 1000.0}]
    return pd.DataFrame(rows)


def test_claims_read_off_spearman_means_and_ranking():
    c = S.claims(_profile_table(), [0.3], n_blocks=6)
    assert list(c) == ["per_type", "ratio_0.3"]
    assert list(c["per_type"]) == ["q@0.3", "down@0.3", "gate@0.3"]  # order of first appearance
    q, down, gate = (c["per_type"][k] for k in ("q@0.3", "down@0.3", "gate@0.3"))
    assert q["spearman_depth"] == pytest.approx(-1) and down["spearman_depth"] == pytest.approx(1)
    assert math.isnan(gate["spearman_depth"])  # two blocks: no rank correlation
    assert q["mean_increase_%"] == pytest.approx(7.5) and q["median_increase_%"] == pytest.approx(7.5)  # 0.5 row out
    assert down["mean_increase_%"] == pytest.approx(27.5)
    at = c["ratio_0.3"]
    assert at["type_ranking"] == ["down", "q", "gate"] and at["most_sensitive_type"] == "down"
    # first third: blocks 0, 1; last third: blocks 4, 5 (gate counts in both)
    assert at["mean_increase_first_third_%"] == pytest.approx(np.mean([10, 9, 20, 23, 1]))
    assert at["mean_increase_last_third_%"] == pytest.approx(np.mean([6, 5, 32, 35, 2]))
    assert -1 <= at["spearman_depth_all"] <= 1


def test_claims_at_a_level_with_a_single_point():
    c = S.claims(_profile_table(), [0.5], n_blocks=6)
    assert list(c["per_type"]) == ["q@0.5"] and math.isnan(c["per_type"]["q@0.5"]["spearman_depth"])
    assert c["ratio_0.5"]["type_ranking"] == ["q"] and math.isnan(c["ratio_0.5"]["spearman_depth_all"])
