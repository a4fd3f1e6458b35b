"""Notebook 05's experiments around a healing run, as functions a reader can rerun and test.

* :func:`loss_comparison`: the same start healed with each loss (``lm``, ``kd``, ...) for the
  same tokens, then scored on every held-out text, with the paired NLL difference of each loss
  against the first (``compactify.compare``): the measurement that picks ``heal.loss``.
* :func:`speed_comparison`: the paper's Fig. 3 -- the same steps healed by the dense and the
  compressed model, one after the other, steady-state tokens/s (step 1, which also allocates
  the AdamW state, left out) and peak memory.
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


def loss_comparison(model_dir, out_root: Path, cfg: Mapping, losses=("lm", "kd"), tokens: int = 8192,
                    heldout: Mapping | None = None, device="cpu") -> dict:
    """Heal ``model_dir`` once per loss for ``tokens`` tokens (fresh runs in ``out_root/<loss>``),
    score each healed model on every held-out text; returns per loss the run's tokens/s and
    final losses, the perplexities, and the paired NLL difference against ``losses[0]``."""
    from . import compare as C
    from .evaluate import heldout_ids_for, perplexity
    from .heal import launch
    from .models import load_model
    from .mpo_layer import contracted

    pc = cfg["eval"]["perplexity"]
    out: dict = {"tokens": int(tokens), "losses": {}}
    for loss in losses:
        d = Path(out_root) / loss
        shutil.rmtree(d, ignore_errors=True)
        r = launch(model_dir, d, _cfg(cfg, {"heal.loss": loss, "heal.tokens": int(tokens), "heal.steps": None,
                                            "heal.resume": False, "heal.checkpoint_every": 10**6}),
                   stream=io.StringIO())
        model, tok = load_model(d / "model", device=device)
        texts = heldout if heldout is not None else heldout_ids_for(tok, cfg)
        with contracted(model):
            ppl = {name: perplexity(model, tok, ids, seq_len=pc["seq_len"], batch_size=pc["batch_size"],
                                    autocast=cfg["eval"]["autocast"], text_name=name) for name, ids in texts.items()}
        last = r["loss_curve"][-1]
        out["losses"][loss] = {"tokens_per_s": r["tokens_per_s_steady"], "final_lm_loss": last["lm_loss"],
                               "final_kd_loss": last["kd_loss"], "perplexity": ppl,
                               "curve": [{k: p[k] for k in ("tokens", "lm_loss", "kd_loss")} for p in r["loss_curve"]]}
        del model
        shutil.rmtree(d, ignore_errors=True)  # the checkpoints and the model: only the numbers are kept
    base = losses[0]
    out["paired_vs_" + base] = {
        loss: {text: C.compare_nll(out["losses"][base]["perplexity"][text], v["perplexity"][text], base, loss)
               for text in v["perplexity"]} for loss, v in out["losses"].items() if loss != base}
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
        speed[name] = {k: r[k] for k in ("train_seconds", "wall_seconds", "steps_this_run", "tokens_this_run",
                                         "peak_rss_mib_per_rank", "compute", "threads_per_rank")}
        speed[name].update({"tokens_per_s": r["tokens_per_s_steady"], "tokens_per_s_all_steps": r["tokens_per_s"],
                            "trainable_params": r["params"], "peak_rss_mib": max(r["peak_rss_mib_per_rank"])})
        shutil.rmtree(d, ignore_errors=True)
    return speed
