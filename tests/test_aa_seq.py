"""The sequential activation-aware SVD (compactify.aa_seq): the reduced-rank regression behind it,
and the block-by-block fit on a tiny Llama."""
from __future__ import annotations

import copy

import pytest
import torch

import compactify.tensorize as T
from compactify import aa_init, aa_seq
from compactify.lowrank import CompressError, LowRank
from conftest import tiny_llama


def _inputs(n=600, d=48, seed=0):
    """Dense-model inputs X and "compressed-model" inputs X' = X (I + 0.3 G) + noise: a systematic
    distortion (what earlier compressed layers do) that a fit on X' alone cannot undo."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.diag(torch.logspace(0, -1, d))
    X2 = X @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5) + 0.05 * torch.randn(n, d, generator=g)
    return X, X2


@pytest.mark.parametrize("shape", [(32, 48), (64, 48)])
def test_cross_equal_to_C_is_the_activation_aware_svd(shape):
    torch.manual_seed(0)
    W, X = torch.randn(shape[0], 48), torch.randn(600, 48)   # well conditioned: the damping (1e-6) does not show
    C = X.T @ X / X.shape[0]
    a, b = LowRank(W, C).rank(8).weight, LowRank(W, C, cross=C).rank(8).weight
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max())


def test_regression_is_the_best_rank_r_map_from_the_compressed_inputs():
    """min ||X W^T - X' M^T|| over rank-r M: the closed form beats ASVD fitted on either input
    set, and a random perturbation of it only makes it worse."""
    g = torch.Generator().manual_seed(1)
    U, _, V = torch.linalg.svd(torch.randn(40, 48, generator=g), full_matrices=False)
    W = U @ torch.diag(torch.logspace(0, -2, 40)) @ V   # a decaying spectrum: rank 8 keeps most of it
    X, X2 = _inputs()
    n = X.shape[0]
    C2, K = X2.T @ X2 / n, X2.T @ X / n

    def err(M):
        return float(torch.linalg.norm(X @ W.T - X2 @ M.T))

    fit = LowRank(W, C2, cross=K).rank(8)
    A, B = fit.factors
    assert torch.linalg.matrix_rank(fit.weight, rtol=1e-5) == 8 and A.shape == (40, 8) and B.shape == (8, 48)
    best = err(fit.weight)
    assert best < 0.8 * err(LowRank(W, C2).rank(8).weight)
    assert best < 0.8 * err(LowRank(W, X.T @ X / n).rank(8).weight)
    for s in range(5):
        g = torch.Generator().manual_seed(s)
        dA, dB = (1e-2 * torch.randn(t.shape, generator=g) for t in (A, B))
        assert err((A + dA) @ (B + dB)) > best
    with pytest.raises(CompressError, match="needs the activation-aware SVD"):
        LowRank(W, aware=False, cross=K)


def _plan():
    return T.Plan.uniform(2, target_ratio=0.3)


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_sequential_asvd_fits_the_dense_outputs_better_and_saves_like_asvd(tmp_path):
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    ids = torch.randint(0, 49152, (4096,), generator=torch.Generator().manual_seed(0))
    seq = aa_seq.sequential_asvd(dense, _plan(), ids, seq_len=128, batch_size=8, ridge=1e-3,
                                 calibration={"split": "synthetic"})
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the dense model is untouched
    info = seq.config.compactify
    assert info["init"] == "asvd_seq" and info["activation_aware"]["calibration"] == {
        "split": "synthetic", "sequential": True, "ridge": 1e-3}
    assert len(info["activation_errors"]) == 14
    # the independent activation-aware SVD of the same plan, from the same text
    from compactify.frontier import input_stats

    stats = input_stats(dense, ids, seq_len=128, batch_size=8, progress=False)
    ind = T.tensorize(copy.deepcopy(dense), _plan(), init="asvd", stats=stats)
    assert ind.num_parameters() == seq.num_parameters() and ind.config.compactify["init"] == "asvd"
    x = ids[:1024].view(8, 128)
    ref = _hidden(dense, x)
    e_seq, e_ind = (float(torch.linalg.norm(_hidden(m, x) - ref)) for m in (seq, ind))
    assert e_seq < 0.9 * e_ind, (e_seq, e_ind)
    seq.save_pretrained(tmp_path)
    loaded = T.load_compressed(tmp_path)
    assert loaded.config.compactify["init"] == "asvd_seq"
    assert torch.equal(_hidden(loaded, x), _hidden(seq, x))


def test_asvd_seq_refused_where_it_cannot_be_built():
    model = tiny_llama()
    with pytest.raises(aa_init.InitError, match="block by block"):
        T.tensorize(model, _plan(), init="asvd_seq", stats={})
    C = torch.eye(64)
    pairs = {(b, m): (C, C) for b in range(2) for m in ("q", "k", "v", "o", "gate", "up")}
    with pytest.raises(aa_init.InitError, match="only init='asvd' uses"):
        T.tensorize(model, T.Plan.uniform(2, target_ratio=0.3, matrices=("q",)), init="activation_aware", stats=pairs)
    with pytest.raises(aa_init.InitError, match=r"not \(64, 64\)"):
        T.tensorize(model, T.Plan.uniform(2, target_ratio=0.3, matrices=("q",)), init="asvd",
                    stats={(b, "q"): (C, torch.eye(3)) for b in range(2)})
    with pytest.raises(ValueError, match="fewer than one window"):
        aa_seq.sequential_asvd(model, _plan(), torch.arange(10), seq_len=128)


def test_asvd_seq_from_the_config(tiny_llama_dir):
    """tensorize.init: asvd_seq builds the sequential start from the config's calibration settings
    (the heal split, seq_calib_tokens, seq_ridge) and leaves the model it was given unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compactify.config import load_config

    cfg = load_config(None, {"tensorize.init": "asvd_seq", "tensorize.seq_calib_tokens": 300,
                             "tensorize.seq_ridge": 0.05, "frontier.calib_seq_len": 64})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plan = T.Plan.uniform(2, target_ratio=0.5, blocks=[1], matrices=("q", "down"))
    out = aa_init.tensorize_from_config(model, tok, plan, cfg)
    assert not hasattr(model.config, "compactify") and out is not model
    info = out.config.compactify
    assert info["init"] == "asvd_seq" and sorted(info["plan"]["entries"]) == ["1.down", "1.q"]
    assert info["activation_aware"]["calibration"] == {"split": "heal", "tokens": 256, "seq_len": 64, "seed": 0,
                                                       "sequential": True, "ridge": 0.05}
