"""Why ``MPOLinear.materialize_from`` exists: forward + backward of one MPO layer, factored
(contract the input through the cores) vs materialized (rebuild W from the cores, one GEMM;
autograd back to the cores) vs nn.Linear, on SmolLM2's matrix shapes at 30% of parameters kept,
for 1, 32, 128 and 512 tokens, one thread, interleaved repeats (medians).

Usage::

    .venv/bin/python benchmarks/materialize.py     # writes data/results/benchmarks/materialize.json
"""
import functools
import statistics
import time

import torch

from compactify.config import REPO_ROOT
from compactify.mpo_layer import MPOLinear
from compactify.results import save_results
from compactify.speed import interleaved

SHAPES = {"q/k/v/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536)}
TOKENS = (1, 32, 128, 512)


def fwd_bwd_ms(layer, x) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    t = time.perf_counter()
    layer(x).sum().backward()
    return 1e3 * (time.perf_counter() - t)


def main(repeats: int = 5) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name, (o, i) in SHAPES.items():
        dense = torch.nn.Linear(i, o, bias=False)
        factored = MPOLinear.from_linear(dense, target_ratio=0.3, cores=3)
        factored.materialize_from = None
        materialized = MPOLinear.from_linear(dense, target_ratio=0.3, cores=3)
        materialized.materialize_from = 1
        for n in TOKENS:
            x = torch.randn(n, i, requires_grad=True)
            layers = {"dense": dense, "factored": factored, "materialized": materialized}
            # one warm-up round, then rounds that interleave the three layers
            times = interleaved({k: functools.partial(fwd_bwd_ms, m, x) for k, m in layers.items()}, rounds=repeats)
            ms = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"shape": name, "tokens": n, "ms": ms, "bond_dims": list(factored.bond_dims),
                         "factored_over_materialized": ms["factored"] / ms["materialized"]})
            print(name, n, {k: round(v, 2) for k, v in ms.items()}, flush=True)
    data = {"what": "forward+backward ms of one layer, 3-core MPO at 30% kept, median of interleaved repeats",
            "threads": 1, "repeats": repeats, "rows": rows,
            "materialize_from": MPOLinear.materialize_from}
    save_results(REPO_ROOT / "data" / "results" / "benchmarks" / "materialize.json", data, device="cpu")
    return data


if __name__ == "__main__":
    main()
