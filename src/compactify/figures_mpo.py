"""The MPO primer's summary figure (notebook 01), in the style of :mod:`compactify.figures` (which
re-exports it): takes the curves :func:`compactify.primer.error_curves` computes, returns a
matplotlib Figure."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt

# marker/line style and colour per curve: MPOs in oranges, the truncated SVD of W in blue
CURVE_STYLES = {"MPO, 3 cores": ("o-", "#d94701"), "MPO, 2 cores": ("s-", "#fd8d3c"),
                "truncated SVD of W": ("-", "#2171b5")}


def error_vs_kept(curves: Mapping[str, Sequence[tuple]], title: str, mark: float = 0.3) -> plt.Figure:
    """Relative error ``||W - Ŵ|| / ||W||`` of one matrix against the fraction of its parameters
    kept, one curve per method (points ``(kept, error, chi or rank)``), a dotted line at ``mark``
    (the paper's "70% fewer parameters"). Where the blue curve lies below the orange ones, a plain
    low-rank SVD represents the matrix better than an MPO of the same size."""
    from .figures import apply_style  # here, not at the top: figures.py imports this module

    apply_style()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in curves.items():
        style, color = CURVE_STYLES[label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label, ms=4)
    ax.axvline(mark, color="0.5", ls=":", lw=1)
    ax.set(xlabel="fraction of the matrix's parameters kept", ylabel="relative error ‖W − Ŵ‖ / ‖W‖",
           title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    fig.tight_layout()
    return fig
