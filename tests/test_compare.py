"""Tests of compactify.compare (paired differences) and compactify.heldout (the held-out texts)."""
from __future__ import annotations

import numpy as np
import pytest

from compactify import compare as C


def test_paired_bootstrap_covers_a_known_difference_at_the_nominal_rate():
    # 200 simulated paired evaluations of 300 binary documents: a is right with p = 0.6, b gives
    # a's answer flipped with q = 0.3, so the population difference is q (1 - 2p) = -0.06.
    rng = np.random.default_rng(0)
    truth, hits = 0.3 * (1 - 2 * 0.6), 0
    for i in range(200):
        a = rng.random(300) < 0.6
        b = np.where(rng.random(300) < 0.3, ~a, a)
        r = C.paired_bootstrap(a.astype(float), b.astype(float), n_boot=1000, seed=i)
        hits += r["lo"] <= truth <= r["hi"]
    assert 0.9 <= hits / 200 <= 0.99


def test_identical_models_give_zero_difference_and_zero_width():
    x = np.random.default_rng(1).random(50)
    r = C.paired_bootstrap(x, x)
    assert r["diff"] == 0 and r["lo"] == 0 and r["hi"] == 0 and r["half_width"] == 0


def test_mcnemar_exact_matches_the_binomial_test():
    a = np.array([1] * 10 + [0] * 10)
    b = np.array([1] * 10 + [1] * 2 + [0] * 8)     # 2 discordant, both one way
    assert C.mcnemar_exact(a, b) == pytest.approx(0.5)  # 2 * 0.5^2
    assert C.mcnemar_exact(a, a) == 1.0
    b = np.array([0] * 10 + [0] * 10)               # 10 discordant, all one way
    assert C.mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 10)


def _task(scores, ids=None, prompts=None, version=1):
    n = len(scores)
    return {"metric": "acc", "value": float(np.mean(scores)), "stderr": 0.05, "chance": 0.25, "versions": {"t": version},
            "samples": {"doc_id": list(ids or range(n)), "score": list(map(float, scores)),
                        "prompt_hash": list(prompts or [f"p{i}" for i in range(n)])}}


def test_compare_task_pairs_by_document_and_refuses_unpaired_results():
    a, b = _task([1, 1, 0, 0, 1]), _task([1, 0, 0, 0, 1])
    r = C.compare_task(a, b, "t")
    assert r["diff"] == pytest.approx(-20.0) and r["n"] == 5 and r["discordant"] == 1
    with pytest.raises(C.PairingError, match="documents differ"):
        C.compare_task(a, _task([1, 0, 0, 0, 1], ids=[0, 1, 2, 3, 9]), "t")
    with pytest.raises(C.PairingError, match="prompts differ"):
        C.compare_task(a, _task([1, 0, 0, 0, 1], prompts=list("abcde")), "t")
    with pytest.raises(C.PairingError, match="task versions differ"):
        C.compare_task(a, _task([1, 0, 0, 0, 1], version=2), "t")
    old = {k: v for k, v in a.items() if k != "samples"}
    with pytest.raises(C.PairingError, match="no per-document records.*Rerun the notebook"):
        C.compare_task(old, b, "t")


def test_compare_nll_refuses_other_windows_and_gives_the_ppl_ratio():
    base = {"text": "brown-heldout", "ids_sha": "x", "seq_len": 4, "windows": 3, "tokens": 9, "ppl": np.exp(2.0),
            "window_nll": [2.0, 2.0, 2.0]}
    worse = {**base, "ppl": np.exp(2.5), "window_nll": [2.5, 2.5, 2.5]}
    r = C.compare_nll(base, worse)
    assert r["diff"] == pytest.approx(0.5) and r["ppl_ratio"] == pytest.approx(np.exp(0.5))
    with pytest.raises(C.PairingError, match="held-out texts differ"):
        C.compare_nll(base, {**worse, "text": "boolq-wiki"})
    with pytest.raises(C.PairingError, match="ids_shas differ"):
        C.compare_nll(base, {**worse, "ids_sha": "y"})


def test_drop_verdict_rule_and_chance():
    assert C.drop_verdict(0.5, 2.9) == "reproduced"
    assert C.drop_verdict(3.1, 9.0) == "not reproduced"
    assert C.drop_verdict(1.0, 5.0) == "inconclusive"
    assert C.at_chance({"value": 0.27, "stderr": 0.05, "chance": 0.25})
    assert not C.at_chance({"value": 0.62, "stderr": 0.02, "chance": 0.5})
    m = C.mean_drop({"a": {"task": "a", "diff": -2.0, "half_width": 3.0, "n": 9},
                     "b": {"task": "b", "diff": -4.0, "half_width": 4.0, "n": 9}}, ["a", "b"])
    assert m["drop"] == pytest.approx(3.0) and m["half_width"] == pytest.approx(2.5)


def test_heldout_texts_are_disjoint_from_healing_and_calibration_text():
    from compactify import corpus, heldout

    heal = corpus.documents("heal")
    assert not set(corpus.documents("heldout")) & set(heal)         # by document
    for name in heldout.TEXTS:                                      # by 8-gram of words
        assert heldout.check_disjoint(name, heal, "healing text", max_shared=5) <= 5
    with pytest.raises(heldout.EvalError, match="would not be held out"):
        heldout.check_disjoint("brown-heldout", heldout.documents("brown-heldout")[:2], "healing text")


def test_heldout_ids_refuse_bad_requests():
    from compactify import heldout
    from compactify.config import load_config
    from compactify.evaluate import EvalError, heldout_ids_for

    with pytest.raises(heldout.EvalError, match="Unknown held-out text"):
        heldout.check_name("wikitext")
    cfg = load_config(None, {"eval.perplexity.max_tokens": 16})
    with pytest.raises(EvalError, match="shorter than one window"):
        heldout_ids_for(None, cfg)


def test_healing_data_that_contains_held_out_text_is_refused(tmp_path):
    from compactify import heldout
    from compactify.heal_data import HealError, packed_data

    leak = tmp_path / "leak.txt"
    leak.write_text("\n\n".join(heldout.documents("boolq-wiki")[:3]) + "\n")
    with pytest.raises(HealError, match="shares .* 8-grams .*not be held out"):
        packed_data(None, str(leak), 32, 0)
