"""Notebook 05's experiments around a healing run, as functions a reader can rerun and test.

* :func:`variant_comparison`: the same start healed once per variant of the recipe for the same
  tokens, then scored on every held-out text, with the paired NLL difference of each variant
  against the first (``compactify.compare``). :func:`loss_comparison` (which ``heal.loss``) and
  :func:`lr_sweep` (which ``heal.lr``) are the two measurements built on it.
* :func:`speed_comparison`: the paper's Fig. 3 -- the same steps healed by the dense and the
  compressed model, one after the other, steady-state tokens/s (step 1, which also allocates
  the AdamW state, left out) and peak memory (:func:`speed_record`).
* :func:`heal_start`: one start healed at its own learning rate (a stale run set aside first),
  scored with :func:`before_healing` and :func:`evaluate_dir`.
* :func:`dense_control`: the original dense model healed with the same recipe and tokens, the
  fair reference for a healed compressed model (its whole run also times Fig. 3).
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Mapping



def _cfg(cfg: Mapping, overrides: Mapping) -> dict:
    """A copy of ``cfg`` with some ``heal.*`` keys changed (the rest of the run's settings kept)."""
    import copy

    out = copy.deepcopy(dict(cfg))
    for key, value in overrides.items():
        out["heal"][key.split(".", 1)[1]] = value
    return out


def variant_comparison(model_dir, out_root: Path, cfg: Mapping, variants: Mapping[str, Mapping], tokens: int = 8192,
                       heldout: Mapping | None = None, device="cpu", keep_models: bool = False) -> dict:
    """Heal ``model_dir`` once per variant ({name: {"heal.key": value}}, e.g. a loss or a learning
    rate) for the same ``tokens`` from the same start (fresh runs in ``out_root/<name>``), score each
    healed model on every held-out text; returns per variant its settings, tokens/s, final losses,
    curve and perplexities, and the paired NLL difference of each variant against the first.
    Only the numbers are kept unless ``keep_models`` (then ``out_root/<name>/model`` and its
    heal.json stay, for benchmarks scored later; the checkpoints go either way)."""
    from . import compare as C
    from .heal import launch
    from .models import load_model
    from .perplexity import heldout_ids_for, heldout_perplexities

    out: dict = {"tokens": int(tokens), "variants": {}}
    for name, overrides in variants.items():
        d = Path(out_root) / str(name)
        shutil.rmtree(d, ignore_errors=True)
        r = launch(model_dir, d, _cfg(cfg, {**dict(overrides), "heal.tokens": int(tokens), "heal.steps": None,
                                            "heal.resume": False, "heal.checkpoint_every": 10**6}),
                   stream=io.StringIO())
        model, tok = load_model(d / "model", device=device)
        texts = heldout if heldout is not None else heldout_ids_for(tok, cfg)
        ppl = heldout_perplexities(model, tok, texts, cfg)
        last = r["loss_curve"][-1]
        out["variants"][name] = {"settings": dict(overrides), "tokens_per_s": r["tokens_per_s_steady"],
                                 "compute": r["compute"], "final_lm_loss": last["lm_loss"],
                                 "final_kd_loss": last["kd_loss"], "perplexity": ppl,
                                 "curve": [{k: p[k] for k in ("tokens", "lm_loss", "kd_loss")} for p in r["loss_curve"]]}
        del model
        if keep_models:
            out["variants"][name]["model_dir"] = str(d / "model")
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
        else:
            shutil.rmtree(d, ignore_errors=True)  # the checkpoints and the model: only the numbers are kept
    base = next(iter(variants))
    out["paired_vs_first"] = {
        name: {text: C.compare_nll(out["variants"][base]["perplexity"][text], v["perplexity"][text], str(base), str(name))
               for text in v["perplexity"]} for name, v in out["variants"].items() if name != base}
    return out


def paired_with_run(heal_json: Path, variants: Mapping[str, Mapping]) -> dict:
    """Each variant of :func:`variant_comparison` paired, on the same held-out windows, with a
    separate healing run of the same start (its ``results/05_heal.json``: notebook 05's), named by
    its recipe. Keys: ``reference`` and ``by_variant`` ({variant: {text: paired comparison}})."""
    from . import compare as C
    from .results import read_json

    heal = read_json(heal_json)
    hc = heal["heal"]["meta"]["config"]["heal"]
    ref = (f"notebook 05 ({hc['loss']} loss, batch {hc['batch_per_rank']} x {hc['seq_len']}, lr {hc['lr']:g}, "
           f"{heal['heal']['plan']['tokens']:,} tokens)")
    return {"reference": ref, "by_variant": {
        name: {t: C.compare_nll(heal["after"]["perplexity_texts"][t], v["perplexity"][t], ref, name)
               for t in v["perplexity"]} for name, v in variants.items()}}


def notebook_03_05(cfg: Mapping) -> tuple[dict, dict]:
    """The run's ``03_tensorize.json`` and ``05_heal.json`` (run.path, not run.require: a run made
    before a newer setting existed is still the reference for the scripts that build on it); a clear
    exit when either is missing."""
    import sys

    from . import run
    from .results import read_json

    paths = [run.path(cfg, "tensorize"), run.path(cfg, "heal")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing: run notebooks 03 and 05 with this config first (make reproduce).")
    return read_json(paths[0]), read_json(paths[1])


def paired_with_refs(runs: Mapping[str, Mapping], refs: Mapping[str, Mapping], name: str) -> dict:
    """Each healed run (``{key: run}`` with ``perplexity``, e.g. :func:`lr_sweep`'s ``lrs``) paired on
    the same held-out windows with each reference (``{ref name: perplexity_texts}``, e.g. notebook
    05's two healed starts): ``{key: {ref: {text: paired comparison}}}``."""
    from . import compare as C

    return {key: {ref: {t: C.compare_nll(texts[t], r["perplexity"][t], ref, f"{name} {key}") for t in r["perplexity"]}
                  for ref, texts in refs.items()} for key, r in runs.items()}


def print_paired(paired: Mapping, text: str = "brown-heldout", digits: int = 2) -> None:
    """One line per run and reference of :func:`paired_with_refs` on ``text``."""
    for key, by_ref in paired.items():
        for ref, by_text in by_ref.items():
            r = by_text[text]
            print(f"lr {key}: {text} {r['ppl_b']:.1f} = x{r['ppl_ratio']:.{digits}f} "
                  f"[{r['ppl_ratio_lo']:.{digits}f}, {r['ppl_ratio_hi']:.{digits}f}] {ref}")


# scripts/loss_study.py's result files under data/results/heal/, in the order the README and the figure list them
LOSS_STUDY_FILES = ("loss_study.json", "loss_study_topk.json", "loss_study_data.json", "loss_study_equal_time.json")


# The long healing runs of scripts/heal_long.py under data/results/heal/ ({figure key: file}), and the
# benchmark scoring of models saved along them (scripts/eval_models.py, the dense model first): which of
# its models is which run after how many healing tokens ({run key: {tokens: model name}})
LONG_RUN_FILES = {"tt_svd": "heal_long.json", "tt_svd_bw": "heal_long_bw.json", "asvd": "heal_long_asvd.json",
                  "asvd_brownwiki": "heal_long_asvd_brownwiki.json",
                  "asvd_brownwiki_lr5e-4": "heal_long_asvd_brownwiki_lr5e-4.json",
                  "asvd_bw_keep0.7": "heal_long_keep0.7_asvd_bw.json"}
# Long runs at another budget than the main model's (block parameters kept): not in the comparison of starts
LONG_RUN_KEEP = {"asvd_bw_keep0.7": 0.7}
LONG_RUN_TASKS = ("heal_long_tasks.json", {
    "asvd": {1_048_576: "asvd@1M"},
    "asvd_brownwiki": {98_304: "asvd+wiki@98k", 196_608: "asvd+wiki@197k", 294_912: "asvd+wiki@295k",
                       491_520: "asvd+wiki@492k", 1_048_576: "asvd+wiki@1M"}})


def loss_study_label(run: Mapping, name: str, tokens: int) -> str:
    """A variant of one ``scripts/loss_study.py`` run as ``loss@healing text``, with its teacher
    mode where not online and its token budget where not ``tokens`` (the first run's)."""
    rc = run["recipe"]
    label = name if "@" in name else f"{name}@{rc.get('data', 'heal')}"
    if rc["teacher_mode"] != "online" and label.split("@")[0] in ("kd", "mix"):
        label += f" ({rc['teacher_mode']} teacher)"
    return label + (f", {run['tokens']:,} tokens" if run["tokens"] != tokens else "")


def loss_comparison(model_dir, out_root: Path, cfg: Mapping, losses=("lm", "kd"), tokens: int = 8192,
                    heldout: Mapping | None = None, device="cpu") -> dict:
    """The same start healed with each loss for the same tokens (:func:`variant_comparison`); the
    measurement that picks ``heal.loss``. Keys: ``losses`` and ``paired_vs_<first loss>``."""
    r = variant_comparison(model_dir, out_root, cfg, {loss: {"heal.loss": loss} for loss in losses}, tokens,
                           heldout, device)
    return {"tokens": r["tokens"], "losses": r["variants"], "paired_vs_" + losses[0]: r["paired_vs_first"]}


def lr_sweep(model_dir, out_root: Path, cfg: Mapping, lrs, tokens: int = 8192, heldout: Mapping | None = None,
             device="cpu") -> dict:
    """The same start healed at each peak learning rate (same schedule shape, loss and tokens);
    the measurement behind ``heal.lr``. Keys: ``lrs`` ({lr as text: run}), ``paired_vs_first`` and
    ``best`` (the lr with the lowest perplexity on the first held-out text)."""
    if not lrs:
        raise ValueError("lr_sweep needs at least one learning rate, e.g. [3e-4, 1e-3].")
    r = variant_comparison(model_dir, out_root, cfg, {f"{float(lr):g}": {"heal.lr": float(lr)} for lr in lrs}, tokens,
                           heldout, device)
    first_text = next(iter(next(iter(r["variants"].values()))["perplexity"]))
    best = min(r["variants"], key=lambda k: r["variants"][k]["perplexity"][first_text]["ppl"])
    return {"tokens": r["tokens"], "lrs": r["variants"], "paired_vs_first": r["paired_vs_first"],
            "best": float(best), "judged_on": first_text}


def speed_record(r: Mapping) -> dict:
    """The Fig. 3 numbers of one healing run's record (``heal.json``): steady tokens/s, time, memory."""
    out = {k: r[k] for k in ("train_seconds", "wall_seconds", "steps_this_run", "tokens_this_run",
                             "peak_rss_mib_per_rank", "compute", "threads_per_rank")}
    out.update({"tokens_per_s": r["tokens_per_s_steady"], "tokens_per_s_all_steps": r["tokens_per_s"],
                "trainable_params": r["params"], "peak_rss_mib": max(r["peak_rss_mib_per_rank"])})
    return out


def speed_comparison(sources: Mapping[str, str], out_root: Path, cfg: Mapping, steps: int) -> dict:
    """Heal each model of ``sources`` ({name: model dir}) for ``steps`` steps, one after the other."""
    from .heal import launch

    speed = {}
    for name, src in sources.items():
        d = Path(out_root) / f"speed_{name}"
        shutil.rmtree(d, ignore_errors=True)
        r = launch(src, d, _cfg(cfg, {"heal.steps": int(steps), "heal.resume": False, "heal.checkpoint_every": 10**6,
                                      "heal.loss": "lm"}), stream=io.StringIO())
        speed[name] = speed_record(r)
        shutil.rmtree(d, ignore_errors=True)
    return speed


def set_aside_stale(out_dir: Path, model_dir) -> Path | None:
    """Move a healing in ``out_dir`` aside when it started from another model than ``model_dir``
    (notebook 03 rebuilt it): healing refuses to resume onto a different model, and a rerun must
    not delete the old run either. Returns where it went, or None when there was nothing to move."""
    import time

    from .heal_data import find_checkpoint
    from .heal_setup import model_fingerprint
    from .models import load_model
    from .results import read_json

    ckpt, _ = find_checkpoint(Path(out_dir) / "checkpoints")
    if ckpt is None or read_json(ckpt / "meta.json")["fingerprint"]["model"] == model_fingerprint(
            load_model(model_dir)[0]):
        return None
    aside = Path(out_dir).with_name(f"{Path(out_dir).name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    Path(out_dir).rename(aside)
    return aside


def heal_start(model_dir, out_dir: Path, cfg: Mapping, lr: float | None = None) -> dict:
    """Notebook 05's healing of one start (resumed if ``out_dir`` holds a checkpoint of the same
    start and recipe), at its own peak learning rate ``lr`` (None: ``heal.lr``)."""
    from .heal import launch

    aside = set_aside_stale(out_dir, model_dir)
    if aside:
        print(f"moved the healing of a previous model to {aside} (delete it when no longer needed)")
    return launch(model_dir, out_dir, _cfg(cfg, {"heal.lr": float(lr)}) if lr else cfg)


def evaluate_dir(model_dir, tokenizer, cfg: Mapping, heldout: Mapping, device="cpu") -> dict:
    """``evaluate_model`` of the model saved in ``model_dir``, freed afterwards."""
    from .evaluate import evaluate_model
    from .models import load_model

    model, _ = load_model(model_dir, device=device)
    return evaluate_model(model, tokenizer, cfg, heldout_ids=heldout)


def before_healing(cfg: Mapping, model_dir, tokenizer, heldout: Mapping, device="cpu") -> tuple[dict, dict | None, str]:
    """The evaluation of notebook 03's start before healing: notebook 03's own when it scored this
    very model with the same ``eval`` settings, else made here. Also notebook 03's perplexities of
    the improved start (``tensorize.compare_init``) when reused, and which source was used."""
    from . import run
    from .results import read_json

    prev_path = run.path(cfg, "tensorize")
    prev = read_json(prev_path) if prev_path.exists() else None
    if (prev is not None and prev["main"]["model_dir"] == str(model_dir)
            and not run.differences(prev["meta"].get("config") or {}, cfg, ["eval"])):
        aa = (prev.get("improved") or {}).get("evaluation")
        return prev["main"]["evaluation"], aa, "notebook 03's evaluation of the same model"
    return evaluate_dir(model_dir, tokenizer, cfg, heldout, device), None, "evaluated here"


def dense_control(source, out_dir: Path, cfg: Mapping, tokenizer, heldout: Mapping, baseline: Mapping,
                  device="cpu") -> dict:
    """The fair reference for a healed compressed model: the *original* dense model healed with the
    same recipe, tokens and data (a fine-tune of its blocks on the healing text), then evaluated like
    the others. Returns its run record (``heal``), its evaluation (``after``) and the paired
    differences from the untouched original (``paired``, ``paired_nll``: what the fine-tune alone
    does). Resumable like any healing run (``out_dir``)."""
    from . import compare as C
    from .heal import launch

    r = launch(source, Path(out_dir), cfg, stream=io.StringIO())
    after = evaluate_dir(Path(out_dir) / "model", tokenizer, cfg, heldout, device)
    paired, paired_nll = C.paired(baseline, after, "original", "dense healed", seed=cfg["seed"])
    return {"heal": r, "after": after, "paired": paired, "paired_nll": paired_nll}


def long_run(model_dir, out_dir: Path, cfg: Mapping, tokens: int, eval_every_tokens: int, baseline: Mapping,
             stream=None, stop_after_tokens: int | None = None) -> dict:
    """One long healing of ``model_dir`` (the reference recipe of ``cfg``, ``tokens`` in all) with
    held-out perplexity every ``eval_every_tokens`` (``heal.eval_every``): the recovery curve a
    reader extrapolates from. Resumable (``out_dir``'s checkpoints, one per two measurements).
    Each point is also given as a ratio to the dense model (``baseline``: notebook 00's
    ``perplexity_texts``, same texts and windows), the last with its paired interval.

    ``stop_after_tokens``: end at the last checkpoint at or before that many tokens, on the full
    run's schedule (the first part of the same run, e.g. to check a recipe where a long run
    misbehaved); the record then says ``completed: False`` and holds the points and loss curve
    up to that checkpoint (the last measured at it)."""
    from . import compare as C
    from .heal import launch

    per_step = int(cfg["heal"]["seq_len"]) * int(cfg["heal"]["batch_per_rank"]) * int(cfg["heal"]["nproc"])
    every = max(1, round(eval_every_tokens / per_step))
    stop = None
    if stop_after_tokens is not None:
        stop = stop_after_tokens // per_step // (2 * every) * (2 * every)
        if stop < 2 * every:
            raise ValueError(f"stop_after_tokens={stop_after_tokens:,} is before the first checkpoint "
                             f"({2 * every * per_step:,} tokens): stop later.")
    r = launch(model_dir, Path(out_dir), _cfg(cfg, {"heal.tokens": int(tokens), "heal.steps": None,
                                                    "heal.eval_every": every, "heal.checkpoint_every": 2 * every,
                                                    "heal.resume": True, "heal.stop_after": stop}), stream=stream)
    if r.get("completed") is False:
        return _partial_run(Path(out_dir), stop, per_step, every, cfg, baseline)
    points = _points(r["heldout_curve"], baseline)
    last = r["heldout_curve"][-1]["perplexity"]
    return {"tokens": r["plan"]["tokens"], "eval_every_steps": every, "lr": float(cfg["heal"]["lr"]),
            "dense": {t: {k: baseline[t][k] for k in ("ppl", "tokens", "seq_len", "text")} for t in last},
            "points": points, "final_vs_dense": {t: C.compare_nll(baseline[t], last[t], "dense", "healed")
                                                 for t in last},
            "heal": speed_record(r) | {"plan": r["plan"], "loss": r["loss"],
                                       "curve": [{k: p[k] for k in ("tokens", "lm_loss", "lr")}
                                                 for p in r["loss_curve"]]}}


def _points(heldout_curve, baseline: Mapping) -> list[dict]:
    """A long run's held-out points, each also as a ratio to the dense model on the same windows
    (window_nll and ids_sha kept: two long runs can then be paired at every point, paired_long_runs)."""
    keep = ("ppl", "nll", "tokens", "seq_len", "windows", "text", "ids_sha", "window_nll")
    return [{"step": p["step"], "tokens": p["tokens"],
             "perplexity": {t: {k: v[k] for k in keep} for t, v in p["perplexity"].items()},
             "x_dense": {t: v["ppl"] / baseline[t]["ppl"] for t, v in p["perplexity"].items()}} for p in heldout_curve]


def _partial_run(out_dir: Path, stop: int, per_step: int, every: int, cfg: Mapping, baseline: Mapping) -> dict:
    """:func:`long_run`'s record of a run stopped at step ``stop``, from that checkpoint's meta.json."""
    from .heal_data import MARKER
    from .results import read_json

    ckpt = out_dir / "checkpoints" / f"step_{stop}"
    if not (ckpt / MARKER).is_file():
        raise RuntimeError(f"the healing stopped at step {stop} but {ckpt} is not a complete checkpoint")
    meta = read_json(ckpt / "meta.json")
    points = _points(meta["heldout"], baseline)
    return {"completed": False, "stopped_at_tokens": stop * per_step, "eval_every_steps": every,
            "lr": float(cfg["heal"]["lr"]), "warmup": float(cfg["heal"]["warmup"]), "train_seconds": meta["train_seconds"],
            "tokens_per_s": stop * per_step / meta["train_seconds"],
            "dense": {t: {k: baseline[t][k] for k in ("ppl", "tokens", "seq_len", "text")} for t in points[-1]["perplexity"]},
            "points": points, "heal": {"curve": [{"tokens": p["step"] * per_step, "lm_loss": p["lm_loss"], "lr": p["lr"]}
                                                  for p in meta["curve"]]}}


def export_checkpoints(model_dir, out_dir: Path, tokens_per_step: int) -> dict[int, str]:
    """Every complete checkpoint a long run kept (``heal.keep_checkpoints`` large enough) as a model
    directory ``out_dir/at_<tokens>``, for the benchmarks along the run (``scripts/eval_models.py``).
    An export that already exists is kept. Returns ``{tokens: path}``."""
    from .heal_data import MARKER, export_checkpoint

    out = {}
    for ckpt in sorted((Path(out_dir) / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])):
        if (ckpt / MARKER).is_file():
            tokens = int(ckpt.name[5:]) * int(tokens_per_step)
            dest = Path(out_dir) / f"at_{tokens}"
            if not (dest / "config.json").is_file():
                export_checkpoint(model_dir, ckpt, dest)
            out[tokens] = str(dest)
    return out


def paired_long_runs(a: Mapping, b: Mapping, name_a: str = "a", name_b: str = "b") -> list[dict]:
    """Two :func:`long_run` results compared at every number of healing tokens both measured:
    ``[{"tokens", text: compare_nll(a's point, b's point)}]`` (``ppl_ratio`` is b over a, with its
    paired 95% interval over the same windows). Long runs written before their points kept the
    per-window NLL cannot be paired: compactify.compare says so."""
    from . import compare as C

    b_at = {p["tokens"]: p for p in b["points"]}
    return [{"tokens": p["tokens"], **{t: C.compare_nll(v, b_at[p["tokens"]]["perplexity"][t], name_a, name_b)
                                       for t, v in p["perplexity"].items()}}
            for p in a["points"] if p["tokens"] in b_at]
