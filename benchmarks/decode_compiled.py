"""Compiled decoding against the roofline: where eager batch-1 decoding loses its time on this CPU,
and how close transformers' own compiled decoding gets to the bandwidth bound, dense and compressed.

``benchmarks/roofline.py`` found dense fp32 decoding at 28% of its bandwidth bound and every
compressed format no faster than dense at 50% kept. This benchmark measures, in one run and at
each thread count:

1. the machine's bandwidth roof (:func:`compactify.roofline.ceilings`);
2. a GEMV probe on the dense model's own 211 matrices (:func:`compactify.speed.gemv_probe`): the
   rate of a plain read of each matrix, of torch's ``linear`` of one token (the BLAS GEMV that eager
   decoding calls), and of the multiply-and-sum that inductor generates for it;
3. every format decoded eagerly and compiled (:func:`compactify.speed.generate_kwargs`: a static
   KV cache, the decode step compiled by torch.compile with one-row matmuls decomposed), all
   round-robin in one process (rotated order), each against the bound its bytes and FLOPs imply,
   and against dense fp32 in the same runtime as per-round ratios with their IQR.

MPO formats run in ``auto`` mode (per layer the faster of factored and ``W`` cached, decided by
measurement before timing, eagerly: see :func:`compactify.mpo_modes.prepare_compiled`).

Writes ``data/results/benchmarks/decode_compiled.json`` and ``figures/decode_compiled.png``::

    .venv/bin/python benchmarks/decode_compiled.py                # ~8 min on 2 cores
    .venv/bin/python benchmarks/decode_compiled.py --quick        # fp32 and svd-50, 1 thread: ~4 min
    .venv/bin/python benchmarks/decode_compiled.py --figure-only
"""
from __future__ import annotations

import os

# ACTIVE, unlike the other benchmarks (benchmarks/mpo_linear.py: PASSIVE): a compiled decode step runs
# hundreds of small parallel kernels, and with PASSIVE each wakes sleeping threads; measured, 2 threads
# then decoded slower than 1 (data/results/benchmarks/decode_compiled_passive.json). Run it alone.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from compactify import roofline as R  # noqa: E402
from compactify import speed  # noqa: E402
from compactify.config import REPO_ROOT  # noqa: E402
from compactify.results import read_json, save_results  # noqa: E402

FORMATS = ("fp32", "bf16", "svd-70", "svd-50", "svd-30", "mpo2-50", "mpo3-50")
QUICK = ("fp32", "svd-50")
RUNTIMES = ("eager", "compiled")
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a screw press into a system that could produce books quickly. ")
DECODE_PROMPT = "Write one sentence about the sea:"


def label(name: str) -> str:
    if name in ("fp32", "bf16"):
        return f"dense {name}"
    spec = R.parse_format(name)
    kind = f"MPO {spec['cores']} cores" if spec["kind"] == "mpo" else "SVD"
    return f"{kind} {round(spec['keep'] * 100)}%"


def bytes_fit(formats: dict, key: str, runtime: str) -> dict | None:
    """Seconds per decoded token against bytes per token, a straight line through the formats whose
    kernels stream their bytes (dense and SVD; the MPOs' FLOPs, not bytes, bound them): the slope
    is the bandwidth the runtime reaches, the intercept its fixed cost per token (framework,
    attention, the generate loop). None with fewer than three such formats."""
    import numpy as np

    names = [n for n, f in formats.items() if R.parse_format(n)["kind"] in ("fp32", "bf16", "svd")]
    if len(names) < 3:
        return None
    x = np.array([formats[n]["decode_cost"]["bytes_per_token"] for n in names])
    y = np.array([1 / formats[n]["by_threads"][key][runtime]["decode"]["median"] for n in names])
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (slope * x + icept)
    return {"formats": names, "fixed_ms_per_token": 1e3 * icept, "bytes_per_s": 1 / slope,
            "max_abs_residual_ms": 1e3 * float(np.abs(resid).max())}


def ratio_rounds(a: list, b: list) -> dict:
    """Per-round ratio of two models' rates timed back to back: median and IQR."""
    return speed.stats([x / y for x, y in zip(a, b)])


def measure(args) -> dict:
    from compactify.models import load_model
    from compactify.mpo_modes import mode_summary, set_inference_mode

    t0, load_before = time.perf_counter(), os.getloadavg()
    torch.manual_seed(0)
    ceil = R.ceilings(args.threads, ("float32", "bfloat16"), seconds=1.0 if args.quick else 3.0,
                      mib=128 if args.quick else 256)
    print(f"ceilings done at {time.perf_counter() - t0:.0f} s", flush=True)
    base, tok = load_model("embedded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, records = R.build_formats(base, args.formats, log=lambda s: print(s, flush=True))
    prompt_ids = tok(PROMPT * 8, return_tensors="pt").input_ids[:, :args.prefill_tokens]
    dec_ids = tok(DECODE_PROMPT, return_tensors="pt").input_ids
    ctx = dec_ids.shape[1] + args.new_tokens // 2 + 1   # average position of the timed decode steps
    formats = {n: {"label": label(n), "spec": R.parse_format(n), **records[n],
                   "compute_dtype": "bfloat16" if n == "bf16" else "float32",
                   "by_threads": {}} for n in models}
    costs = {n: R.decode_cost(m, ctx) for n, m in models.items()}   # as stored; MPO again per pass, as executed
    for n, c in costs.items():
        formats[n]["decode_cost"] = c.to_dict()
    dense_mats = [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear)]
    probes, setups, fits = {}, {}, {}
    for t in args.threads:
        torch.set_num_threads(t)
        torch._dynamo.reset()   # inductor's CPU kernels are built for the thread count at compile time
        probes[str(t)] = speed.gemv_probe(dense_mats, repeats=args.probe_repeats)
        p = probes[str(t)]
        print(f"{t} thread(s): GEMV probe " + ", ".join(f"{w} {p[w]['bytes_per_s'] / 1e9:.1f} GB/s"
                                                          for w in ("read", "linear", "compiled")), flush=True)
        for n, m in models.items():
            if R.parse_format(n)["kind"] == "mpo":
                set_inference_mode(m, "auto")   # decisions made anew at this thread count
        entries = {f"{n} {rt}": models[n] for n in models for rt in RUNTIMES}
        runtimes = {k: k.rsplit(" ", 1)[1] for k in entries}
        s = speed.compare(entries, tok, prompt_ids, dec_ids, new_tokens=args.new_tokens, repeats=args.repeats,
                          rotate=True, decode=runtimes)
        setups[str(t)] = s.pop("_setup")
        c = ceil[str(t)]
        for n, f in formats.items():
            cost = costs[n]
            if R.parse_format(n)["kind"] == "mpo":   # auto's layers that chose the cached W read dense bytes
                cost = R.decode_cost(models[n], ctx, executed=True)
                f.setdefault("decode_cost_as_executed", {})[str(t)] = cost.to_dict()
                f.setdefault("mpo_mode", {})[str(t)] = mode_summary(models[n])
            b = R.bound(cost, c["bandwidth_roof"]["bytes_per_s"], c["gemm"][f["compute_dtype"]]["flops_per_s"])
            rec = {"bound": b, "bound_from": "as executed (auto's decisions)" if R.parse_format(n)["kind"] == "mpo"
                   else "stored format"}
            for rt in RUNTIMES:
                d = s[f"{n} {rt}"]["decode"]
                ref = s[f"fp32 {rt}"]["decode"]["values"]
                rec[rt] = {"decode": d, "fraction_of_bound": d["median"] / b["tokens_per_s"],
                           "ratio_to_fp32_same_runtime": ratio_rounds(d["values"], ref),
                           "ratio_to_fp32_eager": ratio_rounds(d["values"], s["fp32 eager"]["decode"]["values"]),
                           "prefill": s[f"{n} {rt}"]["prefill"]}
                print(f"  {t}t {n:8s} {rt:8s} {d['median']:6.1f} tok/s = {100 * rec[rt]['fraction_of_bound']:4.1f}% of "
                      f"{b['tokens_per_s']:5.1f}; x{rec[rt]['ratio_to_fp32_same_runtime']['median']:.2f} dense {rt}", flush=True)
            f["by_threads"][str(t)] = rec
        fits[str(t)] = {rt: bytes_fit(formats, str(t), rt) for rt in RUNTIMES}
        for rt, fit in fits[str(t)].items():
            if fit:
                print(f"  {rt}: {fit['fixed_ms_per_token']:.1f} ms per token + bytes at {fit['bytes_per_s'] / 1e9:.1f} GB/s "
                      f"(largest residual {fit['max_abs_residual_ms']:.1f} ms)", flush=True)
        print(f"  done at {time.perf_counter() - t0:.0f} s", flush=True)
    settings = {"quick": args.quick, "formats": list(args.formats), "threads": args.threads, "runtimes": list(RUNTIMES),
                "mpo_mode": "auto", "new_tokens": args.new_tokens, "repeats": args.repeats, "order": "rotated",
                "prefill_tokens": int(prompt_ids.shape[1]), "decode_prompt_tokens": int(dec_ids.shape[1]),
                "decode_context_tokens": ctx, "probe_repeats": args.probe_repeats,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0, "speed_setup": setups,
                "compiled": "transformers generate(cache_implementation='static', compile_config=CompileConfig(dynamic="
                            "False, options={'post_grad_fusion_options': {'decompose_mm_pass': {}}})); first call compiles"}
    return {"settings": settings, "ceilings": ceil, "gemv_probe": probes, "bytes_fit": fits, "formats": formats}


def figure(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from compactify.figures import apply_style, save

    apply_style()
    formats, threads = data["formats"], [str(t) for t in data["settings"]["threads"]]
    names = list(formats)
    tl = {t: f"{t} thread{'s' * (t != '1')}" for t in threads}
    rt_color = {"eager": "#d94701", "compiled": "#2171b5"}
    fig, ((a1, a2), (a3, a4)) = plt.subplots(2, 2, figsize=(12, 9), layout="constrained",
                                             gridspec_kw={"width_ratios": [0.75, 1.25]})
    fig.get_layout_engine().set(rect=(0, 0.02, 1, 0.98))   # room for the provenance footer
    ways = [("read", "plain read (w.sum())", "#bdbdbd"), ("linear", "torch linear (MKL GEMV)", "#6baed6"),
            ("compiled", "compiled multiply-sum", "#08519c")]
    w = 0.8 / len(ways)
    for j, (key, lab, col) in enumerate(ways):
        vals = [data["gemv_probe"][t][key]["bytes_per_s"] / 1e9 for t in threads]
        a1.bar(np.arange(len(threads)) + (j - 1) * w, vals, w, color=col, label=lab, edgecolor="0.3", lw=0.4)
    for i, t in enumerate(threads):
        roof = data["ceilings"][t]["bandwidth_roof"]["bytes_per_s"] / 1e9
        a1.hlines(roof, i - 0.45, i + 0.45, color="k", ls="--", lw=1, label="bandwidth roof (measured first)" if i == 0 else None)
    a1.set_xticks(range(len(threads)), [tl[t] for t in threads])
    a1.set_ylim(0, 1.45 * max(data["ceilings"][t]["bandwidth_roof"]["bytes_per_s"] / 1e9 for t in threads))
    a1.set(ylabel="GB/s", title=f"(a) streaming the dense model's {data['gemv_probe'][threads[0]]['matrices']} "
           "matrices,\none token each")
    a1.legend(fontsize=7, loc="upper center", ncol=2)
    x = np.arange(len(names))
    bw = 0.8 / (2 * len(threads))
    for k, t in enumerate(threads):
        for j, (rt, hatch) in enumerate((("eager", "//"), ("compiled", None))):
            pos = x + (2 * k + j - len(threads) + 0.5) * bw
            rec = [formats[n]["by_threads"][t][rt]["decode"] for n in names]
            med = np.array([r["median"] for r in rec])
            err = np.array([[m - r["q1"], r["q3"] - m] for m, r in zip(med, rec)]).T
            a2.bar(pos, med, bw, yerr=err, hatch=hatch, color=rt_color[rt], alpha=0.45 + 0.55 * k / max(len(threads) - 1, 1),
                   edgecolor="0.3", lw=0.4, error_kw={"lw": 0.7}, label=f"{rt}, {tl[t]}")
            bound = [formats[n]["by_threads"][t]["bound"]["tokens_per_s"] for n in names]
            a2.scatter(pos, bound, marker="_", s=60, color="k", zorder=3, label="bandwidth bound" if k + j == 0 else None)
    a2.set_xticks(x, [formats[n]["label"] for n in names], rotation=25, ha="right", fontsize=8)
    a2.set_ylim(0, 1.25 * max(formats[n]["by_threads"][t]["bound"]["tokens_per_s"] for n in names for t in threads))
    a2.set(ylabel="decoded tokens/s (median, IQR)", title="(b) batch-1 decode, eager vs compiled, against each format's bound")
    a2.legend(fontsize=7, ncol=3, loc="upper left")
    best = max(threads, key=lambda t: formats["fp32"]["by_threads"][t]["compiled"]["decode"]["median"])
    # bytes as executed: auto's MPO layers that chose the cached W read dense bytes
    mb = {n: (formats[n].get("decode_cost_as_executed", {}).get(best) or formats[n]["decode_cost"])["bytes_per_token"] / 1e6
          for n in names}
    xs = np.linspace(0, 1.2 * max(mb.values()), 50)
    a3.plot(xs, xs * 1e6 / data["ceilings"][best]["bandwidth_roof"]["bytes_per_s"] * 1e3, color="k", ls="--", lw=1,
            label="bound: bytes at the bandwidth roof")
    # hand-placed: the MPO points sit on dense's bytes, so they share one label
    offsets = {"fp32": (6, 5), "bf16": (0, 9), "svd-70": (-6, 7), "svd-50": (6, -12), "svd-30": (6, -12),
               "mpo2-50": None, "mpo3-50": (-6, -13)}
    for rt, marker in (("eager", "o"), ("compiled", "s")):
        for n in names:
            y = 1e3 / formats[n]["by_threads"][best][rt]["decode"]["median"]
            mpo = R.parse_format(n)["kind"] == "mpo"
            a3.plot(mb[n], y, marker, color=rt_color[rt], mfc="none" if mpo else rt_color[rt], ms=6, mec=rt_color[rt])
            if rt == "compiled" and offsets.get(n, (6, -12)):
                dx, dy = offsets.get(n, (6, -12))
                text = "MPO 2 / 3 cores 50%" if n == "mpo3-50" and "mpo2-50" in names else formats[n]["label"]
                a3.annotate(text, (mb[n], y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                            color="0.25", ha="left" if dx > 0 else "right" if dx < 0 else "center")
        fit = (data.get("bytes_fit") or {}).get(best, {}).get(rt)
        if fit:
            a3.plot(xs, fit["fixed_ms_per_token"] + xs * 1e6 / fit["bytes_per_s"] * 1e3, color=rt_color[rt], lw=1,
                    label=f"{rt}: {fit['fixed_ms_per_token']:.1f} ms + bytes at {fit['bytes_per_s'] / 1e9:.1f} GB/s (dense, SVD)")
    a3.plot([], [], "o", color="0.4", mfc="none", label="open: MPO, auto mode (every layer chose the cached W)")
    a3.set_xlim(0, xs[-1])
    a3.set_ylim(0, None)
    a3.set(xlabel="MB read per decoded token (counted from the model, as executed)", ylabel="ms per decoded token (median)",
           title=f"(c) time against bytes per token ({tl[best]})")
    a3.legend(fontsize=7, loc="upper left")
    for j, rt in enumerate(("eager", "compiled")):
        r = [formats[n]["by_threads"][best][rt]["ratio_to_fp32_same_runtime"] for n in names]
        med = np.array([v["median"] for v in r])
        err = np.array([[m - v["q1"], v["q3"] - m] for m, v in zip(med, r)]).T
        a4.errorbar(x + (j - 0.5) * 0.2, med, yerr=err, fmt="o", color=rt_color[rt], ms=5, label=f"{rt} vs dense fp32 {rt}")
    a4.axhline(1.0, color="k", lw=0.8)
    a4.axhline(1.5, color="0.5", lw=0.8, ls=":", label="issue 18's target at 50% kept (1.5x)")
    a4.set_xticks(x, [formats[n]["label"] for n in names], rotation=25, ha="right", fontsize=8)
    a4.set(ylabel="decode rate / dense fp32's, same runtime", yscale="log",
           title=f"(d) compressed vs dense in the same runtime ({tl[best]}; IQR of rounds)")
    a4.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.25, 0.5, 1, 1.5, 2, 3]))
    a4.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    a4.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a4.legend(fontsize=7, loc="upper right")
    return save(fig, path.parent, path.stem, data.get("meta"))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="torch thread counts (default 1 2; quick 1)")
    ap.add_argument("--formats", nargs="+", default=None, help=f"default {' '.join(FORMATS)} (fp32 is always included)")
    ap.add_argument("--quick", action="store_true", help=f"formats {', '.join(QUICK)}, 1 thread, short timings")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 2 per entry; quick 3)")
    ap.add_argument("--probe-repeats", type=int, default=9)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(REPO_ROOT / "data/results/benchmarks/decode_compiled.json"))
    ap.add_argument("--figure", default=str(REPO_ROOT / "figures/decode_compiled.png"))
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from --out")
    args = ap.parse_args(argv)
    if not args.figure_only:
        formats = list(args.formats or (QUICK if args.quick else FORMATS))
        try:
            R.check_formats(formats)
        except R.RooflineError as e:
            ap.error(str(e))
        if any(R.parse_format(n)["kind"] in ("int8", "nf4") for n in formats):
            ap.error("int8/NF4: bitsandbytes' CPU kernels are not compiled by torch.compile here; see benchmarks/roofline.py.")
        args.formats = ["fp32", *[n for n in formats if n != "fp32"]]
        args.threads = args.threads or ([1] if args.quick else [1, 2])
        args.repeats = args.repeats or (3 if args.quick else len(args.formats))
    return args


def main(argv=None):
    args = parse(argv)
    if not args.figure_only:
        data = measure(args)
        save_results(args.out, data, device="cpu", seed=0, model="embedded",
                     config_name="benchmarks/decode_compiled.py" + " --quick" * args.quick)
    figure(read_json(args.out), Path(args.figure))
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
