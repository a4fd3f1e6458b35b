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


def test_the_heal_box_and_the_fig3_legend_name_the_blockwise_step_only_when_it_ran(tmp_path):
    import json

    from compactify import figures as F

    res = tmp_path / "results"
    res.mkdir()
    h = json.loads((RESULTS / "05_heal.json").read_text())
    h["blockwise"] = {"perplexity": {"brown-heldout": {"ppl": 468.2}}}
    (res / "05_heal.json").write_text(json.dumps(h))
    assert PF.measured(res)["heal"].startswith("block-wise + ") and " -> 468 -> " in PF.measured(res)["heal"]
    h["blockwise"] = None
    (res / "05_heal.json").write_text(json.dumps(h))
    assert "block-wise" not in PF.measured(res)["heal"] and " -> 468 -> " not in PF.measured(res)["heal"]
    legend = lambda bw: [t.get_text() for t in F.heal_figure(h["heal"]["loss_curve"], h["speed"],  # noqa: E731
                                                             main=F.heal_start_label(bw)).axes[0].get_legend().get_texts()]
    assert legend({"tokens": 1})[0] == "paper's start (TT-SVD), block-wise first: next-token loss"
    assert legend(None)[0] == "paper's start (TT-SVD): next-token loss"
