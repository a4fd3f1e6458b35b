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
