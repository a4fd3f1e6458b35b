"""The run directory ``runs/<config name>/``: what each notebook writes there, and what a later one
may read.

Every artefact has a name, a path inside the run directory, the notebook that writes it and the
config settings it depends on (:data:`ARTEFACTS`). :func:`path` gives where an artefact lives;
:func:`require` gives it only if it exists *and* was made with the same settings as the config
at hand (read from the producing notebook's result JSON, whose ``meta.config`` records the
whole config). Otherwise it fails with what to rerun, so a notebook never builds on a model made
under other settings, and never falls back to a stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .config import run_dir
from .results import read_json

# Settings every artefact depends on, and those of each step (dotted keys are single settings).
BASE = ("model", "dtype", "seed")
_AA = ("frontier.calib_split", "frontier.calib_tokens", "frontier.calib_seq_len", "frontier.aa_sweeps",
       "frontier.aa_inner", "frontier.aa_damping")   # the activation-aware start's calibration (aa_init)
_TENSORIZE = (*BASE, "mpo", "sensitivity", "tensorize", *_AA)


@dataclass(frozen=True)
class Artefact:
    path: str                  # inside the run directory
    notebook: str              # the notebook that writes it
    depends_on: tuple          # config sections / dotted keys that must match
    record: str                # the result JSON (in the run directory) whose meta.config says how it was made


ARTEFACTS: dict[str, Artefact] = {
    "baseline": Artefact("results/00_baseline.json", "00_model_and_baseline", (*BASE, "eval"), "results/00_baseline.json"),
    "sensitivity": Artefact("results/02_layer_sensitivity.json", "02_layer_sensitivity", (*BASE, "mpo", "sensitivity"),
                            "results/02_layer_sensitivity.json"),
    "tensorize": Artefact("results/03_tensorize.json", "03_tensorize", _TENSORIZE, "results/03_tensorize.json"),
    "tensorized": Artefact("models/tensorized", "03_tensorize", _TENSORIZE, "results/03_tensorize.json"),
    "tensorized_aa": Artefact("models/tensorized_aa", "03_tensorize", _TENSORIZE, "results/03_tensorize.json"),
    "quantize": Artefact("results/04_quantize.json", "04_quantize", (*_TENSORIZE, "quantize"), "results/04_quantize.json"),
    "heal": Artefact("results/05_heal.json", "05_heal", (*_TENSORIZE, "heal"), "results/05_heal.json"),
    # notebook 05's block-wise start (heal.blockwise): shaped by the step's settings, the text it distils on and
    # its windows and batches (healing's: blockwise.settings_from)
    "tensorized_bw": Artefact("models/tensorized_bw", "05_heal", (*_TENSORIZE, "heal.blockwise", "heal.data",
                                                                  "heal.seq_len", "heal.batch_per_rank"),
                              "results/05_heal.json"),
    "healed": Artefact("heal/tensorized/model", "05_heal", (*_TENSORIZE, "heal"), "results/05_heal.json"),
    "healed_aa": Artefact("heal/tensorized_aa/model", "05_heal", (*_TENSORIZE, "heal"), "results/05_heal.json"),
    "evaluate": Artefact("results/06_evaluate.json", "06_evaluate", (*_TENSORIZE, "heal", "eval", "quantize"),
                         "results/06_evaluate.json"),
    "frontier": Artefact("results/07_frontier.json", "07_frontier", (*BASE, "mpo", "frontier"), "results/07_frontier.json"),
}
# result file name -> the notebook that writes it (what to rerun when it is missing)
PRODUCERS = {Path(a.path).name: a.notebook for a in ARTEFACTS.values() if a.path.startswith("results/")}


class RunInputError(FileNotFoundError):
    """An input a notebook needs is missing or was made under other settings; the message says what to rerun."""


def _artefact(name: str) -> Artefact:
    if name not in ARTEFACTS:
        raise KeyError(f"Unknown artefact '{name}': use one of {', '.join(ARTEFACTS)}")
    return ARTEFACTS[name]


def path(cfg: Mapping, name: str) -> Path:
    """Where artefact ``name`` of this config's run lives (whether or not it exists yet)."""
    return run_dir(cfg) / _artefact(name).path


def _setting(cfg: Mapping, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def differences(made_with: Mapping, cfg: Mapping, keys) -> list[str]:
    """The settings among ``keys`` whose values differ, down to the single key of a section, as
    ``"key: then -> now"``."""
    out = []
    for k in keys:
        then, now = _setting(made_with, k), _setting(cfg, k)
        if then == now:
            continue
        if isinstance(then, Mapping) and isinstance(now, Mapping):
            out += [f"{k}.{d}" for d in differences(then, now, sorted(set(then) | set(now), key=str))]
        else:
            out.append(f"{k}: {_short(then)} -> {_short(now)}")
    return out


def require(cfg: Mapping, name: str) -> Path:
    """Artefact ``name``'s path, after checking that it exists and that the notebook which wrote
    it ran with the same settings (:data:`ARTEFACTS`) as ``cfg``."""
    art = _artefact(name)
    p, record = path(cfg, name), run_dir(cfg) / art.record
    rerun = f"run notebook {art.notebook} with this config first (make reproduce runs every notebook in order)"
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        raise RunInputError(f"{p} is missing: {rerun}.")
    if not record.is_file():
        raise RunInputError(f"{p} exists but {record} does not, so how it was made is unknown: {rerun}.")
    made_with = read_json(record)["meta"].get("config") or {}
    diff = differences(made_with, cfg, art.depends_on)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise RunInputError(f"{p} was made with other settings ({shown}): rerun notebook {art.notebook} with this "
                            "config, or use the config it was made with.")
    return p
