"""The study's house rules, checked: one source of dependencies, the two commands, notebooks."""
import json
import re
import tomllib

import yaml

from compactify.config import REPO_ROOT


def test_environment_yml_installs_the_package_and_cannot_drift():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip == ["-e ."], "environment.yml must install the package, not list its dependencies a second time"
    conda_pkgs = {re.split(r"[=<>]", d)[0] for d in deps if isinstance(d, str)}
    py_deps = {re.split(r"[=<>\[ ]", d)[0].lower() for d in
               tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert not (conda_pkgs - {"python", "pip", "nodejs"}), "conda section may only provide the toolchain"
    assert {"torch", "transformers", "tensorly", "lm-eval", "papermill", "nbval", "seaborn"} <= py_deps


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]
    readme = (REPO_ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^make \w+", quick, flags=re.M) == ["make reproduce", "make test"]


def test_notebooks_are_parameterised_chapters():
    notebooks = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks and notebooks[0].name.startswith("00_")
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
        assert 'config = "configs/smoke.yaml"' in "".join(params[0]["source"]), nb_path.name
        for cell in nb["cells"]:
            for o in cell.get("outputs", []):
                assert o.get("output_type") != "error", f"{nb_path.name} is committed with an error output"


def test_published_notebooks_have_clean_outputs():
    """reports/: what a reader opens on GitHub. A long step prints a few lines (compactify.progress),
    never one saved output per redraw of a bar, a widget frozen at 0%, an error or third-party spam."""
    reports = sorted((REPO_ROOT / "reports").glob("[0-9][0-9]_*.ipynb"))
    assert len(reports) == len(list((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    spam = ("Failed to load CPU gemm_4bit_forward", "use_cache=True", "Loading weights", "Filter:",
            "Generating test split", "Generating validation split", "\r")
    for path in reports:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            outs = cell.get("outputs", [])
            streams = [o for o in outs if o.get("output_type") == "stream"]
            text = "".join("".join(o["text"]) for o in streams)
            where = f"{path.name} cell {i}"
            minutes = (cell.get("metadata", {}).get("papermill", {}).get("duration") or 0) / 60
            allowed = 12 + 2 * minutes  # a line a minute per bar (compactify.progress), a closing line per bar, a few prints
            assert len(streams) <= allowed, (f"{where}: {len(streams)} stream outputs in {minutes:.1f} min "
                                             "(a progress bar saved per redraw?)")
            assert len(text) <= 4000, f"{where}: {len(text)} characters of printed text"
            assert not any(s in text for s in spam), f"{where}: {[s for s in spam if s in text]}"
            for o in outs:
                assert o.get("output_type") != "error", f"{where}: an error output"
                assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), f"{where}: a widget"
