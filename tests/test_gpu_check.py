"""`make gpu-check` (scripts/gpu_check.py) without a GPU: the refusal writes nothing, and the dry run
records every stage at tiny CPU shapes (the notebook stage skipped: minutes on 2 cores)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
GPU_OUT = REPO / "data" / "results" / "gpu"


def _run(*args, timeout=240, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


def _listing():
    return sorted(str(p) for p in GPU_OUT.rglob("*")) if GPU_OUT.exists() else []


def test_refuses_without_cuda_and_writes_nothing():
    before = _listing()
    p = _run(timeout=120, CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 2, p.stderr
    assert "make gpu-check needs a CUDA device; none found (torch" in p.stderr
    assert "Nothing was written." in p.stderr
    assert _listing() == before


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, problem", [(["--stages", "scale,warp"], "unknown stage"),
                                           (["--stages", ","], "unknown stage"),
                                           (["--budget-s", "0"], "positive number"),
                                           (["--dry-run", "--out", str(GPU_OUT / "x")], "never writes under")])
def test_bad_arguments_are_named(args, problem, capsys):
    before = _listing()
    with pytest.raises(SystemExit) as e:
        _module().parse(args)
    assert e.value.code == 2 and problem in capsys.readouterr().err
    assert _listing() == before


def test_dry_run_records_every_stage(tmp_path):
    p = _run("--dry-run", "--stages", "scale,lowrank,compiled", "--out", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["complete"] is True and r["dry_run"] is True and r["device"]["name"] == "cpu (dry run)"
    assert set(r["stages"]) == {"scale", "lowrank", "compiled", "roofline", "notebooks"}
    for name in ("scale", "lowrank", "compiled"):
        st = r["stages"][name]
        assert st["status"] == "ok", st
        assert Path(st["output"]).is_file() and Path(st["log"]).is_file()
    for name in ("roofline", "notebooks"):
        assert r["stages"][name] == {"status": "skipped", "why": "not in --stages"}
    lr = json.loads(Path(r["stages"]["lowrank"]["output"]).read_text())
    assert set(lr["models"]) == {"dense", "mpo", "lowrank"}
    for m in ("mpo", "lowrank"):  # both compressed formats at (about) 70% fewer block parameters
        assert 0.2 < lr["models"][m]["block_params_ratio"] <= 0.3
    t = r["targets"]
    assert set(t) == {"decomposition_s", "decode_ratio", "heal_tokens_ratio", "heal_peak_memory_ratio"}
    for k, v in t.items():
        assert v["applies"] is False and isinstance(v["met"], bool) and v["measured"] is not None, (k, v)
    assert t["decomposition_s"]["matrices"] == 7  # one block of seven matrices at the tiny shape
    assert re.fullmatch(r"(mpo|lowrank) \((eager|compiled), 1 blocks\)", t["decode_ratio"]["format"]), t["decode_ratio"]
    # the compiled stage: every model in both decode runtimes, each ratio against dense in its own runtime
    c = json.loads(Path(r["stages"]["compiled"]["output"]).read_text())
    assert c["config"]["decode"] == ["eager", "compiled"] and set(c["decode_runtimes"]) == {"eager", "compiled"}
    for by in c["decode_runtimes"].values():
        assert set(by) == {"dense", "mpo", "lowrank"} and by["dense"]["decode_ratio_to_dense"] == 1.0


def test_roofline_only_if_present(tmp_path, monkeypatch):
    """benchmarks/roofline.py is called as a subprocess when the file exists, else recorded as skipped."""
    mod = _module()
    monkeypatch.setattr(mod, "REPO", tmp_path)
    args = mod.parse(["--dry-run", "--out", str(tmp_path / "out")])
    assert mod.stage_commands(args, "python")["roofline"] == "not present (benchmarks/roofline.py)"
    assert mod.run_stage("roofline", "not present (benchmarks/roofline.py)", 1e12, False, tmp_path / "l.log") == \
        {"status": "skipped", "why": "not present (benchmarks/roofline.py)"}
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "roofline.py").write_text("import sys; sys.exit(3)\n")
    cmd, out_json = mod.stage_commands(args, sys.executable)["roofline"]
    assert cmd[1:4] == [str(tmp_path / "benchmarks" / "roofline.py"), "--device", "cpu"]
    assert "--random-weights" in cmd   # the GPU machine has no copy of SmolLM2's weights
    rec = mod.run_stage("roofline", (cmd, out_json), __import__("time").monotonic() + 60, False, tmp_path / "l.log")
    assert rec["status"] == "failed" and rec["error"].startswith("exit 3") and rec["output"] is None


def test_stage_time_limit_and_budget(tmp_path, monkeypatch):
    """A stage past its limit is stopped and recorded as failed; with the budget spent it is skipped."""
    import time

    mod = _module()
    monkeypatch.setitem(mod.LIMITS, "lowrank", 5)
    hang = ([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "x.json")
    t = time.monotonic()
    rec = mod.run_stage("lowrank", hang, t + 60, False, tmp_path / "l.log")
    assert rec["status"] == "failed" and rec["error"] == "timed out after its limit of 5 s"
    rec = mod.run_stage("scale", hang, t + 2, False, tmp_path / "l.log")
    assert rec["status"] == "skipped" and "budget spent" in rec["why"]
