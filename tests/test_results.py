import json
import os

import pytest

from compactify.results import atomic_write_bytes, read_json, save_results, write_json


def test_save_results_records_provenance(tmp_path):
    p = save_results(tmp_path / "r.json", {"ppl": float("nan"), "acc": 0.5}, {"name": "t", "seed": 3, "model": "m"})
    data = read_json(p)
    assert data["acc"] == 0.5 and data["ppl"] is None
    meta = data["meta"]
    assert meta["seed"] == 3 and meta["model"] == "m" and meta["versions"]["torch"]
    assert meta["device"]["device"] in ("cpu", "cuda") and "timestamp" in meta


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_json(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b'{"v": 2')
    assert json.loads(p.read_text()) == {"v": 1}
    assert not [f for f in tmp_path.iterdir() if f.name != "r.json"], "temporary file left behind"


@pytest.mark.parametrize("name,content,words", [
    ("03_tensorize.json", b'{"meta": {"seed": 0}, "main": {"size_rep', ["03_tensorize.json", "notebook 03_tensorize",
                                                                        "in the middle of the JSON"]),
    ("06_evaluate.json", b'{"a": 1,, "b": 2}', ["notebook 06_evaluate", "line 1, column 9"]),
    ("00_baseline.json", b'\xff\xfe{"a": 1}', ["notebook 00_model_and_baseline", "not UTF-8"]),
    ("mpo_linear.json", b"", ["benchmarks/mpo_linear.py"]),
])
def test_corrupt_result_names_the_file_and_its_notebook(tmp_path, name, content, words):
    from compactify.results import ResultFileError

    folder = tmp_path / ("benchmarks" if name == "mpo_linear.json" else "results")
    folder.mkdir()
    (folder / name).write_bytes(content)
    with pytest.raises(ResultFileError) as err:
        read_json(folder / name)
    for w in words + [str(folder / name), "Rerun"]:
        assert w in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError):  # a missing file is still a missing file
        read_json(tmp_path / "nope.json")


def test_one_map_names_the_producer_of_every_result_file():
    from compactify import report, results, run

    assert results.PRODUCERS is run.PRODUCERS and report.PRODUCERS is run.PRODUCERS
    assert set(run.PRODUCERS) >= {"00_baseline.json", "03_tensorize.json", "04_quantize.json", "05_heal.json",
                                  "06_evaluate.json", "07_frontier.json"}


def test_dirty_means_code_changed_not_that_a_run_wrote_its_outputs(tmp_path, monkeypatch):
    import subprocess

    from compactify import results as R

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    for rel in ("src/code.py", "data/results/a.json", "figures/f.png", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(R, "REPO_ROOT", tmp_path)
    clean = R.git_commit()
    assert clean and not clean.endswith("+dirty")
    for rel in ("data/results/a.json", "figures/f.png", "README.md"):  # what runs write
        (tmp_path / rel).write_text("1")
    assert R.git_commit() == clean
    (tmp_path / "src/code.py").write_text("1")
    assert R.git_commit() == clean + "+dirty"


def test_results_say_which_cpu_path_made_them(monkeypatch):
    """Two machines both named "AMD EPYC" here differ 2-3x in bf16 speed: the meta and the footer say which."""
    import torch

    from compactify.figures import footer
    from compactify.perplexity import fast_bf16
    from compactify.results import cpu_isa, device_info

    isa = device_info("cpu")["cpu_isa"]
    assert isa == cpu_isa()
    assert (isa in ("AMX", "AVX512-BF16")) == fast_bf16(torch.device("cpu"))  # the study computes in bf16 exactly there
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_isa() == "AVX512-BF16"
    meta = {"device": {"device": "cpu", "cpu": "AMD EPYC", "torch_threads": 2, "cpu_isa": "AVX2"}}
    assert "(AMD EPYC, AVX2, 2 threads)" in footer(meta)
    del meta["device"]["cpu_isa"]  # results made before the ISA was recorded keep their old footer
    assert "(AMD EPYC, 2 threads)" in footer(meta)
