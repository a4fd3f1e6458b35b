"""compactify.tensorize: plans, whole-model tensorization, one-matrix swaps, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import compactify.tensorize as T
from compactify.mpo import MPOLinear
from conftest import tiny_llama_config


def smollm2_shaped(blocks=2):
    """SmolLM2-135M's real block shapes (GQA: k/v 576 -> 192), tied embeddings, a small vocab."""
    return tiny_llama_config(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)


def llama2_shaped():
    """LLaMA-2's proportions in miniature: MHA, untied head, intermediate = 2.6875 * hidden
    (344 = 2^3 * 43 keeps 11008's awkward prime factor)."""
    return tiny_llama_config(vocab_size=512, hidden_size=128, intermediate_size=344, num_key_value_heads=4,
                             tie_word_embeddings=False, max_position_embeddings=2048)


def qwen2_shaped():
    """Another family (biases on q/k/v): registered too."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def model_of(config, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- the plan

def test_plan_json_roundtrip_and_uniform():
    plan = T.Plan.uniform(4, chi=16, blocks=[1, 3], matrices=T.WITHOUT_DOWN)
    assert len(plan.entries) == 12 and plan.entries["3.up"] == {"chi": 16} and "1.down" not in plan.entries
    again = T.Plan.from_json(plan.to_json())
    assert again == plan
    mixed = T.Plan({"0.q": {"chi": 8}, "1.down": {"target_ratio": 0.5}}, cores=2)
    assert list(mixed.items()) == [(0, "q", {"chi": 8}), (1, "down", {"target_ratio": 0.5})]
    assert T.Plan.from_dict(json.loads(mixed.to_json())) == mixed


@pytest.mark.parametrize("entries,match", [({"0.q_proj": {"chi": 4}}, "matrix one of"),
                                           ({"first.q": {"chi": 4}}, "<block>.<matrix>"),
                                           ({"0.q": {"chi": 0}}, "positive integer"),
                                           ({"0.q": {"chi": 4.5}}, "positive integer"),
                                           ({"0.q": {"target_ratio": 1.5}}, r"\(0, 1\]"),
                                           ({"0.q": {"chi": 4, "target_ratio": 0.5}}, "chi': int"),
                                           ({"0.q": 4}, "chi': int")])
def test_plan_bad_entries(entries, match):
    with pytest.raises(T.PlanError, match=match):
        T.Plan(entries)


def test_plan_naming_what_the_model_lacks():
    model = model_of(llama2_shaped())
    with pytest.raises(T.PlanError, match=r"Block 5 does not exist.*0\.\.1"):
        T.tensorize(model, T.Plan({"5.q": {"chi": 4}}))
    with pytest.raises(T.PlanError, match="Unknown plan keys"):
        T.Plan.from_dict({"entries": {}, "chis": 3})
    assert type(model) is LlamaForCausalLM  # nothing was touched
    T.tensorize(model, T.Plan({"0.q": {"chi": 4}}))
    with pytest.raises(T.PlanError, match="already tensorized"):
        T.tensorize(model, T.Plan({"0.q": {"chi": 4}}))


# ---------------------------------------------------------------- tensorize + report

def test_tensorize_smollm2_shapes_and_report():
    model = model_of(smollm2_shaped())
    dense_params = model.num_parameters()
    T.tensorize(model, T.Plan.uniform(2, target_ratio=0.3, matrices=T.WITHOUT_DOWN))
    assert type(model).__name__ == "CompactLlamaForCausalLM"
    assert isinstance(model.model.layers[1].self_attn.k_proj, MPOLinear)
    assert model.model.layers[1].self_attn.k_proj.out_features == 192
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    rep = T.size_report(model)
    tot = rep["totals"]
    assert tot["model_params_after"] == model.num_parameters() and tot["model_params_before"] == dense_params
    assert tot["matrices_tensorized"] == 12 and len(rep["rows"]) == 14 and len(rep["blocks"]) == 2
    for row in rep["rows"]:
        if row["tensorized"]:
            assert row["params_after"] <= 0.3 * row["params_before"] and 0 < row["relative_error"] < 1
        else:
            assert row["params_after"] == row["params_before"]
    assert sum(b["params_after"] for b in rep["blocks"]) == tot["block_params_after"]
    assert tot["model_bytes_after"] == 4 * tot["model_params_after"]
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("config", [smollm2_shaped, llama2_shaped, qwen2_shaped])
def test_save_load_roundtrip(tmp_path, config):
    model = model_of(config())
    T.tensorize(model, T.Plan.uniform(2, chi=8))
    ref, params = logits(model), model.num_parameters()
    model.save_pretrained(tmp_path)
    assert T.is_compressed_dir(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.cores.0" in saved
    assert not any(k.startswith("model.layers.") and k.endswith("proj.weight") for k in saved)

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain HF API, after import compactify.tensorize
    assert type(auto) is type(model) and type(auto).__name__.startswith("Compact")
    assert auto.num_parameters() == params < model_of(config()).num_parameters()
    assert torch.equal(logits(auto.eval()), ref)
    loaded = T.load_compressed(tmp_path, dtype=torch.float32, device="cpu")
    assert torch.equal(logits(loaded), ref)
    tied = config().tie_word_embeddings
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_skeleton_never_allocates_dense_weights(tmp_path):
    model = model_of(llama2_shaped())
    T.tensorize(model, T.Plan.uniform(2, chi=4))
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert isinstance(skeleton.model.layers[1].mlp.down_proj, MPOLinear)
    assert skeleton.num_parameters() == model.num_parameters()


# ---------------------------------------------------------------- one matrix at a time

# ---------------------------------------------------------------- bad directories

def test_load_rejects_mismatched_files(tmp_path):
    model = model_of(llama2_shaped())
    T.tensorize(model, T.Plan.uniform(2, chi=4, matrices=("q", "up")))
    model.save_pretrained(tmp_path)
    cfg_path, st_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    good_cfg, good = cfg_path.read_text(), load_file(st_path)

    cfg = json.loads(good_cfg)
    cfg["compactify"]["modules"]["model.layers.0.self_attn.q_proj"]["bond_dims"] = [5, 5]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(T.CompressedCheckpointError, match=r"q_proj.cores.0: expected \(1, 4, 4, 5\)"):
        T.load_compressed(tmp_path)
    cfg_path.write_text(good_cfg)

    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.cores.2"]
    bad["model.layers.0.self_attn.k_proj.cores.0"] = bad.pop("model.layers.0.self_attn.k_proj.weight")[:1, :1, None, None]
    save_file(bad, st_path, metadata={"format": "pt"})
    with pytest.raises(T.CompressedCheckpointError, match="up_proj.cores.2: expected .* found nothing.*"
                                                          "k_proj.cores.0: MPO cores for a matrix the config says is dense.*"
                                                          "k_proj.weight: missing"):
        T.load_compressed(tmp_path)
    save_file(good, st_path, metadata={"format": "pt"})
    assert T.load_compressed(tmp_path).num_parameters() == model.num_parameters()

    dense_dir = tmp_path / "dense"
    model_of(llama2_shaped()).save_pretrained(dense_dir)
    assert not T.is_compressed_dir(dense_dir)
    with pytest.raises(T.CompressedCheckpointError, match="not a compressed model directory"):
        T.load_compressed(dense_dir)


@pytest.mark.slow
# ---------------------------------------------------------------- all or nothing

def _state(model):
    return (type(model), type(model.config), json.dumps(getattr(model.config, "compactify", None), sort_keys=True),
            [type(m).__name__ for m in model.modules()], logits(model))


def _assert_unchanged(model, before):
    after = _state(model)
    assert after[:4] == before[:4]
    torch.testing.assert_close(after[4], before[4], rtol=0, atol=0, equal_nan=True)  # bit for bit


def _nan_in_block_1(model):
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    return model


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                       num_attention_heads=4, num_key_value_heads=2)


def _gemma():
    from transformers import GemmaConfig
    return GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                       num_attention_heads=4, num_key_value_heads=2)


# kind -> (model, plan, exception, words the message must hold). Every plan would succeed on its
# first matrices: the failure is in a later one, which the old code found after swapping.
FAILURES = {
    "unreachable ratio, later matrix": (lambda: model_of(llama2_shaped()), T.Plan(
        {"0.q": {"target_ratio": 0.3}, "1.k": {"target_ratio": 0.0001}}), T.MPOError, ["'1.k'", "unreachable", "larger ratio"]),
    "prime intermediate_size": (lambda: model_of(tiny_prime()), T.Plan.uniform(2, chi=4),
                                T.MPOError, ["'0.gate'", "97", "fewer cores"]),
    "NaN in a later block": (lambda: _nan_in_block_1(model_of(llama2_shaped())), T.Plan.uniform(2, chi=4),
                             T.MPOError, ["'1.up'", "NaN", "nothing was changed"]),
    "unsupported family (Qwen3)": (lambda: model_of(_qwen3()), T.Plan.uniform(2, chi=4), T.PlanError,
                                   ["Qwen3ForCausalLM", "not a supported", "LlamaForCausalLM, Mistral"]),
    "unsupported family (Gemma)": (lambda: model_of(_gemma()), T.Plan.uniform(2, chi=4), T.PlanError,
                                   ["GemmaForCausalLM", "not a supported"]),
    "chi larger than dense": (lambda: model_of(llama2_shaped()), T.Plan.uniform(2, chi=10**6), T.PlanError,
                              ["more than the dense", "allow_growth=True", "smaller chi"]),
}


def tiny_prime():
    return tiny_llama_config(vocab_size=512, intermediate_size=97, tie_word_embeddings=False, max_position_embeddings=2048)


@pytest.mark.parametrize("kind", FAILURES)
def test_failed_tensorize_leaves_the_model_as_it_was(kind, tmp_path):
    make, plan, exc, words = FAILURES[kind]
    model = make()
    before = _state(model)
    with pytest.raises(exc) as err:
        T.tensorize(model, plan)
    for w in words:
        assert w in str(err.value), str(err.value)
    _assert_unchanged(model, before)
    if kind.startswith("unsupported"):
        return
    model.save_pretrained(tmp_path)  # saves as the dense model it still is, and reloads bit for bit
    assert not T.is_compressed_dir(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is before[0]
    torch.testing.assert_close(logits(again), before[4], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("where", ["decompose", "swap", "interrupt"])
def test_failure_during_decomposition_or_swap_rolls_back(where, monkeypatch):
    model = model_of(llama2_shaped())
    T.tensorize(model, T.Plan({"0.q": {"chi": 4}}))  # an already-compact model: its state must survive too
    before = _state(model)
    calls = {"n": 0}
    real_decompose, real_sync = T.decompose, T._sync

    def failing_decompose(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt if where == "interrupt" else RuntimeError("out of memory (simulated)")
        return real_decompose(*a, **k)

    def failing_sync(m):
        real_sync(m)
        raise RuntimeError("failure after the swap (simulated)")

    if where == "swap":
        monkeypatch.setattr(T, "_sync", failing_sync)
    else:
        monkeypatch.setattr(T, "decompose", failing_decompose)
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else RuntimeError):
        T.tensorize(model, T.Plan.uniform(2, chi=4, matrices=("k", "v", "o", "gate", "up")))
    monkeypatch.undo()
    _assert_unchanged(model, before)
    T.tensorize(model, T.Plan.uniform(2, chi=4, matrices=("k",)))  # and it still works
    assert isinstance(model.model.layers[1].self_attn.k_proj, MPOLinear)


def test_allow_growth_is_explicit_and_reported():
    model = model_of(llama2_shaped())
    with pytest.warns(UserWarning, match="14 plan entries .* clamped"):
        T.tensorize(model, T.Plan(T.Plan.uniform(2, chi=10**6).entries, allow_growth=True))
    rep = T.size_report(model)
    assert rep["totals"]["matrices_larger_than_dense"] == 14 and "MORE parameters" in rep["totals"]["warning"]
    assert all(r["larger_than_dense"] for r in rep["rows"])
    assert model.config.compactify["plan"]["allow_growth"] is True
    assert T.Plan.from_dict(T.Plan({"0.q": {"chi": 4}}, allow_growth=True).to_dict()).allow_growth
    assert "allow_growth" not in T.Plan({"0.q": {"chi": 4}}).to_dict()  # old plans' JSON unchanged
    small = model_of(llama2_shaped())
    T.tensorize(small, T.Plan.uniform(2, chi=4))
    assert T.size_report(small)["totals"]["matrices_larger_than_dense"] == 0
    assert "warning" not in T.size_report(small)["totals"]


# ---------------------------------------------------------------- activation-aware initialisation

def anisotropic_stats(model, seed=0):
    """``{(block, matrix): C}`` of inputs whose scales fall 50-fold along a random rotation: far
    from the isotropic inputs under which TT-SVD would already be the activation-optimal MPO."""
    from compactify.frontier import INPUT_OF

    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for b, layer in enumerate(model.model.layers):
        for t, reader in INPUT_OF.items():
            n = model.get_submodule(f"model.layers.{b}.{T.MATRICES[reader]}").in_features
            if (b, reader) not in stats:
                q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
                x = torch.randn(4 * n, n, generator=gen) * torch.logspace(0, -1.7, n) @ q
                stats[(b, reader)] = x.T @ x / x.shape[0]
            stats[(b, t)] = stats[(b, reader)]
    return stats


MIXED_PLAN = T.Plan({**T.Plan.uniform(2, target_ratio=0.3, matrices=("q", "o", "gate", "down")).entries,
                     **T.Plan.uniform(2, chi=3, matrices=("k", "v", "up")).entries})
AA_OPTIONS = {"sweeps": 1, "inner": 2, "damping": 0.01}


def test_activation_aware_same_bonds_lower_activation_error():
    from compactify.lowrank import activation_error

    plain, aware = model_of(llama2_shaped()), model_of(llama2_shaped())
    dense = {n: m.weight.detach().clone() for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = anisotropic_stats(plain)
    T.tensorize(plain, MIXED_PLAN)
    T.tensorize(aware, MIXED_PLAN, init="activation_aware", stats=stats, aa_options=AA_OPTIONS,
                calibration={"split": "synthetic", "tokens": 512})
    assert aware.num_parameters() == plain.num_parameters()
    assert aware.config.compactify["modules"] == plain.config.compactify["modules"]  # factors, bonds, biases
    assert aware.config.compactify["init"] == "activation_aware" and plain.config.compactify["init"] == "tt_svd"
    assert "activation_errors" not in plain.config.compactify
    assert aware.config.compactify["activation_aware"] == {**AA_OPTIONS, "calibration": {"split": "synthetic", "tokens": 512}}
    recorded = aware.config.compactify["activation_errors"]
    assert len(recorded) == 14
    for b, m, _ in MIXED_PLAN.items():
        name = f"model.layers.{b}.{T.MATRICES[m]}"
        C = stats[(b, m)]
        e_plain = activation_error(dense[name], plain.get_submodule(name).to_mpo().to_matrix(), C)
        e_aware = activation_error(dense[name], aware.get_submodule(name).to_mpo().to_matrix(), C)
        assert e_aware < 0.98 * e_plain, (name, e_aware, e_plain)
        assert recorded[name]["aa"] == pytest.approx(e_aware, abs=2e-4)
        assert recorded[name]["plain"] == pytest.approx(e_plain, abs=2e-4)
        assert aware.config.compactify["relative_errors"][name] >= plain.config.compactify["relative_errors"][name] - 1e-6


def test_activation_aware_save_load_and_mixed(tmp_path):
    model = model_of(llama2_shaped())
    stats = anisotropic_stats(model)
    T.tensorize(model, T.Plan({"0.q": {"chi": 4}}))
    T.tensorize(model, T.Plan.uniform(2, target_ratio=0.3, matrices=("k", "up")), init="activation_aware",
                stats=stats, aa_options=AA_OPTIONS)
    info = model.config.compactify
    assert info["init"] == "mixed" and len(info["activation_errors"]) == 4
    assert "model.layers.0.self_attn.q_proj" not in info["activation_errors"]
    ref = logits(model)
    model.save_pretrained(tmp_path)
    for loaded in (T.load_compressed(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path).eval()):
        assert torch.equal(logits(loaded), ref) and loaded.num_parameters() == model.num_parameters()
        assert loaded.config.compactify["init"] == "mixed"
        assert loaded.config.compactify["activation_errors"] == info["activation_errors"]
    with pytest.raises(T.aa_init.InitError, match="already holds activation-aware MPOs"):
        T.tensorize(model, T.Plan({"1.v": {"chi": 2}}), init="activation_aware", stats=stats,
                    aa_options={**AA_OPTIONS, "inner": 3})


def test_asvd_is_the_low_rank_peer_within_each_mpo_budget(tmp_path):
    """init='asvd': every planned matrix becomes the activation-aware rank-r factorisation that
    fits in its MPO's parameters, stored as a 2-core MPO of trivial factors, saved and loaded like one."""
    from compactify.lowrank import LowRank, activation_error

    mpo, low = model_of(llama2_shaped()), model_of(llama2_shaped())
    dense = {n: m.weight.detach().clone() for n, m in low.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = anisotropic_stats(low)
    T.tensorize(mpo, MIXED_PLAN)
    T.tensorize(low, MIXED_PLAN, init="asvd", stats=stats, calibration={"split": "synthetic", "tokens": 512})
    info = low.config.compactify
    assert info["init"] == "asvd" and info["activation_aware"] == {"method": "asvd", "calibration": {"split": "synthetic", "tokens": 512}}
    assert low.num_parameters() <= mpo.num_parameters()
    for b, m, _ in MIXED_PLAN.items():
        name = f"model.layers.{b}.{T.MATRICES[m]}"
        W, C, layer = dense[name], stats[(b, m)], low.get_submodule(name)
        out, inp = W.shape
        (r,) = layer.bond_dims
        assert (list(layer.out_factors), list(layer.in_factors)) == ([out, 1], [1, inp])
        assert r * (out + inp) <= mpo.get_submodule(name).num_params < (r + 1) * (out + inp)  # the largest rank that fits
        approx = layer.to_mpo().to_matrix()
        assert torch.linalg.matrix_rank(approx.detach(), rtol=1e-4) == r  # fp32 round-off aside
        assert torch.allclose(approx, LowRank(W, C, aware=True).rank(r).weight, atol=1e-5)
        e_aware, e_plain = activation_error(W, approx, C), activation_error(W, LowRank(W).rank(r).weight, C)
        assert e_aware < e_plain and info["activation_errors"][name] == {"aa": pytest.approx(e_aware, abs=2e-4),
                                                                         "plain": pytest.approx(e_plain, abs=2e-4)}
        x = torch.randn(3, inp)
        assert torch.allclose(layer(x), x @ approx.T, atol=1e-4)
    ref = logits(low)
    low.save_pretrained(tmp_path)
    loaded = T.load_compressed(tmp_path)
    assert torch.equal(logits(loaded), ref) and loaded.config.compactify["init"] == "asvd"
    with pytest.raises(T.aa_init.InitError, match="init='asvd', which has none"):
        T.tensorize(model_of(llama2_shaped()), MIXED_PLAN, init="asvd", stats=stats, aa_options=AA_OPTIONS)


def _stats_without_block_1(model):
    return {k: v for k, v in anisotropic_stats(model).items() if k[0] != 1}


def _wrong_shape(model):
    stats = anisotropic_stats(model)
    stats[(1, "down")] = torch.eye(128)  # down reads the 344-wide MLP activation
    return stats


# kind -> (tensorize keyword arguments given the model, words the message must hold)
AA_FAILURES = {
    "unknown init": (lambda m: {"init": "activation-aware"}, ["'activation-aware'", "Did you mean 'activation_aware'"]),
    "no stats": (lambda m: {"init": "activation_aware"}, ["needs stats", "activation_stats"]),
    "stats of a block missing": (lambda m: {"init": "activation_aware", "stats": _stats_without_block_1(m)},
                                 ["6 planned matrices", "1.k", "Nothing was changed"]),
    "stats of the wrong shape": (lambda m: {"init": "activation_aware", "stats": _wrong_shape(m)},
                                 ["'1.down'", "(128, 128)", "not (344, 344)"]),
    "unknown option": (lambda m: {"init": "activation_aware", "stats": anisotropic_stats(m), "aa_options": {"sweep": 2}},
                       ["['sweep']", "inner"]),
    "stats with tt_svd": (lambda m: {"stats": anisotropic_stats(m)}, ["init='tt_svd'", "init='activation_aware'"]),
}


@pytest.mark.parametrize("kind", AA_FAILURES)
def test_bad_activation_aware_input_leaves_the_model_as_it_was(kind):
    model = model_of(llama2_shaped())
    T.tensorize(model, T.Plan({"0.q": {"chi": 4}}))  # an already-compact model: its state must survive too
    before = _state(model)
    kwargs, words = AA_FAILURES[kind]
    with pytest.raises(ValueError) as err:
        T.tensorize(model, T.Plan.uniform(2, target_ratio=0.3, matrices=("k", "v", "o", "gate", "up", "down")),
                    **kwargs(model))
    for w in words:
        assert w in str(err.value), str(err.value)
    _assert_unchanged(model, before)


def test_failure_during_activation_aware_decomposition_rolls_back(monkeypatch):
    model = model_of(llama2_shaped())
    before = _state(model)
    calls, real = {"n": 0}, T.aa_init.decompose

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(T.aa_init, "decompose", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        T.tensorize(model, T.Plan.uniform(2, chi=4), init="activation_aware", stats=anisotropic_stats(model))
    _assert_unchanged(model, before)


def test_config_init_choice_and_activation_stats(tiny_llama_dir):
    from compactify import aa_init
    from compactify.config import ConfigError, load_config
    from compactify.frontier import FrontierError
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="tensorize.init.*'ttsvd'.*Did you mean 'tt_svd'"):
        load_config(None, {"tensorize.init": "ttsvd"})
    cfg = load_config(None, {"tensorize.init": "activation_aware", "frontier.calib_tokens": 300,
                             "frontier.calib_seq_len": 64})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plan = T.Plan.uniform(2, target_ratio=0.5, blocks=[1], matrices=("q", "down"))
    stats, calibration = aa_init.activation_stats(model, tok, cfg, plan)
    assert calibration == {"split": "heal", "tokens": 256, "seq_len": 64, "seed": 0}
    assert {b for b, _ in stats} == {1} and stats[(1, "down")].shape == (96, 96)
    assert torch.linalg.eigvalsh(stats[(1, "q")].double()).min() > -1e-6  # a second moment: PSD
    aa_init.tensorize_from_config(model, tok, plan, cfg)
    assert model.config.compactify["init"] == "activation_aware"
    assert model.config.compactify["activation_aware"]["calibration"]["split"] == "heal"
    assert model.config.compactify["activation_aware"]["inner"] == cfg["frontier"]["aa_inner"]
    with pytest.raises(FrontierError, match="heldout"):
        aa_init.activation_stats(model, tok, load_config(None, {"frontier.calib_split": "heldout"}))
