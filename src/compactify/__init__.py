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
