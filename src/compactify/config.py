"""One config per run: a YAML file validated against the defaults, with single-key overrides.

Every setting lives in exactly one place. The defaults are split by section, one YAML file
per step of the method under ``compactify/defaults/<section>.yaml``, so that each module owns
its own keys. A config file (``configs/smoke.yaml``, ``configs/default.yaml``, ...) overrides
any of them; a notebook's ``parameters`` cell may override single keys with dotted names::

    cfg = load_config("configs/smoke.yaml", {"eval.limit": 5})
    cfg["eval"]["limit"]  # -> 5

A key that the defaults do not know is an error that names the closest known key, so a typo
never silently falls back to a default.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULTS_DIR = Path(__file__).parent / "defaults"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config file or override that cannot be used as it is."""


def defaults() -> dict:
    """The full default config: ``defaults/run.yaml`` at top level, every other file a section."""
    out: dict = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if path.stem == "run":
            out.update(data)
        else:
            out[path.stem] = data
    return out


def _merge(base: dict, new: Mapping, where: str) -> None:
    for key, value in new.items():
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            hint = f" Did you mean '{where}{close[0]}'?" if close else ""
            known = ", ".join(sorted(map(str, base)))
            raise ConfigError(f"Unknown config key '{where}{key}'.{hint} Known keys here: {known}.")
        if isinstance(base[key], dict) and base[key] and isinstance(value, Mapping):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = copy.deepcopy(value)


def _dotted(overrides: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = str(dotted).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def resolve_path(path: str | Path) -> Path:
    """A path as given, or relative to the repository root (notebooks run from notebooks/)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    q = REPO_ROOT / p
    return q if q.exists() else p


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Defaults <- the YAML file at ``path`` <- ``overrides`` (dotted keys), validated.

    ``path`` may be absolute, relative to the working directory, or relative to the
    repository root. The returned dict records where it came from under ``config_path``.
    """
    cfg = defaults()
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{path}' not found. Pass a path such as configs/smoke.yaml "
                              f"(available: {', '.join(sorted(x.name for x in (REPO_ROOT / 'configs').glob('*.yaml')))}).")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {e}") from e
        if not isinstance(data, Mapping):
            raise ConfigError(f"Config file '{p}' must hold a mapping of keys, not {type(data).__name__}.")
        _merge(cfg, data, "")
        cfg["config_path"] = str(p)
    if overrides:
        _merge(cfg, _dotted(overrides), "")
    if not cfg.get("name"):
        cfg["name"] = Path(cfg.get("config_path") or "default").stem
    if not cfg.get("run_dir"):
        cfg["run_dir"] = f"runs/{cfg['name']}"
    return cfg


def run_dir(cfg: Mapping) -> Path:
    """The run directory of a config (created), resolved against the repository root."""
    p = Path(cfg["run_dir"])
    if not p.is_absolute():
        p = REPO_ROOT / p
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir(*parts: str) -> Path:
    """The gitignored cache (models, corpora, evaluation data): $COMPACTIFY_CACHE or data/cache."""
    import os

    root = Path(os.environ.get("COMPACTIFY_CACHE") or REPO_ROOT / "data" / "cache")
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p
