"""compactify: a reproducible study of CompactifAI (MPO compression of Llama-family LLMs).

Modules are named after the method's steps: ``models`` (loading), ``mpo`` (one matrix as a
Matrix Product Operator), ``tensorize`` (a whole model), ``sensitivity``, ``quantize``,
``heal``, ``evaluate``, ``figures``; ``config``, ``results`` and ``corpus`` are the glue.
"""
__version__ = "0.1.0"
