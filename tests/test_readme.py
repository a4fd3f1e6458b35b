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
