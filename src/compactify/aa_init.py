"""The activation-aware MPO as an initialisation of :func:`compactify.tensorize.tensorize`.

The paper's recipe is plain TT-SVD (``init="tt_svd"``): every MPO minimises the weight error
``||W - M||_F``, and it stays the reference model of the study. ``init="activation_aware"``
instead fits each MPO with :class:`compactify.lowrank.AAMPO`, which minimises the error of the
layer's *outputs* on calibration inputs, ``||X (W - M)^T||_F`` with ``C = X^T X / tokens``, and
is never worse than TT-SVD under that measure (it starts from the better of TT-SVD and a
Kronecker-whitened TT-SVD and only descends).

The MPO keeps exactly the plain TT-SVD's factors and bond dimensions for the plan entry (a
``target_ratio`` or a ``chi``, as :func:`compactify.tensorize.check_plan` resolves it), so the
parameter count, the saved config (factors and bonds per module), loading and healing are the
same as for a TT-SVD model; only the core values differ. AAMPO takes a parameter budget, so
the bonds are reached through the budget those bonds spend (:func:`decompose`), and checked.

``init="asvd"`` is the strongest low-rank peer of the MPO (SVD-LLM-style activation-aware SVD,
:class:`compactify.lowrank.LowRank`): each planned matrix becomes ``W ~ A B`` of the largest rank
whose ``r * (out + in)`` parameters fit in what the plan's MPO would spend, fitted to the same
calibration inputs. It is stored as a 2-core MPO whose first core holds all outputs and the second
all inputs (factors ``(out, 1)`` and ``(1, in)``, bond ``r``): exactly a rank-``r`` factorisation, so
it is saved, loaded, healed and sized by the same code as every MPO model, and compared with the
MPOs at (at most) the same parameters.

``init="asvd_seq"`` is the same factorisation fitted block by block on the *compressed* model's
own inputs towards the dense outputs (:mod:`compactify.aa_seq`, GPTQ's order of work): it cannot
be built by :func:`~compactify.tensorize.tensorize` from per-matrix stats alone, so
:func:`tensorize_from_config` calls :func:`sequential_from_config` for it. Its model records
``init: asvd_seq`` (a low-rank model whose calibration record says ``sequential``).

Everything here is checked before :func:`~compactify.tensorize.tensorize` changes anything
(:func:`prepare`): an unknown init, stats missing for a planned matrix or of the wrong shape,
unknown options. The config records ``init`` (``tt_svd``, ``activation_aware``, or ``mixed``
once a model holds both), the options and calibration under ``activation_aware``, and each
such module's relative activation error and that of the plain TT-SVD at the same bonds under
``activation_errors`` (which also marks which modules were fitted this way).

The calibration statistics come from the config by :func:`activation_stats` (the ``heal``
split, never the held-out text), with the frontier's settings (``frontier.calib_*``,
``frontier.aa_*``): one source for the activation-aware method's defaults.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Mapping

import torch

from .aa_mpo import AAMPO
from .mpo import MPO, count_params, factorize

INITS = ("tt_svd", "activation_aware", "asvd", "asvd_seq")
LABELS = {"tt_svd": "TT-SVD", "activation_aware": "activation-aware MPO", "asvd": "activation-aware SVD",
          "asvd_seq": "sequential activation-aware SVD"}  # for prose and legends


def label(init: str) -> str:
    """An init's name for prose and legends (an unknown one as given)."""
    return LABELS.get(init, init)
OPTIONS = {k: p.default for k, p in inspect.signature(AAMPO.__init__).parameters.items()
           if k in ("sweeps", "inner", "damping")}  # AAMPO's own defaults, used where none are given


class InitError(ValueError):
    """An initialisation that cannot be run as asked (unknown init, missing or wrong stats)."""


@dataclass
class AAInit:
    """What :func:`prepare` validated: the stats, the AAMPO options, the calibration record."""
    stats: Mapping
    options: dict
    calibration: dict | None
    init: str = "activation_aware"

    def record(self) -> dict:
        if self.init == "asvd":
            return {"method": "asvd", "calibration": self.calibration}
        return {**self.options, "calibration": self.calibration}


def check_init(init: str) -> str:
    if init not in INITS:
        close = difflib.get_close_matches(str(init), INITS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise InitError(f"Unknown MPO init {init!r}.{hint} Use one of {', '.join(INITS)} (tensorize.init).")
    return init


def _options(options: Mapping | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise InitError(f"Unknown activation-aware options {sorted(unknown)}; AAMPO takes {sorted(OPTIONS)}.")
    out = {**OPTIONS, **options}
    for key in ("sweeps", "inner"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InitError(f"Activation-aware option {key}={v!r} must be an integer >= 0 (0 = whitened TT-SVD only).")
    if isinstance(out["damping"], bool) or not isinstance(out["damping"], (int, float)) or not out["damping"] > 0:
        raise InitError(f"Activation-aware option damping={out['damping']!r} must be a number > 0 "
                        "(the relative diagonal damping of the whitening factors).")
    out["damping"] = float(out["damping"])
    return out


def _budget(out: int, inp: int, bonds) -> float:
    """The fraction of an ``out x in`` matrix's parameters that the MPO with ``bonds`` keeps
    (with the default factors, as :func:`compactify.tensorize.check_plan` chose them)."""
    cores = len(bonds) + 1
    dims = [o * i for o, i in zip(factorize(out, cores), factorize(inp, cores))]
    return count_params(dims, bonds) / (out * inp)


def prepare(init: str, targets, stats: Mapping | None, options: Mapping | None, calibration: Mapping | None,
            info: Mapping | None) -> AAInit | None:
    """Validate an init for the checked plan ``targets`` (:func:`compactify.tensorize.check_plan`)
    before anything is decomposed; ``info`` is the model's current ``config.compactify``.
    Returns None for ``tt_svd``, else what :func:`decompose` needs. Raises :class:`InitError`."""
    check_init(init)
    if init == "asvd_seq":
        raise InitError("init='asvd_seq' is fitted block by block on the compressed model's own inputs, which "
                        "tensorize() alone cannot see: build it with compactify.aa_seq.sequential_asvd(dense, plan, ids) "
                        "or aa_init.tensorize_from_config (tensorize.init: asvd_seq).")
    if init == "tt_svd":
        given = [n for n, v in (("stats", stats), ("aa_options", options), ("calibration", calibration)) if v is not None]
        if given:
            raise InitError(f"{' and '.join(given)} given with init='tt_svd', which uses no calibration data: "
                            "pass init='activation_aware' to use them, or leave them out.")
        return None
    if not isinstance(stats, Mapping):
        raise InitError("init='activation_aware' needs stats={(block, matrix): C}, the input second moments of the "
                        "planned matrices: build them with compactify.aa_init.activation_stats(model, tokenizer, cfg) "
                        "or compactify.frontier.input_stats(model, calibration_ids).")
    missing = [key for key, *_ in targets if tuple(_key(key)) not in stats]
    if missing:
        raise InitError(f"No calibration stats for {len(missing)} planned matrices ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}): collect them for every block of the plan "
                        "(input_stats(..., block_ids='all')). Nothing was changed.")
    for key, name, layer, _, bonds in targets:
        C = stats[_key(key)]
        n = layer.in_features
        if isinstance(C, tuple) and init != "asvd":
            raise InitError(f"Calibration stats for '{key}' ({name}) are a (C', K) pair, which only init='asvd' "
                            "uses (sequential calibration, compactify.aa_seq). Nothing was changed.")
        for M in (C if isinstance(C, tuple) and len(C) == 2 else (C,)):
            if not isinstance(M, torch.Tensor) or tuple(M.shape) != (n, n):
                raise InitError(f"Calibration stats for '{key}' ({name}) have shape {tuple(getattr(M, 'shape', ()))}, "
                                f"not ({n}, {n}): pass the second moment of THIS layer's inputs (or, for a sequential "
                                "calibration, the pair (C', K) of that shape). Nothing was changed.")
            if not torch.isfinite(M).all():
                raise InitError(f"Calibration stats for '{key}' ({name}) contain NaN/Inf (overflow in the calibration "
                                "forward?). Nothing was changed.")
        if _budget(layer.out_features, n, bonds) > 1:
            raise InitError(f"Plan entry '{key}' ({name}) gives an MPO larger than the dense matrix (bonds "
                            f"{list(bonds)}); the activation-aware fit works within a parameter budget <= dense. "
                            "Use a smaller chi, or init='tt_svd' for this plan. Nothing was changed.")
    if init == "asvd" and options is not None:
        raise InitError(f"aa_options={dict(options)} given with init='asvd', which has none (its damping is "
                        "compactify.lowrank.LowRank's): leave them out, or use init='activation_aware'.")
    aa = AAInit(stats, _options(options), None if calibration is None else dict(calibration), init)
    before = (info or {}).get("activation_aware")
    if before is not None and (info or {}).get("activation_errors") and before != aa.record():
        raise InitError(f"This model already holds activation-aware MPOs fitted with {before}; these would use "
                        f"{aa.record()}. Use the same options and calibration, or tensorize from the dense model.")
    return aa


def _key(key: str) -> tuple[int, str]:
    block, matrix = key.split(".")
    return int(block), matrix


def decompose(aa: AAInit, key: str, weight: torch.Tensor, cores: int, bonds) -> tuple[MPO, dict]:
    """The activation-aware MPO of one planned matrix with exactly ``bonds`` (the plain TT-SVD's),
    and ``{"aa": its relative activation error, "plain": the TT-SVD's at the same bonds}``; for
    ``init="asvd"`` the activation-aware rank-``r`` factorisation within the same budget (see the
    module's docstring) and ``{"aa": its error, "plain": the plain truncated SVD's at rank r}``."""
    out, inp = weight.shape
    keep = min(1.0, _budget(out, inp, bonds) + 0.5 / (out * inp))  # the budget these bonds spend (+ half a parameter: rounding)
    if aa.init == "asvd":
        return _asvd(weight, aa.stats[_key(key)], keep)
    comp = AAMPO(weight, aa.stats[_key(key)], cores=cores, **aa.options).at(keep)
    mpo = comp.factors
    if tuple(mpo.bond_dims) != tuple(bonds):
        raise InitError(f"Internal error: the activation-aware MPO of '{key}' has bonds {list(mpo.bond_dims)}, "
                        f"the plan's TT-SVD {list(bonds)}. Nothing was changed; report this.")
    return mpo, {"aa": round(comp.info["act_error"], 6), "plain": round(comp.info["act_error_plain"], 6)}


def _asvd(weight: torch.Tensor, C: torch.Tensor, keep: float) -> tuple[MPO, dict]:
    """The activation-aware SVD of ``weight`` at the largest rank within ``keep``, as a 2-core MPO;
    ``C`` is the input second moment, or the pair ``(C', K)`` of a sequential calibration."""
    from .lowrank import LowRank, activation_error, lowrank_rank

    weight = weight.detach()
    out, inp = weight.shape
    r = lowrank_rank((out, inp), keep)
    C, K = C if isinstance(C, tuple) else (C, None)   # K: the cross moment of a sequential calibration
    A, B = LowRank(weight, C, aware=True, cross=K).rank(r).factors
    plain = LowRank(weight, aware=False).rank(r).weight
    mpo = MPO([A.reshape(1, out, 1, r).contiguous(), B.reshape(r, 1, inp, 1).contiguous()])
    return mpo, {"aa": round(activation_error(weight, A @ B, C), 6), "plain": round(activation_error(weight, plain, C), 6)}


def is_lowrank(spec: Mapping) -> bool:
    """A module record (``config.compactify["modules"][name]``) of a rank-r factorisation: two
    cores, all outputs on the first and all inputs on the second (what ``init="asvd"`` builds)."""
    return len(spec["out_factors"]) == 2 and spec["out_factors"][1] == 1 and spec["in_factors"][0] == 1


def sync(info: Mapping, modules: Mapping) -> dict:
    """The init keys of ``config.compactify`` for the MPO ``modules`` now in the model (called by
    :func:`compactify.tensorize._sync`): a module is ``asvd`` if it is a rank-r factorisation
    (:func:`is_lowrank`), else activation-aware iff it has an entry in ``activation_errors``."""
    act = {k: v for k, v in (info.get("activation_errors") or {}).items() if k in modules}
    seq = bool(((info.get("activation_aware") or {}).get("calibration") or {}).get("sequential"))
    kinds = {("asvd_seq" if seq else "asvd") if is_lowrank(spec) else "activation_aware" if name in act else "tt_svd"
             for name, spec in modules.items()}
    init = kinds.pop() if len(kinds) == 1 else "mixed"
    return {"init": init, **({"activation_aware": info.get("activation_aware"), "activation_errors": act} if act else {})}


# ---------------------------------------------------------------- from the config

def options_from_config(cfg: Mapping) -> dict:
    """The AAMPO options of a run: ``frontier.aa_sweeps``, ``aa_inner``, ``aa_damping``."""
    fc = cfg["frontier"]
    return {"sweeps": fc["aa_sweeps"], "inner": fc["aa_inner"], "damping": fc["aa_damping"]}


def activation_stats(model, tokenizer, cfg: Mapping, plan=None, progress: bool = False) -> tuple[dict, dict]:
    """``(stats, calibration)``: the input second moments ``{(block, matrix): C}`` of the dense
    ``model`` over ``frontier.calib_tokens`` tokens of ``frontier.calib_split`` (the healing text;
    "heldout" is refused), in windows of ``frontier.calib_seq_len``, for the blocks of ``plan``
    (default: all), and a record of that calibration for the model's config."""
    from .frontier import calibration_ids, input_stats

    fc = cfg["frontier"]
    ids = calibration_ids(tokenizer, fc["calib_split"], fc["calib_tokens"], cfg["seed"])
    block_ids = "all" if plan is None else sorted({b for b, _, _ in plan.items()})
    stats = input_stats(model, ids, seq_len=fc["calib_seq_len"], batch_size=fc["batch_size"], block_ids=block_ids,
                        progress=progress)
    n = ids.numel() // fc["calib_seq_len"] * fc["calib_seq_len"]
    return stats, {"split": fc["calib_split"], "tokens": n, "seq_len": fc["calib_seq_len"], "seed": cfg["seed"]}


def tensorize_from_config(model, tokenizer, plan, cfg: Mapping, progress: bool = False, errors: bool = True):
    """:func:`compactify.tensorize.tensorize` with the run's ``tensorize.init``; for
    ``activation_aware`` the stats come from :func:`activation_stats` (collected on the dense
    model before any matrix is swapped) and the options from :func:`options_from_config`."""
    from .tensorize import tensorize

    init = check_init(cfg["tensorize"]["init"])
    if init == "tt_svd":
        return tensorize(model, plan, progress=progress, errors=errors)
    if init == "asvd_seq":
        return sequential_from_config(model, tokenizer, plan, cfg, progress=progress)
    stats, calibration = activation_stats(model, tokenizer, cfg, plan, progress)
    return tensorize(model, plan, progress=progress, errors=errors, init=init, stats=stats,
                     aa_options=options_from_config(cfg) if init == "activation_aware" else None, calibration=calibration)


def sequential_from_config(dense, tokenizer, plan, cfg: Mapping, progress: bool = False):
    """:func:`compactify.aa_seq.sequential_asvd` of ``dense`` (not changed) with the run's settings:
    ``tensorize.seq_calib_tokens`` tokens of ``frontier.calib_split`` in ``frontier.calib_seq_len``
    windows, ridge ``tensorize.seq_ridge``."""
    from .aa_seq import sequential_asvd
    from .frontier import calibration_ids

    fc, tc = cfg["frontier"], cfg["tensorize"]
    ids = calibration_ids(tokenizer, fc["calib_split"], tc["seq_calib_tokens"], cfg["seed"])
    n = ids.numel() // fc["calib_seq_len"] * fc["calib_seq_len"]
    calibration = {"split": fc["calib_split"], "tokens": n, "seq_len": fc["calib_seq_len"], "seed": cfg["seed"]}
    return sequential_asvd(dense, plan, ids, seq_len=fc["calib_seq_len"], batch_size=fc["batch_size"],
                           ridge=tc["seq_ridge"], calibration=calibration, progress=progress)
