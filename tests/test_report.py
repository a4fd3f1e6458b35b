"""Notebook 08's machinery: every paper artefact has a file, README links resolve, and a
missing result fails only the figures that need it, naming the notebook to rerun."""
import re
import shutil

import pytest

from compactify import report
from compactify.config import REPO_ROOT

RESULTS = REPO_ROOT / "data" / "results"
NEEDED = ["02_layer_sensitivity.json", "03_tensorize.json", "05_heal.json", "06_evaluate.json"]
have_reference = all((RESULTS / n).is_file() for n in NEEDED)


def test_readme_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:figures|data|notebooks)/[^)#\s]+)\)", readme)
    missing = [link for link in links if not (REPO_ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_missing_result_names_the_notebook(tmp_path):
    with pytest.raises(report.RunInputError, match="rerun notebook 05_heal"):
        report.load(tmp_path, "05_heal.json")


@pytest.mark.skipif(not have_reference, reason="no reference results in data/results (run make reproduce)")
def test_every_artefact_builds_and_a_deleted_result_fails_alone(tmp_path):
    status = report.build_all(RESULTS, tmp_path / "all", REPO_ROOT)
    assert all(v == "ok" for v in status.values()), status
    for stem in ("fig1a_mpo", "fig1b_block", "fig2_accuracy", "fig3_healing", "fig4_inference_time", "fig5_sensitivity",
                 "heal_long", "recovery_curve", "healed_frontier"):
        assert (tmp_path / "all" / f"{stem}.png").is_file() and (tmp_path / "all" / f"{stem}.pdf").is_file()
    assert (tmp_path / "all" / "tables.md").is_file()
    partial = tmp_path / "results"
    shutil.copytree(RESULTS, partial)
    (partial / "05_heal.json").unlink()
    status = report.build_all(partial, tmp_path / "partial", REPO_ROOT)
    assert "05_heal" in status["Fig. 3"] and status["Fig. 5"] == "ok" and status["Fig. 2"] == "ok"
    assert {r["claim"] for r in report.claims(RESULTS)} >= {"70% fewer parameters", "healing ~2x faster"}


PAPER_ARTEFACTS = ["fig1a_mpo", "fig1b_block", "fig2_accuracy", "fig3_healing", "fig4_inference_time", "fig5_sensitivity"]


@pytest.mark.skipif(not have_reference, reason="no reference results in data/results (run make reproduce)")
def test_committed_figures_hold_every_paper_artefact():
    """figures/ (make figures) has a PNG and a PDF of every paper figure, Tables I-II and the claims."""
    figs = REPO_ROOT / "figures"
    missing = [f"{s}.{ext}" for s in PAPER_ARTEFACTS for ext in ("png", "pdf") if not (figs / f"{s}.{ext}").is_file()]
    missing += [f for f in ("tables.md", "claims.md") if not (figs / f).is_file()]
    assert not missing, f"figures/ lacks {missing}: run make figures"
    assert "| claim | paper |" in (figs / "claims.md").read_text()


def test_depth_verdict_does_not_turn_on_the_sign_of_a_zero_correlation():
    from compactify.report import depth_verdict

    # the bf16 and fp32 runs of the same study: rho -0.008 and +0.004, first third +841%, last +17%
    assert depth_verdict(-0.008, 841, 17) == depth_verdict(0.004, 841, 17)
    assert depth_verdict(0.004, 841, 17).startswith("partly")
    assert depth_verdict(-0.5, 841, 17) == "reproduced"
    assert depth_verdict(0.5, 841, 17) == "not reproduced"  # deeper blocks clearly *more* sensitive
    assert depth_verdict(-0.1, 20, 17) == "not reproduced"  # no trend and no early-block excess
