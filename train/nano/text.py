"""Open-vocabulary English for salmonn-nano's transcripts: sentences from Debian text packages.

Sources (each a Debian package, read from disk, nothing downloaded):
- WordNet's usage examples (`wordnet-base`, the quoted parts of each synset's gloss): short everyday
  sentences and phrases over the whole dictionary;
- fortune cookies (`fortunes`, `fortunes-min`): quotations, jokes and proverbs, cut into sentences.

A sentence is kept when it is plain English a voice can read: letters, digits and ordinary punctuation,
3 to `MAX_WORDS` words, numbers spelled out as spoken (`evaluate.number_words`), so that a sentence is
its own transcript for every voice. Nothing is invented: the text is the source's, re-cased at the start
and given a final full stop where the source had none.

Held-out text comes from a source never used in training: whole fortune files (`HELD_OUT_FORTUNES`) are
read only for the test split, so no sentence, author or topic thread of them reaches training.
Validation takes a fixed hashed share of the training sources.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from train.nano.evaluate import normalize_words, number_words

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PACKAGES = {"wordnet": "wordnet-base", "fortunes": "fortunes fortunes-min"}
# files of program code, pictures made of characters, text that is mostly names and jargon, or dictionary
# entries ("Senate, n.: ...") that no one reads aloud as written
SKIPPED_FORTUNES = ("ascii-art", "perl", "linux", "linuxcookie", "debian", "computers", "knghtbrd", "translate-me",
                    "definitions")
# never read for training or validation: the held-out sentences are theirs
HELD_OUT_FORTUNES = ("wisdom", "people", "literature", "pets")
MIN_WORDS = 3
MAX_WORDS = 24
VALID_PERCENT = 2
ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:?!'\-$%]+$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
ATTRIBUTION = re.compile(r"^\s*(--|-|~)\s*\S")


class TextSourceError(RuntimeError):
    """A Debian text package the nano data needs is not installed."""


@dataclass(frozen=True)
class Line:
    """One sentence and where it came from (source and file)."""
    text: str
    source: str         # "wordnet" | "fortunes"
    origin: str         # file name inside the source

    @property
    def split(self) -> str:
        if self.source == "fortunes" and self.origin in HELD_OUT_FORTUNES:
            return "test"
        digest = hashlib.sha1(self.text.lower().encode()).digest()
        return "valid" if digest[0] * 100 // 256 < VALID_PERCENT else "train"


def missing_packages() -> list[str]:
    missing = []
    if not all((WORDNET_DIR / f).is_file() for f in WORDNET_FILES):
        missing.append(PACKAGES["wordnet"])
    if not (FORTUNES_DIR / "fortunes").is_file() or not (FORTUNES_DIR / HELD_OUT_FORTUNES[0]).is_file():
        missing.append(PACKAGES["fortunes"])
    return missing


def spoken_text(raw: str) -> str | None:
    """`raw` cleaned into a sentence a voice reads word for word, or None when it is not one."""
    text = " ".join(re.sub(r"\s*--\s*", ", ", raw.replace("’", "'").replace("`", "'")).split())
    text = text.strip(" \"'")
    if not text or not ALLOWED.match(text):
        return None
    words = []
    for token in text.split():
        core = token.strip(",.;:?!")
        if any(ch.isdigit() for ch in core) or "$" in core or "%" in core:
            spoken = number_words(core)
            if spoken is None:
                return None
            words.append(token.replace(core, " ".join(spoken)))
        elif not re.search(r"[A-Za-z]", token) and token not in ("-",):
            return None
        elif core.startswith("'") or core.endswith("'"):
            return None         # a quoted word: the source names the word rather than says it
        else:
            words.append(token)
    text = " ".join(w for w in words if w != "-")
    if "$" in text or "%" in text or text.isupper():
        return None
    count = len(normalize_words(text))
    if not MIN_WORDS <= count <= MAX_WORDS:
        return None
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text.rstrip(",;:") + "."


def _wordnet_lines() -> list[Line]:
    lines = []
    for name in WORDNET_FILES:
        for row in (WORDNET_DIR / name).read_text(encoding="latin-1").splitlines():
            if row.startswith(" ") or "|" not in row:
                continue        # the licence header
            gloss = row.split("|", 1)[1]
            for example in re.findall(r'"([^"]+)"', gloss):
                text = spoken_text(example)
                if text:
                    lines.append(Line(text, "wordnet", name))
    return lines


def _fortune_sentences(fortune: str) -> list[str]:
    body = [ln for ln in fortune.splitlines() if not ATTRIBUTION.match(ln)]
    if any(ln.startswith(("\t", "    ")) for ln in body[1:]) and len(body) > 6:
        return []           # verse, dialogue layouts and tables: line breaks carry meaning
    return SENTENCE_END.split(" ".join(" ".join(body).split()))


def _fortune_lines(files: list[Path]) -> list[Line]:
    lines = []
    for path in files:
        for fortune in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            for sentence in _fortune_sentences(fortune):
                text = spoken_text(sentence)
                if text:
                    lines.append(Line(text, "fortunes", path.name))
    return lines


def _fortune_files() -> list[Path]:
    return sorted(p for p in FORTUNES_DIR.iterdir()
                  if p.is_file() and "." not in p.name and p.name not in SKIPPED_FORTUNES)


@lru_cache(maxsize=1)
def corpus() -> tuple[Line, ...]:
    """Every usable sentence, each once (first source wins), in a fixed order."""
    missing = missing_packages()
    if missing:
        raise TextSourceError(f"missing text packages (apt-get install {' '.join(missing)})")
    seen, unique = set(), []
    for line in _wordnet_lines() + _fortune_lines(_fortune_files()):
        key = " ".join(normalize_words(line.text))
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return tuple(unique)


def lines_for(split: str) -> list[Line]:
    return [line for line in corpus() if line.split == split]


def vocabulary(lines: list[Line]) -> set[str]:
    return {w for line in lines for w in normalize_words(line.text)}


def summary() -> dict:
    """Sentence and word counts per split, vocabulary sizes and the held-out vocabulary's overlap."""
    by_split = {s: lines_for(s) for s in ("train", "valid", "test")}
    vocab = {s: vocabulary(lines) for s, lines in by_split.items()}
    test_words = [w for line in by_split["test"] for w in normalize_words(line.text)]
    return {
        "sentences": {s: len(lines) for s, lines in by_split.items()},
        "sources": {s: sorted({f"{l.source}/{l.origin}" for l in lines}) for s, lines in by_split.items()},
        "vocabulary": {s: len(v) for s, v in vocab.items()},
        "test_types_in_train": round(len(vocab["test"] & vocab["train"]) / max(len(vocab["test"]), 1), 4),
        "test_tokens_in_train": round(sum(w in vocab["train"] for w in test_words) / max(len(test_words), 1), 4),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(summary(), indent=1))
