"""Quantization with bitsandbytes: the paper's 8-bit and 4-bit baselines, its "88%" (tensorized,
fp16) and "93%" ("mixed": MPO cores in fp16, the layers left dense in 4 bits) models, and honest
byte counts for all of them.

**LLM.int8()** (``bnb.nn.Linear8bitLt``) stores each weight row as int8 with one scale per row
(absmax / 127). At run time it quantizes the activations per row too and multiplies in int8; the
few activation *columns* with a value above ``threshold`` (6.0, the library's and transformers'
default) are multiplied in 16-bit instead, because a handful of outlier features carry most of an
LLM's signal. **NF4** (``bnb.nn.Linear4bit``, QLoRA) cuts each weight matrix into blocks of 64
values, scales each block by its absmax and rounds every value to the nearest of 16 levels placed
at the quantiles of a normal distribution (weights are roughly normal, so every level is used
about equally often). Two values share a byte; with *double quantization* the per-block scales are
themselves stored in 8 bits. The matmul dequantizes the weights and multiplies in the *compute
dtype*.

What bitsandbytes 0.50.2 really does on an x86 CPU with torch 2.13 (read in its source, checked
here, see tests/test_quantize.py):

* both layer types run on CPU. Int8 rounds the activations to fp16, quantizes them per row and
  multiplies with ``torch._int_mm`` (where the CPU has AVX-512); outlier columns take a 16-bit
  path; the output keeps the input dtype.
* on a CPU with AVX512-BF16 (``bnb.functional.has_avx512bf16()``) an *eval-mode* 4-bit layer
  repacks its weight at the first forward pass into a CPU tile layout, un-nests the block scales
  into bf16, and from then on multiplies **in bf16 whatever compute dtype was asked for** (the
  fused kernel only exists for bf16). That repacking asserts ``out_features % 32 == 0`` and
  ``in_features % 64 == 0`` (1376 crashed in a reshape); :func:`quantize` checks this first and names the layers that fail.
* ``Embedding4bit`` / ``Embedding8bit`` exist and run on CPU, but cannot be saved
  (``_save_to_state_dict`` raises ``NotImplementedError``).
* ``save_pretrained`` of a model with ``Linear4bit`` / ``Linear8bitLt`` layers works, and reloads
  with ``from_pretrained``.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .models import DTYPES, HALF_DTYPES  # noqa: F401  (HALF_DTYPES re-exported: the names to_half takes)

BITS = (8, 4)
QUANT_TYPES = ("nf4", "fp4")


class QuantizeError(ValueError):
    """A quantization that cannot be done as asked; the message names what is missing and the fix."""


# ----------------------------------------------------------------------------- support checks

def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantizeError("Quantization needs the package 'bitsandbytes' (this study uses 0.50.2, which has a "
                            f"CPU backend): pip install bitsandbytes. ({e})") from None
    return bnb


@functools.lru_cache(maxsize=None)
def _probe(bits: int, device_type: str) -> str | None:
    """Run one tiny quantized layer on ``device_type``; None if it works, else what went wrong.

    A real forward pass is the only reliable test: which kernels a bitsandbytes build registers
    depends on its version, its native library and the CPU's instruction set.
    """
    _bnb()  # a QuantizeError naming what is missing, before the probe
    try:
        torch.manual_seed(0)
        lin = nn.Linear(64, 64, bias=False)
        q = _quantized_linear(lin, bits, "nf4", None, 6.0, True, torch.device(device_type)).eval()
        x = torch.randn(2, 64, device=device_type)
        with torch.no_grad():
            y, ref = q(x).float(), lin.to(device_type)(x)
        err = float((y - ref).norm() / ref.norm())
        if not err < 0.25:
            return f"its output is wrong (relative error {err:.2f} on a 64x64 test layer)"
    except Exception as e:  # noqa: BLE001 - any failure of the library is reported, with its text
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None


def check_support(bits: int, device: str | torch.device = "cpu") -> None:
    """Raise :class:`QuantizeError` unless bitsandbytes can do ``bits``-bit layers on ``device``.

    Called by :func:`quantize` before any module is replaced, so a model is never left half
    converted and the user never sees a crash from deep inside bitsandbytes.
    """
    if bits not in BITS:
        raise QuantizeError(f"bits must be 8 (LLM.int8) or 4 (NF4/FP4), not {bits!r}.")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantizeError(f"{bits}-bit quantization on '{device}' was asked for but torch {torch.__version__} sees no "
                            "CUDA GPU. Use device 'cpu' (bitsandbytes >= the version used here has a CPU backend).")
    bnb = _bnb()
    reason = _probe(bits, dev.type)
    if reason:
        kind = "LLM.int8 (Linear8bitLt)" if bits == 8 else "4-bit (Linear4bit)"
        raise QuantizeError(f"bitsandbytes {bnb.__version__} cannot run {kind} layers on {dev.type}: {reason}. Install "
                            "a bitsandbytes release with a working backend for this device (this study was run with "
                            f"0.50.2 on x86 CPU), or use CUDA.")


def cpu_repacks_4bit(device: str | torch.device = "cpu") -> bool:
    """True where bitsandbytes repacks eval-mode 4-bit weights for its bf16 CPU kernel (AVX512-BF16)."""
    if torch.device(device).type != "cpu":
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


# ----------------------------------------------------------------------------- module replacement

def _qparam(w: torch.Tensor, bits: int, quant_type: str, double_quant: bool, module, device):
    """``w`` as a bitsandbytes parameter, quantized by its ``.to(device)`` (that is how bnb does it)."""
    import bitsandbytes as bnb

    if bits == 8:
        return bnb.nn.Int8Params(w.detach().to(device), requires_grad=False, has_fp16_weights=False).to(device)
    return bnb.nn.Params4bit(w.detach().to(device), requires_grad=False, compress_statistics=double_quant,
                             quant_type=quant_type, module=module).to(device)


def _quantized_linear(lin: nn.Linear, bits: int, quant_type: str, compute_dtype, threshold: float,
                      double_quant: bool, device: torch.device) -> nn.Module:
    """A bitsandbytes copy of ``lin``, quantized from its weights (built on 'meta': no random init)."""
    import bitsandbytes as bnb

    shape, bias = (lin.in_features, lin.out_features), lin.bias is not None
    new = (bnb.nn.Linear8bitLt(*shape, bias=bias, has_fp16_weights=False, threshold=threshold, device="meta")
           if bits == 8 else
           bnb.nn.Linear4bit(*shape, bias=bias, compute_dtype=compute_dtype, compress_statistics=double_quant,
                             quant_type=quant_type, device="meta"))
    new.weight = _qparam(lin.weight, bits, quant_type, double_quant, new, device)
    if bias:
        new.bias = nn.Parameter(lin.bias.detach().to(device), requires_grad=False)
    return new.train(lin.training)  # a new module starts in training mode; keep the model's mode


def _quantized_embedding(emb: nn.Embedding, bits: int, quant_type: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    dims, dtype = (emb.num_embeddings, emb.embedding_dim), emb.weight.dtype
    new = (bnb.nn.Embedding8bit(*dims, dtype=dtype, device="meta") if bits == 8 else
           bnb.nn.Embedding4bit(*dims, dtype=dtype, quant_type=quant_type, device="meta"))
    new.weight = _qparam(emb.weight, bits, quant_type, False, new, device)
    new.padding_idx = emb.padding_idx
    return new.train(emb.training)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` is skipped if a pattern equals it, glob-matches it, or is its last component(s)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.endswith("." + p) for p in patterns)


def quantize(model: nn.Module, bits: int, skip: Iterable[str] = (), quant_type: str = "nf4",
             compute_dtype: torch.dtype | str | None = None, threshold: float = 6.0, double_quant: bool = True,
             embeddings: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its 8-bit or 4-bit bitsandbytes twin.

    * ``skip``: module names or glob patterns left alone (``"lm_head"``, ``"*.down_proj"``,
      ``"down_proj"``). Only modules whose type *is* ``nn.Linear`` are replaced, so MPO layers
      (:class:`compactify.mpo.MPOLinear`) and already-quantized layers are never touched.
    * ``embeddings=False`` leaves the input embedding and the output head as they are, like
      transformers' ``BitsAndBytesConfig`` does. ``True`` quantizes both (``Embedding4bit``/
      ``Embedding8bit`` and a 4/8-bit head); a tied head then gets its own quantized copy, and
      such a model cannot be saved (bitsandbytes 0.50.2 cannot serialize quantized embeddings).
    * ``quant_type``: "nf4" (the default here and in QLoRA; bitsandbytes' own default is "fp4").
    * ``compute_dtype``: the dtype 4-bit matmuls run in; None = the input's dtype. On CPUs with
      AVX512-BF16, eval-mode 4-bit matmuls run in bf16 regardless (see the module docstring).
    * ``threshold``: LLM.int8's outlier threshold (0 turns the fp16 outlier path off).

    Quantization happens on ``device`` (default: where the model is). Returns ``model``.
    """
    if quant_type not in QUANT_TYPES:
        raise QuantizeError(f"quant_type must be one of {QUANT_TYPES}, not {quant_type!r}.")
    if isinstance(compute_dtype, str):
        compute_dtype = DTYPES.get(compute_dtype, compute_dtype)
        if isinstance(compute_dtype, str):
            raise QuantizeError(f"Unknown compute_dtype {compute_dtype!r}; use float32, bfloat16 or float16.")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    check_support(bits, dev)
    skip = list(skip)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and not _matches(n, skip) and (embeddings or m is not head)]
    if bits == 4 and cpu_repacks_4bit(dev):
        bad = [n for n, m in targets if m.out_features % 32 or m.in_features % 64]
        if bad:
            raise QuantizeError(f"bitsandbytes' bf16 CPU kernel for 4-bit layers needs out_features divisible by 32 and "
                                f"in_features divisible by 64 (its quantization block); these layers are not: {', '.join(bad[:5])}"
                                f"{' ...' if len(bad) > 5 else ''}. Leave them in full precision with skip=[...].")
    for name, lin in targets:
        model.set_submodule(name, _quantized_linear(lin, bits, quant_type, compute_dtype, threshold, double_quant, dev))
    if embeddings and isinstance(emb, nn.Embedding) and not _matches(_name_of(model, emb), skip):
        model.set_submodule(_name_of(model, emb), _quantized_embedding(emb, bits, quant_type, dev))
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # head and embedding now hold separate quantized copies
    if hasattr(model, "config"):
        # So that save_pretrained writes a config from which from_pretrained rebuilds the same layers.
        kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        model.config.quantization_config = _bnb_config(bits, quant_type, compute_dtype, threshold, double_quant, kept)
    return model


def _bnb_config(bits, quant_type="nf4", compute_dtype=None, threshold=6.0, double_quant=True, skip=None):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32, llm_int8_skip_modules=skip)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def to_half(model: nn.Module, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The paper's "88%" model: the (tensorized) model's parameters in 16 bits ("auto": fp16 as in
    the paper on CUDA, bf16 on CPU)."""
    if any(_is_bnb(m) for m in model.modules()):
        raise QuantizeError("to_half must come before quantize(): casting a bitsandbytes layer would reinterpret its "
                            "packed integer weights as floats. Call to_half first (mixed() does).")
    if dtype == "auto":  # bf16 on CPU: AMX/AVX512-BF16 matmuls; fp16 ones are often slow there (notebook 04 measures)
        dtype = torch.float16 if next(model.parameters()).device.type == "cuda" else torch.bfloat16
    elif not isinstance(dtype, torch.dtype):
        if dtype not in HALF_DTYPES:
            raise QuantizeError(f"Half dtype must be auto, float16 or bfloat16, not {dtype!r}.")
        dtype = HALF_DTYPES[dtype]
    # Parameters only: buffers such as the rotary inv_freq stay fp32, as when transformers loads a
    # checkpoint with dtype=float16 (model.to(dtype) would round the RoPE frequencies too).
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


def mixed(model: nn.Module, bits: int = 4, quant_type: str = "nf4", half: str | torch.dtype = "auto",
          embeddings: bool = False, skip: Iterable[str] = (), double_quant: bool = True) -> nn.Module:
    """The paper's "93%" model: MPO cores in 16 bits, every linear layer left dense in ``bits`` bits.

    The embedding and head stay in 16 bits by default, which is what Table I's 2.1 GB implies
    (see :func:`paper_table1_check`); ``embeddings=True`` quantizes them too.
    """
    to_half(model, half)
    dtype = next(model.parameters()).dtype
    return quantize(model, bits, skip=skip, quant_type=quant_type, compute_dtype=dtype, embeddings=embeddings,
                    double_quant=double_quant)


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


# ----------------------------------------------------------------------------- real bytes

def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
    s2 = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
    if s2 is not None:
        out += [t for t in (s2.absmax, s2.code) if isinstance(t, torch.Tensor)]
    return out


def model_size(model: nn.Module) -> dict:
    """In-memory bytes of parameters, buffers and quantization state, by storage kind; logical parameters by precision.

    Every tensor counts with its real element size, once (tied weights share storage). A 4-bit
    matrix counts its packed uint8 bytes plus its quant state (block scales, the nested scales'
    scales, the 16-value code book); it still holds ``rows x cols`` *parameters*. An int8 matrix
    counts its int8 bytes plus one fp32 scale per row.
    """
    import bitsandbytes as bnb

    seen: set = set()
    by_kind: Counter = Counter()
    params: Counter = Counter()

    def add(t: torch.Tensor | None, kind: str) -> bool:  # count a tensor once; True if it was new
        key = None if t is None else (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key is None or t.numel() == 0 or key in seen:
            return False
        seen.add(key)
        by_kind[kind] += t.numel() * t.element_size()
        return True

    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if isinstance(p, bnb.nn.Params4bit) and p.quant_state is not None:
                if add(p.data, "int4 (packed uint8)"):
                    params[f"int4 ({p.quant_type})"] += math.prod(p.quant_state.shape)
                    for t in _quant_state_tensors(p.quant_state):
                        add(t, "quant state")
            elif isinstance(p, bnb.nn.Int8Params) and p.data.dtype == torch.int8:
                if add(p.data, "int8"):
                    params["int8"] += p.numel()
                state = getattr(mod, "state", None)
                for scb in (getattr(p, "SCB", None), getattr(state, "SCB", None)):
                    add(scb, "quant state")
            elif add(p.data, str(p.dtype).replace("torch.", "")):
                params[str(p.dtype).replace("torch.", "")] += p.numel()
        for b in mod.buffers(recurse=False):
            add(b, "buffers")
    total = sum(by_kind.values())
    n = sum(params.values())
    return {"bytes": total, "params": n, "bits_per_param": 8 * total / n if n else None,
            "bytes_by_kind": dict(by_kind), "params_by_precision": dict(params)}


def _check_saveable(model: nn.Module) -> None:
    emb = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("Embedding4bit", "Embedding8bit")]
    if emb:
        raise QuantizeError(f"bitsandbytes cannot save quantized embeddings ({emb[0]}._save_to_state_dict raises "
                            "NotImplementedError). Quantize with embeddings=False to save the model.")
    packed = [n for n, m in model.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise QuantizeError(f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were repacked for bitsandbytes' CPU kernel by "
                            "a forward pass; bitsandbytes 0.50.2 undoes that on save only approximately (it re-quantizes "
                            "the bf16 block scales), which changes the model. Save right after quantize(), before running it.")


def _dir_bytes(out: Path, **extra) -> dict:
    files = {f.name: f.stat().st_size for f in sorted(Path(out).iterdir()) if f.is_file()}
    return {"safetensors_bytes": sum(v for k, v in files.items() if k.endswith(".safetensors")),
            "total_bytes": sum(files.values()), "files": files, **extra}


def serialized_bytes(model: nn.Module, tmpdir: str | Path | None = None) -> dict:
    """Really save ``model`` with ``save_pretrained`` (safetensors) in a temporary directory (inside
    ``tmpdir`` if given) and sum the file sizes; the files are deleted afterwards."""
    _check_saveable(model)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        model.save_pretrained(tmp)
        return _dir_bytes(Path(tmp))


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path) -> dict:
    """``save_pretrained`` a quantized model and its tokenizer atomically into ``out_dir``; return its bytes.

    The directory reloads with ``compactify.models.load_model(out_dir)`` (transformers rebuilds the
    bitsandbytes layers from the ``quantization_config`` that :func:`quantize` put in the config);
    give a 16-bit model (88%/93%) its own dtype back: ``load_model(out_dir, dtype="bfloat16")``.
    """
    from .models import save_model_dir

    _check_saveable(model)
    out = save_model_dir(model, tokenizer, out_dir)
    return _dir_bytes(out, dir=str(out))


# ----------------------------------------------------------------------------- the paper's Table I


# The paper's Table I arithmetic lives with the paper's numbers; re-exported for callers of this module.
from .paper import LLAMA2_7B, NF4_BITS_DQ, PAPER_TABLE1, paper_table1_check  # noqa: E402,F401
