"""The paper's numbers, in one place: Tables I and II and the headline claims, read from
``data/paper/*.csv`` (the only copy; see data/paper/README.md for where each number is in the paper),
LLaMA-2 7B's shape, and the arithmetic of Table I (:func:`paper_table1_check`)."""
from __future__ import annotations

import csv
from functools import lru_cache

from .config import REPO_ROOT

PAPER_DIR = REPO_ROOT / "data" / "paper"
PAPER_MODELS = ("original", "8-bit", "4-bit", "88%", "93%")
# LLaMA-2 7B (meta-llama/Llama-2-7b-hf config.json): untied embedding and head, RMSNorm scales
# (two per block and a final one).
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "blocks": 32, "vocab": 32000}


def _rows(name: str) -> list[dict]:
    with open(PAPER_DIR / name, newline="") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=None)
def table1() -> dict[str, dict]:
    """Table I: ``{model: {"size_gb", "parameters" (a count), "precision"}}``."""
    return {r["model"]: {"size_gb": float(r["size_gb"]), "parameters": float(r["parameters_b"]) * 1e9,
                         "precision": r["precision"]} for r in _rows("table1_models.csv")}


@lru_cache(maxsize=None)
def table2() -> dict[str, dict[str, float]]:
    """Table II: ``{task: {model: accuracy in %}}``."""
    return {r["task"]: {m: float(r[m]) for m in PAPER_MODELS} for r in _rows("table2_accuracy.csv")}


@lru_cache(maxsize=None)
def claims() -> dict[str, dict]:
    """The headline claims: ``{name: {"value" (float, or the text where it is a range), "unit", "source"}}``."""
    out = {}
    for r in _rows("claims.csv"):
        try:
            value: float | str = float(r["paper_value"])
        except ValueError:
            value = r["paper_value"]
        out[r["claim"]] = {"value": value, "unit": r["unit"], "source": r["source"]}
    return out


def inference_time(model: str) -> float:
    """The paper's inference time relative to the original (Fig. 4's text): "4-bit" 1.13, "88%" 0.75."""
    return float(claims()[{"4-bit": "inference_time_4bit", "88%": "inference_time_tensorized"}[model]]["value"])


def speed_ratio(model: str) -> float:
    """The same claim as a tokens/s ratio to the original (1 / time): 0.88 for 4-bit, 1.33 for 88%."""
    return 1.0 / inference_time(model)


# Table I as (size in GB = 10^9 bytes, parameters, precision's first word), for the arithmetic below.
PAPER_TABLE1 = {m: (r["size_gb"], r["parameters"], r["precision"].split(" ")[0]) for m, r in table1().items()}

NF4_BITS_DQ = 4 + 8 / 64 + 32 / (64 * 256)  # NF4, blocksize 64, 8-bit scales with one fp32 scale per 256 of them


def paper_table1_check(shapes: dict | None = None) -> dict:
    """Which layers must be 4-bit in the paper's "93%" model for Table I's 2.1 GB? The arithmetic.

    The "88%" model is all fp16: 4.1 GB / 2 bytes = 2.05 B parameters. The "93%" model has the
    same parameters, ``x`` in fp16 MPO cores and ``y`` in int4, so 2x + 0.5y = 2.1 GB with
    x + y = 2.05 B, i.e. ``y = (2 * 2.05 - 2.1) / 1.5 = 1.33 B`` parameters must be int4. The
    candidates below place the dense layers differently and give the size each implies.
    """
    shapes = dict(shapes or {k: LLAMA2_7B[k] for k in ("hidden", "intermediate", "blocks", "vocab")})
    h, f, nb, v = shapes["hidden"], shapes["intermediate"], shapes["blocks"], shapes["vocab"]
    per_block = {"q": h * h, "k": h * h, "v": h * h, "o": h * h, "gate": h * f, "up": h * f, "down": f * h}
    matrices = nb * sum(per_block.values())
    down, emb_head, norms = nb * per_block["down"], 2 * v * h, (2 * nb + 1) * h
    total = matrices + emb_head + norms
    gb = 1e9
    p88 = PAPER_TABLE1["88%"][0] * gb / 2                     # parameters of the fp16 88% model
    int4_needed = (2 * p88 - PAPER_TABLE1["93%"][0] * gb) / 1.5  # int4 parameters of the 93% model

    def size(int4, fp16, bits4=4.0):
        return (fp16 * 2 + int4 * bits4 / 8) / gb

    candidates = []
    for name, int4 in [("embedding + head only (all seven matrices tensorized)", emb_head),
                       ("down_proj of every block + embedding + head", down + emb_head),
                       ("down_proj of every block; embedding + head stay fp16", down),
                       ("everything, MPO cores included", p88)]:
        fp16 = p88 - int4
        candidates.append({"int4": name, "int4_params": int4, "fp16_params": fp16, "gb_at_4_bits": size(int4, fp16),
                           "gb_nf4_double_quant": size(int4, fp16, NF4_BITS_DQ)})
    rows = {"original": {"formula_gb": 4 * total / gb},
            "8-bit": {"formula_gb": total / gb,  # every parameter in one byte
                      "bnb_gb": (matrices + 4 * nb * (4 * h + 2 * f + h) + 2 * (emb_head + norms)) / gb},
            "4-bit": {"formula_gb": total / 2 / gb,
                      "bnb_gb": (matrices * NF4_BITS_DQ / 8 + 2 * (emb_head + norms)) / gb},
            "88%": {"params_from_size": p88}, "93%": {"int4_params_needed": int4_needed, "fp16_params": p88 - int4_needed,
                    # Table I rounds to 0.1 GB: 88% in [4.05, 4.15], 93% in [2.05, 2.15] GB
                    "int4_params_range": ((4.05 - 2.15) * gb / 1.5, (4.15 - 2.05) * gb / 1.5)}}
    for k, (paper_gb, paper_params, prec) in PAPER_TABLE1.items():
        rows[k].update({"paper_gb": paper_gb, "paper_params": paper_params, "precision": prec})
    return {"shapes": shapes, "params": {"total": total, "block_matrices": matrices, "down_proj": down,
                                         "embedding_and_head": emb_head, "norms": norms, "per_block": per_block},
            "rows": rows, "candidates_93": candidates,
            "tensorized_keep_ratio_if_down_dense": (p88 - down - emb_head - norms) / (matrices - down)}
