"""Sensitivity profiling: replay from a block is exact; profile restores weights; the allocator
meets its budget and prefers cheap matrices."""
import math

import pytest
import torch

from compactify import sensitivity as S
from conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3)
    ids = torch.randint(0, 512, (4 * 32,))
    return model, S.BlockReplay(model, ids, seq_len=32, batch_size=3)


def test_replay_from_any_block_equals_the_full_model(tiny):
    model, replay = tiny
    for b in range(3):
        assert replay.loss(b) == pytest.approx(replay.dense_loss, rel=1e-5)
    # Perturb block 2 and compare against a full forward pass.
    lin = model.model.layers[2].mlp.up_proj
    saved = lin.weight.data.clone()
    lin.weight.data.mul_(0.5)
    try:
        assert replay.loss(2) == pytest.approx(replay._full(), rel=1e-5)
        assert replay.loss(2) != pytest.approx(replay.dense_loss, rel=1e-4)
    finally:
        lin.weight.data.copy_(saved)


def test_profile_restores_weights_and_error_falls_with_chi(tiny):
    model, replay = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = S.profile(model, replay, [0, -1], ["q", "down"], chis=[2, 8, 64], progress=False)
    assert len(recs) == 2 * 2 * 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was not restored"
    for b in (0, 2):
        errs = [r["rel_error"] for r in recs if r["block"] == b and r["type"] == "q"]
        assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5  # chi=64 is exact for 96x96 with 3 cores
        last = [r for r in recs if r["block"] == b and r["type"] == "q"][-1]
        assert last["ppl"] == pytest.approx(math.exp(replay.dense_loss), rel=1e-4)


def test_bad_targets(tiny):
    model, replay = tiny
    with pytest.raises(S.SensitivityError, match="do not exist"):
        S.profile(model, replay, [7], ["q"], chis=[4], progress=False)
    with pytest.raises(S.SensitivityError, match="Unknown matrix types"):
        S.profile(model, replay, [0], ["query"], chis=[4], progress=False)
    with pytest.raises(S.SensitivityError, match="at least one level"):
        S.profile(model, replay, [0], ["q"], progress=False)


def test_allocate_meets_budget_and_spends_where_it_hurts():
    cheap = S.Choice(0, "q", 100, [1.0, 0.5, 0.2], [100, 50, 20], [0.0, 0.01, 0.02])
    dear = S.Choice(0, "down", 100, [1.0, 0.5, 0.2], [100, 50, 20], [0.0, 1.0, 5.0])
    plan = S.allocate([cheap, dear], keep_ratio=0.6)
    assert plan == {(0, "q"): 0.2, (0, "down"): 1.0}
    assert S.allocate([cheap, dear], keep_ratio=0.2) == {(0, "q"): 0.2, (0, "down"): 0.2}
    with pytest.raises(S.SensitivityError, match="unreachable"):
        S.allocate([cheap, dear], keep_ratio=0.1)


def test_paper_blocks():
    assert S.paper_blocks(32) == [0, 5, 15, 31]
    assert S.paper_blocks(30) == [0, 5, 14, 29]


def test_choices_from_profile_predict_costs_that_fall_with_ratio(tiny):
    model, replay = tiny
    recs = S.profile(model, replay, [1], ["q", "up"], ratios=[0.3], progress=False)
    choices = S.choices_from_profile(model, recs, ratios=[0.1, 0.3, 0.6], dense_types=["down"])
    assert len(choices) == 3 * 7
    for c in choices:
        assert c.ratios[0] == 1.0 and c.cost[0] == 0.0
        if c.type == "down":
            assert c.ratios == [1.0]
        else:
            assert c.cost[1:] == sorted(c.cost[1:], reverse=True) and c.params[1:] == sorted(c.params[1:])
    plan = S.allocate(choices, keep_ratio=0.5)
    kept = sum(c.params[c.ratios.index(plan[(c.block, c.type)])] for c in choices)
    assert kept <= 0.5 * sum(c.dense_params for c in choices)
    assert all(plan[(b, "down")] == 1.0 for b in range(3))


@pytest.mark.parametrize("shape,cores", [((96, 192), 3), ((64, 96), 2), ((48, 64), 4)])
def test_fast_error_curve_equals_decomposing(shape, cores):
    from compactify import mpo

    torch.manual_seed(1)
    w = torch.randn(*shape) @ torch.diag(torch.logspace(0, -1, shape[1]))
    curve = S.error_curve(w, [0.1, 0.3, 0.6], cores=cores)
    sweep = mpo.MPOSweep(w, cores=cores)
    assert set(curve) == {0.1, 0.3, 0.6}
    for r, (params, err) in curve.items():
        m = sweep.at(target_ratio=r)
        assert params == m.num_params and err == pytest.approx(m.relative_error(w), abs=2e-5)


def test_replay_under_bf16_autocast_is_exact_and_close_to_fp32(tiny):
    model, fp32 = tiny
    ids = fp32.windows.reshape(-1)
    bf16 = S.BlockReplay(model, ids, seq_len=32, batch_size=3, autocast=torch.bfloat16)
    for b in range(3):
        assert bf16.loss(b) == pytest.approx(bf16.dense_loss, rel=1e-5)   # replay is exact under autocast too
    assert bf16.dense_loss == pytest.approx(fp32.dense_loss, rel=2e-2)
    assert bf16.dense_loss != fp32.dense_loss                             # it did compute in bf16
