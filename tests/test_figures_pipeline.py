"""The pipeline overview (compactify.figures_pipeline): each step's number comes from its result
file, a missing file says so instead of breaking the figure."""
from __future__ import annotations

import shutil

from compactify import figures_pipeline as PF
from compactify.config import REPO_ROOT

RESULTS = REPO_ROOT / "data" / "results"


def test_each_step_reads_its_number_from_the_results_and_a_missing_one_is_named(tmp_path):
    got = PF.measured(RESULTS)
    assert set(got) == {s[0] for s in PF.STEPS}
    assert all("not run" not in v for v in got.values()), got
    assert "matrices MPO" in got["plan + tensorize"] and "tokens" in got["heal"]
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res, ignore=shutil.ignore_patterns("benchmarks", "scale"))
    (res / "05_heal.json").unlink()
    partial = PF.measured(res)
    assert partial["heal"].startswith("not run") and partial["baseline"] == got["baseline"]
    fig = PF.pipeline(partial)
    assert len(fig.axes) == 1
