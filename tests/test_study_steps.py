"""The step functions behind notebooks 03 and 05 (compactify.tensorize_study, compactify.heal_study,
compactify.compare.paired): the plans of one budget, the paired rows, and a stale healing set aside."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_llama


def _evaluation(shift: float) -> dict:
    window = [2.0 + shift, 2.1 + shift, 1.9 + shift, 2.2 + shift]
    ppl = {"ppl": float(np.exp(np.mean(window))), "nll": float(np.mean(window)), "tokens": 4 * 63, "seq_len": 64,
           "windows": 4, "text": "brown-heldout", "ids_sha": "abc", "window_nll": window}
    task = {"value": 0.5, "stderr": 0.1, "n": 4, "metric": "acc",
            "samples": {"doc_id": [0, 1, 2, 3], "prompt_hash": ["h0", "h1", "h2", "h3"], "score": [1, 0, 1, int(shift > 0)]}}
    return {"tasks": {"piqa": task}, "perplexity_texts": {"brown-heldout": ppl}}


def test_paired_gives_tasks_and_texts_and_a_summary_row_each():
    from compactify import compare as C

    a, b = _evaluation(0.0), _evaluation(0.5)
    tasks, texts = C.paired(a, b, "before", "after")
    assert set(texts) == {"brown-heldout"}
    assert texts["brown-heldout"]["diff"] == pytest.approx(0.5)
    assert texts["brown-heldout"]["ppl_ratio"] == pytest.approx(np.exp(0.5))
    assert texts == C.compare_texts(a, b, "before", "after")
    table = C.summary_of({"after - before": (tasks, texts)})
    assert tasks["piqa"]["diff"] == pytest.approx(25.0)  # one document of four gained, in points
    assert len(table) == len(tasks) + 1


@pytest.fixture(scope="module")
def choices():
    from compactify import sensitivity as S

    model = tiny_llama(num_hidden_layers=3)
    records = [{"block": b, "type": t, "rel_error": 0.5, "delta_loss": 0.1 * (b + 1)}
               for b in range(3) for t in ("q", "up")]
    return model, S.choices_from_profile(model, records, ratios=[0.2, 0.4, 0.7], cores=2, dense_types=["down"])


@pytest.mark.parametrize("leave_down_dense", [True, False])
def test_plans_of_one_budget_keep_the_same_share(choices, leave_down_dense):
    from compactify import tensorize_study as T
    from compactify.tensorize import size_report, tensorize

    model, opts = choices
    both, alloc, predicted = T.plans(opts, 0.6, 3, cores=2, leave_down_dense=leave_down_dense)
    assert set(both) == {"sensitivity", "uniform"} and predicted > 0
    assert all(alloc[(b, "down")] == 1.0 for b in range(3))  # only offered dense (dense_types)
    kept = {}
    for name, plan in both.items():
        import copy

        totals = size_report(tensorize(copy.deepcopy(model), plan))["totals"]
        kept[name] = totals["block_params_after"] / totals["block_params_before"]
        assert kept[name] <= 0.6 + 0.05
    uniform_types = {key.split(".")[1] for key in both["uniform"].to_dict()["entries"]}
    assert ("down" in uniform_types) is (not leave_down_dense)
    assert kept["uniform"] == pytest.approx(kept["sensitivity"], abs=0.1)


def test_a_healing_of_another_model_is_set_aside(tmp_path, tiny_llama_dir):
    from compactify import heal_study
    from compactify.heal_setup import model_fingerprint
    from compactify.models import load_model

    model_dir = tiny_llama_dir
    model = load_model(model_dir)[0]
    out = tmp_path / "heal" / "tensorized"
    ckpt = out / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "meta.json").write_text(json.dumps({"fingerprint": {"model": model_fingerprint(model)}}))
    assert heal_study.set_aside_stale(out, model_dir) is None and out.is_dir()  # the same start: resumed

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()  # notebook 03 rebuilt the start
    model.save_pretrained(model_dir)
    aside = heal_study.set_aside_stale(out, model_dir)
    assert aside is not None and not out.exists() and (aside / "checkpoints" / "step_3" / "meta.json").is_file()
    assert aside.name.startswith("tensorized.previous-")
    assert heal_study.set_aside_stale(tmp_path / "heal" / "none", model_dir) is None


def test_before_healing_reuses_notebook_03_only_for_the_same_model_and_eval(tmp_path, monkeypatch):
    from compactify import heal_study, run
    from compactify.config import load_config
    from compactify.results import save_results

    cfg = load_config(None, {"run_dir": str(tmp_path / "run")})
    ours, aa = _evaluation(0.0), _evaluation(0.3)
    save_results(run.path(cfg, "tensorize"), {"main": {"model_dir": "m", "evaluation": ours},
                                              "improved": {"evaluation": aa}}, cfg)
    here = _evaluation(1.0)
    monkeypatch.setattr(heal_study, "evaluate_dir", lambda *a, **k: here)
    assert heal_study.before_healing(cfg, "m", None, {}) == (ours, aa, "notebook 03's evaluation of the same model")
    assert heal_study.before_healing(cfg, "other", None, {})[0] is here  # another model
    changed = load_config(None, {"run_dir": str(tmp_path / "run"), "eval.limit": 7})
    assert heal_study.before_healing(changed, "m", None, {}) == (here, None, "evaluated here")  # other eval settings
