"""One table of bad inputs across the public entry points: model loading, tensorize, quantize,
config, results (issue 15, item 6). Each row asserts the exception type, that the message
names the fix, that the model it was given is unchanged (class, modules, logits bit for bit),
and that nothing half-written is left on disk. Healing, evaluation and report inputs have
their own tables in their modules' tests."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import compactify.tensorize as T
from compactify import quantize as Q
from compactify.config import ConfigError, load_config
from compactify.models import ModelLimitError, ModelLoadError, check_seq_len, load_model, save_model_dir
from compactify.mpo import MPOError
from compactify.results import ResultFileError, read_json
from conftest import tiny_llama


def tiny(**kw):
    """LLaMA-2's proportions in miniature (full-width k/v, untied head)."""
    return tiny_llama(**{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 344, "num_key_value_heads": 4,
                         "tie_word_embeddings": False, **kw})


class Ctx:
    """What a row may use: a tmp dir, a tiny model (watched for changes), saved directories."""

    def __init__(self, tmp: Path, tokenizer):
        self.tmp, self.tok = tmp, tokenizer
        self.model = tiny()

    def nan_model(self):
        with torch.no_grad():
            self.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        self.before = _state(self.model)  # the NaN is the bad input; what must not change is the rest
        return self.model

    def compressed(self, damage: str | None = None) -> Path:
        m = tiny()
        T.tensorize(m, T.Plan.uniform(2, chi=4, matrices=("q", "up")))
        d = save_model_dir(m, self.tok, self.tmp / f"compressed-{damage}")
        self._damage(d, damage)
        return d

    def dense(self, damage: str | None = None) -> Path:
        d = save_model_dir(tiny(), self.tok, self.tmp / f"dense-{damage}")
        self._damage(d, damage)
        return d

    @staticmethod
    def _damage(d: Path, damage):
        st = d / "model.safetensors"
        if damage == "truncated":
            st.write_bytes(st.read_bytes()[:-512])
        elif damage:
            t = load_file(st)
            if damage == "missing core":
                del t["model.layers.1.mlp.up_proj.cores.1"]
            elif damage == "extra core":
                t["model.layers.0.self_attn.q_proj.cores.3"] = torch.zeros(1, 2, 2, 1)
            elif damage == "core for a dense matrix":
                t["model.layers.0.self_attn.k_proj.cores.0"] = torch.zeros(1, 4, 4, 4)
            elif damage == "missing dense":
                del t["model.layers.0.mlp.down_proj.weight"]
            save_file(t, st, metadata={"format": "pt"})

    def config_file(self, text: str) -> Path:
        p = self.tmp / "bad.yaml"
        p.write_text(text)
        return p

    def result(self, name: str, content: bytes) -> Path:
        p = self.tmp / "results" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(content)
        return p


@dataclass
class Row:
    call: Callable[[Ctx], object]      # the bad input, applied
    exc: type                          # the exception it must raise
    words: tuple[str, ...]             # what the message must say (the problem and the fix)


def _save_failing(c: Ctx):
    """A save that fails half-way (the tokenizer write raises) over an existing good directory."""
    out = save_model_dir(c.model, c.tok, c.tmp / "out")
    before = sorted(p.name for p in out.iterdir())

    class Broken:
        def save_pretrained(self, d):
            (Path(d) / "tokenizer.json").write_text("{half")
            raise OSError("disk full (simulated)")

    try:
        save_model_dir(c.model, Broken(), out)
    finally:
        assert sorted(p.name for p in out.iterdir()) == before  # the old directory is intact


PLAN4 = T.Plan.uniform(2, chi=4)
ROWS = {
    # ---- model loading
    "load: no such path": Row(lambda c: load_model(c.tmp / "nope"), ModelLoadError, ("No model at", "'embedded'")),
    "load: hub-like id offline": Row(lambda c: load_model("no-such-org/no-such-model"), ModelLoadError,
                                     ("not in the local Hugging Face cache", "huggingface-cli download")),
    "load: directory without config": Row(lambda c: (c.tmp / "empty").mkdir() or load_model(c.tmp / "empty"),
                                          ModelLoadError, ("no config.json", "save_pretrained")),
    "load: not a GGUF": Row(lambda c: (c.tmp / "x.gguf").write_bytes(b"NOPE" * 8) and load_model(c.tmp / "x.gguf"),
                            ModelLoadError, ("not a GGUF file", "Re-download")),
    "load: unknown dtype": Row(lambda c: load_model("embedded", dtype="float8"), ModelLoadError, ("Unknown dtype", "float32")),
    "load: compressed, missing core": Row(lambda c: load_model(c.compressed("missing core")), T.CompressedCheckpointError,
                                          ("model.safetensors", "up_proj.cores.1: expected", "found nothing", "Re-save")),
    "load: compressed, extra core": Row(lambda c: load_model(c.compressed("extra core")), T.CompressedCheckpointError,
                                        ("q_proj.cores.3: an extra core", "Re-save")),
    "load: compressed, core for a dense matrix": Row(lambda c: load_model(c.compressed("core for a dense matrix")),
                                                     T.CompressedCheckpointError, ("k_proj.cores.0: MPO cores", "Re-save")),
    "load: compressed, truncated": Row(lambda c: load_model(c.compressed("truncated")), T.CompressedCheckpointError,
                                       ("model.safetensors is truncated", "re-save")),
    "from_pretrained: compressed, missing core": Row(
        lambda c: AutoModelForCausalLM.from_pretrained(c.compressed("missing core")), T.CompressedCheckpointError,
        ("up_proj.cores.1", "Re-save")),
    "from_pretrained: compressed, truncated": Row(
        lambda c: AutoModelForCausalLM.from_pretrained(c.compressed("truncated")), T.CompressedCheckpointError,
        ("is truncated", "re-save")),
    "load: dense, missing tensor": Row(lambda c: load_model(c.dense("missing dense")), ModelLoadError,
                                       ("down_proj.weight", "random values", "re-save")),
    "load: dense, truncated": Row(lambda c: load_model(c.dense("truncated")), ModelLoadError, ("is truncated", "re-save")),
    "save: fails half-way": Row(_save_failing, OSError, ("disk full",)),
    "seq_len beyond positions": Row(lambda c: check_seq_len(c.model, 1024, "eval.perplexity.seq_len"), ModelLimitError,
                                    ("max_position_embeddings=256", "at most 256")),
    # ---- tensorize
    "tensorize: unreachable ratio (later entry)": Row(
        lambda c: T.tensorize(c.model, T.Plan({"0.q": {"target_ratio": 0.5}, "1.k": {"target_ratio": 1e-5}})),
        MPOError, ("'1.k'", "unreachable", "larger ratio")),
    "tensorize: shape without 3 factors": Row(lambda c: T.tensorize(c.model, T.Plan.uniform(2, chi=4, cores=5)),
                                              MPOError, ("'0.gate'", "344", "fewer cores")),
    "tensorize: NaN in a later block": Row(lambda c: T.tensorize(c.nan_model(), PLAN4), MPOError,
                                           ("'1.up'", "NaN", "Check the checkpoint")),
    "tensorize: chi above dense size": Row(lambda c: T.tensorize(c.model, T.Plan.uniform(2, chi=10**6)), T.PlanError,
                                           ("more than the dense", "allow_growth=True", "smaller chi")),
    "tensorize: block out of range": Row(lambda c: T.tensorize(c.model, T.Plan({"0.q": {"chi": 4}, "7.q": {"chi": 4}})),
                                         T.PlanError, ("Block 7 does not exist", "0..1")),
    "tensorize: unknown matrix name": Row(lambda c: T.Plan({"0.q_proj": {"chi": 4}}), T.PlanError, ("matrix one of", "3.q")),
    "tensorize: chi not a positive int": Row(lambda c: T.Plan({"0.q": {"chi": 0}}), T.PlanError, ("positive integer",)),
    "tensorize: one core": Row(lambda c: T.Plan({"0.q": {"chi": 4}}, cores=1), T.PlanError, ("integer >= 2",)),
    "tensorize: unsupported family": Row(lambda c: T.tensorize(c.swap_model(_gemma()), PLAN4), T.PlanError,
                                         ("GemmaForCausalLM", "not a supported", "Use a model of one of")),
    "tensorize: plan JSON with unknown key": Row(lambda c: T.Plan.from_dict({"entries": {}, "chis": 3}), T.PlanError,
                                                 ("Unknown plan keys", "'entries'")),
    # ---- quantize
    "quantize: 3 bits": Row(lambda c: Q.quantize(c.model, 3), Q.QuantizeError, ("bits must be 8", "or 4")),
    "quantize: unknown quant_type": Row(lambda c: Q.quantize(c.model, 4, quant_type="nf5"), Q.QuantizeError,
                                        ("quant_type must be one of",)),
    "quantize: unknown compute dtype": Row(lambda c: Q.quantize(c.model, 4, compute_dtype="int3"), Q.QuantizeError,
                                           ("Unknown compute_dtype", "bfloat16")),
    "quantize: unknown half dtype": Row(lambda c: Q.to_half(c.model, "fp8"), Q.QuantizeError, ("auto, float16 or bfloat16",)),
    # ---- config
    "config: heal.steps 'ten'": Row(lambda c: load_config(c.config_file("heal:\n  steps: ten\n")), ConfigError,
                                    ("'heal.steps' is 'ten'", "an integer", "Fix the value")),
    "config: bool as 1": Row(lambda c: load_config(None, {"heal.resume": 1}), ConfigError, ("true or false", "Fix")),
    "config: unknown eval task": Row(lambda c: load_config(None, {"eval.tasks": ["piqa", "hellaswagg"]}), ConfigError,
                                     ("unknown task 'hellaswagg'", "Did you mean 'hellaswag'")),
    "config: typo in a key": Row(lambda c: load_config(c.config_file("sed: 3\n")), ConfigError, ("Did you mean 'seed'",)),
    "config: not YAML": Row(lambda c: load_config(c.config_file("a: [1, 2\n")), ConfigError, ("not valid YAML",)),
    "config: missing file": Row(lambda c: load_config(c.tmp / "nope.yaml"), ConfigError, ("not found", "configs/smoke.yaml")),
    # ---- results
    "results: truncated 03_tensorize.json": Row(
        lambda c: read_json(c.result("03_tensorize.json", b'{"meta": {"seed": 0}, "main": {"size_report": {"ro')),
        ResultFileError, ("03_tensorize.json", "notebook 03_tensorize", "middle of the JSON", "Rerun")),
    "results: corrupt 05_heal.json": Row(lambda c: read_json(c.result("05_heal.json", b'{"loss": [1.0,, 2.0]}')),
                                         ResultFileError, ("05_heal.json", "notebook 05_heal", "line 1, column 15")),
}


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
                       num_attention_heads=4, num_key_value_heads=2)


def _swap_model(self, config):
    torch.manual_seed(0)
    self.model = AutoModelForCausalLM.from_config(config).eval()
    self.before = _state(self.model)
    return self.model


Ctx.swap_model = _swap_model


def _state(model):
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        out = model(ids).logits
    return (type(model), type(model.config), json.dumps(getattr(model.config, "compactify", None)),
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()}, out)


def _files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded[1]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ROWS[row]
    c = Ctx(tmp_path / "work", tokenizer)
    c.tmp.mkdir()
    c.before = _state(c.model)
    with pytest.raises(spec.exc) as err:
        spec.call(c)  # bad inputs (damaged directories, files) are made inside the call
    message = str(err.value)
    for w in spec.words:
        assert w in message, f"{row}: {w!r} not in: {message}"
    after = _state(c.model)
    assert after[:4] == c.before[:4], f"{row}: the model's class, config or modules changed"
    for k, v in c.before[4].items():
        torch.testing.assert_close(after[4][k], v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(after[5], c.before[5], rtol=0, atol=0, equal_nan=True)
    leftovers = [f for f in _files(tmp_path) if any(part.startswith(".") or part.endswith((".tmp", ".old"))
                                                    for part in Path(f).parts)]
    assert not leftovers, f"{row}: half-written files left behind: {leftovers}"


def test_table_covers_every_entry_point():
    kinds = {row.split(":")[0] for row in ROWS}
    assert {"load", "tensorize", "quantize", "config", "results"} <= kinds and len(ROWS) >= 30
