"""compactify.run: one owner of the run directory. An input is given only if it exists and was made
with the same settings; otherwise the error says which notebook to rerun and what differs."""
from __future__ import annotations

import pytest

from compactify import run
from compactify.config import load_config
from compactify.results import save_results


def cfg_at(tmp_path, **overrides):
    return load_config("configs/smoke.yaml", {"run_dir": str(tmp_path / "run"), **overrides})


def test_path_is_inside_the_run_directory_and_unknown_names_are_refused(tmp_path):
    cfg = cfg_at(tmp_path)
    assert run.path(cfg, "tensorized") == tmp_path / "run" / "models" / "tensorized"
    assert run.path(cfg, "healed") == tmp_path / "run" / "heal" / "tensorized" / "model"
    with pytest.raises(KeyError, match="Unknown artefact 'tensorised'"):
        run.path(cfg, "tensorised")


def test_require_refuses_a_missing_input_naming_the_notebook(tmp_path):
    cfg = cfg_at(tmp_path)
    with pytest.raises(run.RunInputError, match="missing: run notebook 03_tensorize"):
        run.require(cfg, "tensorized")
    run.path(cfg, "tensorized").mkdir(parents=True)
    with pytest.raises(run.RunInputError, match="missing"):  # an empty folder is no model
        run.require(cfg, "tensorized")
    (run.path(cfg, "tensorized") / "config.json").write_text("{}")
    with pytest.raises(run.RunInputError, match="how it was made is unknown"):
        run.require(cfg, "tensorized")


def test_require_checks_the_settings_the_input_was_made_with(tmp_path):
    made = cfg_at(tmp_path)
    (run.path(made, "tensorized")).mkdir(parents=True)
    (run.path(made, "tensorized") / "config.json").write_text("{}")
    save_results(run.path(made, "tensorize"), {"main": {}}, made)
    assert run.require(made, "tensorized") == run.path(made, "tensorized")
    assert run.require(cfg_at(tmp_path, **{"eval.limit": 3}), "tensorized")  # eval does not shape the model
    other = cfg_at(tmp_path, **{"tensorize.keep_ratios": [0.5], "tensorize.main_keep_ratio": 0.5})
    with pytest.raises(run.RunInputError, match=r"other settings \(tensorize.keep_ratios: \[0.3\] -> \[0.5\]; tensorize.main_keep_ratio: .*rerun notebook 03_tensorize"):
        run.require(other, "tensorized")
    calib = cfg_at(tmp_path, **{"frontier.calib_tokens": 64})  # the activation-aware start's calibration
    with pytest.raises(run.RunInputError, match="frontier.calib_tokens: 512 -> 64"):
        run.require(calib, "tensorized")
    assert run.require(cfg_at(tmp_path, **{"frontier.methods": ["svd"]}), "tensorized")  # 07's own settings
