"""compactify.paper_models (the paper's five models for notebooks 04 and 06) and the step functions
those notebooks share with compactify.speed and compactify.figures: one recipe per model, no
stand-in when notebook 03 has not run, earlier evaluations reused only when made with the same
settings, timing under the same conditions for every model and everything put back."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from compactify import paper, run, speed
from compactify import paper_models as PM
from compactify.config import load_config
from compactify.results import save_results
from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")

QC = {"quant_type": "nf4", "double_quant": True, "int8_threshold": 6.0, "half_dtype": "bfloat16", "embeddings": False,
      "save_models": True}
IDS = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))


def tiny(seed=0):
    return tiny_llama(seed, vocab_size=512, hidden_size=128, intermediate_size=256)  # shapes bnb's CPU 4-bit kernel takes


@pytest.fixture(scope="module")
def tensorized():
    import compactify.tensorize as T

    return T.tensorize(tiny(1), T.Plan.uniform(2, chi=8, matrices=T.WITHOUT_DOWN))  # down_proj left dense


def cfg_at(tmp_path, **overrides):
    return load_config("configs/smoke.yaml", {"run_dir": str(tmp_path / "run"), **overrides})


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the five models

def test_paper_models_follow_the_config_and_leave_their_sources_alone(tensorized):
    original = tiny()
    before, before_t = state(original), state(tensorized)
    models = PM.paper_models(original, tensorized, {**QC, "quant_type": "fp4", "int8_threshold": 3.0})
    assert tuple(models) == paper.PAPER_MODELS and models["original"] is original
    q8 = models["8-bit"].model.layers[0].self_attn.q_proj
    assert isinstance(q8, bnb.nn.Linear8bitLt) and q8.state.threshold == 3.0
    q4 = models["4-bit"].model.layers[1].mlp.down_proj
    assert isinstance(q4, bnb.nn.Linear4bit) and q4.weight.quant_type == "fp4"
    assert not isinstance(models["4-bit"].lm_head, bnb.nn.Linear4bit)  # embeddings: false, as bitsandbytes does
    assert {p.dtype for p in models["88%"].parameters()} == {torch.bfloat16}
    assert PM.linear4bit_names(models["93%"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert type(models["93%"].model.layers[0].mlp.up_proj).__name__ == "MPOLinear"
    assert not any(m.training for m in models.values())
    for src, kept in ((original, before), (tensorized, before_t)):  # built from copies
        assert all(torch.equal(v, kept[k]) for k, v in src.state_dict().items())
    assert PM.block_matrix_kinds(tensorized) == {"MPOLinear": 12, "Linear": 2}


def test_build_and_size_saves_the_quantized_models_before_they_run(tmp_path, tensorized, monkeypatch):
    import compactify.quantize as Q

    cfg = cfg_at(tmp_path, **{f"quantize.{k}": v for k, v in QC.items()})
    saved = {}

    def fake_save(model, tokenizer, out_dir):
        Q._check_saveable(model)  # raises if a forward pass had repacked the 4-bit weights already
        saved[out_dir.name] = out_dir
        return {"safetensors_bytes": 1, "dir": str(out_dir)}

    monkeypatch.setattr(Q, "save_quantized", fake_save)
    models, built = PM.build_and_size(tiny(), tensorized, None, cfg)
    assert list(built) == list(models) == list(paper.PAPER_MODELS)
    assert saved == {d: tmp_path / "run" / "models" / d for d in ("int8", "nf4", "mixed")}
    assert built["88%"]["disk"]["safetensors_bytes"] > 0 and "dir" not in built["88%"]["disk"]  # measured, not kept
    assert built["88%"]["memory_at_rest"]["bytes"] < built["original"]["memory_at_rest"]["bytes"]
    assert all(b["build_seconds"] >= 0 for b in built.values())
    saved.clear()
    PM.build_and_size(tiny(), tensorized, None, cfg_at(tmp_path, **{"quantize.save_models": False}))
    assert saved == {}


def test_no_stand_in_without_notebook_03(tmp_path, monkeypatch):
    import compactify.models as M

    cfg = cfg_at(tmp_path)
    with pytest.raises(run.RunInputError, match="run notebook 03_tensorize"):
        PM.tensorized_start(cfg)
    loaded = []
    monkeypatch.setattr(M, "load_model", lambda d, dtype, device: (loaded.append(d) or "model", None))
    run.path(cfg, "tensorized").mkdir(parents=True)
    (run.path(cfg, "tensorized") / "config.json").write_text("{}")
    save_results(run.path(cfg, "tensorize"), {"main": {}}, cfg)
    model, source = PM.tensorized_start(cfg)
    assert loaded == [run.path(cfg, "tensorized")] and source.startswith("unhealed (notebook 03; healing comes")
    run.path(cfg, "healed").mkdir(parents=True)  # a healed model made with other heal settings is not used
    (run.path(cfg, "healed") / "config.json").write_text("{}")
    save_results(run.path(cfg, "heal"), {}, cfg_at(tmp_path, **{"heal.lr": 1e-5}))
    _, source = PM.tensorized_start(cfg)
    assert loaded[-1] == run.path(cfg, "tensorized") and "the healed model is not used" in source
    save_results(run.path(cfg, "heal"), {}, cfg)
    _, source = PM.tensorized_start(cfg)
    assert loaded[-1] == run.path(cfg, "healed") and source == f"healed (notebook 05): {run.path(cfg, 'healed')}"


def test_both_halves_reuse_the_built_model(tensorized):
    import compactify.quantize as Q

    m88 = Q.to_half(copy.deepcopy(tensorized), "bfloat16")
    halves = PM.both_halves(m88, tensorized)
    assert halves["bfloat16"] is m88 and next(halves["float16"].parameters()).dtype == torch.float16


# ----------------------------------------------------------------------------- quality, bytes and claims

def test_next_token_quality_is_zero_against_itself_and_positive_for_another_model():
    a = tiny()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.mul_(3)
    q = PM.next_token_quality({"original": a, "changed": b}, IDS)
    assert q["original"] == {"kl_to_original": 0.0, "top1_agreement": 1.0}
    assert q["changed"]["kl_to_original"] > 1e-4 and 0 <= q["changed"]["top1_agreement"] <= 1


def test_model_rows_and_memory_table():
    def size(nbytes, params):
        return {"bytes": nbytes, "params": params, "bits_per_param": 8 * nbytes / params,
                "params_by_precision": {"float32": params}}

    built = {"original": {"build_seconds": 0.0, "memory_at_rest": size(400, 100), "disk": {"safetensors_bytes": 410}},
             "88%": {"build_seconds": 1.0, "memory_at_rest": size(100, 50), "disk": {"error": "cannot save"}}}
    in_use = {"original": size(400, 100), "88%": size(120, 50)}
    quality = {n: {"kl_to_original": 0.0, "top1_agreement": 1.0} for n in built}
    t1 = paper.paper_table1_check()
    rows = PM.model_rows(built, in_use, quality, t1)
    assert rows["88%"]["memory_ratio_vs_fp32"] == 120 / 400  # in use over the original at rest
    assert math.isnan(rows["88%"]["disk_ratio_vs_fp32"]) and rows["original"]["disk_ratio_vs_fp32"] == 1
    assert rows["88%"]["paper_ratio_vs_fp32"] == pytest.approx(4.1 / 27.1)
    table = PM.memory_table(rows)
    assert list(table.index) == ["original", "88%"] and table.loc["88%", "MB in use"] == 120 / 1e6
    assert table.loc["88%", "precision"] == "float32 100%"


def test_speed_claims_come_from_the_paper():
    sp = {"original": {}, "4-bit": {"prefill_ratio": 0.8, "decode_ratio": 1.1},
          "88%": {"prefill_ratio": 1.5, "decode_ratio": 0.9}}
    v = PM.speed_claims(sp)
    assert v["4-bit"]["paper"] == "13% slower than the original"
    assert v["88%"]["paper"] == "more than 25% faster than the original"
    assert v["4-bit"]["paper_ratio"] == paper.speed_ratio("4-bit") == 1 / 1.13
    assert v["4-bit"]["direction_holds"] == {"prefill": True, "decode": False}
    assert v["88%"]["direction_holds"] == {"prefill": True, "decode": False}
    assert list(PM.speed_claims({"4-bit": sp["4-bit"]})) == ["4-bit"]


# ----------------------------------------------------------------------------- notebook 06's evaluations

def _evaluation(score, tasks=("mmlu", "piqa")):
    return {"tasks": {t: {"value": score, "stderr": 0.1, "n": 8} for t in tasks},
            "perplexity_texts": {"brown-heldout": {"ppl": 40.0}}}


def test_earlier_evaluations_are_reused_only_with_the_same_settings(tmp_path):
    cfg = cfg_at(tmp_path)
    save_results(run.path(cfg, "baseline"), {"baseline": _evaluation(0.5)}, cfg)
    save_results(run.path(cfg, "heal"), {"after": _evaluation(0.4)}, cfg_at(tmp_path, **{"eval.limit": {"mmlu": 2}}))
    reused, why_not = PM.earlier_evaluations(cfg)
    assert reused == {"original": _evaluation(0.5)}
    assert "missing: run notebook 03_tensorize" in why_not["tensorized (unhealed)"]
    assert why_not["healed (fp32)"] == "scored with other eval settings"


def test_evaluate_all_scores_only_what_is_not_reused(monkeypatch, capsys):
    import compactify.evaluate as E

    scored = []
    monkeypatch.setattr(E, "evaluate_model", lambda m, tok, cfg, heldout_ids: scored.append(m) or _evaluation(0.3, ("mmlu",)))
    reused = {"original": _evaluation(0.5), "healed (fp32)": _evaluation(0.4)}
    evals = PM.evaluate_all({"original": "m0", "8-bit": "m8"}, None, {}, {}, reused)
    assert scored == ["m8"] and list(evals) == ["original", "8-bit", "healed (fp32)"]
    assert evals["original"] is reused["original"] and "8-bit: evaluated in" in capsys.readouterr().out
    assert PM.common_tasks(evals) == ["mmlu"]  # piqa is not in every evaluation
    table = PM.score_table(evals)
    assert list(table.index) == ["mmlu (n=8)", "ppl brown-heldout"] and table.loc["mmlu (n=8)", "8-bit"] == "30.0 ± 10.0"


# ----------------------------------------------------------------------------- compactify.speed steps

def test_round_robin_forward_alternates_and_drops_the_warm_up(monkeypatch):
    calls = []

    def fake(model, ids, repeats, warmup):
        calls.append(model)
        return {"median_s": float(len(calls))}

    monkeypatch.setattr(speed, "time_forward", fake)
    out = speed.round_robin_forward({"a": "A", "b": "B"}, IDS, repeats=2)
    assert calls == ["A", "B"] * 3
    assert out["a"]["values"] == [3.0, 5.0] and out["b"]["values"] == [4.0, 6.0] and out["a"]["n"] == 2


def test_timing_setup_puts_everything_back(tensorized, monkeypatch):
    import compactify.evaluate as E
    import compactify.quantize as Q

    monkeypatch.setattr(E, "fast_bf16", lambda device: False)  # a CPU without fast bf16: 16-bit runs as fp32 copies
    half = Q.to_half(copy.deepcopy(tensorized), "bfloat16")
    dense = tiny()
    threads = torch.get_num_threads()
    layer = half.model.layers[0].mlp.up_proj
    mode = layer.mode
    with speed.timing_setup({"dense": dense, "half": half}, threads=1, mpo_mode="contracted") as upcast:
        assert torch.get_num_threads() == 1 and layer.mode == "contracted"
        assert upcast["dense"] is None and upcast["half"] and layer.cores[0].dtype == torch.float32
    assert torch.get_num_threads() == threads and layer.mode == mode and layer.cores[0].dtype == torch.bfloat16


def test_inference_times_relative_to_the_first_model_under_the_setup(monkeypatch):
    import compactify.evaluate as E

    cfg = {"quantize": {"speed": {"threads": 1, "mpo_mode": None, "new_tokens": 3, "repeats": 1, "order": "rotated"}}}
    seen = {}

    def fake_tasks(models, tok, cfg, tasks, decisions):
        seen["threads"] = torch.get_num_threads()
        decisions["b"] = {"piqa": 0.5}
        return {"a": {"piqa": 2.0}, "b": {"piqa": 3.0}}

    monkeypatch.setattr(E, "task_times", fake_tasks)
    monkeypatch.setattr(speed, "compare", lambda *a, **k: {"a": "speed"})
    t = speed.inference_times({"a": tiny(), "b": tiny()}, None, cfg, ["piqa"], IDS, "prompt")
    assert seen["threads"] == t["threads"] == 1
    assert t["task_time_vs_original"] == {"a": {"piqa": 1.0}, "b": {"piqa": 1.5}}
    assert t["decide_seconds"] == {"b": {"piqa": 0.5}} and t["speed"] == {"a": "speed"}


def test_speed_table_and_quantize_figure():
    import matplotlib.pyplot as plt

    from compactify import figures

    def st(m):
        return {"median": m, "iqr": 0.1, "q1": m - 0.05, "q3": m + 0.05}

    sp = {n: {"prefill": st(10.0 * r), "decode": st(2.0 * r), "prefill_ratio": r, "decode_ratio": r,
              "decode_ratio_rounds": {"iqr": 0.0}} for n, r in (("original", 1.0), ("4-bit", 0.8), ("88%", 1.4))}
    sp["_setup"] = {"threads": 1}
    table = speed.table(sp)
    assert list(table.index) == ["original", "4-bit", "88%"] and table.loc["88%", "decode tok/s"] == 2.8
    rows = {n: {"memory_ratio_vs_fp32": r, "disk_ratio_vs_fp32": r, "paper_ratio_vs_fp32": r}
            for n, r in (("original", 1.0), ("4-bit", 0.3), ("88%", 0.2))}
    fig = figures.quantize_figure({"models": rows, "speed": sp, "speed_claims": PM.speed_claims(sp)}, "speed on a CPU")
    a, b = fig.axes
    ticks = [tuple(p) for c in b.collections for p in c.get_offsets()]
    assert (1, pytest.approx(1 / 1.13)) in ticks and (2, pytest.approx(1 / 0.75)) in ticks  # the paper's claims
    assert b.get_title() == "speed on a CPU" and [t.get_text() for t in b.get_legend().get_texts()][0] == "paper"
    plt.close(fig)
