"""The results contract: every notebook and benchmark writes JSON beside its run, atomically,
with the provenance a reader needs to trust a number (config, model, device, versions, seed,
git commit, timestamp).

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
target (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written result.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .config import REPO_ROOT


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(x.item())
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (NaN becomes null, tensors become lists)."""
    text = json.dumps(_jsonable(data), indent=1, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def __getattr__(name: str):
    """``PRODUCERS`` (result file -> the notebook that writes it) is compactify.run's."""
    if name == "PRODUCERS":
        from .run import PRODUCERS

        return PRODUCERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ResultFileError(ValueError):
    """A results JSON that exists but cannot be read (truncated, corrupt, not UTF-8)."""


def producer(path: str | Path) -> str:
    """What to rerun to write ``path`` again, in words."""
    from .run import PRODUCERS

    path = Path(path)
    if path.name in PRODUCERS:
        return f"notebook {PRODUCERS[path.name]} (make reproduce runs every notebook, then publishes to data/results/)"
    if path.parent.name == "scale":
        return "benchmarks/scale.py (make benchmarks)"
    if path.parent.name == "benchmarks":
        return f"benchmarks/{path.stem}.py (make benchmarks)"
    if path.name in ("heal.json", "meta.json") or "checkpoints" in path.parts:
        return "the healing run (notebook 05_heal, compactify.heal) with a new out_dir"
    return "the notebook or script that wrote it"


def read_json(path: str | Path) -> Any:
    """Read a JSON result; a corrupt file is a :class:`ResultFileError` naming the file, where
    the problem is and what writes it (a missing one stays a ``FileNotFoundError``)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode())
    except UnicodeDecodeError as e:
        where = f"it is not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        where = f"invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})"
        if e.pos >= len(data.rstrip()) or e.msg.startswith("Unterminated"):
            where += f"; the file ends after {len(data)} bytes, in the middle of the JSON"
    raise ResultFileError(f"{path} cannot be read: {where}, so it is truncated or corrupt. Results are written "
                          f"atomically, so it was damaged after writing (a copy, an edit). Rerun {producer(path)} "
                          "to write it again, or restore it (git checkout for the published data/results/).")


OUTPUT_PATHS = ("data/results", "figures", "reports", "README.md")  # written by runs, not code


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        # "+dirty": code or configs differ from the commit. The folders runs write into (published
        # results, figures, executed notebooks, the README's generated blocks) do not count, or a
        # benchmark would mark the next one dirty by writing its own result first.
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){p}" for p in OUTPUT_PATHS)],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_isa() -> str:
    """The CPU's fastest matmul path as torch sees it: ``AMX``, ``AVX512-BF16`` (native bf16, where the
    study computes in bf16), else torch's capability (``AVX512``, ``AVX2``, ...; fp32 there)."""
    import torch

    try:  # private helpers of torch.cpu (compactify.perplexity.fast_bf16 uses the same)
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
    except AttributeError:
        pass
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def device_info(device: Any = None) -> dict:
    """What the numbers were measured on: CPU model and threads, or the CUDA device."""
    import torch

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_isa"] = cpu_isa()  # two "AMD EPYC" machines here differ 2-3x in bf16 speed: the ISA says which
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    info["device"] = dev
    if dev.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(dev).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tensorly", "lm_eval", "bitsandbytes", "compactify"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def metadata(cfg: Mapping | None = None, device: Any = None, **extra: Any) -> dict:
    """Provenance for a result: config, model, device, versions, seed, git commit, timestamp."""
    meta = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device_info(device),
    }
    if cfg is not None:
        meta.update({"config_name": cfg.get("name"), "config_path": cfg.get("config_path"),
                     "model": cfg.get("model"), "seed": cfg.get("seed"), "config": dict(cfg)})
    meta.update(extra)
    return meta


def save_results(path: str | Path, data: Mapping, cfg: Mapping | None = None,
                 device: Any = None, **extra: Any) -> Path:
    """Write ``{"meta": metadata(...), **data}`` atomically to ``path``; return the path."""
    return write_json(path, {"meta": metadata(cfg, device, **extra), **data})
