"""Is an MPO layer faster than the dense one it replaces, and how long does tensorizing take?

Side by side in one process, interleaved round-robin so that the load other jobs put on this
shared machine hits both alike; the JSON keeps the median and the minimum of the repeats. With
load averages of 6-9 on 2 cores, a millisecond-scale call is often pre-empted, so medians
scatter by 2-5x between runs; the minimum (the uncontended cost) is what the figure and the
targets use, next to the median:

* ``MPOLinear`` vs ``nn.Linear`` forward, and forward+backward (weights and input get
  gradients, as in healing), for SmolLM2's block shapes (576x576, 192x576, 1536x576,
  576x1536) and LLaMA-2-7B's (4096x4096, 11008x4096, 4096x11008), over a chi sweep that
  includes the chi removing 70% of the matrix's parameters (``chi70``), at 1 token (decode)
  and 512 tokens (prefill). Also, as a reference only, "rebuild the dense matrix from the
  cores, then matmul" (the module never does this). The layers' cores are random: time does
  not depend on their values. FLOP ratios come from ``MPOLinear.flops`` (the cost model).
  LLaMA shapes at 1 token are timed with cold caches (a 256 MiB buffer is streamed before
  every call): a 4096x4096 fp32 matrix (64 MiB) otherwise stays in this CPU's 105 MiB L3
  between repeats, which no layer of a 7B model enjoys while decoding. SmolLM2's matrices
  (<= 3.4 MiB) are timed warm.
  Points whose predicted cost exceeds a few seconds a call are skipped and say so.
* Decomposition time (TT-SVD at chi70, 3 cores) of all 210 block matrices of SmolLM2-135M
  (real weights), with the default Gram-eigh SVD; tensorly's LAPACK ``truncated_svd`` on one
  block for comparison; and single LLaMA-2-7B-sized matrices with 3 and 2 cores.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless already set): on this shared
2-core machine, spinning OpenMP threads made a 2-thread MPO forward 28x slower than a
1-thread one (38.6 ms vs 1.4 ms); passive waiting removed the penalty (1.6 ms).

Usage::

    .venv/bin/python benchmarks/mpo_linear.py            # ~5 min: data/results/benchmarks/mpo_linear.json
    .venv/bin/python benchmarks/mpo_linear.py --quick --out /tmp/x   # seconds, for the tests
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.tt_matrix import tt_matrix_to_matrix  # noqa: E402

from compactify.config import REPO_ROOT  # noqa: E402
from compactify.mpo import MPOLinear, bond_dims, chi_for_ratio, decompose, factorize  # noqa: E402
from compactify.results import read_json, save_results  # noqa: E402
from compactify.speed import interleaved  # noqa: E402

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOL_MATRICES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                 "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
MAX_CALL_S = 2.5        # skip a point predicted to exceed this per call and 2.5x the dense FLOPs
ASSUMED_FLOPS = 2e10    # FLOP/s assumed for that prediction (2 busy cores)


def layer_for(shape, chi, cores=3):
    out_f, in_f = factorize(shape[0], cores), factorize(shape[1], cores)
    dims = [o * i for o, i in zip(out_f, in_f)]
    layer = MPOLinear(out_f, in_f, bond_dims(dims, chi), bias=False)
    for p in layer.cores:  # unit-variance output for unit-variance input
        torch.nn.init.normal_(p, std=(p.shape[0] * p.shape[2]) ** -0.5)
    return layer


def chi70(shape, cores=3):
    out_f, in_f = factorize(shape[0], cores), factorize(shape[1], cores)
    return chi_for_ratio([o * i for o, i in zip(out_f, in_f)], 0.3)


_EVICT = None


def evict_caches():
    """Stream a buffer larger than the last-level cache (105 MiB here), so that the next call
    reads its weights from memory, as each layer of a real model does during decoding."""
    global _EVICT
    if _EVICT is None:
        _EVICT = torch.ones(64 * 2**20)  # 256 MiB
    _EVICT.add_(1.0)


def round_robin(fns: dict, budget_s: float, min_rep=3, max_rep=200, cold=False) -> dict:
    """Median and min seconds of each function, calls interleaved (compactify.speed.interleaved);
    repeats sized to ``budget_s`` from one timed call each. ``cold``: evict the caches before
    every call (not timed)."""
    def seconds(fn) -> float:
        if cold:
            evict_caches()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    timed = {name: functools.partial(seconds, fn) for name, fn in fns.items()}
    first = {name: v[0] for name, v in interleaved(timed, rounds=1, warmup=0).items()}  # also the warm-up
    reps = int(min(max_rep, max(min_rep, budget_s / max(sum(first.values()), 1e-9))))
    times = interleaved(timed, rounds=reps, warmup=0)
    return {"median": {name: statistics.median(ts) for name, ts in times.items()},
            "min": {name: min(ts) for name, ts in times.items()}, "repeats": reps}


def rebuilt(layer):  # reference only: the dense matrix from the cores (differentiable)
    with tl.backend_context("pytorch"):
        return tt_matrix_to_matrix(list(layer.cores))


def bench_group(shape, chis, batch, budget_s, cold=False):
    """All chi of one (shape, batch), timed together with the dense layer."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(shape[1], shape[0], bias=False)
    x = torch.randn(batch, shape[1])
    xg = x.clone().requires_grad_(True)
    g = torch.randn(batch, shape[0])
    layers = {chi: layer_for(shape, chi) for chi in chis}
    rows, fwd, bwd = [], {"dense": lambda: dense(x)}, {"dense": lambda: dense(xg).backward(g)}
    for chi, layer in layers.items():
        row = {"shape": list(shape), "chi": chi, "chi70": chi == chi70(shape), "batch": batch,
               "bond_dims": list(layer.bond_dims), "params_ratio": layer.num_cores_params / (shape[0] * shape[1]),
               "flops_ratio": layer.flops(batch) / layer.dense_flops(batch),
               "bytes_ratio": layer.bytes(batch) / layer.dense_bytes(batch)}
        predicted = 3 * layer.flops(batch) / ASSUMED_FLOPS
        if predicted > MAX_CALL_S and row["flops_ratio"] > 2.5:
            row["skipped"] = f"predicted {predicted:.0f} s per forward+backward ({row['flops_ratio']:.1f}x dense FLOPs)"
        else:
            fwd[chi] = lambda layer=layer: layer(x)
            fwd[f"rebuild{chi}"] = lambda layer=layer: torch.nn.functional.linear(x, rebuilt(layer))
            bwd[chi] = lambda layer=layer: layer(xg).backward(g)
        rows.append(row)
    with torch.no_grad():
        tf = round_robin(fwd, budget_s, cold=cold)
    tb = round_robin(bwd, budget_s, cold=cold)
    for row in rows:
        chi = row["chi"]
        row.update(repeats=[tf["repeats"], tb["repeats"]], cold_cache=cold)
        for stat, suffix in (("median", ""), ("min", "_min")):
            f, b = tf[stat], tb[stat]
            row.update({f"dense_fwd{suffix}_s": f["dense"], f"dense_fwdbwd{suffix}_s": b["dense"]})
            if chi in f:
                row.update({f"mpo_fwd{suffix}_s": f[chi], f"rebuild_fwd{suffix}_s": f[f"rebuild{chi}"],
                            f"mpo_fwdbwd{suffix}_s": b[chi], f"fwd_ratio{suffix}": f[chi] / f["dense"],
                            f"fwdbwd_ratio{suffix}": b[chi] / b["dense"],
                            f"rebuild_ratio{suffix}": f[f"rebuild{chi}"] / f["dense"]})
    return rows


def smollm2_weights(quick: bool):
    """The 210 block matrices of SmolLM2-135M (real), or random ones of the same shapes."""
    if not quick:
        try:
            from compactify.models import load_model

            model, _ = load_model("embedded")
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
            return [(b, t, layer.get_submodule(names[t]).weight.detach().clone())
                    for b, layer in enumerate(model.model.layers) for t in names], "SmolLM2-135M-Instruct (real weights)"
        except Exception as e:  # noqa: BLE001 - the timing is still meaningful on random weights
            print(f"embedded model unavailable ({e}); timing random matrices of the same shapes")
    blocks = 1 if quick else 30
    g = torch.Generator().manual_seed(0)
    return ([(b, t, torch.randn(*s, generator=g) / math.sqrt(s[1])) for b in range(blocks) for t, s in SMOL_MATRICES.items()],
            "random matrices with SmolLM2's shapes")


def bench_decomposition(quick: bool) -> dict:
    weights, source = smollm2_weights(quick)
    t0 = time.perf_counter()
    mpos = [decompose(w, target_ratio=0.3) for _, _, w in weights]
    total = time.perf_counter() - t0
    errors = [m.relative_error(w) for m, (_, _, w) in zip(mpos, weights)]
    block0 = [w for b, _, w in weights if b == 0][: 2 if quick else 7]
    t1 = time.perf_counter()
    for w in block0:
        decompose(w, target_ratio=0.3, svd="truncated_svd")
    lapack_block = (time.perf_counter() - t1) * 7 / len(block0)
    out = {"source": source, "smollm2_matrices": len(weights), "smollm2_total_s": total,
           "smollm2_per_matrix_s": total / len(weights), "mean_relative_error_chi70": statistics.mean(errors),
           "tensorly_truncated_svd_one_block_s": lapack_block, "gram_one_block_s": total / len(weights) * 7,
           "tensorly_truncated_svd_all_blocks_estimate_s": lapack_block * len(weights) / 7, "llama": []}
    big = [] if quick else [((4096, 4096), 3), ((4096, 4096), 2), ((11008, 4096), 3)]
    g = torch.Generator().manual_seed(0)
    for shape, cores in big:
        w = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        t = time.perf_counter()
        m = decompose(w, target_ratio=0.3, cores=cores)
        out["llama"].append({"shape": list(shape), "cores": cores, "bond_dims": list(m.bond_dims),
                             "seconds": time.perf_counter() - t, "svd": "gram"})
    return out


def figure(data, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plt.rcParams.update({"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.25]})
    colors = dict(zip([tuple(s) for s in SMOL + LLAMA], plt.cm.tab10.colors))
    for ax, batch in zip(axes[:2], sorted({r["batch"] for r in data["layer"]})):
        for shape in dict.fromkeys(tuple(r["shape"]) for r in data["layer"]):
            rows = [r for r in data["layer"] if tuple(r["shape"]) == shape and r["batch"] == batch and "fwd_ratio_min" in r]
            if not rows:
                continue
            ax.plot([r["chi"] for r in rows], [r["fwd_ratio_min"] for r in rows], "o-", color=colors.get(shape),
                    label=f"{shape[0]}x{shape[1]}" + (" (cold)" if rows[0]["cold_cache"] else ""), ms=4)
            for r in rows:
                if r["chi70"]:
                    ax.plot(r["chi"], r["fwd_ratio_min"], "*", color=colors.get(shape), ms=13, mec="k", mew=0.5)
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="bond dimension chi",
               ylabel="MPOLinear / nn.Linear forward time\n(min of interleaved repeats)", title=f"{batch} token{'s' if batch > 1 else ''} (star: 70% removed)")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # a label under a decade's span too
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    d = data["decomposition"]
    n = d["smollm2_matrices"]
    labels = [f"SmolLM2,\n{n} matrices", "same, LAPACK\nSVD (est.)"] + [
        f"{r['shape'][0]}x{r['shape'][1]}\n{r['cores']} cores" for r in d["llama"]]
    values = [d["smollm2_total_s"], d["tensorly_truncated_svd_all_blocks_estimate_s"]] + [r["seconds"] for r in d["llama"]]
    bars = axes[2].bar(range(len(values)), values, color=["#2171b5", "#9ecae1"] + ["#fd8d3c"] * len(d["llama"]))
    axes[2].bar_label(bars, [f"{v:.0f} s" for v in values], fontsize=7)
    axes[2].set_xticks(range(len(values)), labels, fontsize=7)
    axes[2].axhline(20, color="k", ls="--", lw=0.8)
    axes[2].set(yscale="log", ylabel="decomposition time (s)", title="TT-SVD at chi70 (dashed: 20 s target)")
    fig.tight_layout()
    # the shapes' legend below the two line panels (inside either it covers the lines)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=7, loc="upper center",
               bbox_to_anchor=(0.36, 0.0), frameon=False)
    m, st = data["meta"], data["settings"]
    fig.text(0.01, -0.1, f"CPU: {m['device'].get('cpu', '?')}, {st['threads']} torch threads, load average "
             f"{st['loadavg_before'][0]:.1f} (shared machine) · float32 · min of interleaved repeats (medians in the JSON) · "
             f"{m['timestamp'][:10]} · commit {m.get('git_commit')}", fontsize=6, color="0.45")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", dpi=150)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, batch 1 and 8, one block: seconds")
    ap.add_argument("--out", default=None, help="directory for mpo_linear.json and mpo_linear.png "
                    "(default: data/results/benchmarks/ and figures/benchmarks/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    ap.add_argument("--figure-only", action="store_true", help="redraw the PNG from the existing JSON")
    args = ap.parse_args(argv)
    if args.figure_only:
        src = Path(args.out or REPO_ROOT / "data/results/benchmarks")
        png = Path(args.out) / "mpo_linear.png" if args.out else REPO_ROOT / "figures/benchmarks/mpo_linear.png"
        return figure(read_json(src / "mpo_linear.json"), png)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)  # chi clamped at small bonds: expected in a sweep
    load_before = os.getloadavg()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.quick:
        shapes, batches, budget = [(192, 576)], [1, 8], 0.05
    else:
        shapes, batches, budget = SMOL + LLAMA, [1, 512], 2.0
    rows = []
    for shape in shapes:
        chis = sorted({4, chi70(shape)} if args.quick else {4, 8, 16, 32, 64, chi70(shape)})
        for batch in batches:
            big = shape in LLAMA and batch > 1  # keep the run short: these cost seconds per call
            rows += bench_group(shape, [c for c in chis if c <= 32] if big else chis, batch,
                                budget * (3 if shape in LLAMA else 1), cold=shape in LLAMA and batch == 1)
            print(f"{shape} batch {batch} (min): " + ", ".join(f"chi {r['chi']}: {r.get('fwd_ratio_min', float('nan')):.2f}x"
                                                          for r in rows if r["batch"] == batch and tuple(r["shape"]) == shape), flush=True)
    decomposition = bench_decomposition(args.quick)
    targets = {"smollm2_decomposition_s": decomposition["smollm2_total_s"],
               "smollm2_decomposition_met": decomposition["smollm2_total_s"] <= 20 if not args.quick else None,
               "chi70_batch1": []}
    for r in rows:
        if r["chi70"] and r["batch"] == 1:
            same = [q for q in rows if q["shape"] == r["shape"] and q["batch"] == 1]
            targets["chi70_batch1"].append({
                "shape": r["shape"], "chi70": r["chi"], "flops_ratio": r["flops_ratio"], "bytes_ratio": r["bytes_ratio"],
                "fwd_ratio_median": r.get("fwd_ratio"), "fwd_ratio_min": r.get("fwd_ratio_min"),
                "met": r.get("fwd_ratio_min", 9) < 1 and r.get("fwd_ratio", 9) < 1,
                "largest_chi_faster_than_dense_min": max([q["chi"] for q in same if q.get("fwd_ratio_min", 9) < 1], default=None),
                "largest_chi_faster_than_dense_median": max([q["chi"] for q in same if q.get("fwd_ratio", 9) < 1], default=None)})
    data = {"settings": {"quick": args.quick, "shapes": [list(s) for s in shapes], "batches": batches, "cores": 3,
                         "dtype": "float32", "threads": torch.get_num_threads(),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_before": load_before,
                         "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
                         "cpu_s": time.process_time() - cpu_start,
                         "max_call_s": MAX_CALL_S, "assumed_flops_per_s": ASSUMED_FLOPS},
            "layer": rows, "decomposition": decomposition, "targets": targets}
    out_json = Path(args.out) / "mpo_linear.json" if args.out else REPO_ROOT / "data/results/benchmarks/mpo_linear.json"
    out_png = Path(args.out) / "mpo_linear.png" if args.out else REPO_ROOT / "figures/benchmarks/mpo_linear.png"
    save_results(out_json, data, device="cpu")
    figure(read_json(out_json), out_png)
    print(f"wrote {out_json} and {out_png} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
