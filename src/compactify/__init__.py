"""compactify: a reproducible study of CompactifAI (MPO compression of Llama-family LLMs).

Modules are named after the method's steps: ``models`` (loading), ``mpo`` (one matrix as a
Matrix Product Operator), ``tensorize`` (a whole model), ``sensitivity``, ``quantize``,
``heal``, ``evaluate``, ``figures``/``report``; ``config``, ``results`` and ``corpus`` are the
glue. Importing the package registers the compressed model classes with transformers' Auto*
factories, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved MPO model.
"""
__version__ = "0.1.0"

from . import tensorize  # noqa: E402,F401  (registers CompactLlamaForCausalLM & co.)

# transformers draws a progress bar for every model load and save ("Loading weights 0/272"): in a
# notebook that reloads models a dozen times they are noise, and frozen copies of them fill its outputs.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()

# bitsandbytes logs two messages that say nothing new here: at import, that the optional `kernels`
# package (a faster fused CPU 4-bit kernel, fetched from a hub this study never reaches) cannot be
# loaded, so its own kernel is used; and at *every* int8 call, that fp32 inputs are cast to fp16
# (compactify.quantize). Printed thousands of times the second one also slows the timing loops. The
# filter sits here, before any module can import bitsandbytes (frontier does, without quantize).
import logging as _logging  # noqa: E402


class _QuietBnb(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("MatMul8bitLt: inputs will be cast") or "gemm_4bit_forward from kernels" in msg)


for _name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
    _logging.getLogger(_name).addFilter(_QuietBnb())
