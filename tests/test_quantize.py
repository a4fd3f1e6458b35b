"""compactify.quantize and compactify.speed: bitsandbytes layers on CPU, real byte counts,
skip rules, save/load, the clear errors, and the paper's Table I arithmetic."""
import copy

import pytest
import torch
from torch import nn

import compactify.quantize as Q
from compactify.speed import compare, stats, time_forward
from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def tiny(seed=0, **kw):
    return tiny_llama(seed, **{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, **kw})


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def block_linears(model):
    return [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- forward quality

def test_quantized_forward_close_to_fp32():
    model = tiny()
    ref = logits(model)
    q8, q4 = Q.quantize(copy.deepcopy(model), 8), Q.quantize(copy.deepcopy(model), 4)
    e8, e4 = rel(logits(q8), ref), rel(logits(q4), ref)
    # int8 rows keep ~2 significant digits, NF4 ~1 (measured here: 0.013 and 0.14 on random weights,
    # which have no outliers to waste levels on but also no structure); a broken layout gives ~1.4
    assert 0 < e8 < 0.04, e8
    assert 0 < e4 < 0.3, e4
    assert e8 < e4 / 4
    kinds = {type(m).__name__ for n, m in q4.named_modules() if n in block_linears(model)}
    assert kinds == {"Linear4bit"}
    assert all(m.quant_type == "nf4" for m in q4.modules() if isinstance(m, bnb.nn.Linear4bit) for m in [m.weight])
    assert not any(m.training for m in q4.modules())  # replaced layers keep the model's eval mode


def test_skip_and_non_linear_layers_are_left_alone():
    import compactify.tensorize as T

    model = T.tensorize(tiny(), T.Plan({"0.q": {"chi": 4}}))
    mpo = model.model.layers[0].self_attn.q_proj
    kept = model.model.layers[1].self_attn.q_proj
    w = kept.weight.detach().clone()
    Q.quantize(model, 4, skip=["down_proj", "model.layers.1.self_attn.q_proj"])
    assert model.model.layers[0].self_attn.q_proj is mpo  # an MPO layer is not an nn.Linear: untouched
    assert model.model.layers[1].self_attn.q_proj is kept and torch.equal(kept.weight, w)
    assert all(type(b.mlp.down_proj) is nn.Linear for b in model.model.layers)
    assert type(model.lm_head) is nn.Linear  # the head stays, as with transformers' BitsAndBytesConfig
    assert isinstance(model.model.layers[1].mlp.up_proj, bnb.nn.Linear4bit)
    assert model.config.quantization_config.llm_int8_skip_modules  # so from_pretrained rebuilds the same
    assert logits(model).isfinite().all()


# ----------------------------------------------------------------------------- bytes and parameters

def test_bytes_shrink_by_the_expected_factors_and_parameters_are_kept():
    model = tiny()
    fp32 = Q.model_size(model)
    lin = sum(model.get_submodule(n).weight.numel() for n in block_linears(model))
    rows = sum(model.get_submodule(n).weight.shape[0] for n in block_linears(model))
    assert fp32["params"] == sum(p.numel() for p in model.parameters())
    assert fp32["bytes_by_kind"]["float32"] == 4 * fp32["params"]

    s8 = Q.model_size(Q.quantize(copy.deepcopy(model), 8))
    assert s8["bytes_by_kind"]["int8"] == lin  # one byte per weight ...
    assert s8["bytes_by_kind"]["quant state"] == 4 * rows  # ... plus one fp32 scale per row
    assert s8["bytes_by_kind"]["float32"] == 4 * (fp32["params"] - lin)
    q4 = Q.quantize(copy.deepcopy(model), 4)
    s4 = Q.model_size(q4)
    assert s4["bytes_by_kind"]["int4 (packed uint8)"] == lin // 2  # two weights per byte ...
    blocks = lin // 64
    # ... one 8-bit scale per 64 weights, and per matrix its code books (16 + 256 fp32) and nested scales
    assert blocks + 14 * 1088 <= s4["bytes_by_kind"]["quant state"] < blocks + 14 * 1200
    for s in (s8, s4):
        assert s["params"] == fp32["params"]  # a packed m x n matrix still holds m*n parameters
    assert s4["params_by_precision"]["int4 (nf4)"] == lin
    assert s4["bytes"] < s8["bytes"] < fp32["bytes"]

    # after the first eval forward on an AVX512-BF16 CPU the scales are un-nested into bf16 (2 bytes
    # per 64 weights) and the nested scales' code book is gone; elsewhere nothing changes
    logits(q4)
    after = Q.model_size(q4)["bytes_by_kind"]
    if Q.cpu_repacks_4bit(torch.device("cpu")):
        assert after["quant state"] == 2 * blocks + 14 * (64 + 4)
    else:
        assert after == s4["bytes_by_kind"]
    assert after["int4 (packed uint8)"] == lin // 2


def test_serialized_bytes_match_memory_and_reload_exactly(tmp_path, embedded):
    model = tiny()
    q4 = Q.quantize(copy.deepcopy(model), 4)
    info = Q.save_quantized(q4, embedded[1], tmp_path / "q4")
    mem = Q.model_size(q4)["bytes"]
    assert abs(info["safetensors_bytes"] - mem) < 0.02 * mem + 20_000  # headers and the bnb metadata blobs
    ref = logits(q4)
    from compactify.models import load_model

    back, _ = load_model(tmp_path / "q4")
    assert isinstance(back.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert torch.equal(logits(back), ref)
    with pytest.raises(Q.QuantizeError, match="Save right after quantize"):  # q4 ran, its weights are repacked
        if not Q.cpu_repacks_4bit(torch.device("cpu")):
            raise Q.QuantizeError("Save right after quantize (no CPU packing on this machine)")
        Q.serialized_bytes(q4)


def test_embeddings_option_quantizes_a_tied_head_separately():
    model = tiny()
    ref = logits(model)
    q = Q.quantize(copy.deepcopy(model), 4, embeddings=True)
    assert isinstance(q.model.embed_tokens, bnb.nn.Embedding4bit) and isinstance(q.lm_head, bnb.nn.Linear4bit)
    assert rel(logits(q), ref) < 0.35  # measured 0.18
    emb = model.model.embed_tokens.weight.numel()
    assert Q.model_size(q)["params"] == sum(p.numel() for p in model.parameters()) + emb  # the head is its own copy now
    with pytest.raises(Q.QuantizeError, match="cannot save quantized embeddings"):
        Q.serialized_bytes(q)


def test_half_and_mixed():
    import compactify.tensorize as T

    model = T.tensorize(tiny(), T.Plan.uniform(2, chi=8, matrices=T.WITHOUT_DOWN))
    ref = logits(model)
    half = Q.to_half(copy.deepcopy(model), "bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies are not rounded
    assert rel(logits(half), ref) < 0.02  # measured 0.005
    mixed = Q.mixed(copy.deepcopy(model), half="bfloat16")
    assert all(isinstance(b.mlp.down_proj, bnb.nn.Linear4bit) for b in mixed.model.layers)
    assert type(mixed.model.layers[0].mlp.up_proj).__name__ == "MPOLinear"
    assert mixed.model.layers[0].mlp.up_proj.cores[0].dtype == torch.bfloat16
    assert rel(logits(mixed), ref) < 0.05  # measured 0.008
    assert Q.model_size(mixed)["bytes"] < Q.model_size(half)["bytes"]
    with pytest.raises(Q.QuantizeError, match="to_half must come before quantize"):
        Q.to_half(mixed)


# ----------------------------------------------------------------------------- bad input

def test_unsupported_backend_is_a_clear_error_before_anything_changes(monkeypatch):
    model = tiny()
    monkeypatch.setattr(Q, "_probe", lambda bits, device_type: "NotImplementedError: no kernel for cpu")
    with pytest.raises(Q.QuantizeError, match=r"bitsandbytes .* cannot run 4-bit \(Linear4bit\) layers on cpu: "
                                              r"NotImplementedError: no kernel for cpu.*or use CUDA"):
        Q.quantize(model, 4)
    assert not any(Q._is_bnb(m) for m in model.modules())


def test_bad_arguments():
    with pytest.raises(Q.QuantizeError, match="bits must be 8"):
        Q.check_support(3)
    with pytest.raises(Q.QuantizeError, match="quant_type"):
        Q.quantize(tiny(), 4, quant_type="int4")
    if not torch.cuda.is_available():
        with pytest.raises(Q.QuantizeError, match="sees no CUDA GPU"):
            Q.check_support(4, "cuda")


def test_shapes_the_cpu_kernel_cannot_take_are_named(monkeypatch):
    monkeypatch.setattr(Q, "cpu_repacks_4bit", lambda device: True)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40))
    with pytest.raises(Q.QuantizeError, match=r"divisible by 32.*: 1\. Leave them .* skip="):
        Q.quantize(model, 4)
    assert type(model[0]) is nn.Linear
    Q.quantize(model, 4, skip=["1"])
    assert isinstance(model[0], bnb.nn.Linear4bit) and type(model[1]) is nn.Linear


def test_probe_really_runs_bitsandbytes():
    assert Q._probe(8, "cpu") is None and Q._probe(4, "cpu") is None


# ----------------------------------------------------------------------------- the paper's Table I

def test_paper_table1_arithmetic():
    t = Q.paper_table1_check()
    p = t["params"]
    assert p["total"] == 6_738_415_616  # LLaMA-2 7B
    assert p["embedding_and_head"] == 2 * 32000 * 4096 and p["down_proj"] == 32 * 4096 * 11008
    assert t["rows"]["original"]["formula_gb"] == pytest.approx(26.95, abs=0.01)  # the paper says 27.1
    assert t["rows"]["4-bit"]["formula_gb"] == pytest.approx(3.37, abs=0.01)
    assert t["rows"]["88%"]["params_from_size"] == pytest.approx(2.05e9)
    need = t["rows"]["93%"]["int4_params_needed"]
    assert need == pytest.approx(1.333e9, rel=1e-3)
    lo, hi = t["rows"]["93%"]["int4_params_range"]
    assert lo < need < hi
    by = {c["int4"]: c for c in t["candidates_93"]}
    gb = {k: c["gb_at_4_bits"] for k, c in by.items()}
    assert gb["embedding + head only (all seven matrices tensorized)"] == pytest.approx(3.71, abs=0.01)
    assert gb["down_proj of every block + embedding + head"] == pytest.approx(1.54, abs=0.01)
    best = min(gb, key=lambda k: abs(gb[k] - 2.1))
    assert best == "down_proj of every block; embedding + head stay fp16" and gb[best] == pytest.approx(1.94, abs=0.01)
    assert t["tensorized_keep_ratio_if_down_dense"] == pytest.approx(0.0685, abs=1e-3)


# ----------------------------------------------------------------------------- speed helpers

def test_stats():
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and s["n"] == 4


def test_interleaved_rotates_the_order_so_each_measurement_takes_every_position():
    from compactify.speed import interleaved

    calls: list[str] = []
    measure = {n: (lambda n=n: calls.append(n) or len(calls)) for n in "abc"}
    out = interleaved(measure, rounds=3, warmup=1, rotate=True)
    assert calls == list("abc" + "abc" + "bca" + "cab")   # warm-up, then counted rounds starting at a, b, c
    assert out == {"a": [4, 9, 11], "b": [5, 7, 12], "c": [6, 8, 10]}  # the values of the counted rounds only
    calls.clear()
    interleaved(measure, rounds=2, warmup=0)
    assert calls == list("abcabc")                        # fixed order by default


def test_speed_helpers_side_by_side(embedded):
    tok = embedded[1]
    a, b = tiny(vocab_size=len(tok)), tiny(seed=1, vocab_size=len(tok))
    t = time_forward(a, IDS, repeats=3)
    assert t["median_s"] > 0 and t["iqr_s"] >= 0 and len(t["times_s"]) == 3
    with pytest.raises(ValueError, match="at least 2"):
        compare({"a": a}, tok, IDS[:1], "Hello", new_tokens=1)
    r = compare({"a": a, "b": b}, tok, IDS[:1], "Hello there", new_tokens=3, repeats=2)
    assert r["a"]["prefill_ratio"] == 1.0 and r["a"]["decode_ratio"] == 1.0
    assert r["b"]["decode"]["n"] == 2 and r["_setup"]["reference"] == "a" and r["_setup"]["order"] == "fixed"
    ids = tok("Hello there", return_tensors="pt").input_ids          # token ids, no tokenizer (benchmarks/scale.py)
    r = compare({"a": a, "b": b}, None, IDS[:1], ids, new_tokens=3, repeats=1, reference="b")
    assert r["b"]["decode_ratio"] == 1.0 and r["_setup"]["decode_prompt_tokens"] == ids.shape[1]


def test_in_features_not_a_multiple_of_64_is_named(monkeypatch):
    monkeypatch.setattr(Q, "cpu_repacks_4bit", lambda device: True)
    model = nn.Sequential(nn.Linear(96, 64))         # 96 % 64 != 0: bnb's CPU repack crashed in a reshape
    with pytest.raises(Q.QuantizeError, match=r"in_features divisible by 64.*: 0\."):
        Q.quantize(model, 4)
    assert type(model[0]) is nn.Linear
