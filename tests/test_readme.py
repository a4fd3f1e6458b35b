"""The README's numbers are the published results' (compactify.readme): the committed README
agrees with data/results/, and a changed result is caught."""
from __future__ import annotations

import json
import shutil

import pytest

from compactify import readme
from compactify.config import REPO_ROOT

RESULTS = REPO_ROOT / "data" / "results"


def test_the_committed_readme_holds_the_published_numbers():
    problems = readme.check((REPO_ROOT / "README.md").read_text(), RESULTS)
    assert problems == [], "\n".join(problems)


def test_a_changed_result_is_caught_and_update_rewrites_only_the_blocks(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res)
    text = (REPO_ROOT / "README.md").read_text()
    assert readme.check(text, res) == []
    b = json.loads((res / "00_baseline.json").read_text())
    b["baseline"]["perplexity_texts"]["brown-heldout"]["ppl"] *= 1.5
    (res / "00_baseline.json").write_text(json.dumps(b))
    problems = readme.check(text, res)
    assert any("'baseline'" in p for p in problems) and any("'headline'" in p for p in problems), problems
    path = tmp_path / "README.md"
    path.write_text(text)
    assert readme.update(path, res) is True
    new = path.read_text()
    assert readme.check(new, res) == [] and readme.update(path, res) is False
    outside = lambda t: readme._BLOCK.sub("", t)  # noqa: E731
    assert outside(new) == outside(text)  # prose outside the blocks is left as it was


def test_a_missing_or_unknown_block_is_named():
    assert any("'claims' is missing" in p for p in readme.check("no blocks here", RESULTS))
    with pytest.raises(ValueError, match="generated:nonsense"):
        readme.render("<!-- generated:nonsense -->\nx\n<!-- /generated:nonsense -->", RESULTS)


def test_a_section_is_read_from_the_readme_and_a_missing_one_is_named():
    text = readme.section(REPO_ROOT / "README.md", "Why our numbers differ from the paper's")
    assert text.startswith("| difference | ours | the paper |") and "\n#" not in text
    with pytest.raises(KeyError, match="no section"):
        readme.section(REPO_ROOT / "README.md", "No such heading")


def test_the_headline_names_the_blockwise_step_only_when_notebook_05_ran_it(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    for name in ("00_baseline.json", "03_tensorize.json", "05_heal.json", "06_evaluate.json", "claims.csv"):
        if (RESULTS / name).exists():
            shutil.copy(RESULTS / name, res / name)
    h = json.loads((res / "05_heal.json").read_text())
    h["blockwise"] = None
    (res / "05_heal.json").write_text(json.dumps(h))
    plain = readme.headline(res)
    assert "Block-wise distillation" not in plain and " Healing (" in plain
    h["blockwise"] = {"tokens": 32768, "seconds": 456.0, "settings": {"tokens": 32768, "epochs": 4, "lr": 5e-3},
                      "perplexity": {"brown-heldout": {"ppl": 468.2, "tokens": 8160, "seq_len": 256}}}
    (res / "05_heal.json").write_text(json.dumps(h))
    text = readme.headline(res)
    assert "x 4 passes, 7.6 min) takes the TT-SVD start to 468.2 on `brown-heldout`. Then healing (" in text
    assert "without the block-wise step" in text or not h.get("improved")
