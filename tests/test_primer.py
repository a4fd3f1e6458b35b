"""The MPO primer's hand-written NumPy TT-SVD (notebook 01) is the package's factorisation, and
the notation of notebooks 01 and 02 is chi / χ. Runs the notebook's own functions on small
matrices (well under a second), not the notebook."""
import ast
import contextlib
import json
import math
import re

import numpy as np
import pytest
import torch

from compactify.config import REPO_ROOT
from compactify.mpo import bond_dims, cut_spectra, decompose, error_bound

NOTEBOOKS = REPO_ROOT / "notebooks"


def _cells(name):
    return json.loads((NOTEBOOKS / name).read_text())["cells"]


@pytest.fixture(scope="module")
def primer():
    """``tt_svd`` and ``contract`` exactly as notebook 01 defines them (only the ``def``s are run)."""
    sources = ["".join(c["source"]) for c in _cells("01_mpo_primer.ipynb") if c["cell_type"] == "code"]
    trees = [ast.parse(s) for s in sources if "def tt_svd" in s or "def contract" in s]  # a cell each
    defs = ast.Module([n for t in trees for n in t.body if isinstance(n, ast.FunctionDef)], type_ignores=[])
    ns = {"np": np, "math": math}
    exec(compile(defs, "01_mpo_primer.ipynb", "exec"), ns)
    return ns["tt_svd"], ns["contract"]


@pytest.mark.parametrize("out_f, in_f, chi", [((4, 6), (6, 5), 3), ((2, 3, 4), (3, 2, 5), 4),
                                              ((2, 3, 4), (3, 2, 5), 100), ((2, 2, 3, 2), (5, 3, 2, 1), 2)])
def test_numpy_tt_svd_is_decompose(primer, out_f, in_f, chi):
    tt_svd, contract = primer
    torch.manual_seed(0)
    w = torch.randn(math.prod(out_f), math.prod(in_f), dtype=torch.float64)
    cores, dropped = tt_svd(w.numpy(), out_f, in_f, chi)
    with pytest.warns(UserWarning, match="clamped") if chi == 100 else contextlib.nullcontext():
        ref = decompose(w, chi=chi, cores=len(out_f), out_factors=out_f, in_factors=in_f)
    assert [c.shape for c in cores] == [tuple(c.shape) for c in ref.cores]
    assert [c.shape[-1] for c in cores[:-1]] == bond_dims([o * i for o, i in zip(out_f, in_f)], chi)
    np.testing.assert_allclose(contract(cores), ref.to_matrix().numpy(), atol=1e-10)
    # the TT-SVD error: equal to the dropped squared singular values, at most Oseledets' bound
    err2 = float(np.sum((w.numpy() - contract(cores)) ** 2))
    assert err2 == pytest.approx(sum(dropped), rel=1e-8, abs=1e-20)
    bound = error_bound(cut_spectra(w, len(out_f), in_factors=in_f, out_factors=out_f), ref.bond_dims)
    assert err2 / float(w.square().sum()) <= bound ** 2 * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("name", ["01_mpo_primer.ipynb", "02_layer_sensitivity.ipynb"])
def test_one_notation_for_the_bond_dimension(name):
    text = "".join("".join(c["source"]) for c in _cells(name) if c["cell_type"] == "markdown")
    assert not re.search(r"D_?\{?max", text, flags=re.I), f"{name}: write chi / χ for the bond dimension, not Dmax"
