"""Compiled decoding (compactify.speed.generate_kwargs): transformers' static KV cache with the
decode step compiled by torch.compile, one-row matmuls turned into fused multiply-and-sums."""
from __future__ import annotations

import pytest
import torch

from compactify import speed
from conftest import tiny_llama

SHAPE = dict(vocab_size=256, num_hidden_layers=1, max_position_embeddings=64, tie_word_embeddings=False)


def test_unknown_runtime_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="Unknown decode runtime 'fast'.*eager, compiled"):
        speed.generate_kwargs(tiny_llama(**SHAPE), "fast")
    assert speed.generate_kwargs(tiny_llama(**SHAPE), "eager") == {}


def test_compiled_decoding_gives_eager_tokens_and_decomposes_every_one_row_matmul():
    from torch._dynamo.utils import counters

    model = tiny_llama(**SHAPE)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = speed.generate_kwargs(model, "compiled", max_cache_len=ids.shape[1] + 5)
    assert kw["cache_implementation"] == "static" and kw["max_cache_len"] == 11
    counters.clear()
    with torch.inference_mode():
        gen = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                              min_new_tokens=5, pad_token_id=0, **k) for k in ({}, kw)]
    assert torch.equal(gen[0], gen[1])
    # 7 block matrices + the LM head, each a one-row matmul in the compiled decode step
    assert counters["inductor"]["decompose_mm"] >= 8


def test_compare_times_one_model_under_two_runtimes_side_by_side():
    model = tiny_llama(**SHAPE)
    ids = torch.randint(0, 256, (1, 8))
    out = speed.compare({"eager": model, "compiled": model}, None, ids, ids[:, :4], new_tokens=3, repeats=1,
                        decode={"compiled": "compiled"})
    assert out["_setup"]["decode"] == {"eager": "eager", "compiled": "compiled"}
    assert out["compiled"]["decode"]["median"] > 0 and out["eager"]["decode_ratio"] == 1
    with pytest.raises(ValueError, match="Unknown decode runtime"):
        speed.compare({"m": model}, None, ids, ids[:, :4], new_tokens=2, repeats=1, decode="jit")


def test_gemv_probe_counts_the_bytes_it_streams_and_times_three_kernels():
    ws = [torch.randn(48, 32), torch.randn(16, 48)]
    out = speed.gemv_probe(ws, repeats=2)
    assert out["bytes"] == (48 * 32 + 16 * 48) * 4 and out["matrices"] == 2
    for way in ("read", "linear", "compiled"):
        assert out[way]["seconds"]["n"] == 2
        assert out[way]["bytes_per_s"] == pytest.approx(out["bytes"] / out[way]["seconds"]["median"])
    with pytest.raises(ValueError, match="matrices"):
        speed.gemv_probe([torch.randn(3)])


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_compiled.py"
    spec = importlib.util.spec_from_file_location("decode_compiled_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bytes_fit_recovers_fixed_cost_and_bandwidth_from_dense_and_svd_only():
    bench = _bench()

    def rec(nbytes, ms):
        return {"decode_cost": {"bytes_per_token": nbytes},
                "by_threads": {"1": {"compiled": {"decode": {"median": 1e3 / ms}}}}}
    # 5 ms per token + bytes at 20 GB/s; the MPO point is far off the line and must not count
    formats = {"fp32": rec(5e8, 5 + 25), "bf16": rec(2.5e8, 5 + 12.5), "svd-50": rec(3e8, 5 + 15),
               "mpo3-50": rec(3e8, 200)}
    fit = bench.bytes_fit(formats, "1", "compiled")
    assert fit["formats"] == ["fp32", "bf16", "svd-50"]
    assert fit["fixed_ms_per_token"] == pytest.approx(5) and fit["bytes_per_s"] == pytest.approx(2e10)
    assert bench.bytes_fit({k: formats[k] for k in ("fp32", "mpo3-50")}, "1", "compiled") is None


def test_benchmark_refuses_unknown_and_bitsandbytes_formats_and_always_times_dense():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse(["--formats", "svd-45"])
    with pytest.raises(SystemExit):
        bench.parse(["--formats", "nf4"])
    args = bench.parse(["--quick", "--formats", "svd-30"])
    assert args.formats == ["fp32", "svd-30"] and args.threads == [1] and args.repeats == 3


def test_cost_as_executed_counts_the_cached_matrix_of_contracted_and_auto_layers():
    from compactify import roofline as R
    from compactify.mpo_modes import set_inference_mode
    from compactify.tensorize import Plan, tensorize

    dense = R.decode_cost(tiny_llama(**SHAPE), 8).parts["blocks"]
    model = tensorize(tiny_llama(**SHAPE), Plan.uniform(1, target_ratio=0.5, cores=3), errors=False)
    stored = R.decode_cost(model, 8)
    assert stored.parts["blocks"]["bytes"] < dense["bytes"] and stored.parts["blocks"]["flops"] != dense["flops"]
    assert R.decode_cost(model, 8, executed=True).parts == stored.parts      # factored: as stored
    set_inference_mode(model, "contracted")                                  # every W cached: read like dense
    assert R.decode_cost(model, 8, executed=True).parts["blocks"] == dense
    assert R.decode_cost(model, 8).parts == stored.parts                     # the format's own cost is unchanged
    set_inference_mode(model, "auto")                                        # nothing decided yet: as stored
    assert R.decode_cost(model, 8, executed=True).parts == stored.parts
