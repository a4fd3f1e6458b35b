"""Shared fixtures: tiny random Llama models (seconds) and the real embedded model (cached)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct (fp32, from the cached safetensors copy)."""
    from compactify.models import load_model

    return load_model("embedded")


def tiny_llama_config(**kw):
    """The tests' one tiny Llama shape (SmolLM2's vocabulary, 2 blocks of hidden 64); ``kw``
    changes any field, e.g. a small vocabulary or LLaMA-2's untied head and full-width k/v."""
    from transformers import LlamaConfig

    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, **kw):
    """A randomly initialised (seeded) LlamaForCausalLM of :func:`tiny_llama_config` in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


@pytest.fixture
def tiny_llama_dir(tmp_path, embedded):
    """A randomly initialised 2-block Llama saved with the real SmolLM2 tokenizer."""
    model = tiny_llama()
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    embedded[1].save_pretrained(out)
    return out
