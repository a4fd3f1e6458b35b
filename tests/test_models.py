"""Model loading: the embedded default, local directories, GGUF files, hub ids, and bad input."""
import json

import pytest
import torch

from compactify.models import (ModelLoadError, count_params, embedded_gguf_path, linear_layers, load_model,
                               model_bytes, resolve_device)


def test_embedded_shapes(embedded):
    model, tok = embedded
    rows = linear_layers(model)
    assert len(rows) == 30 * 7
    shapes = {r["type"]: (r["out"], r["in"]) for r in rows if r["block"] == 0}
    assert shapes == {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                      "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    counts = count_params(model)
    assert counts["total"] == 134_515_008 and counts["tied_embeddings"]
    assert counts["block_matrices"] + counts["embedding"] + counts["other"] == counts["total"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq
    assert model_bytes(model) == 4 * counts["total"] + buffers  # fp32, tied weights counted once
    assert tok.pad_token is not None


@pytest.mark.slow
def test_cached_copy_gives_the_gguf_logits(embedded):
    cached, tok = embedded
    from_gguf, _ = load_model(str(embedded_gguf_path()))
    ids = tok("The Brown corpus was compiled in 1961 at Brown University.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = cached(ids).logits, from_gguf(ids).logits
    assert torch.equal(a, b)
    assert not hasattr(cached.config, "quantization_config")


def test_local_directory_round_trip(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and len(linear_layers(model)) == 14
    model16, _ = load_model(tiny_llama_dir, dtype="bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_unknown_path():
    with pytest.raises(ModelLoadError, match="No model at './no/such/model'"):
        load_model("./no/such/model")


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model")


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no model"):
        load_model(tmp_path)


def test_missing_and_corrupt_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(tmp_path / "notgguf.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(embedded_gguf_path().read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(truncated)


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a decoder-only"):
        load_model(tmp_path)


def test_non_language_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="not a decoder-only"):
        load_model(tmp_path)


def test_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_paper_scale_config_stops_at_once_without_the_weights(monkeypatch):
    """configs/llama2-7b.yaml validates, and on a machine without the weights the first step
    (loading the model) stops with a message naming it, before any work is done."""
    from compactify.config import REPO_ROOT, load_config

    cfg = load_config(REPO_ROOT / "configs" / "llama2-7b.yaml")
    assert cfg["model"] == "meta-llama/Llama-2-7b-hf" and cfg["heal"]["mixed_precision"] == "bf16"
    assert cfg["sensitivity"]["metric"] == "mmlu" and cfg["eval"]["source"] == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="meta-llama/Llama-2-7b-hf"):
        load_model(cfg["model"], dtype=cfg["dtype"], device="cpu")


def test_check_seq_len():
    from compactify.models import ModelLimitError, check_seq_len
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=64)  # max_position_embeddings 256
    assert check_seq_len(model, 256) == 256
    with pytest.raises(ModelLimitError, match="eval.perplexity.seq_len=1024 exceeds .*max_position_embeddings=256.*at most 256"):
        check_seq_len(model, 1024, "eval.perplexity.seq_len")
    with pytest.raises(ModelLimitError, match="integer >= 2"):
        check_seq_len(model, "256")


def test_damaged_dense_directory(tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    st = tiny_llama_dir / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 tensor.*up_proj.weight.*random values"):
        load_model(tiny_llama_dir)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated"):
        load_model(tiny_llama_dir)
