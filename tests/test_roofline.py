"""compactify.roofline: bytes and FLOPs per token against a hand count on a tiny Llama, the MPO and
low-rank parts against their own layers, the bound's arithmetic, and bad input. What the timing
code reports is checked, never how fast anything is."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compactify import roofline as R
from compactify.mpo_layer import MPOLinear

from conftest import tiny_llama

H, I, V, L, HEADS, KV, HD = 64, 96, 49152, 2, 4, 2, 16   # the tiny config's shapes, typed in by hand


@pytest.fixture
def tiny():
    return tiny_llama()


def hand_blocks(tokens=1):
    shapes = [(H, H), (KV * HD, H), (KV * HD, H), (H, H), (I, H), (I, H), (H, I)]   # q k v o gate up down
    return (L * sum(4 * (o * i) + 4 * tokens * (o + i) for o, i in shapes),
            L * sum(2 * tokens * o * i for o, i in shapes))


def test_dense_fp32_decode_cost_is_the_hand_count(tiny):
    ctx = 10
    c = R.decode_cost(tiny, context_tokens=ctx)
    p = c.to_dict()["parts_per_token"]
    assert (p["blocks"]["bytes"], p["blocks"]["flops"]) == hand_blocks()
    assert p["lm_head"] == {"bytes": 4 * V * H + 4 * (H + V), "flops": 2 * V * H}   # tied: the full matrix, once
    assert p["attention"] == {"bytes": L * 2 * ctx * KV * HD * 4, "flops": L * 4 * ctx * HEADS * HD}
    norms = 2 * L + 1
    assert p["other"] == {"bytes": 2 * H * 4 + norms * (4 * H + 2 * 4 * H), "flops": norms * 4 * H}
    assert c.bytes == sum(v["bytes"] for v in p.values()) and c.flops == sum(v["flops"] for v in p.values())
    assert c.intensity == pytest.approx(c.flops / c.bytes)


def test_prefill_cost_counts_causal_attention_and_per_token_totals(tiny):
    n = 8
    c = R.prefill_cost(tiny, n)
    assert c.parts["attention"]["flops"] == L * 4 * HEADS * HD * n * (n + 1) // 2
    assert c.parts["blocks"]["flops"] == hand_blocks(n)[1]
    assert c.flops == pytest.approx(sum(v["flops"] for v in c.parts.values()) / n)


def test_bf16_halves_the_weight_bytes(tiny):
    from compactify.quantize import to_half

    fp32 = R.decode_cost(tiny, 16).parts["blocks"]["bytes"]
    bf16 = R.decode_cost(to_half(tiny, "bfloat16"), 16).parts["blocks"]["bytes"]
    assert bf16 * 2 == fp32


def test_mpo_part_is_the_sum_of_the_layers_own_cost_model(tiny):
    from compactify.tensorize import Plan, tensorize

    tensorize(tiny, Plan.uniform(L, target_ratio=0.5, matrices=("q", "gate", "down"), cores=2), errors=False)
    mpos = [m for m in tiny.modules() if isinstance(m, MPOLinear)]
    assert len(mpos) == 3 * L
    c = R.decode_cost(tiny, 4)   # k, v, o and up stay dense
    assert c.parts["blocks"]["bytes"] == sum(m.bytes(1) for m in mpos) + L * sum(
        4 * o * i + 4 * (o + i) for o, i in [(KV * HD, H), (KV * HD, H), (H, H), (I, H)])
    assert c.parts["blocks"]["flops"] == sum(m.flops(1) for m in mpos) + L * sum(
        2 * o * i for o, i in [(KV * HD, H), (KV * HD, H), (H, H), (I, H)])
    # from materialize_from tokens on, the cores are contracted first: one dense GEMM plus the chain
    n = MPOLinear.materialize_from
    pre = R.prefill_cost(tiny, n).parts["blocks"]["flops"]
    mat = sum(R._materialize_flops(m) + 2 * n * m.in_features * m.out_features for m in mpos)
    assert pre == mat + L * n * sum(2 * o * i for o, i in [(KV * HD, H), (KV * HD, H), (H, H), (I, H)])


def test_materialize_flops_of_a_two_core_mpo():
    layer = MPOLinear((4, 8), (2, 16), (3,), bias=False)   # cores (1,4,2,3) and (3,8,16,1)
    assert R._materialize_flops(layer) == 2 * (4 * 2) * 3 * (8 * 16)


def test_lowrank_model_is_two_linears_and_counted_as_such(tiny):
    R.lowrank_model(tiny, 0.5)
    seqs = [m for m in tiny.modules() if isinstance(m, nn.Sequential)]
    assert len(seqs) == 7 * L
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(tiny(ids).logits).all()
    want_b = sum(4 * (a.weight.numel() + b.weight.numel()) + 4 * (a.in_features + a.out_features + b.in_features
                 + b.out_features) for a, b in seqs)
    assert R.decode_cost(tiny, 3).parts["blocks"]["bytes"] == want_b
    with pytest.raises(R.RooflineError, match="must be 'svd'"):
        R.lowrank_model(tiny, 0.5, method="asvd")


def test_bnb_layers_count_their_stored_bytes(tiny):
    pytest.importorskip("bitsandbytes")
    from compactify.quantize import model_size, quantize

    quantize(tiny, 8)
    q = [m for n, m in tiny.named_modules() if type(m).__name__ == "Linear8bitLt"]
    stored = sum(model_size(m)["bytes"] for m in q)
    assert stored == sum(m.in_features * m.out_features + 4 * m.out_features for m in q)   # int8 + fp32 row scale
    act = sum(4 * (m.in_features + m.out_features) for m in q)
    assert R.decode_cost(tiny, 2).parts["blocks"]["bytes"] == stored + act
    deq = R.decode_cost(tiny, 2, dequantized=True).parts["blocks"]["bytes"]
    assert deq - (stored + act) == sum(2 * 4 * m.in_features * m.out_features for m in q)


def test_bound_arithmetic():
    c = R.Cost(1, 1)
    c.add("blocks", 1000, 4000)
    b = R.bound(c, bandwidth=1e6, flops_rate=1e9)
    assert b["tokens_per_s"] == b["memory_tokens_per_s"] == 1000 and b["limited_by"] == "memory"
    b = R.bound(c, bandwidth=1e9, flops_rate=1e6)
    assert b["tokens_per_s"] == 250 and b["limited_by"] == "compute"
    assert R.part_seconds(c, 1e6, 1e9)["blocks"] == pytest.approx(1e-3)
    with pytest.raises(R.RooflineError, match="must both be positive"):
        R.bound(c, 0, 1e9)


def test_overhead_estimate_and_counts(tiny):
    assert R.overhead_seconds({"ops": 100, "module_calls": 10}, {"op_call_s": 1e-6, "module_call_s": 3e-6}) \
        == pytest.approx(100e-6 + 10 * 2e-6)
    calls = R.calls_per_token(tiny, torch.tensor([[1, 2, 3, 4]]))
    n_modules = sum(1 for _ in tiny.modules())
    # every linear, norm and attention module runs once per token; the rotary embedding too
    assert n_modules - 2 <= calls["module_calls"] <= n_modules + 2
    assert calls["ops"] > calls["module_calls"]
    per = R.call_overhead(calls=50)
    assert per["module_call_s"] > 0 and per["op_call_s"] > 0


def test_ceilings_report_what_they_measured():
    out = R.ceilings(threads=[1], dtypes=["float32"], seconds=0.01, mib=4, gemm_n={"float32": 64})
    t = out["1"]
    assert set(t["bandwidth"]) == {"copy", "triad", "read"}
    assert t["bandwidth_roof"]["bytes_per_s"] == max(v["bytes_per_s"] for v in t["bandwidth"].values())
    g = t["gemm"]["float32"]
    assert g["n"] == 64 and g["flops_per_s"] == pytest.approx(2 * 64**3 / g["median_s"])


def test_format_names_and_the_writer_refuses_unknown_ones(tmp_path):
    assert R.parse_format("mpo3-30") == {"kind": "mpo", "cores": 3, "keep": 0.3}
    assert R.parse_format("svd-70")["keep"] == 0.7 and R.parse_format("int8") == {"kind": "int8"}
    assert len(R.ALL_FORMATS) == 13 and set(R.QUICK_FORMATS) <= set(R.ALL_FORMATS)
    for bad in ("mpo4-30", "svd-40", "fp16", "mpo3"):
        with pytest.raises(R.RooflineError, match="Unknown format"):
            R.parse_format(bad)
    c = R.Cost(1, 1)
    c.add("blocks", 10, 10)
    with pytest.raises(R.RooflineError, match=r"Unknown format 'q8'\. Use one of fp32, bf16"):
        R.save_roofline(tmp_path / "r.json", {"formats": {"q8": {"decode_cost": c.to_dict()}}})
    with pytest.raises(R.RooflineError, match="no 'decode_cost'"):
        R.save_roofline(tmp_path / "r.json", {"formats": {"fp32": {}}})
    assert not (tmp_path / "r.json").exists()
    path = R.save_roofline(tmp_path / "r.json", {"formats": {"fp32": {"decode_cost": c.to_dict()}}}, model="embedded")
    data = json.loads(path.read_text())
    assert data["formats"]["fp32"]["decode_cost"]["bytes_per_token"] == 10
    assert data["meta"]["model"] == "embedded" and "git_commit" in data["meta"]


def test_bad_token_counts_are_refused(tiny):
    with pytest.raises(R.RooflineError, match="context_tokens"):
        R.cost(tiny, tokens=4, context_tokens=2)


# ----------------------------------------------------------------------------- devices, skipped formats, random weights

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "roofline.py"
SMOL = REPO / "data" / "cache" / "models" / "SmolLM2-135M-Instruct-fp32"


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("roofline_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ceilings_on_cpu_report_what_they_did_before():
    out = R.ceilings(threads=[1], dtypes=["float32"], seconds=0.01, mib=4, gemm_n={"float32": 64}, device="cpu")
    assert list(out) == ["1"]
    t = out["1"]
    assert {"bandwidth", "bandwidth_roof", "gemm", "array_mib"} <= set(t) and t["array_mib"] == 4
    assert t["device"] == "cpu" and t["threads"] == 1
    assert set(t["bandwidth"]) == {"copy", "triad", "read"}
    assert t["bandwidth_roof"]["from"] in t["bandwidth"]
    g = t["gemm"]["float32"]
    assert g["n"] == 64 and g["flops_per_s"] == pytest.approx(2 * 64**3 / g["median_s"]) and g["repeats"] >= 3
    assert R.call_overhead(calls=20, device="cpu")["device"] == "cpu"


def test_unknown_device_or_cuda_without_cuda_is_refused(monkeypatch):
    with pytest.raises(R.RooflineError, match="Unknown device 'tpu'"):
        R.ceilings(device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(R.RooflineError, match="no CUDA device is available"):
        R.ceilings(threads=[1], seconds=0.01, mib=1, device="cuda")


def test_bench_cuda_without_cuda_exits_2_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--quick", "--out", str(tmp_path / "r.json"),
                        "--figure", str(tmp_path / "r.png")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--device cuda: no CUDA device is available here" in p.stderr and "nothing was measured or written" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_unknown_device_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse(["--device", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_a_format_whose_library_is_missing_is_recorded_as_skipped(tiny, tmp_path, monkeypatch):
    def build(base, name, device):
        if name == "int8":
            raise ImportError("int8 needs the package 'bitsandbytes', which is not installed here")
        return R.build_format(base, name, device)

    models, records = R.build_formats(tiny, ["fp32", "int8"], "cpu", build=build, log=lambda s: None)
    assert list(models) == ["fp32"] and records["fp32"]["build_s"] >= 0
    assert records["int8"] == {"skipped": "not built: int8 needs the package 'bitsandbytes', which is not installed here"}
    # the real builder says the same where bitsandbytes is absent
    import importlib.util
    import sys

    real = importlib.util.find_spec
    with monkeypatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
        _, rec = R.build_formats(tiny, ["nf4"], "cpu", log=lambda s: None)
    assert rec["nf4"] == {"skipped": "not built: nf4 needs the package 'bitsandbytes', which is not installed here"}
    c = R.decode_cost(models["fp32"], 4)
    path = R.save_roofline(tmp_path / "r.json", {"formats": {"fp32": {"decode_cost": c.to_dict()}, "int8": records["int8"]}})
    assert json.loads(path.read_text())["formats"]["int8"] == records["int8"]
    m = models["fp32"]
    want = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])   # tied head: once
    assert R.stored_bytes(m) == want
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # its import fails: the fallback count, the same here
    assert R.stored_bytes(m) == want


@pytest.mark.skipif(not (SMOL / "config.json").is_file(), reason="SmolLM2's config is not cached (make data)")
def test_random_weights_build_smollm2_from_its_config_alone(tmp_path):
    import shutil

    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOL / f, tmp_path / f)   # no weight file in the folder: none can be read
    cfg = json.loads((SMOL / "config.json").read_text())
    h, i, n, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    want = v * h + n * (2 * h * q + 2 * h * kv + 3 * h * i + 2 * h) + h   # tied head: the embedding once
    assert want == 134_515_008
    bench = _bench()
    args = bench.parse(["--random-weights", "--meta", str(tmp_path), "--quick"])
    model, tok, weights = bench.load_base(args)
    assert sum(p.numel() for p in model.parameters()) == want
    assert weights["random"] is True and weights["config"] == str(tmp_path / "config.json")
    assert tok("hello").input_ids and not any(tmp_path.glob("*.safetensors"))
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(w.detach().std()) < 0.025   # transformers' init (std initializer_range = 0.02), not pretrained values
    with pytest.raises(SystemExit):
        bench.parse(["--meta", str(tmp_path)])   # --meta without --random-weights


def test_rotated_order_gives_each_format_every_position_by_default():
    bench = _bench()
    args = bench.parse(["--formats", "fp32", "bf16", "svd-30"])
    assert args.order == "rotated" and args.repeats == 3          # one round per format: each leads once
    assert bench.parse([]).repeats == len(bench.R.ALL_FORMATS)
    assert bench.parse(["--order", "fixed"]).repeats == 5          # the harness's earlier default
    assert bench.parse(["--quick"]).repeats == 2 and bench.parse(["--repeats", "7"]).repeats == 7
    with pytest.raises(SystemExit):
        bench.parse(["--order", "random"])
