"""The healing loss alone, eager against fused (``heal.compile_loss``): seconds per batch for the
forward and backward pass of :func:`compactify.heal.loss_terms` at the study's healing shape
(4 x 255 next-token positions over SmolLM2's 49,152-token vocabulary, bf16 logits as autocast gives
them), for next-token loss and distillation with an online or a top-32 teacher, timed interleaved
(:func:`compactify.speed.interleaved`, rotated), with how far the fused values and gradients are from
the eager ones. Writes ``data/results/benchmarks/loss_speed.json``::

    .venv/bin/python benchmarks/loss_speed.py        # ~1 min on 2 cores
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the healing runs (benchmarks/mpo_linear.py)

import argparse  # noqa: E402

import torch  # noqa: E402

from compactify.config import REPO_ROOT  # noqa: E402
from compactify.heal import loss_terms  # noqa: E402
from compactify.results import save_results  # noqa: E402
from compactify.speed import interleaved, stats  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(REPO_ROOT / "data/results/benchmarks/loss_speed.json"))
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq - 1, args.vocab)
    student = torch.randn(shape, generator=g).to(torch.bfloat16)
    teacher = torch.randn(shape, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, shape[:2], generator=g)
    vals, idx = teacher.topk(32, dim=-1)
    cases = {"lm": (), "kd online": (teacher,), "kd top-32": (None, vals, idx)}
    fused = torch.compile(loss_terms, dynamic=False)

    def step(fn, extra):
        s = student.clone().requires_grad_(True)
        lm, kd = fn(s, targets, *extra, temperature=1.0)
        (lm if kd is None else kd).backward()   # heal.loss kd trains on kd alone; lm is logged
        return (lm if kd is None else kd).detach(), s.grad

    out = {}
    for case, extra in cases.items():
        (ve, ge), (vc, gc) = step(loss_terms, extra), step(fused, extra)   # also compiles
        t = interleaved({"eager": lambda e=extra: _seconds(step, loss_terms, e),
                         "compiled": lambda e=extra: _seconds(step, fused, e)}, rounds=args.repeats, rotate=True)
        out[case] = {way: stats(v) for way, v in t.items()}
        out[case]["speedup"] = out[case]["eager"]["median"] / out[case]["compiled"]["median"]
        out[case]["loss_abs_diff"] = float((ve - vc).abs())
        out[case]["grad_rel_diff"] = float((ge.float() - gc.float()).norm() / ge.float().norm())
        print(f"{case:10s} eager {out[case]['eager']['median']:.3f} s, compiled {out[case]['compiled']['median']:.3f} s "
              f"(x{out[case]['speedup']:.1f}); |loss diff| {out[case]['loss_abs_diff']:.1e}, grad rel diff "
              f"{out[case]['grad_rel_diff']:.1e}", flush=True)
    save_results(args.out, {"what": "heal.loss_terms forward + backward, eager vs torch.compile", "shape": list(shape),
                            "logits_dtype": "bfloat16", "threads": torch.get_num_threads(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": args.repeats,
                            "cases": out}, device="cpu", seed=0, config_name="benchmarks/loss_speed.py")
    print(f"wrote {args.out}")


def _seconds(step, fn, extra) -> float:
    import time

    t = time.perf_counter()
    step(fn, extra)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
