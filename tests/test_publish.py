"""make reproduce publishes what it ran: results are published before notebook 08 draws from them,
and the committed figures/claims.md and figures/tables.md are exactly what data/results/ gives."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from compactify import report
from compactify.config import REPO_ROOT

RESULTS = REPO_ROOT / "data" / "results"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO_ROOT / "scripts" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_publish_happens_before_the_figures_notebook_and_08_reads_the_published_results(monkeypatch, tmp_path):
    mod = _runner()
    events = []

    def fake_execute(nb, out, cwd, progress_bar, parameters):
        events.append(("run", nb.rsplit("/", 1)[-1], parameters["overrides"]))

    monkeypatch.setattr(mod.pm, "execute_notebook", fake_execute)
    monkeypatch.setattr(mod, "publish", lambda cfg: events.append(("publish",)))
    monkeypatch.setattr(mod, "publish_notebooks", lambda out, nbs: events.append(("notebooks",)))
    monkeypatch.setattr(mod, "write_json", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["run_notebooks.py", "--config", "configs/smoke.yaml", "--publish",
                                      "--only", "05_heal", "08_figures"])
    assert mod.main() == 0
    kinds = [e[0] if e[0] != "run" else e[1] for e in events]
    assert kinds == ["05_heal.ipynb", "publish", "08_figures.ipynb", "notebooks"]
    assert events[2][2] == {"figures.results_dir": "data/results", "figures.out_dir": "figures"}


@pytest.mark.skipif(not (RESULTS / "06_evaluate.json").is_file(), reason="no reference results (run make reproduce)")
def test_committed_claims_and_tables_match_the_published_results(tmp_path):
    claims = report.claims_markdown(report.claims(RESULTS))
    assert (REPO_ROOT / "figures" / "claims.md").read_text() == claims, \
        "figures/claims.md is not what data/results/ gives: run make figures (or make reproduce)"
    report._tables(RESULTS, tmp_path, REPO_ROOT)
    assert (REPO_ROOT / "figures" / "tables.md").read_text() == (tmp_path / "tables.md").read_text(), \
        "figures/tables.md is not what data/results/ gives: run make figures (or make reproduce)"
