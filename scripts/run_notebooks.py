#!/usr/bin/env python
"""Run the numbered notebooks in order with papermill under one config (`make reproduce`).

Executed copies go to runs/<config name>/notebooks/. With --publish, the run's result JSON
(runs/<name>/results/) is copied to data/results/ and its figures to figures/ *before* notebook
08 runs, and 08 then rebuilds the paper's figures and tables from those just-published results
straight into figures/: every published artefact comes from this run. The executed notebooks are
copied to reports/ at the end and the README's generated blocks (compactify.readme) rewritten from
the published results. A failing notebook stops the run and names itself.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import papermill as pm

from compactify import crossrun, readme, report
from compactify.config import REPO_ROOT, load_config, parse_overrides, run_dir
from compactify.results import write_json

FIGURES_NOTEBOOK = "08_figures"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00_model 03_tensorize")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides (dotted keys, YAML values), e.g. eval.limit=5")
    ap.add_argument("--publish", action="store_true", help="copy results to data/results/ and figures to figures/")
    args = ap.parse_args()

    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)  # validates before any notebook starts
    note = crossrun.slow_machine_note(cfg, REPO_ROOT / "data" / "results")
    if note:
        print(note, flush=True)
    out_dir = run_dir(cfg) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [n for n in notebooks if any(n.stem.startswith(p) for p in args.only)]
    # the executed notebooks are kept: progress as a line a minute, not a bar saved once per redraw
    os.environ.setdefault("COMPACTIFY_PROGRESS", "log")  # (compactify.progress; the kernels inherit it)
    timings, published = {}, False
    for nb in notebooks:
        print(f"\n=== {nb.name}  (config {cfg['config_path']})", flush=True)
        nb_overrides = dict(overrides)
        if args.publish and nb.stem.startswith(FIGURES_NOTEBOOK):
            publish(cfg)  # 08 must draw this run's results, not the previous run's
            published = True
            nb_overrides.update({"figures.results_dir": "data/results", "figures.out_dir": "figures"})
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), cwd=str(nb.parent), progress_bar=True,
                                parameters={"config": str(Path(cfg["config_path"]).resolve()), "overrides": nb_overrides})
        except pm.PapermillExecutionError as e:
            print(f"\n[run] {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                  f"[run] the executed copy with the traceback is {out_dir / nb.name}", file=sys.stderr)
            return 1
        timings[nb.stem] = round(time.time() - t0, 1)
        print(f"=== {nb.name} done in {timings[nb.stem]:.0f} s", flush=True)
    write_json(run_dir(cfg) / "timings.json", {"config": cfg["config_path"], "seconds": timings,
                                                "total_seconds": round(sum(timings.values()), 1)})
    if args.publish:
        if not published:
            publish(cfg)
        publish_notebooks(out_dir, notebooks)
        if readme.update(REPO_ROOT / "README.md", REPO_ROOT / "data" / "results"):  # its numbers: this run's
            print("[publish] README.md (generated blocks, compactify.readme)")
    print(json.dumps(timings, indent=1))
    return 0


def publish_notebooks(out_dir: Path, notebooks) -> None:
    """The executed notebooks, outputs included, to reports/ (readable without running anything)."""
    dest = REPO_ROOT / "reports"
    dest.mkdir(exist_ok=True)
    for nb in notebooks:
        if (out_dir / nb.name).is_file():
            shutil.copy2(out_dir / nb.name, dest / nb.name)
            print(f"[publish] reports/{nb.name}")


def publish(cfg) -> None:
    """Copy the run's results and figures into the committed folders."""
    src = run_dir(cfg)
    for sub, dest in (("results", REPO_ROOT / "data" / "results"), ("figures", REPO_ROOT / "figures")):
        for f in sorted((src / sub).rglob("*")) if (src / sub).is_dir() else []:
            if sub == "figures" and report.redrawn(f):  # 08 publishes it under the paper's name
                stale = dest / f.relative_to(src / sub)
                stale.unlink(missing_ok=True)
                continue
            if f.is_file():
                target = dest / f.relative_to(src / sub)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                print(f"[publish] {target.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
