"""compactify.takeaways: each chapter's closing sentence carries its number (formatted for
people, computed here from the published JSON), the paper's number from data/paper/*.csv, a
verdict, and names what an older or smaller result file lacks instead of failing."""
import csv
import json

import pytest

from compactify import takeaways as T
from compactify.aa_init import LABELS
from compactify.config import REPO_ROOT

R = REPO_ROOT / "data" / "results"


def load(name):
    return json.loads((R / name).read_text())


def write(tmp_path, name, d):
    (tmp_path / name).write_text(json.dumps(d))
    return tmp_path


def test_00_baseline_perplexities_tokens_and_table2():
    d = load("00_baseline.json")
    text = T.takeaway("00", R)
    for name, p in d["baseline"]["perplexity_texts"].items():
        assert f"{p['ppl']:,.2f}" in text and f"on {name} ({p['tokens']:,} tokens, seq_len {p['seq_len']})" in text
    assert "95% CI" in text
    mmlu = d["baseline"]["tasks"]["mmlu"]
    assert f"mmlu {100 * mmlu['value']:.1f} ± {100 * mmlu['stderr']:.1f} (n={mmlu['n']})" in text
    with open(REPO_ROOT / "data" / "paper" / "table2_accuracy.csv") as f:
        paper = {r["task"]: float(r["original"]) for r in csv.DictReader(f)}
    assert f"mmlu {paper['mmlu']:.1f}" in text and "Verdict: not testable here" in text


def test_01_primer_error_and_flops_ratio():
    c = load("01_mpo_primer.json")["real_matrix"]["chi70"]
    text = T.takeaway("01", R)
    assert f"relative error {c['rel_error']:.2f}" in text and f"{c['flops_ratio_batch1']:.2f}x the dense FLOPs" in text
    assert "parameter formula is reproduced" in text and "not testable against the paper" in text


def test_02_sensitivity_uses_the_claims_table_verdicts():
    from compactify import report

    c = load("02_layer_sensitivity.json")["claims"]["ratio_0.3"]
    text = T.takeaway("02", R)
    assert f"Spearman(depth, increase) = {c['spearman_depth_all']:.2f}" in text
    assert f"+{c['mean_increase_first_third_%']:,.0f}%" in text and f"`{c['most_sensitive_type']}`" in text
    rows = {r["claim"]: r for r in report.claims(R)}
    assert rows["deeper layers more compressible"]["verdict"] in text
    assert f"L7 most sensitive: {rows['last MLP matrix (L7) most sensitive']['verdict']}" in text


def test_03_plans_before_healing_and_the_improved_start(tmp_path):
    d = load("03_tensorize.json")
    at = {r["plan"]: r["ppl"] for r in d["comparison"] if r["keep_target"] == 0.3}
    text = T.takeaway("03", R)
    assert f"{at['sensitivity']:,.0f}" in text and f"{at['uniform']:,.0f}" in text
    assert f"({at['uniform'] / at['sensitivity']:,.2f}x higher)" in text
    assert "reproduced (by construction)" in text
    if d.get("improved"):
        assert f"{LABELS[d['improved']['init']]} start of the same plan" in text
    d.pop("improved", None)
    text = T.takeaway("03", write(tmp_path, "03_tensorize.json", d))
    assert "No activation-aware start in this run (`improved` is missing" in text


def test_04_memory_against_table1_and_speed_against_claims():
    d = load("04_quantize.json")
    with open(REPO_ROOT / "data" / "paper" / "table1_models.csv") as f:
        gb = {r["model"]: float(r["size_gb"]) for r in csv.DictReader(f)}
    text = T.takeaway("04", R)
    for m in ("8-bit", "4-bit", "93%"):
        assert f"{m} {d['models'][m]['memory_ratio_vs_fp32']:.2f} (paper {gb[m] / gb['original']:.2f})" in text
    assert f"{1 / d['speed_claims']['4-bit']['decode_ratio']:.2f}x the original's time per token (paper 1.13x)" in text


def test_05_healing_ratio_interval_and_speed(tmp_path):
    d = load("05_heal.json")
    r = d["paired_nll"]["brown-heldout"]
    text = T.takeaway("05", R)
    assert f"{r['ppl_a']:,.0f} → {r['ppl_b']:,.0f}" in text
    assert f"divided by {1 / r['ppl_ratio']:,.2f} [95% CI {1 / r['ppl_ratio_hi']:,.2f}, {1 / r['ppl_ratio_lo']:,.2f}]" in text
    assert f"{d['speed_ratio_tensorized_vs_dense']:.2f}x the dense model's tokens/s" in text and "about 2.0x" in text
    if d.get("improved"):
        own = d["improved"].get("lr") not in (None, d["settings"]["lr"])
        lr = f" (at its own peak rate, {d['improved']['lr']:.0e})" if own else ""
        alike = "Healed the same way but without the block-wise step" if d.get("blockwise") else "Healed alike"
        assert f"{alike}{lr}, the {LABELS[d['improved']['init']]} start reaches" in text
    d.pop("improved", None)
    assert "No activation-aware start healed in this run" in T.takeaway("05", write(tmp_path, "05_heal.json", d))


def test_05_names_the_blockwise_step_when_it_ran(tmp_path):
    d = load("05_heal.json")
    d["blockwise"] = {"tokens": 32768, "seconds": 456.0, "settings": {"tokens": 32768, "epochs": 4, "lr": 5e-3},
                      "perplexity": {"brown-heldout": {"ppl": 468.2, "tokens": 4095, "seq_len": 256}}}
    text = T.takeaway("05", write(tmp_path, "05_heal.json", d))
    assert "Block-wise distillation (32,768 healing tokens x 4 passes per block, 7.6 min) took the TT-SVD start to 468" in text
    assert "went on from there" in text and "Healing (" not in text
    d["blockwise"] = None
    assert "**Takeaway.** Healing (" in T.takeaway("05", write(tmp_path, "05_heal.json", d))


def test_05_names_a_null_improved_start(tmp_path):
    d = load("05_heal.json")
    d["improved"] = None
    assert "(`improved` is null)" in T.takeaway("05", write(tmp_path, "05_heal.json", d))


def test_06_mean_drop_against_table2_with_the_claims_verdict():
    from compactify import report

    d = load("06_evaluate.json")
    orig = d["evaluations"]["original"]["tasks"]
    ok = [t for t in d["paired"]["88%"] if orig[t]["value"] - 1.96 * (orig[t]["stderr"] or 0) > orig[t]["chance"]]
    drop = -sum(d["paired"]["88%"][t]["diff"] for t in ok) / len(ok)
    text = T.takeaway("06", R)
    assert f"88% {drop:.1f} points" in text and f"({', '.join(ok)})" in text
    r = d["paired_nll"]["88%"]["brown-heldout"]
    assert f"multiplied by {r['ppl_ratio']:,.2f} [95% CI {r['ppl_ratio_lo']:,.2f}, {r['ppl_ratio_hi']:,.2f}]" in text
    verdict = next(x for x in report.accuracy_claims(d) if x["claim"].endswith("(88%)"))["verdict"].split(" (")[0]
    assert f"2-3 point drop: {verdict} (88%)" in text


def test_07_winner_at_every_budget():
    d = load("07_frontier.json")
    text = T.takeaway("07", R)
    for keep, w in d["winners"].items():
        assert f"{float(keep):.0%} kept: {w['winner']} ({dict(w['ranking'])[w['winner']]:,.0f})" in text
    assert "not testable against the paper" in text


@pytest.mark.parametrize("chapter, name, drop, wording", [
    ("00", "00_baseline.json", ("baseline", "perplexity_texts"), "no held-out perplexity in this run"),
    ("01", "01_mpo_primer.json", ("real_matrix",), "is missing `real_matrix`"),
    ("02", "02_layer_sensitivity.json", ("claims",), "is missing `claims`"),
    ("03", "03_tensorize.json", ("comparison",), "is missing `comparison`"),
    ("04", "04_quantize.json", ("speed_claims",), "is missing `speed_claims`"),
    ("05", "05_heal.json", ("speed_ratio_tensorized_vs_dense",), "is missing `speed_ratio_tensorized_vs_dense`"),
    ("06", "06_evaluate.json", ("paired",), "`paired` is missing from the results"),
    ("07", "07_frontier.json", ("winners",), "is missing `winners`"),
])
def test_a_missing_section_is_named_not_raised(tmp_path, chapter, name, drop, wording):
    d = load(name)
    parent = d
    for k in drop[:-1]:
        parent = parent[k]
    del parent[drop[-1]]
    if drop == ("baseline", "perplexity_texts"):
        del d["baseline"]["perplexity"]
    text = T.takeaway(chapter, write(tmp_path, name, d))
    assert wording in text, text


def test_a_missing_file_names_its_notebook(tmp_path):
    assert "run notebook 05_heal first" in T.takeaway("05", tmp_path)


def test_unknown_chapter_names_the_valid_ones():
    with pytest.raises(ValueError, match="00, 01, 02, 03, 04, 05, 06, 07"):
        T.takeaway("08", R)


def test_fmt_ppl():
    assert [T.fmt_ppl(x) for x in (45.8134, 1406.58, 123953.6, 1.4832e13)] == ["45.81", "1,407", "123,954", "1.48e+13"]
