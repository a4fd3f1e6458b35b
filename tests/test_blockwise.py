"""Block-wise distillation (compactify.blockwise) on a tiny Llama: it brings every compressed block
closer to the dense one, leaves the dense model and the trainable flags as they were, saves like
any compressed model, and refuses settings it cannot run."""
from __future__ import annotations

import copy

import pytest
import torch

import compactify.tensorize as T
from compactify import blockwise
from conftest import tiny_llama


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_relative_error_weighs_every_token_alike():
    """One token 100x larger than the rest: the plain squared error is all that token's, the
    per-token relative error is not (the massive-activation case of the module docstring)."""
    t = torch.ones(1, 4, 8)
    t[0, 0] *= 100.0
    y = t.clone()
    y[0, 1:] = 0.0   # the three ordinary tokens entirely wrong, the large one right
    assert blockwise.relative_error(y, t).item() == pytest.approx(0.75)
    plain = ((y - t) ** 2).sum() / (t ** 2).sum()
    assert plain.item() < 1e-3


def test_distill_blocks_brings_every_block_closer(tmp_path):
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = T.tensorize(copy.deepcopy(dense), T.Plan.uniform(2, target_ratio=0.3))
    frozen_name, frozen = next((n, p) for n, p in model.named_parameters() if "embed" in n)
    frozen.requires_grad_(False)
    ids = torch.randint(0, 49152, (2048,), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))  # text it did not train on
    ref = _hidden(dense, x)
    e0 = float(torch.linalg.norm(_hidden(model, x) - ref))
    rec = blockwise.distill_blocks(dense, model, ids, blockwise.BlockwiseConfig(tokens=2048, epochs=8, lr=1e-2,
                                                                               batch_size=4, seq_len=64))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())   # the dense model is untouched
    assert rec["windows"] == 32 and rec["tokens"] == 2048 and len(rec["blocks"]) == 2
    for b in rec["blocks"]:
        assert b["last_epoch"] < b["first_step"], b
    e1 = float(torch.linalg.norm(_hidden(model, x) - ref))
    assert e1 < 0.9 * e0, (e0, e1)   # measured: 0.80
    # the flags come back as they were: trainable stays trainable, a frozen parameter stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not flags.pop(frozen_name) and all(flags.values())
    assert not model.training
    model.save_pretrained(tmp_path)
    assert torch.equal(_hidden(T.load_compressed(tmp_path), x), _hidden(model, x))


def test_distill_blocks_refuses_what_it_cannot_run():
    dense = tiny_llama()
    with pytest.raises(ValueError, match="must be positive"):
        blockwise.BlockwiseConfig(epochs=0).check()
    with pytest.raises(ValueError, match="less than one window"):
        blockwise.BlockwiseConfig(tokens=100, seq_len=256).check()
    with pytest.raises(ValueError, match="fewer than one window"):
        blockwise.distill_blocks(dense, copy.deepcopy(dense), torch.arange(10),
                                 blockwise.BlockwiseConfig(tokens=256, seq_len=64))
    with pytest.raises(ValueError, match="compressed one 3"):
        blockwise.distill_blocks(dense, tiny_llama(num_hidden_layers=3), torch.arange(512),
                                 blockwise.BlockwiseConfig(tokens=256, seq_len=64))


def test_heal_blockwise_setting_and_notebook_step(tmp_path, tiny_llama_dir):
    """heal.blockwise: null is off, a mapping is checked; notebook 05's step saves the distilled
    start with its record and reuses it when nothing changed, and makes it again when the start did."""
    from compactify.config import load_config

    assert blockwise.settings_from(load_config(None, {})) == blockwise.BlockwiseConfig(32768, 4, 5e-3, 4, 256)  # default: on
    assert blockwise.settings_from(load_config(None, {"heal.blockwise": None})) is None
    with pytest.raises(ValueError, match="heal.blockwise.batch"):   # the config loader names the unknown key
        blockwise.settings_from(load_config(None, {"heal.blockwise": {"tokens": 256, "batch": 2}}))
    made = load_config(None, {})
    made["heal"]["blockwise"] = 5    # a config built in code, not loaded: settings_from checks it too
    with pytest.raises(ValueError, match="tokens, epochs, lr"):
        blockwise.settings_from(made)
    cfg = load_config(None, {"model": str(tiny_llama_dir), "heal.seq_len": 64, "heal.batch_per_rank": 2,
                             "heal.blockwise": {"tokens": 256, "epochs": 1, "lr": 1e-3}})
    assert blockwise.settings_from(cfg) == blockwise.BlockwiseConfig(256, 1, 1e-3, 2, 64)
    from transformers import AutoModelForCausalLM

    start = T.tensorize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), T.Plan.uniform(2, target_ratio=0.3))
    start.save_pretrained(tmp_path / "start")
    rec = blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", cfg, progress=False)
    assert not rec["reused"] and rec["tokens"] == 256 and (tmp_path / "bw" / "blockwise.json").is_file()
    assert T.load_compressed(tmp_path / "bw").config.compactify["plan"] == start.config.compactify["plan"]
    assert blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", cfg, progress=False)["reused"]
    start.save_pretrained(tmp_path / "start")   # notebook 03 made the start again: the step runs again
    assert not blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", cfg, progress=False)["reused"]


def test_blockwise_start_script_refuses_a_run_whose_notebook_05_already_healed_a_blockwise_start(tmp_path):
    """scripts/blockwise_start.py pairs the block-wise start with notebook 05's plain healing: a run
    made with heal.blockwise on has none, and the script says so instead of pairing like with like."""
    import importlib.util
    import json

    from compactify.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("blockwise_start", REPO_ROOT / "scripts" / "blockwise_start.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "03_tensorize.json").write_text(json.dumps({"main": {}}))
    (tmp_path / "results" / "05_heal.json").write_text(json.dumps({"blockwise": {"tokens": 128}, "improved": None}))
    with pytest.raises(SystemExit, match="already healed a block-wise start"):
        mod.main(["--starts", "tt_svd", "--set", f"run_dir={tmp_path}"])


def _heal_long_script():
    import importlib.util

    from compactify.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("heal_long", REPO_ROOT / "scripts" / "heal_long.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_heal_long_blockwise_needs_the_step_and_notebook_05s_start(tmp_path):
    """``scripts/heal_long.py --blockwise`` heals notebook 05's block-wise start for longer: a config
    without the step, a run without that start, or a second start named beside it are refused
    with what to do, before any healing."""
    from compactify import run
    from compactify.config import load_config
    from compactify.results import save_results

    mod = _heal_long_script()
    out = tmp_path / "long.json"
    with pytest.raises(SystemExit, match="heal.blockwise: null"):
        mod.main(["--config", "configs/smoke.yaml", "--blockwise", "--out", str(out), "--set", f"run_dir={tmp_path}",
                  "heal.blockwise=null"])
    with pytest.raises(run.RunInputError, match="tensorized_bw is missing: run notebook 05_heal"):
        mod.main(["--config", "configs/smoke.yaml", "--blockwise", "--out", str(out), "--set", f"run_dir={tmp_path}",
                  "heal.blockwise.tokens=128"])
    cfg = load_config("configs/smoke.yaml", {"run_dir": str(tmp_path), "heal.blockwise.tokens": 128})
    run.path(cfg, "tensorized_bw").mkdir(parents=True)
    (run.path(cfg, "tensorized_bw") / "config.json").write_text("{}")
    save_results(run.path(cfg, "heal"), {"blockwise": {"tokens": 128}}, cfg)
    assert run.require(cfg, "tensorized_bw") == tmp_path / "models" / "tensorized_bw"
    other = load_config("configs/smoke.yaml", {"run_dir": str(tmp_path), "heal.blockwise.tokens": 256})
    with pytest.raises(run.RunInputError, match="heal.blockwise.tokens: 128 -> 256"):
        run.require(other, "tensorized_bw")
    assert run.require(load_config("configs/smoke.yaml", {"run_dir": str(tmp_path), "heal.blockwise.tokens": 128,
                                                          "heal.lr": 3e-4}), "tensorized_bw")  # healing's own rate
    batches = load_config("configs/smoke.yaml", {"run_dir": str(tmp_path), "heal.blockwise.tokens": 128,
                                                 "heal.batch_per_rank": 2})  # the step's batches are healing's
    with pytest.raises(run.RunInputError, match="heal.batch_per_rank"):
        run.require(batches, "tensorized_bw")
    with pytest.raises(SystemExit):
        mod.main(["--blockwise", "--start", str(tmp_path), "--out", str(out)])
    assert not out.exists()


def test_heal_long_draws_notebook_05s_run_only_beside_a_long_run_of_the_same_start(tmp_path):
    """The open circle of the long-run figure is notebook 05's full run of the same start: a block-wise
    notebook 05 beside the long run of notebook 03's model (or the reverse) is left out."""
    import json

    mod = _heal_long_script()
    heal = {"heal": {"plan": {"tokens": 1000}}, "after": {"perplexity_texts": {"brown-heldout": {"ppl": 200.0}}}}
    (tmp_path / "05_heal.json").write_text(json.dumps(heal))
    assert mod.earlier_runs(tmp_path) == [{"tokens": 1000, "ppl": 200.0, "source": "05_heal.json"}]
    assert mod.earlier_runs(tmp_path, blockwise=True) == []
    (tmp_path / "05_heal.json").write_text(json.dumps({**heal, "blockwise": {"tokens": 128}}))
    assert mod.earlier_runs(tmp_path) == []
    assert mod.earlier_runs(tmp_path, blockwise=True)[0]["ppl"] == 200.0


def test_a_long_run_of_a_recovery_start_is_drawn_beside_that_starts_healing_on_the_recovery_curve(tmp_path):
    """``heal_long.py --start <run>/recovery/keep0.7_asvd/start_bw``: the open circle is the recovery
    curve's healing of that start (recovery_curve_bw.json, keep 0.7, asvd_bw), not notebook 05's run; a
    folder the recovery curve did not write, or a point it did not publish, gives none."""
    import json

    from compactify.recovery import full_run_of

    mod = _heal_long_script()
    mod.ROOT = tmp_path / "root"  # full_runs reads ROOT/data/results
    assert mod.full_runs(tmp_path / "run" / "recovery" / "keep0.7_asvd" / "start_bw") == []
    results = tmp_path / "root" / "data" / "results"
    (results / "heal").mkdir(parents=True)
    point = {"keep": 0.7, "start": "asvd_bw", "tokens": 4096, "source": "scripts/recovery_curve.py",
             "after": {"brown-heldout": {"ppl": 83.9}, "boolq-wiki": {"ppl": 70.0}}}
    other = {**point, "keep": 0.5, "after": {"brown-heldout": {"ppl": 135.9}}}
    nb05 = {**point, "keep": 0.3, "source": "05_heal.json"}  # notebook 05 healed notebook 03's start, not the folder's
    (results / "heal" / "recovery_curve_bw.json").write_text(json.dumps({"points": [other, point, nb05]}))
    run = tmp_path / "run" / "recovery"
    got = full_run_of(run / "keep0.7_asvd" / "start_bw", results)
    assert got["tokens"] == 4096 and got["ppl"] == 83.9 and "0.7 kept, asvd_bw" in got["source"]
    assert full_run_of(run / "keep0.5_asvd" / "start_bw", results)["ppl"] == 135.9
    assert full_run_of(run / "keep0.7_asvd" / "start", results) is None  # plain start: recovery_curve.json absent
    assert full_run_of(run / "keep0.3_asvd" / "start_bw", results) is None  # only notebook 05's point there
    assert full_run_of(run / "keep0.2_asvd" / "start_bw", results) is None  # not on the curve
    assert full_run_of(tmp_path / "run" / "models" / "tensorized_bw", results) is None
    assert full_run_of(run / "keepX_asvd" / "start_bw", results) is None
    assert mod.full_runs(run / "keep0.7_asvd" / "start_bw")[0]["ppl"] == 83.9
    # notebook 05's own starts get notebook 05's run (none published here), any other start none
    assert mod.full_runs(tmp_path / "run" / "models" / "tensorized_bw") == []
    assert mod.full_runs(tmp_path / "run" / "models" / "tensorized_aa") == []
    heal = {"heal": {"plan": {"tokens": 1000}}, "after": {"perplexity_texts": {"brown-heldout": {"ppl": 200.0}}},
            "blockwise": {"tokens": 128}}
    (results / "05_heal.json").write_text(json.dumps(heal))
    assert mod.full_runs(tmp_path / "run" / "models" / "tensorized_bw")[0]["ppl"] == 200.0
    assert mod.full_runs(tmp_path / "run" / "models" / "tensorized") == []  # notebook 05 healed the block-wise start
    assert mod.full_runs(tmp_path / "run" / "models" / "tensorized_aa") == []


def test_the_step_can_train_on_rows_the_healing_does_not_start_on(tmp_path, tiny_llama_dir, monkeypatch):
    """heal.blockwise.rows: "first" (default) gives the step the first rows of the shuffled healing data,
    the ones healing then starts on; "last" the last rows. A wrong value is refused; the settings key of a
    "first" step is the one written before the option existed (so its saved starts are still reused)."""
    from compactify.config import load_config
    from compactify.heal_data import packed_data
    from compactify.models import load_model

    with pytest.raises(ValueError, match="rows='middle'"):
        blockwise.BlockwiseConfig(rows="middle").check()
    seen = {}

    def fake(dense, model, ids, cfg=None, **kw):
        seen[cfg.rows] = ids.clone()
        return {"settings": {}, "seconds": 0.0}

    monkeypatch.setattr(blockwise, "distill_blocks", fake)
    from transformers import AutoModelForCausalLM

    start = T.tensorize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), T.Plan.uniform(2, target_ratio=0.3))
    start.save_pretrained(tmp_path / "start")
    base = {"model": str(tiny_llama_dir), "heal.seq_len": 64, "heal.batch_per_rank": 2}
    first = load_config(None, {**base, "heal.blockwise": {"tokens": 256, "epochs": 1, "lr": 1e-3}})
    rec = blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", first, progress=False)
    assert "rows" not in rec["key"]["settings"]
    assert not blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", first, progress=False,
                                           rows="last")["reused"]
    with pytest.raises(ValueError, match="rows='middle'"):
        blockwise.start_from_config(tmp_path / "start", tmp_path / "bw", first, progress=False, rows="middle")
    rows = packed_data(load_model(str(tiny_llama_dir))[1], "heal", 64, int(first["seed"]))
    assert torch.equal(seen["first"], rows) and torch.equal(seen["last"], rows[-4:])  # 256 tokens = 4 rows of 64
    assert not torch.equal(seen["first"].reshape(-1)[:256], seen["last"].reshape(-1))


def test_the_equal_time_control_gets_the_steps_seconds_as_whole_healing_steps():
    """The control of a block-wise start heals its plain start for the healing's tokens plus what the
    step's seconds would have bought at the healing's measured speed, rounded to whole steps."""
    from compactify.blockwise import equal_time_tokens

    assert equal_time_tokens(400.0, 280.0, 114688, 1024) == 114688 + 109 * 1024   # 112,000 tokens -> 109.4 steps
    assert equal_time_tokens(0.0, 280.0, 114688, 1024) == 114688
    assert equal_time_tokens(1.9, 280.0, 4096, 1024) == 4096 + 1024                  # 532 tokens -> one step
    with pytest.raises(ValueError, match="tokens/s"):
        equal_time_tokens(400.0, 0.0, 114688, 1024)


def test_the_warm_up_ramps_the_rate_then_decays_it_and_bad_fractions_are_refused():
    from compactify.blockwise import _cosine
    from compactify.config import load_config

    lrs = [_cosine(s, 100, 1e-2, warmup=5) for s in range(100)]
    assert lrs[:5] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2])  # linear up to the peak in 5 steps
    assert lrs[5] == pytest.approx(1e-2) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # then cosine down
    assert [_cosine(s, 100, 1e-2) for s in range(3)][0] == pytest.approx(1e-2)  # no warm-up: the reference schedule
    for bad in (1.0, -0.1, "5%"):
        with pytest.raises(ValueError, match="blockwise.warmup"):
            blockwise.BlockwiseConfig(warmup=bad).check()
    cfg = load_config(None, {})  # a measurement's setting (scripts/blockwise_warmup.py), not yet a config key
    cfg["heal"]["blockwise"]["warmup"] = 0.05
    assert blockwise.settings_from(cfg).warmup == 0.05


def test_blockwise_warmup_script_refuses_bad_fractions_and_a_config_without_the_step(tmp_path):
    import importlib.util

    from compactify.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("blockwise_warmup", REPO_ROOT / "scripts" / "blockwise_warmup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match=r"--warmups \[0.0, 1.5\]: give fractions"):
        mod.main(["--warmups", "0", "1.5", "--set", f"run_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="heal.blockwise is off"):
        mod.main(["--set", f"run_dir={tmp_path}", "heal.blockwise=null"])
    assert not (tmp_path / "models").exists()  # refused before any work
