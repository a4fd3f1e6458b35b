"""Every figure and table of the paper, rebuilt from saved result JSON alone (notebook 08,
``make figures``): no model is loaded, so it takes seconds and anyone can restyle a figure
without recomputing it.

Each artefact names the result files it needs and the notebook that writes them. A missing
file fails that artefact alone, with a message naming the notebook to rerun; the others still
build. :func:`claims` sets each of the paper's headline claims beside our number and a verdict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import crossrun
from . import figures as F
from . import paper as P
from .aa_init import label
from .results import ResultFileError, read_json
from .speed_claims import compiled_note, roofline_note
from .run import PRODUCERS, RunInputError

# PRODUCERS (result file -> the notebook that writes it) lives in compactify.run.



def load(results_dir: Path, name: str) -> dict:
    path = Path(results_dir) / name
    if not path.is_file():
        raise RunInputError(f"{path} is missing: rerun notebook {PRODUCERS.get(name, '?')} "
                            f"(make reproduce runs every notebook, then publishes to data/results/).")
    return read_json(path)


def paper_tables(repo_root: Path | None = None) -> tuple[dict, dict]:
    """Table I (its CSV rows, as printed) and Table II of the paper (:mod:`compactify.paper`)."""
    return {r["model"]: r for r in P._rows("table1_models.csv")}, P.table2()


def _fig1a(r: Path, out: Path) -> None:
    d = load(r, "03_tensorize.json")
    F.save(F.mpo_diagram(d["main"]["fig1a"]), out, "fig1a_mpo", d["meta"])


def _fig1b(r: Path, out: Path) -> None:
    d = load(r, "03_tensorize.json")
    rows = d["main"]["size_report"]["rows"]
    b = sorted({x["block"] for x in rows})[len({x["block"] for x in rows}) // 2]
    blk = {x["matrix"]: {"out": x["shape"][0], "in": x["shape"][1], "kept": x["ratio"],
                         "chi": max(x["bond_dims"]) if x.get("bond_dims") else None} for x in rows if x["block"] == b}
    F.save(F.block_diagram(blk, b), out, "fig1b_block", d["meta"])


def _fig2(r: Path, out: Path, repo_root: Path) -> None:
    d = load(r, "06_evaluate.json")
    _, t2 = paper_tables(repo_root)
    ours = {m: d["evaluations"][m]["tasks"] for m in F.PAPER_MODELS}
    paired = {m: d["paired"][m] for m in F.PAPER_MODELS if m in d.get("paired", {})} or None
    F.save(F.accuracy_bars(ours, t2, list(ours["original"]), paired=paired), out, "fig2_accuracy", d["meta"])


def _fig3(r: Path, out: Path) -> None:
    d = load(r, "05_heal.json")
    imp = d.get("improved") or {}
    starts = {f"{label(imp['init'])} start": imp["heal"]["loss_curve"]} if imp.get("heal") else None
    control = (d.get("dense_control") or {}).get("heal") or {}
    F.save(F.heal_figure(d["heal"]["loss_curve"], d["speed"], (d.get("loss_comparison") or {}).get("losses"),
                         starts=starts, control=control.get("loss_curve"), main=F.heal_start_label(d.get("blockwise"))),
           out, "fig3_healing", d["meta"])


def _fig4(r: Path, out: Path) -> None:
    d = load(r, "06_evaluate.json")
    F.save(F.inference_time(d["task_time_vs_original"], d["speed"], {m: P.inference_time(m) for m in ("4-bit", "88%")}), out,
           "fig4_inference_time", d["meta"])


def _fig5(r: Path, out: Path) -> None:
    d = load(r, "02_layer_sensitivity.json")
    F.save(F.sensitivity_panels(d["panel"], d["dense_ppl"]), out, "fig5_sensitivity", d["meta"])
    for level in d["settings"]["heatmap_ratios"]:
        F.save(F.sensitivity_heatmap(d["heatmap"], level, d["dense_ppl"]), out,
               f"fig5b_sensitivity_heatmap_{int(round(100 * level))}", d["meta"])


def _frontier(r: Path, out: Path) -> None:
    d = load(r, "07_frontier.json")
    flagged = {int(k.split("/")[1]): v for k, v in crossrun.disagreements(r, "07_frontier.json").items()
               if k.startswith("points/")}  # points another machine's run scored >2x apart
    F.save(F.frontier(d["points"], d["dense"], flagged=flagged), out, "frontier", d["meta"])
    for keep in d["settings"]["errors_at"]:
        F.save(F.matrix_errors(d["matrices"], keep), out, f"frontier_matrix_errors_{int(round(100 * keep))}", d["meta"])


def _pipeline(r: Path, out: Path) -> None:
    from .figures_pipeline import measured

    d = load(r, "00_baseline.json")  # the run's provenance; the other steps' numbers where they exist
    F.save(F.pipeline(measured(r), d["meta"].get("model", "embedded")), out, "pipeline", d["meta"])


def _required(r: Path, rel: str, how: str) -> dict:
    """A result written outside the notebooks (a script or benchmark), or an error naming ``how``."""
    path = Path(r) / rel
    if not path.is_file():
        raise RunInputError(f"{path} is missing: run {how}.")
    return read_json(path)


def _optional(r: Path, rel: str) -> dict | None:
    """A result that is shown where it was run (None where not)."""
    path = Path(r) / rel
    return read_json(path) if path.is_file() else None


def _speed_quality(r: Path, out: Path) -> None:
    d = load(r, "07_frontier.json")
    rf = _required(r, "benchmarks/roofline.json", "benchmarks/roofline.py (make benchmarks)")
    F.save(F.speed_quality(d["points"], d["dense"], rf), out, "speed_quality", rf["meta"])


def scale_results(results_dir: Path) -> list[dict]:
    """benchmarks/scale.py's runs under ``results_dir/scale/`` (GPU runs first)."""
    runs = [read_json(f) for f in sorted((Path(results_dir) / "scale").glob("*.json"))]
    return sorted(runs, key=lambda d: d["meta"]["device"].get("device") == "cpu")


def _scale(r: Path, out: Path) -> None:
    runs = scale_results(r)
    if not runs:
        raise RunInputError(f"{Path(r) / 'scale'} has no results: run benchmarks/scale.py (make benchmarks).")
    F.save_scale_figure(runs, out, "scale_7b_shape")


def _heal_long(r: Path, out: Path) -> None:
    from .heal_study import LONG_RUN_FILES, LONG_RUN_KEEP, LONG_RUN_TASKS

    d = _required(r, f"heal/{LONG_RUN_FILES['tt_svd']}", "make heal-long (after make reproduce)")
    F.save(F.heal_long_figure(d), out, "heal_long", d["meta"])
    # the same long healing of other starts or on other text at the same budget, where run; the benchmarks
    # along them, where scored
    runs = {"tt_svd": d} | {k: h for k, f in LONG_RUN_FILES.items() if k != "tt_svd" and k not in LONG_RUN_KEEP
                            and (h := _optional(r, f"heal/{f}")) is not None}
    t = _optional(r, f"heal/{LONG_RUN_TASKS[0]}")
    if len(runs) > 1:
        F.save(F.heal_long_comparison(runs, tasks=t, task_points=LONG_RUN_TASKS[1] if t else None), out,
               "heal_long_comparison", (t or list(runs.values())[-1])["meta"])


def _healed_frontier(r: Path, out: Path) -> None:
    d = _required(r, "benchmarks/healed_frontier.json", "benchmarks/healed_frontier.py (after scripts/recovery_curve.py)")
    F.save(F.healed_frontier(d), out, "healed_frontier", d["meta"])


def _recovery(r: Path, out: Path) -> None:
    from .recovery import with_blockwise

    d = _required(r, "heal/recovery_curve.json", "scripts/recovery_curve.py (after make reproduce)")
    # the same starts distilled block by block first (scripts/recovery_curve.py --blockwise), where run
    F.save(F.recovery_figure(with_blockwise(d, Path(r) / "heal")), out, "recovery_curve", d["meta"])


def _loss_study(r: Path, out: Path) -> None:
    from .heal_study import LOSS_STUDY_FILES

    runs = [h for h in (_optional(r, f"heal/{f}") for f in LOSS_STUDY_FILES) if h is not None]
    if not runs:
        raise RunInputError(f"{Path(r) / 'heal'} has no loss study: run scripts/loss_study.py (after make reproduce).")
    t = _optional(r, "heal/loss_study_tasks.json")
    F.save(F.loss_study_figure(runs, t), out, "loss_study", (t or runs[-1])["meta"])


def _tables(r: Path, out: Path, repo_root: Path) -> None:
    d = load(r, "06_evaluate.json")
    t1, t2 = paper_tables(repo_root)
    fp32 = d["sizes"]["original"]["bytes"]
    lines = ["# Table I: models (ours: SmolLM2-135M-Instruct; paper: LLaMA-2 7B)", "",
             "| model | ours: MB | ours: vs fp32 | ours: parameters (M) | paper: GB | paper: parameters (B) | paper: precision |",
             "|---|---|---|---|---|---|---|"]
    for m in F.PAPER_MODELS:
        s = d["sizes"][m]
        lines.append(f"| {m} | {s['bytes'] / 1e6:.1f} | {s['bytes'] / fp32:.3f} | {s['params'] / 1e6:.1f} | "
                     f"{t1[m]['size_gb']} | {t1[m]['parameters_b']} | {t1[m]['precision']} |")
    ev = d["evaluations"]
    tasks = list(ev["original"]["tasks"])
    lines += ["", "# Table II: accuracy (%), ours ± stderr [paper]", "",
              "| task | " + " | ".join(ev) + " |", "|---" * (len(ev) + 1) + "|"]
    for t in tasks:
        cells = []
        for m in ev:
            x = ev[m]["tasks"].get(t)
            cell = f"{100 * x['value']:.1f} ± {100 * (x['stderr'] or 0):.1f}" if x else "–"
            if t in t2 and m in t2[t]:
                cell += f" [{t2[t][m]:.1f}]"
            cells.append(cell)
        lines.append(f"| {t} (n={ev['original']['tasks'][t]['n']}) | " + " | ".join(cells) + " |")
    lines.append("| held-out perplexity | " + " | ".join(f"{ev[m]['perplexity']['ppl']:.2f}" for m in ev) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text("\n".join(lines) + "\n\n" + F.footer(d["meta"]) + "\n")


# Notebook figures that notebook 08 redraws from the same results under the paper's names: only
# 08's copy is published (one file per figure). 01's Fig. 1a is the primer's matrix; 08's is the
# saved model's, so the published Fig. 1a is 08's.
REDRAWN = ("01_fig1a_mpo", "02_sensitivity_panels", "02_sensitivity_heatmap_*", "05_heal", "06_fig2_accuracy",
           "06_fig4_inference_time", "07_frontier", "07_matrix_errors_*")


def redrawn(path: Path) -> bool:
    """Whether a notebook's figure file is one that 08 publishes under its paper name."""
    from fnmatch import fnmatch

    return any(fnmatch(Path(path).stem, pat) for pat in REDRAWN)


def show(out_dir: Path, *patterns: str, width: int = 720) -> list[Path]:
    """Display the published PNGs matching ``patterns`` (in a notebook), each under its name."""
    from IPython.display import Image, Markdown, display

    shown = [p for pat in patterns for p in sorted(Path(out_dir).glob(f"{pat}.png"))]
    for png in shown:
        display(Markdown(f"**{png.stem}**"), Image(filename=str(png), width=width))
    if not shown:
        print(f"no figure matching {', '.join(patterns)} in {out_dir} (see the build status above)")
    return shown


def artefacts(repo_root: Path) -> dict[str, Callable[[Path, Path], None]]:
    return {"Pipeline overview": _pipeline, "Fig. 1a": _fig1a, "Fig. 1b": _fig1b, "Fig. 2": lambda r, o: _fig2(r, o, repo_root), "Fig. 3": _fig3,
            "Fig. 4": _fig4, "Fig. 5": _fig5, "Tables I-II": lambda r, o: _tables(r, o, repo_root), "Frontier (beyond the paper)": _frontier, "Speed-quality frontier": _speed_quality,
            "Scale (7B shape, Figs. 3-4)": _scale, "Long healing (beyond the paper)": _heal_long,
            "Recovery curve (beyond the paper)": _recovery, "Healed speed-quality frontier": _healed_frontier,
            "Loss and healing text (beyond the paper)": _loss_study}


def build_all(results_dir: Path, out_dir: Path, repo_root: Path) -> dict[str, str]:
    """Build every artefact; return ``{artefact: "ok" | the reason it failed}``."""
    import matplotlib.pyplot as plt

    status = {}
    for name, fn in artefacts(repo_root).items():
        try:
            fn(Path(results_dir), Path(out_dir))
            status[name] = "ok"
        except (RunInputError, ResultFileError) as e:
            status[name] = str(e)
        finally:
            plt.close("all")
    return status


def _ratio_iqr(v: dict) -> str:
    """A speed ratio with the IQR of its per-round ratios: '0.94x (IQR 0.85-0.97)'."""
    r = v.get("decode_ratio_rounds")
    return f"{v['decode_ratio']:.2f}x" + (f" (IQR {r['q1']:.2f}-{r['q3']:.2f})" if r else "")


def claims(results_dir: Path) -> list[dict]:
    """The paper's headline claims beside our measurements, with a verdict each."""
    def get(name):
        try:
            return load(results_dir, name)
        except (RunInputError, ResultFileError):
            return None

    rows = []
    scale = scale_results(results_dir)
    sc = scale[0] if scale else None
    where = (f"{sc['meta']['device'].get('name') or sc['meta']['device'].get('device')}, "
             f"h{sc['config']['shape']['hidden']}x{sc['config']['shape']['blocks']} blocks") if sc else ""
    sens, tens, heal, ev = (get(n) for n in ("02_layer_sensitivity.json", "03_tensorize.json", "05_heal.json",
                                               "06_evaluate.json"))
    if tens:
        kept = tens["main"]["size_report"]["totals"]
        frac = 1 - kept["block_params_after"] / kept["block_params_before"]
        rows.append({"claim": "70% fewer parameters", "paper": "7B -> 2.1B (70%)",
                     "ours": f"{100 * frac:.0f}% fewer in the block matrices; whole model "
                             f"{100 * (1 - kept['model_ratio']):.0f}% fewer (tied embedding kept)",
                     "at_scale": f"{100 * (1 - sc['decomposition']['block_params_ratio']):.0f}% fewer in the block matrices, "
                                 f"{sc['decomposition']['seconds']:.0f} s to decompose ({where})" if sc else "",
                     "verdict": "reproduced (by construction)" if frac >= 0.69 else "not reached"})
    if ev:
        s = ev["sizes"]
        mem = 1 - s["93%"]["bytes"] / s["original"]["bytes"]
        rows.append({"claim": "93% less memory with mixed int4", "paper": "27.1 GB -> 2.1 GB (92%)",
                     "ours": f"{100 * mem:.0f}% less than fp32",
                     "at_scale": (lambda b: f"{100 * (1 - b['mixed'] / b['dense_fp32']):.0f}% less: {b['mixed'] / 1e9:.2f} GB "
                                  f"(all 7 matrices as MPOs at 30%, embedding + head NF4; computed at the 7B shape)")(
                                      sc["bytes"]["llama2_7b_computed"]["bytes"]) if sc else "",
                     "verdict": "reproduced" if mem >= 0.9 else
                     "not reproduced (the tied embedding, 21% of SmolLM2, stays 16-bit)"})
        rows += accuracy_claims(ev)
        sp = ev["speed"]
        roof = roofline_note(results_dir)
        rows.append({"claim": "inference >25% faster (tensorized)", "paper": f"time <= {P.inference_time('88%')} of original",
                     "ours": f"decode {_ratio_iqr(sp['88%'])}, prefill {sp['88%']['prefill_ratio']:.2f}x the original's "
                             f"tokens/s (CPU, MPO layers in auto mode){roof.get('mpo', '')}{compiled_note(results_dir)}",
                     "at_scale": f"MPO decode {sc['ratios']['decode']:.2f}x dense ({where})" if sc else "",
                     "verdict": "reproduced" if sp["88%"]["decode_ratio"] >= P.speed_ratio("88%") else "not reproduced on this CPU"})
        rows.append({"claim": "4-bit 13% slower", "paper": f"time {P.inference_time('4-bit')} of original",
                     "ours": f"decode {_ratio_iqr(sp['4-bit'])} the original's tokens/s{roof.get('nf4', '')}",
                     "verdict": "direction reproduced" if sp["4-bit"]["decode_ratio"] < 1 else "not reproduced"})
    if heal:
        r = heal["speed_ratio_tensorized_vs_dense"]
        rows.append({"claim": "healing ~2x faster", "paper": "about 2x (8 A10G)", "ours": f"{r:.2f}x tokens/s ({heal['heal']['world_size']} {heal['heal']['device'].split(':')[0].upper()} "
                                                         f"process(es), {heal['heal'].get('compute', 'fp32')})",
                     "at_scale": (f"{sc['ratios']['heal_tokens_per_s']:.2f}x tokens/s, {sc['ratios']['heal_peak_memory']:.2f}x "
                                  f"peak memory ({where})") if sc else "",
                     # one pair of sequential runs, no interval; two reference runs of the same healing code gave
                     # 1.02x and 1.16x, so a ratio within 20% of 1 is not called faster or slower
                     "verdict": "reproduced" if r >= 1.8 else ("faster, less than 2x" if r > 1.2 else
                                                               "not reproduced (within 20% of dense: one pair of "
                                                               "sequential runs, reruns spread by ~15%)")})
    if sens:
        key = next((k for k in sens["claims"] if k.startswith("ratio_")), None)
        c = sens["claims"][key] if key else None
        if c:
            rho, first, last = c["spearman_depth_all"], c["mean_increase_first_third_%"], c["mean_increase_last_third_%"]
            verdict = depth_verdict(rho, first, last)
            rows.append({"claim": "deeper layers more compressible", "paper": "Fig. 5 / text",
                         "ours": f"Spearman(depth, ppl increase) = {rho:.2f}; first third "
                                 f"+{first:.0f}%, last third +{last:.0f}% (mean over matrices)", "verdict": verdict})
            level = key.split("_", 1)[1]
            med = {t.split("@")[0]: v["median_increase_%"] for t, v in sens["claims"]["per_type"].items()
                   if t.endswith("@" + level)}
            by_median = max(med, key=med.get) if med else None
            top = c["most_sensitive_type"]
            verdict = ("reproduced" if top == "down" and by_median == "down" else
                       "partly" if "down" in (top, by_median) else "not reproduced")
            rows.append({"claim": "last MLP matrix (L7) most sensitive", "paper": "Fig. 5 / text",
                         "ours": f"most sensitive by mean: {top}; by median: {by_median} "
                                 f"(median +{med.get(by_median, float('nan')):.1f}%); mean ranking {', '.join(c['type_ranking'])}",
                         "verdict": verdict})
    for claim in ("GSM8K drops most at 93%",):
        rows.append({"claim": claim, "paper": "23.1 -> 17.7", "ours": "GSM8K is ~0% for a 135M model",
                     "verdict": "not testable here (model too small)"})
    return rows


INFORMATIVE = ("lambada", "piqa", "arc_easy", "hellaswag", "winogrande")


def depth_verdict(rho: float, first: float, last: float) -> str:
    """The paper's "deeper layers are more compressible" against Spearman's rho (block depth vs the
    perplexity increase) and the mean increase of the first and last third of the blocks. |rho| < 0.2
    is "no steady trend" whatever its sign: the fp32 run of the same study (crossrun/) measured +0.004
    where the bf16 run measured -0.008, and a verdict must not turn on that."""
    if rho < -0.2:
        return "reproduced"
    if first > 2 * last and rho < 0.2:
        return "partly: the first blocks are far more sensitive, but there is no steady trend with depth"
    return "not reproduced"


def accuracy_claims(ev: dict) -> list[dict]:
    """The "2-3 point drop" claim for the 88% and 93% models, judged by paired intervals
    (compactify.compare.drop_verdict): per task where the original is above chance, and as the
    mean over those tasks; tasks where the original is at chance are "not testable"."""
    from . import compare as C

    if "paired" not in ev:
        return [{"claim": "2-3 point accuracy drop", "paper": "mean 1.4 points over 5 tasks",
                 "ours": "no per-document results (made before paired comparisons): rerun notebook 06",
                 "verdict": "not measured"}]
    o = ev["evaluations"]["original"]
    rows = []
    from .config import REPO_ROOT

    _, t2 = paper_tables(REPO_ROOT)
    for model in ("88%", "93%"):
        if model not in ev["paired"]:
            continue
        paper_drop = sum(t2[t]["original"] - t2[t][model] for t in t2) / len(t2)
        paper = f"mean drop {paper_drop:.1f} points over {len(t2)} tasks (LLaMA-2 7B, Table II)"
        pr = ev["paired"][model]
        testable = [t for t in pr if not C.at_chance(o["tasks"][t])]
        chance = [t for t in pr if t not in testable]
        parts = [f"{t}: drop {-pr[t]['diff']:.1f} [{-pr[t]['hi']:.1f}, {-pr[t]['lo']:.1f}] (n={pr[t]['n']})"
                 for t in testable]
        m = C.mean_drop(pr, testable) if testable else None
        nll = ev.get("paired_nll", {}).get(model, {})
        ppl = "; ".join(f"perplexity x{r['ppl_ratio']:.2f} [{r['ppl_ratio_lo']:.2f}, {r['ppl_ratio_hi']:.2f}] on {x} "
                        f"({r['tokens']} tokens, seq {r['seq_len']})" for x, r in nll.items())
        ours = (f"mean drop {m['drop']:.1f} points [95% CI {m['lo']:.1f}, {m['hi']:.1f}] over {', '.join(testable)}; "
                if m else "") + "; ".join(parts)
        if chance:
            ours += ("; at chance for the original (not testable): " +
                     ", ".join(f"{t} {100 * o['tasks'][t]['value']:.1f}±{100 * (o['tasks'][t]['stderr'] or 0):.1f} "
                               f"vs chance {100 * o['tasks'][t]['chance']:.0f}" for t in chance))
        rows.append({"claim": f"2-3 point accuracy drop ({model})", "paper": paper,
                     "ours": ours + (f"; {ppl}" if ppl else ""),
                     "verdict": (C.drop_verdict(m["lo"], m["hi"]) + " (paired 95% interval of the mean drop vs 3 points)")
                     if m else "not testable (the original is at chance on every task)"})
    return rows


def claims_markdown(rows: list[dict]) -> str:
    out = ["| claim | paper | ours (SmolLM2-135M, CPU) | ours at 7B shape (benchmarks/scale.py) | verdict |",
           "|---|---|---|---|---|"]
    out += [f"| {r['claim']} | {r['paper']} | {r['ours']} | {r.get('at_scale') or 'not measured'} | {r['verdict']} |"
            for r in rows]
    return "\n".join(out) + "\n"

