"""compactify.crossrun: two runs of the study paired record by record."""
import math

import pytest

from compactify import crossrun as X
from compactify.results import write_json


def _ppl(nll, sha="abc"):
    return {"ppl": math.exp(sum(nll) / len(nll)), "nll": sum(nll) / len(nll), "tokens": 255 * len(nll), "seq_len": 256,
            "windows": len(nll), "text": "brown-heldout", "ids_sha": sha, "window_nll": list(nll)}


def _task(scores):
    return {"metric": "acc", "versions": 1, "chance": 0.25, "value": sum(scores) / len(scores),
            "samples": {"doc_id": list(range(len(scores))), "score": list(scores), "prompt_hash": ["p"] * len(scores)}}


def _run(root, nll, scores, sha="abc", plan=None):
    root.mkdir()
    base = {"perplexity": _ppl(nll, sha), "perplexity_texts": {"brown-heldout": _ppl(nll, sha)},
            "tasks": {"lambada": _task(scores)}}
    write_json(root / "00_baseline.json", {"meta": {"git_commit": "x"}, "baseline": base})
    if plan is not None:
        write_json(root / "03_tensorize.json", {"main": {"plan": plan}})
    return root


def test_pairs_every_shared_record_and_reports_the_shift(tmp_path):
    nll = [3.0, 3.2, 2.9, 3.1, 3.3, 3.0, 2.8, 3.1]
    a = _run(tmp_path / "a", nll, [1, 0, 1, 1, 0, 1, 1, 1], plan={"entries": {"1.q": 0.5}})
    b = _run(tmp_path / "b", [x + 0.1 for x in nll], [1, 0, 1, 0, 0, 1, 1, 1], plan={"entries": {"1.q": 0.4}})
    r = X.compare_runs(a, b, names=("bf16", "fp32"))
    # "perplexity" beside "perplexity_texts" is the same record and is not counted twice
    assert list(r["perplexity"]) == ["00_baseline.json:baseline/perplexity_texts/brown-heldout"]
    row = r["headline"]["dense (notebook 00)"]["brown-heldout"]
    assert row["ppl_ratio"] == pytest.approx(math.exp(0.1))
    assert row["ppl_ratio_lo"] > 1  # every window moved the same way: the interval excludes 1
    f = r["per_file"]["00_baseline.json"]
    assert f["excluding_1"] == 1 and f["tasks"] == 1
    assert f["task_diff_max"]["diff"] == pytest.approx(-12.5)
    assert r["plan_same"] is False


def test_identical_runs_agree_exactly(tmp_path):
    nll = [3.0, 3.2, 2.9, 3.1]
    a = _run(tmp_path / "a", nll, [1, 0, 1, 1], plan={"entries": {}})
    b = _run(tmp_path / "b", nll, [1, 0, 1, 1], plan={"entries": {}})
    r = X.compare_runs(a, b)
    assert r["per_file"]["00_baseline.json"]["ratio_max"] == 1.0 and r["plan_same"] is True
    assert r["unpaired"] == []


def test_other_windows_are_listed_as_unpaired_not_compared(tmp_path):
    a = _run(tmp_path / "a", [3.0, 3.1], [1, 0])
    b = _run(tmp_path / "b", [3.0, 3.1], [1, 0], sha="other")
    r = X.compare_runs(a, b)
    assert r["perplexity"] == {} and len(r["unpaired"]) == 1
    assert "ids_sha" in r["unpaired"][0]["why"]
    assert r["plan_same"] is None  # neither run has a notebook 03 result


def test_folders_without_shared_results_are_refused(tmp_path):
    a = _run(tmp_path / "a", [3.0], [1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="share no notebook result files"):
        X.compare_runs(a, tmp_path / "empty")


def test_reproduce_warns_on_a_cpu_without_fast_bf16_with_the_measured_time(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = tmp_path / "results"
    (res / "crossrun").mkdir(parents=True)
    assert "no fast bf16" in X.slow_machine_note({"device": "auto"}, res)
    write_json(res / "crossrun" / "avx2.json", {"names": ["AVX512-BF16", "AVX2"], "meta": {},
                                                "compute": {"AVX512-BF16": "autocast-bf16", "AVX2": "fp32"},
                                                "timings": {"config": "/x/configs/default.yaml", "total_seconds": 6000}})
    note = X.slow_machine_note({"device": "cpu"}, res)
    assert "default.yaml's notebooks took 100 minutes on a 2-core AVX2 machine" in note
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert X.slow_machine_note({"device": "cpu"}, res) is None  # the reference machine: nothing to say


def test_points_another_machine_scored_twice_apart_are_found_and_circled(tmp_path):
    from compactify.figures_frontier import frontier

    res = tmp_path / "results"
    (res / "crossrun").mkdir(parents=True)
    points = [{"method": "asvd", "precision": p, "ratio": 0.5, "bytes_ratio": b, "ppl": v, "stage": "before healing"}
              for p, b, v in (("fp16", 0.25, 900.0), ("nf4", 0.06, 1e5), ("fp16", 0.15, 4600.0), ("nf4", 0.05, 7e6))]
    write_json(res / "07_frontier.json", {"meta": {"git_commit": "5fc88d4abc"}, "points": points})
    # point 3 is 0.34x apart but its interval reaches 1.3: not flagged (the frontier's MPO point)
    rec = {f"07_frontier.json:points/{i}": {"ppl_ratio": r, "ppl_ratio_lo": lo, "ppl_ratio_hi": hi}
           for i, r, lo, hi in ((0, 1.01, 0.99, 1.03), (1, 0.0156, 0.0099, 0.025), (2, 2.5, 2.1, 3.0),
                                (3, 0.34, 0.06, 1.3))}
    cross = {"names": ["AVX512-BF16", "AVX2"], "perplexity": rec,
             "meta": {"07_frontier.json": {"AVX512-BF16": {"commit": "5fc88d4"}, "AVX2": {"commit": "9e9e507"}}}}
    write_json(res / "crossrun" / "avx2.json", cross)
    found = X.disagreements(res, "07_frontier.json")
    assert set(found) == {"points/1", "points/2"} and found["points/1"]["other"] == "AVX2"
    fig = frontier(points, {"ppl": 42.0}, flagged={int(k.split("/")[1]): v for k, v in found.items()})
    rings = [ln for ax in fig.axes for ln in ax.lines if ln.get_markeredgecolor() == "#d62728"]
    assert len(rings) == 3  # the fp16 point on both panels, the NF4 point on the bytes panel only
    assert "scored 2-64x apart" in fig.texts[-1].get_text()
    # a comparison made from another commit's results may index other points: it flags nothing
    cross["meta"]["07_frontier.json"]["AVX512-BF16"]["commit"] = "0000000"
    write_json(res / "crossrun" / "avx2.json", cross)
    assert X.disagreements(res, "07_frontier.json") == {}
