"""A roofline of every format of SmolLM2-135M-Instruct on this machine: how close does each get to
the rate its bytes and FLOPs allow, and where does the rest go?

In one run: the machine's ceilings at each thread count (bandwidth from a large copy/triad/read,
GEMM FLOP/s in fp32 and bf16: :func:`compactify.roofline.ceilings`); every format built with the
package's own functions (dense fp32 and bf16, bitsandbytes int8 and NF4, MPO with 2 and 3 cores
and plain low-rank SVD keeping 70/50/30% of the block parameters); bytes and FLOPs per token
counted from each model (:func:`compactify.roofline.decode_cost`, ``prefill_cost``) and the
bound they imply; batch-1 decode and prefill tokens/s measured round-robin over all formats
(:func:`compactify.speed.compare`: medians and IQRs); and the fixed cost per module call and
per operator times how many one decoded token makes.

bitsandbytes 0.50.2 without AVX-512 (this CPU) dequantizes every quantized weight into a dense
fp32 copy at each call, so int8 and NF4 get two bounds: from their stored bytes (the format's),
and "as executed" with that copy written and read.

``--device cuda`` measures on the GPU instead (ceilings with device operands and synchronized
timings, models moved there, one pass: thread counts do not apply); a format whose library is
not installed there (bitsandbytes) is recorded as ``{"skipped": why}``. ``--random-weights``
builds SmolLM2-135M's architecture from its config.json with random weights, for a machine
without its weights (scripts/gpu_check.py); the JSON says so (``settings.weights``).

Writes ``data/results/benchmarks/roofline.json`` and ``figures/roofline.png``::

    .venv/bin/python benchmarks/roofline.py                     # all 13 formats, 1 and 2 threads
    .venv/bin/python benchmarks/roofline.py --quick --threads 2 # 5 formats, short timings: ~2-3 min
    .venv/bin/python benchmarks/roofline.py --figure-only       # redraw from the JSON
    python benchmarks/roofline.py --device cuda --quick --random-weights --out ... --figure ...
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/mpo_linear.py: spinning threads on 2 cores

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from compactify import roofline as R  # noqa: E402
from compactify.config import REPO_ROOT  # noqa: E402
from compactify.results import read_json  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a screw press into a system that could produce books quickly and "
          "cheaply. Within fifty years presses were operating in hundreds of European cities, and the number of "
          "books in circulation grew from thousands to millions. Scholars could now compare identical copies of a "
          "text, which changed how knowledge was checked and shared. ")
DECODE_PROMPT = "Write one sentence about the sea:"
LABELS = {"fp32": "dense fp32", "bf16": "dense bf16", "int8": "int8 (LLM.int8)", "nf4": "NF4"}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    spec = R.parse_format(name)
    kind = f"MPO {spec['cores']} cores" if spec["kind"] == "mpo" else "SVD"
    return f"{kind} {round(spec['keep'] * 100)}%"


def bnb_dequantizes() -> bool:
    """True where bitsandbytes' CPU backend multiplies through a dense dequantized copy (no AVX-512)."""
    try:
        from bitsandbytes.backends.cpu import ops

        return not getattr(ops, "_has_avx512", False)
    except Exception:  # noqa: BLE001 - no bitsandbytes: no quantized formats either
        return True


def pass_label(key: str) -> str:
    """A measurement pass's name for people: ``"1"`` -> 1 thread, ``"cuda"`` -> CUDA."""
    return "CUDA" if key == "cuda" else f"{key} thread{'s' if int(key) > 1 else ''}"


def load_base(args):
    """``(model, tokenizer, weights)``: the embedded SmolLM2-135M-Instruct, or with ``--random-weights``
    its architecture with random weights (:func:`compactify.roofline.random_model`, no weight file read)."""
    if args.random_weights:
        base, tok = R.random_model(args.meta, seed=0)
        return base, tok, {"random": True, "config": str(Path(args.meta) / "config.json"), "seed": 0,
                           "note": "SmolLM2-135M-Instruct's architecture with random init (its weights are not on this "
                                   "machine): bytes, FLOPs and tokens/s do not depend on the weights' values (except "
                                   "LLM.int8's outlier columns, which follow the activations)"}
    from compactify.models import load_model

    base, tok = load_model("embedded")
    return base, tok, {"random": False, "model": "embedded (pretrained SmolLM2-135M-Instruct)"}


def measure(args) -> dict:
    from compactify.speed import compare

    names = R.check_formats(args.formats or (R.QUICK_FORMATS if args.quick else R.ALL_FORMATS))
    cuda = args.device == "cuda"
    passes = ["cuda"] if cuda else [str(t) for t in args.threads]   # CUDA: thread counts do not apply
    dev = torch.device(args.device)
    t0, load_before = time.perf_counter(), os.getloadavg()
    torch.manual_seed(0)
    print(f"ceilings on {args.device} ...", flush=True)
    ceil = R.ceilings(args.threads, ("float32", "bfloat16"), seconds=1.0 if args.quick else 4.0,
                      mib=None if cuda else 128 if args.quick else 256, device=args.device)
    print(f"ceilings done at {time.perf_counter() - t0:.0f} s", flush=True)
    base, tok, weights = load_base(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, records = R.build_formats(base, names, args.device, log=lambda s: print(s, flush=True))
    del base
    if not models:
        raise R.RooflineError(f"Every format was skipped ({records}); nothing was measured.")
    prompt_ids = tok(PROMPT * 4, return_tensors="pt").input_ids[:, :args.prefill_tokens].to(dev)
    dec_ids = tok(DECODE_PROMPT, return_tensors="pt").input_ids.to(dev)
    ctx = dec_ids.shape[1] + args.new_tokens // 2 + 1   # average position of the timed decode steps
    deq = False if cuda else bnb_dequantizes()   # on CUDA bitsandbytes multiplies the stored weights directly

    formats = {n: {"label": label(n), "spec": R.parse_format(n), **records[n]} for n in names if n not in models}
    for n, m in models.items():
        dc, pc = R.decode_cost(m, ctx), R.prefill_cost(m, prompt_ids.shape[1])
        formats[n] = {"label": label(n), "spec": R.parse_format(n), "build_s": records[n]["build_s"],
                      "compute_dtype": "bfloat16" if n == "bf16" else "float32",
                      "params": sum(p.numel() for p in m.parameters()), "stored_bytes": R.stored_bytes(m),
                      "decode_cost": dc.to_dict(), "decode_cost_as_executed": R.decode_cost(m, ctx, deq).to_dict(),
                      "prefill_cost": pc.to_dict(), "calls_per_token": R.calls_per_token(m, dec_ids), "by_threads": {}}
    formats = {n: formats[n] for n in names}
    print(f"costs and call counts done at {time.perf_counter() - t0:.0f} s", flush=True)
    overhead, speed = {}, {}
    for key in passes:
        if not cuda:
            torch.set_num_threads(int(key))
        overhead[key] = R.call_overhead(device=args.device)
        print(f"{pass_label(key)}: timing {len(models)} formats round-robin ...", flush=True)
        speed[key] = compare(models, tok, prompt_ids, dec_ids, new_tokens=args.new_tokens, repeats=args.repeats,
                             rotate=args.order == "rotated")
        print(f"  done at {time.perf_counter() - t0:.0f} s", flush=True)
    for n, f in formats.items():
        if "skipped" in f:
            continue
        for key in passes:
            c, s = ceil[key], speed[key][n]
            bw, fl = c["bandwidth_roof"]["bytes_per_s"], c["gemm"][f["compute_dtype"]]["flops_per_s"]
            dc, dx = _cost(f["decode_cost"]), _cost(f["decode_cost_as_executed"])
            b, bx, bp = R.bound(dc, bw, fl), R.bound(dx, bw, fl), R.bound(_cost(f["prefill_cost"]), bw, fl)
            t_meas = 1 / s["decode"]["median"]
            parts = R.part_seconds(dc, bw, fl)
            dequant = sum(R.part_seconds(dx, bw, fl).values()) - sum(parts.values())
            over = R.overhead_seconds(f["calls_per_token"], overhead[key])
            gap = {**{f"{k}_at_roof_s": v for k, v in parts.items()}, "dequantized_copy_s": dequant,
                   "call_overhead_s": over, "rest_s": t_meas - sum(parts.values()) - dequant - over,
                   "measured_s": t_meas}
            f["by_threads"][key] = {
                "decode": s["decode"], "prefill": s["prefill"], "decode_ratio_to_fp32": s["decode_ratio"],
                "decode_ratio_rounds": s.get("decode_ratio_rounds"),
                "decode_bound": b, "decode_bound_as_executed": bx, "prefill_bound": bp,
                "decode_fraction_of_bound": s["decode"]["median"] / b["tokens_per_s"],
                "decode_fraction_of_bound_as_executed": s["decode"]["median"] / bx["tokens_per_s"],
                "prefill_fraction_of_bound": s["prefill"]["median"] / bp["tokens_per_s"],
                "decode_seconds_per_token": gap}
            print(f"  {pass_label(key)} {n:8s} decode {s['decode']['median']:6.1f} tok/s = {gap['measured_s'] * 1e3:5.1f} ms, "
                  f"bound {b['tokens_per_s']:6.1f} ({100 * s['decode']['median'] / b['tokens_per_s']:4.1f}%), overhead "
                  f"{over * 1e3:4.1f} ms; prefill {s['prefill']['median']:6.0f} tok/s, bound {bp['tokens_per_s']:6.0f}")
    settings = {"quick": args.quick, "formats": names, "device": args.device,
                "device_name": torch.cuda.get_device_name(dev) if cuda else None,
                "threads": None if cuda else args.threads, "passes": passes, "weights": weights,
                "skipped": {n: f["skipped"] for n, f in formats.items() if "skipped" in f},
                "new_tokens": args.new_tokens, "repeats": args.repeats, "order": args.order,
                "prefill_tokens": int(prompt_ids.shape[1]),
                "decode_prompt_tokens": int(dec_ids.shape[1]), "decode_context_tokens": ctx,
                "bnb_dequantizes": deq, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0,
                "speed_setup": {k: speed[k]["_setup"] for k in speed}}
    return {"settings": settings, "ceilings": ceil, "call_overhead": overhead, "formats": formats}


def _cost(d: dict) -> R.Cost:
    """A :class:`Cost` back from its ``to_dict`` (per-token parts, one token)."""
    c = R.Cost(1, d["context_tokens"])
    for k, v in d["parts_per_token"].items():
        c.add(k, v["bytes"], v["flops"])
    return c


# ----------------------------------------------------------------------------- figure

OFFSETS = [(6, 3), (6, -11), (-6, 3), (-6, -11), (0, 9), (0, -16), (10, 14), (10, -22), (-10, 14), (-10, -22),
           (18, 0), (-18, 0), (14, 26), (14, -34), (-14, 26), (-14, -34), (30, 8), (-30, 8), (30, -20), (-30, -20),
           (45, 0), (-45, 0), (40, 24), (-40, 24), (40, -30), (-40, -30), (0, 38), (0, -44), (60, 14), (-60, 14),
           (60, -26), (-60, -26)]   # farther out, with a leader line, where the cluster near intensity 1 is dense


def place_labels(ax, points, texts, colors, lines=()) -> int:
    """Label each point at the first offset whose box overlaps no other label, point, roof line
    (``lines``) or the axes' edge (greedy, checked in display coordinates); returns how many labels
    still overlap."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    frame = ax.get_window_extent(rend)
    dots = [ax.transData.transform(p) for p in points]
    paths = [ln.get_transform().transform_path(ln.get_path()) for ln in lines]
    placed, clashes = [], 0
    for k in sorted(range(len(points)), key=lambda k: -points[k][1]):
        best = None
        for dx, dy in OFFSETS:
            a = ax.annotate(texts[k], points[k], xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                            color=colors[k], ha="left" if dx > 0 else "right" if dx < 0 else "center",
                            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if abs(dx) + abs(dy) > 20 else None)
            a.update_positions(rend)
            bb = Text.get_window_extent(a, rend).expanded(1.05, 1.15)  # the text alone, not its leader line
            ok = (frame.contains(bb.x0, bb.y0) and frame.contains(bb.x1, bb.y1) and not any(bb.overlaps(o) for o in placed)
                  and not any(bb.contains(*d) for j, d in enumerate(dots) if j != k)
                  and not any(p.intersects_bbox(bb, filled=False) for p in paths))
            if ok:
                best = (a, bb)
                break
            a.remove()
        if best is None:
            clashes += 1
            a = ax.annotate(texts[k], points[k], xytext=OFFSETS[0], textcoords="offset points", fontsize=6.5, color=colors[k])
            best = (a, a.get_window_extent(rend))
        placed.append(best[1])
    return clashes


def color(name: str):
    """One hue per family (dense, bitsandbytes, MPO 2 / 3 cores, SVD), darker for less kept."""
    import matplotlib.pyplot as plt

    fixed = {"fp32": "#252525", "bf16": "#969696", "int8": "#6baed6", "nf4": "#08519c"}
    if name in fixed:
        return fixed[name]
    spec = R.parse_format(name)
    cmap = {"mpo": {2: "Oranges", 3: "Reds"}.get(spec["cores"]), "svd": "Greens"}[spec["kind"]]
    return plt.get_cmap(cmap)(0.45 + 0.5 * (1 - spec["keep"]) / 0.4 * 0.8)


def figure(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from compactify.figures import apply_style, save

    apply_style()
    formats, settings = data["formats"], data["settings"]
    passes = settings.get("passes") or [str(t) for t in settings["threads"]]   # files from before --device
    names = [n for n in formats if "skipped" not in formats[n]]
    skipped = [n for n in formats if n not in names]
    colors = {n: color(n) for n in names}
    fig = plt.figure(figsize=(11, 9.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    clashes = 0
    for ax, t in zip(np.atleast_1d(top.subplots(1, len(passes))), passes):
        c = data["ceilings"][t]
        bw, f32 = c["bandwidth_roof"]["bytes_per_s"], c["gemm"]["float32"]["flops_per_s"]
        x = np.logspace(-1.5, 2.5, 200)
        roofs = ax.plot(x, np.minimum(bw * x, f32), color="k", lw=1.2, label=f"roof: {bw / 1e9:.1f} GB/s ({c['bandwidth_roof']['from']}), "
                f"fp32 GEMM {f32 / 1e9:.0f} GFLOP/s")
        if "bfloat16" in c["gemm"]:
            b16 = c["gemm"]["bfloat16"]["flops_per_s"]
            roofs += ax.plot(x, np.minimum(bw * x, b16), color="k", lw=0.9, ls="--", label=f"bf16 GEMM roof {b16 / 1e9:.1f} GFLOP/s")
        pts, txt, cols = [], [], []
        for n in names:
            f, r = formats[n], formats[n]["by_threads"][t]
            ai, fl = f["decode_cost"]["intensity_flop_per_byte"], f["decode_cost"]["flops_per_token"]
            meas, bnd = r["decode"]["median"] * fl, r["decode_bound"]["tokens_per_s"] * fl
            lo, hi = r["decode"]["q1"] * fl, r["decode"]["q3"] * fl
            ax.plot([ai, ai], [meas, bnd], color=colors[n], lw=0.6, alpha=0.6)
            ax.plot(ai, bnd, "o", mfc="none", mec=colors[n], ms=5)
            ax.errorbar(ai, meas, yerr=[[meas - lo], [hi - meas]], fmt="o", color=colors[n], ms=5, mec="k", mew=0.4, lw=0.8)
            pts.append((ai, meas))
            txt.append(f"{f['label']} {100 * r['decode_fraction_of_bound']:.0f}%")
            cols.append(colors[n])
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity of a decoded token (FLOP / byte)",
               ylabel="FLOP/s", title=f"decode, batch 1, {pass_label(t)}: measured (filled, IQR) vs bound (open)")
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(min(p[1] for p in pts) / 4, f32 * 3)
        ax.legend(fontsize=6.5, loc="upper left")
        clashes += place_labels(ax, pts, txt, cols, lines=roofs)
    ax, ax2 = bottom.subplots(1, 2)
    width = 0.8 / (2 * len(passes))
    idx = np.arange(len(names))
    for j, t in enumerate(passes):
        for k, (kind, hatch) in enumerate((("decode", None), ("prefill", "//"))):
            vals = [formats[n]["by_threads"][t][f"{kind}_fraction_of_bound"] for n in names]
            ax.bar(idx + (2 * j + k - len(passes) + 0.5) * width, vals, width, hatch=hatch, alpha=0.55 + 0.45 * j,
                   color=[colors[n] for n in names], edgecolor="0.3", lw=0.4, label=f"{kind}, {pass_label(t)}")
    ax.set_xticks(idx, [formats[n]["label"] for n in names], rotation=40, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="measured / bound", title="fraction of the roofline bound reached")
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=6.5, ncol=2)
    if skipped:   # why: the JSON's settings.skipped
        ax.set_title(f"fraction of the roofline bound reached\n(not built here: {', '.join(skipped)})")
    ax = ax2
    t = "cuda" if passes == ["cuda"] else str(max(int(k) for k in passes))
    keys = [("blocks_at_roof_s", "block matrices at roof"), ("lm_head_at_roof_s", "LM head at roof"),
            ("attention_at_roof_s", "attention (KV cache) at roof"), ("other_at_roof_s", "embedding, norms"),
            ("dequantized_copy_s", "bnb dense dequantized copy"), ("call_overhead_s", "per-call overhead (est.)"),
            ("rest_s", "rest: kernels below roof, generate loop")]
    left = np.zeros(len(names))
    palette = ["#2171b5", "#6baed6", "#74c476", "#bdbdbd", "#fd8d3c", "#d94701", "#f0f0f0"]
    for (key, lab), colr in zip(keys, palette):
        vals = np.array([max(formats[n]["by_threads"][t]["decode_seconds_per_token"][key], 0) * 1e3 for n in names])
        ax.barh(idx, vals, left=left, color=colr, edgecolor="0.4", lw=0.3, label=lab)
        left += vals
    ax.set_yticks(idx, [formats[n]["label"] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="ms per decoded token", title=f"where a decoded token's time goes ({pass_label(t)})")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.45, -0.16), ncol=2)
    if clashes:
        print(f"warning: {clashes} point labels could not be placed without overlap")
    return save(fig, path.parent, path.stem, data.get("meta"))


def parse(argv=None) -> argparse.Namespace:
    """The options, checked: an unknown format or device, or ``--device cuda`` without CUDA, exits 2
    (the message names the problem) before anything is measured or written."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=R.DEVICES, default="cpu",
                    help="where to measure (default cpu); cuda: one pass, --threads does not apply")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts on the CPU (default 1 2)")
    ap.add_argument("--quick", action="store_true", help=f"formats {', '.join(R.QUICK_FORMATS)}; short timings")
    ap.add_argument("--formats", nargs="+", default=None, help=f"any of {', '.join(R.ALL_FORMATS)}")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's architecture with random weights, from its config.json (no weight file read)")
    ap.add_argument("--meta", default=None, help="folder with SmolLM2's config.json + tokenizer.json for --random-weights "
                    "(default data/cache/gpu-carry/smollm2-meta, else data/cache/models/SmolLM2-135M-Instruct-fp32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per timing (default 16, quick 6)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="round-robin repeats (default: rotated, one per format, so each takes every position once; fixed 5; quick 2)")
    ap.add_argument("--order", choices=["rotated", "fixed"], default="rotated",
                    help="rotated: each round starts one format later (default since 2026-12-07); fixed: the same order every "
                         "round, the last format always timed last (benchmarks/mpo_modes.py measured that position at 0.88x)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="prompt tokens of prefill (default 128, quick 32)")
    ap.add_argument("--out", default=str(REPO_ROOT / "data/results/benchmarks/roofline.json"))
    ap.add_argument("--figure", default=str(REPO_ROOT / "figures/roofline.png"))
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from --out")
    args = ap.parse_args(argv)
    if not args.figure_only:
        if args.meta and not args.random_weights:
            ap.error("--meta only applies with --random-weights.")
        try:
            R.check_formats(args.formats or ())
            R.check_device(args.device)
            if args.random_weights:
                args.meta = str(args.meta or R.smollm2_meta_dir())
                if not (Path(args.meta) / "config.json").is_file():
                    raise R.RooflineError(f"--meta {args.meta}: no config.json there.")
        except R.RooflineError as e:
            ap.error(str(e))
        args.new_tokens = args.new_tokens or (6 if args.quick else 16)
        n_formats = len(args.formats or (R.QUICK_FORMATS if args.quick else R.ALL_FORMATS))
        args.repeats = args.repeats or (2 if args.quick else n_formats if args.order == "rotated" else 5)
        args.prefill_tokens = args.prefill_tokens or (32 if args.quick else 128)
    return args


def main(argv=None):
    args = parse(argv)
    if not args.figure_only:
        data = measure(args)
        flags = [f"--device {args.device}"] + ["--quick"] * args.quick + ["--random-weights"] * args.random_weights
        R.save_roofline(args.out, data, device=args.device, seed=0,
                        model="random SmolLM2-135M-Instruct architecture" if args.random_weights else "embedded",
                        config_name=" ".join(["benchmarks/roofline.py", *flags]))
    try:
        figure(read_json(args.out), Path(args.figure))
    except ImportError as e:   # a GPU machine may lack matplotlib/seaborn: the JSON is what counts
        print(f"figure not drawn ({e}); the results are in {args.out}")
        return
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
