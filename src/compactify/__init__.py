"""compactify: a reproducible study of CompactifAI (MPO compression of Llama-family LLMs).

Modules are named after the method's steps: ``models`` (loading), ``mpo`` (one matrix as a
Matrix Product Operator), ``tensorize`` (a whole model), ``sensitivity``, ``quantize``,
``heal``, ``evaluate``, ``figures``/``report``; ``config``, ``results`` and ``corpus`` are the
glue. Importing the package registers the compressed model classes with transformers' Auto*
factories, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved MPO model.
"""
__version__ = "0.1.0"

from . import tensorize  # noqa: E402,F401  (registers CompactLlamaForCausalLM & co.)
