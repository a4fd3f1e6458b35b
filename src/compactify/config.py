"""One config per run: a YAML file validated against the defaults, with single-key overrides.

Every setting lives in exactly one place. The defaults are split by section, one YAML file
per step of the method under ``compactify/defaults/<section>.yaml``, so that each module owns
its own keys. A config file (``configs/smoke.yaml``, ``configs/default.yaml``, ...) overrides
any of them; a notebook's ``parameters`` cell may override single keys with dotted names::

    cfg = load_config("configs/smoke.yaml", {"eval.limit": 5})
    cfg["eval"]["limit"]  # -> 5

A key that the defaults do not know is an error that names the closest known key, so a typo
never silently falls back to a default. A value of the wrong type is an error at load time
too (:func:`check_types`): each key must have its default's type (an int is fine for a
float), except where the default is null (no type), and where the default's own comment in
``defaults/*.yaml`` documents an alternative: ``null`` (e.g. "null = all") or ``a list``
(e.g. ``blocks: all  # "all" or a list``); a per-task mapping also takes one number for all.
Every ``eval.tasks`` entry must be a task that ``compactify.evaluate`` knows.
"""
from __future__ import annotations

import copy
import difflib
import re
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


def _docs() -> dict:
    """``{dotted key: the comments documenting it in defaults/*.yaml}`` (its own line's comment
    and the comment lines right above it), from the YAML node positions."""
    docs: dict = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()

        def doc(line: int) -> str:
            out = [lines[line].partition("#")[2]]
            k = line - 1
            while k >= 0 and lines[k].lstrip().startswith("#"):
                out.append(lines[k])
                k -= 1
            return " ".join(out)

        def walk(node, prefix: str) -> None:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    docs[prefix + key.value] = doc(key.start_mark.line)
                    walk(value, prefix + key.value + ".")

        walk(yaml.compose(path.read_text()), "" if path.stem == "run" else f"{path.stem}.")
    return docs


# Keys whose default is null carry no type of their own; these say what a non-null value must be.
NULL_DEFAULT_TYPES = {"heal.steps": int, "heal.stop_after": int, "heal.teacher": str, "heal.teacher_file": str,
                      "figures.out_dir": str, "config_path": str}


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _per_item(default) -> bool:
    """A mapping of plain values (per task, per text): it may also be given as one number."""
    return isinstance(default, dict) and all(not isinstance(v, (dict, list)) for v in default.values())


def _type_problem(key: str, value, default, doc: str) -> str | None:
    if default is None:
        if value is None or key not in NULL_DEFAULT_TYPES:
            return None
        return _type_problem(key, value, NULL_DEFAULT_TYPES[key](), "null")
    if value is None:
        return None if "null" in doc else "null, which this key does not take"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str) or (isinstance(value, list) and "list" in doc)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, Mapping) or (_per_item(default) and isinstance(value, int) and not isinstance(value, bool))
    else:
        ok = True
    return None if ok else f"{value!r} ({_type_name(value)})"


def check_types(cfg: Mapping, base: Mapping | None = None, docs: Mapping | None = None, where: str = "") -> None:
    """Every value of ``cfg`` has its default's type (see the module docstring); raise a
    :class:`ConfigError` naming the key, the value, the type wanted and the default."""
    base = defaults() if base is None else base
    docs = _docs() if docs is None else docs
    for key, default in base.items():
        if key not in cfg:
            continue
        dotted, value = f"{where}{key}", cfg[key]
        doc = docs.get(dotted, "")
        if where and _per_item(base) and dotted not in docs:
            doc = docs.get(where[:-1], "")  # a flow mapping's items: documented with their mapping
        problem = _type_problem(dotted, value, default, doc)
        if problem:
            like = "" if default is None else f", like its default {default!r}"
            like = like if len(like) <= 70 else like[:67] + "..."
            if default is None:
                default, doc = NULL_DEFAULT_TYPES[dotted](), "null"
            wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                      list: "a list", dict: "a mapping"}[type(default)]
            also = [alt for alt, on in (("null", "null" in doc), ("a list", isinstance(default, str) and "list" in doc),
                                        ("one integer for all", _per_item(default))) if on]
            raise ConfigError(f"Config key '{dotted}' is {problem}; it must be {wanted}"
                              f"{' (or ' + ' or '.join(also) + ')' if also else ''}{like}. "
                              "Fix the value in the config file or the override.")
        if isinstance(default, dict) and default and isinstance(value, Mapping):
            check_types(value, default, docs, dotted + ".")
        elif isinstance(default, list) and default and isinstance(value, list):
            kinds = {type(v) for v in default}
            if len(kinds) == 1 and kinds <= {int, float, str, bool}:
                for i, item in enumerate(value):
                    if _type_problem(f"{dotted}[{i}]", item, default[0], ""):
                        raise ConfigError(f"Config key '{dotted}' holds {item!r} ({_type_name(item)}) at position {i}; "
                                          f"its items must be like the default's {default!r}. Fix the value.")


def check_tasks(cfg: Mapping) -> None:
    """``eval.tasks`` names only tasks that compactify.evaluate knows (checked at load, not
    minutes later in run_tasks)."""
    tasks = (cfg.get("eval") or {}).get("tasks")
    if tasks is None:
        return
    from .evaluate import TASKS

    for task in [tasks] if isinstance(tasks, str) else tasks:
        if task not in TASKS:
            close = difflib.get_close_matches(str(task), TASKS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"eval.tasks names an unknown task {task!r}.{hint} Known tasks: {', '.join(TASKS)}.")


def choices() -> dict:
    """Keys that take one of a fixed set of strings, each set from the module that owns it."""
    from .aa_init import INITS

    return {"tensorize.init": INITS, "tensorize.compare_init": INITS, "quantize.speed.order": ("rotated", "fixed")}


def check_choices(cfg: Mapping) -> None:
    """Every key of :func:`choices` holds one of its values (checked at load, not when the step
    runs); an unknown one is an error naming the closest value."""
    for dotted, allowed in choices().items():
        node = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and node not in allowed:
            close = difflib.get_close_matches(str(node), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Config key '{dotted}' is {node!r}.{hint} It must be one of: {', '.join(allowed)}.")


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


def parse_overrides(pairs) -> dict:
    """``--set KEY=VALUE ...`` of the scripts as overrides for :func:`load_config` (dotted keys,
    YAML values: ``eval.limit=5``, ``heal.lr_sweep=[1e-4]``, ``heal.eval_every=null``)."""
    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ConfigError(f"Override '{pair}' is not KEY=VALUE: write e.g. --set eval.limit=5 (dotted key, YAML value).")
        try:
            out[key] = _numbers(yaml.safe_load(value))
        except yaml.YAMLError as e:
            raise ConfigError(f"Override '{pair}': the value is not valid YAML ({e}).") from e
    return out


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(value):
    """YAML 1.1 (PyYAML) reads ``5e-4`` (no dot) as a string; on the command line it means a number."""
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


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
    check_types(cfg)
    check_tasks(cfg)
    check_choices(cfg)
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
