"""MPOLinear's inference modes (factored / contracted / auto) and compactify.mpo_modes: same
function in every mode, training always factored, no stale cached matrix, decisions recorded,
only the cores saved, clear errors."""
from __future__ import annotations

import pytest
import torch

from compactify.mpo_layer import (MPOLinear, contracted, inference_mode_set, mode_summary, set_inference_mode)

MODES = ("factored", "contracted", "auto")


def tiny(seed=0, dtype=torch.float32):
    """Two MPO layers (3 and 2 cores, one with bias) around a ReLU: 48 -> 36 -> 48."""
    torch.manual_seed(seed)
    a = MPOLinear.from_linear(torch.nn.Linear(48, 36), chi=4, cores=3)
    b = MPOLinear.from_linear(torch.nn.Linear(36, 48, bias=False), chi=3, cores=2)
    return torch.nn.Sequential(a, torch.nn.ReLU(), b).to(dtype)


def outputs(model, xs):
    with torch.no_grad():
        return [model(x) for x in xs]


INPUTS = [torch.randn(1, 48, generator=torch.Generator().manual_seed(1)),        # decode: 1 token
          torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(2)),     # 3 tokens, bucket 4
          torch.randn(2, 20, 48, generator=torch.Generator().manual_seed(3))]    # 40 >= materialize_from


def test_default_mode_is_todays_forward_bit_for_bit():
    model = tiny()
    assert MPOLinear.mode == "factored" and all(m.mode == "factored" for m in model if isinstance(m, MPOLinear))
    layer = model[0]
    for x in (INPUTS[0], torch.randn(2, 20, 48)):
        assert torch.equal(layer(x), layer.forward_factored(x))
    assert layer._dense is None  # the default holds nothing but the cores


@pytest.mark.parametrize("mode", ["contracted", "auto"])
def test_every_mode_is_the_same_function(mode):
    model = tiny()
    ref = outputs(model, INPUTS)
    summary = set_inference_mode(model, mode)
    assert summary["modes"] == {mode: 2}
    for got, want in zip(outputs(model, INPUTS), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # speed.compare times under inference_mode
        torch.testing.assert_close(model(INPUTS[0]), ref[0], rtol=1e-4, atol=1e-5)
    assert mode_summary(model)["extra_bytes"] <= 4 * (36 * 48 + 48 * 36)


@pytest.mark.parametrize("mode", ["contracted", "auto"])
@pytest.mark.parametrize("train", [True, False])
def test_gradients_never_go_through_the_cache(mode, train):
    ref, model = tiny(), tiny()
    set_inference_mode(model, mode, tokens=[40] if mode == "auto" else None)
    for m in (ref, model):
        m.train(train)
        (m(INPUTS[2]) ** 2).sum().backward()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    # a poisoned cache proves which path ran: under grad the factored one, under no_grad the cache
    layer = model[0]
    layer.mode = "contracted"
    layer.dense_matrix().zero_()
    x = INPUTS[1]
    torch.testing.assert_close(layer(x), layer.forward_factored(x))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.bias.expand(1, 3, 36))


def test_frozen_cores_may_use_the_cache_and_still_pass_the_input_gradient():
    model = tiny()
    ref = tiny()
    set_inference_mode(model, "contracted")
    for m in (model, ref):
        for p in m.parameters():
            p.requires_grad_(False)
    xs = [INPUTS[1].clone().requires_grad_(True) for _ in range(2)]
    for m, x in zip((model, ref), xs):
        m(x).square().sum().backward()
    assert model[0].cache_allowed()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)


def change_in_place(model):
    with torch.no_grad():
        model[0].cores[1].mul_(-2.0)


def change_in_inference_mode(model):
    with torch.inference_mode():
        model[0].cores[0].add_(0.5)


def change_by_optimizer_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    (model(INPUTS[1]) ** 2).sum().backward()
    opt.step()
    model.eval()


def change_by_adamw_foreach(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    (model(INPUTS[1]) ** 2).sum().backward()
    opt.step()


def change_by_load_state_dict(model):
    model.load_state_dict(tiny(seed=7).state_dict())


def change_by_load_state_dict_assign(model):
    model.load_state_dict(tiny(seed=8).state_dict(), assign=True)


def change_by_dtype(model):
    model.double()


def change_by_data(model):
    model[0].cores[2].data = model[0].cores[2].data * 3


@pytest.mark.parametrize("change", [change_in_place, change_in_inference_mode, change_by_optimizer_step,
                                    change_by_adamw_foreach, change_by_load_state_dict,
                                    change_by_load_state_dict_assign, change_by_dtype, change_by_data])
@pytest.mark.parametrize("mode", ["contracted", "auto"])
def test_a_changed_core_never_serves_a_stale_matrix(change, mode):
    model = tiny()
    set_inference_mode(model, mode, tokens=[1, 3] if mode == "auto" else None)
    before = outputs(model, INPUTS[:2])
    change(model)
    if change is change_by_dtype:  # .double() (via _apply) drops the cache and auto's float32 timings
        assert model[0]._dense is None and model[0].auto_decisions == {}
    after = outputs(model, INPUTS[:2]) if change is not change_by_dtype else outputs(model, [x.double() for x in INPUTS[:2]])
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())
    want = outputs(fresh.to(after[0].dtype), [x.to(after[0].dtype) for x in INPUTS[:2]])  # factored, from the cores
    for a, b, w in zip(before, after, want):
        torch.testing.assert_close(b, w, rtol=1e-4, atol=1e-5)
        assert b.dtype != a.dtype or not torch.allclose(a, b, atol=1e-3)  # the change did change the function


def test_auto_records_a_decision_per_bucket_and_keeps_w_only_where_chosen():
    model = tiny()
    summary = set_inference_mode(model, "auto")
    assert summary["auto_decisions"] == {} and summary["extra_bytes"] == 0  # nothing decided yet
    outputs(model, INPUTS)
    for layer in (model[0], model[2]):
        assert sorted(layer.auto_decisions) == [1, 4, 64]
        for bucket, d in layer.auto_decisions.items():
            assert d["decided_by"] == "measurement" and d["path"] in ("factored", "contracted")
            assert d["factored_s"] > 0 and d["contracted_s"] > 0 and MPOLinear.bucket(d["tokens"]) == bucket
            assert d["path"] == ("factored" if d["factored_s"] <= d["contracted_s"] else "contracted")
        chose_w = any(d["path"] == "contracted" for d in layer.auto_decisions.values())
        assert (layer._dense is not None) == chose_w
    summary = mode_summary(model)
    assert summary["decided_by"] == {"measurement": 6}
    assert all(sum(row.values()) == 2 for row in summary["auto_decisions"].values())
    # pre-decided buckets; the same bucket is not measured twice
    summary = set_inference_mode(model, "auto", tokens=(1, 32))
    assert sorted(model[0].auto_decisions) == [1, 32] and summary["decided_by"] == {"measurement": 4}
    first = dict(model[0].auto_decisions[32])
    with torch.no_grad():
        model(torch.randn(30, 48))  # 30 tokens: bucket 32, already decided
    assert model[0].auto_decisions[32] == first


def test_auto_falls_back_to_the_cost_model_and_says_so():
    meta = tiny().to("meta")
    with pytest.warns(UserWarning, match="cost model.*meta device cannot be timed"):
        summary = set_inference_mode(meta, "auto", tokens=[1, 64])
    assert summary["decided_by"] == {"cost model": 4}
    d = meta[0].auto_decisions[64]
    assert d["why"] == "meta device cannot be timed" and d["path"] == "contracted"  # W rebuilt per call loses to cached W
    assert d["factored_s"] == meta[0].estimate_seconds("factored", 64)
    # the torch-only copy saved beside a model has no clock: the cost model, recorded
    model = tiny()
    model[0].auto_timer = None
    set_inference_mode(model, "auto")
    outputs(model, INPUTS[:1])
    assert model[0].auto_decisions[1]["decided_by"] == "cost model"
    assert model[0].auto_decisions[1]["why"] == "no clock in this copy of MPOLinear"
    assert model[2].auto_decisions[1]["decided_by"] == "measurement"
    with pytest.raises(ValueError, match="knows 'factored' and 'contracted'"):
        model[0].estimate_seconds("dense")


def test_bad_input_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="Unknown MPO inference mode 'dense'.*factored.*contracted.*auto"):
        set_inference_mode(model, "dense")
    with pytest.raises(ValueError, match="tokens=.*pre-decides auto"):
        set_inference_mode(model, "contracted", tokens=[1])
    with pytest.raises(ValueError, match="positive whole numbers"):
        set_inference_mode(model, "auto", tokens=[0])
    with pytest.raises(ValueError, match="no MPOLinear layer"):
        set_inference_mode(torch.nn.Linear(3, 3), "auto")
    model[0].mode = "fast"
    with pytest.raises(ValueError, match="MPOLinear.mode is 'fast'.*factored, contracted, auto"):
        outputs(model, INPUTS[:1])


@pytest.mark.parametrize("mode", MODES)
def test_saved_state_holds_only_the_cores(mode):
    model = tiny()
    keys = set(model.state_dict())
    set_inference_mode(model, mode)
    outputs(model, INPUTS)
    state = model.state_dict()
    assert set(state) == keys and all(k.split(".")[-2] == "cores" or k.endswith("bias") for k in state)
    assert not any(t.shape in ((36, 48), (48, 36)) for t in state.values())
    again = tiny(seed=3)
    again.load_state_dict(state)
    for got, want in zip(outputs(again, INPUTS), outputs(model, INPUTS)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_modes_are_put_back_after_a_block():
    model = tiny()
    model[2].mode = "auto"
    with contracted(model) as n:
        assert n == 2 and model[0].mode == model[2].mode == "contracted" and model[0]._dense is not None
    assert "mode" not in model[0].__dict__ and model[2].mode == "auto"
    assert model[0]._dense is None and model[2]._dense is None
    with inference_mode_set(model, "auto", tokens=[1]) as summary:
        assert summary["decided_by"] == {"measurement": 2}
    assert model[2].auto_decisions == {}
    with contracted(torch.nn.Linear(2, 2)) as n:  # a dense model: nothing to do, as before
        assert n == 0


def test_speed_compare_sets_and_reports_the_mode():
    from compactify import speed
    from compactify.tensorize import Plan, tensorize
    from conftest import tiny_llama

    shape = dict(vocab_size=256, num_hidden_layers=1, max_position_embeddings=64, tie_word_embeddings=False)
    dense = tiny_llama(**shape)
    mpo = tensorize(tiny_llama(**shape), Plan.uniform(1, target_ratio=0.5), errors=False)
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="Unknown MPO inference mode"):
        speed.compare({"dense": dense, "mpo": mpo}, None, ids, ids, new_tokens=2, repeats=1, mpo_mode="fast")
    out = speed.compare({"dense": dense, "mpo": mpo}, None, ids, ids, new_tokens=2, repeats=1, mpo_mode="auto")
    assert out["_setup"]["mpo_mode"] == "auto"
    rec = out["mpo"]["mpo_mode"]
    assert rec["modes"] == {"auto": 7} and set(rec["auto_decisions"]) == {1, 8} and "mpo_mode" not in out["dense"]
    layers = [m for m in mpo.modules() if isinstance(m, MPOLinear)]
    assert all(m.mode == "factored" and m._dense is None for m in layers)  # put back afterwards
    out = speed.compare({"mpo": mpo}, None, ids, ids, new_tokens=2, repeats=1)
    assert out["_setup"]["mpo_mode"] is None and "mpo_mode" not in out["mpo"]
    out = speed.compare({"dense": dense}, None, ids, ids, new_tokens=2, repeats=1, mpo_mode="contracted")
    assert out["_setup"]["mpo_mode"] == "contracted" and "mpo_mode" not in out["dense"]  # no MPO layer: left alone


def test_auto_records_what_its_decisions_cost_so_timings_can_leave_it_out():
    from compactify.mpo_modes import decide_seconds

    model = tiny()
    set_inference_mode(model, "auto")
    assert decide_seconds(model) == 0.0
    outputs(model, INPUTS[:1])
    first = decide_seconds(model)
    layers = [m for m in model if isinstance(m, MPOLinear)]
    assert first > 0 and all(d["decide_s"] > 0 for m in layers for d in m.auto_decisions.values())
    outputs(model, INPUTS[:1])  # same bucket again: decided already, nothing more spent
    assert decide_seconds(model) == first
    outputs(model, INPUTS[1:2])  # a new bucket: a new decision per layer
    assert decide_seconds(model) > first
    assert decide_seconds(torch.nn.Linear(3, 3)) == 0.0
