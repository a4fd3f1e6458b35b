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
