"""Python hooks named by the task templates (``!function compactify.tasks.utils.<name>``).

Where lm-eval's official config calls a function, we call the very same function from the
installed lm-eval (re-exported here), so prompts and preprocessing cannot drift from it.
"""
from __future__ import annotations

from lm_eval.api.samplers import ContextSampler
# Official WinoGrande partial scoring: one context per option, the shared suffix as target.
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)


def as_list(dataset):
    """The few-shot pool as a plain list, converted column-wise.

    lm-eval turns the pool into a list when it builds a task, even for 0-shot runs; iterating
    a 10k-row ``datasets.Dataset`` row by row took 4-8 s per task here, ``to_list()`` well
    under a second. Used where the pool is the scored split itself (no train split offline);
    lm-eval then leaves the evaluated document out of its own few-shot examples.
    """
    return dataset.to_list()


# MMLU: lm-eval's official mmlu is 57 tasks, each taking its k few-shot examples from the
# first k of that subject's dev split. We run one combined task over all subjects (so that
# ``limit`` samples across them), which needs a sampler that picks the dev examples of the
# evaluated document's own subject. lm-eval hands the sampler the evaluated document only when
# the few-shot split is the test split, so both live in the split "test" (test.jsonl and
# dev.jsonl, marked by a "split" field) and are told apart here.

def mmlu_test_docs(dataset):
    """The documents to evaluate: the test rows."""
    return dataset.filter(lambda split: split == "test", input_columns="split")


def mmlu_dev_docs(dataset):
    """The few-shot pool: the dev rows (5 per subject, in the file's order)."""
    return dataset.filter(lambda split: split == "dev", input_columns="split")


class SameSubjectFirstN(ContextSampler):
    """The first n dev examples of the evaluated document's subject (official MMLU few-shot)."""

    def __init__(self, df=None, **kwargs):
        super().__init__(df, **kwargs)
        self.by_subject: dict[str, list[dict]] = {}
        for doc in self.df:
            self.by_subject.setdefault(doc["subject"], []).append(doc)

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if eval_doc is None:
            raise ValueError("SameSubjectFirstN needs the evaluated document; keep fewshot_split equal to "
                             "test_split in mmlu.yaml.")
        pool = self.by_subject.get(eval_doc["subject"], [])
        if n > len(pool):
            raise ValueError(f"MMLU has {len(pool)} dev examples for '{eval_doc['subject']}', "
                             f"cannot take {n} shots; use num_fewshot <= {len(pool)}.")
        return pool[:n]
