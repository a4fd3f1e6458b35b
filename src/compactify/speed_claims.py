"""The speed rows' notes in the claims table (:func:`compactify.report.claims`): what the speed
benchmarks' published JSON (``benchmarks/roofline.py``, ``benchmarks/decode_compiled.py``) says."""
from __future__ import annotations

from pathlib import Path

from .results import read_json


def roofline_note(results_dir: Path) -> dict:
    """What benchmarks/roofline.json says of the factored 3-core MPO at 30% kept and of NF4 (2 threads)."""
    p = Path(results_dir) / "benchmarks" / "roofline.json"
    if not p.is_file():
        return {}
    f = read_json(p)["formats"]
    out = {}
    for key, name, why in (("mpo", "mpo3-30", "factored: its FLOPs, not its bytes, bound it"),
                           ("nf4", "nf4", "bitsandbytes' CPU path writes a dense copy of each weight per call")):
        t = f.get(name, {}).get("by_threads", {}).get("2")
        if t:
            out[key] = (f"; roofline (benchmarks/roofline.json, 2 threads): {f[name]['label']} decodes at "
                        f"{t['decode_ratio_to_fp32']:.2f}x dense fp32, {100 * t['decode_fraction_of_bound']:.0f}% of its "
                        f"bound ({why})")
    return out


def compiled_note(results_dir: Path) -> str:
    """What benchmarks/decode_compiled.json says of compiled decoding (its fastest thread count for dense)."""
    p = Path(results_dir) / "benchmarks" / "decode_compiled.json"
    if not p.is_file():
        return ""
    f = read_json(p)["formats"]
    t = max(f["fp32"]["by_threads"], key=lambda k: f["fp32"]["by_threads"][k]["compiled"]["decode"]["median"])
    dense = f["fp32"]["by_threads"][t]["compiled"]
    parts = [f"dense fp32 at {100 * dense['fraction_of_bound']:.0f}% of its bound, "
             f"{dense['ratio_to_fp32_eager']['median']:.2f}x eager"]
    for n in ("mpo2-50", "mpo3-50", "svd-50"):
        if n in f:
            r = f[n]["by_threads"][t]["compiled"]["ratio_to_fp32_same_runtime"]
            parts.append(f"{f[n]['label']} {r['median']:.2f}x (IQR {r['q1']:.2f}-{r['q3']:.2f}) dense")
    return (f"; compiled decoding (benchmarks/decode_compiled.json, {t} thread{'s' * (t != '1')}, "
            f"static KV cache + torch.compile): " + ", ".join(parts))
