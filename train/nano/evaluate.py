"""Scoring salmonn-nano answers: word error rate and sound-event accuracy.

WER: word-level Levenshtein distance over normalised text (lowercase, punctuation and apostrophes
dropped, hyphens split, numbers written out the way flite speaks them), summed over a corpus and
divided by the number of reference words.

Numbers follow flite 2.2's `us_tokentowords`: "9:30" -> "nine thirty", "10:05" -> "ten oh five",
"21st" -> "twenty first", "3.5" -> "three point five", "1,200" -> "one thousand two hundred",
"50%" -> "fifty per cent", "$5" -> "five dollars", "07" -> "zero seven". flite picks year or
cardinal reading of a bare 4-digit number with a decision tree; here 1400..2599 read as years
("1969" -> "nineteen sixty nine", "2005" -> "two thousand five"), which agrees with it on ordinary years.

Event accuracy: an answer is right when it names the labelled class: it contains one of the class's
keywords (`sounds.CLASSES`) at the start of a word ("knock" matches "knocking").
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from train.nano.sounds import CLASSES as EVENT_CLASSES

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                 "nine": "ninth", "twelve": "twelfth"}
YEAR_RANGE = (1400, 2599)
ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "percent": "per cent"}

TIME = re.compile(r"^(\d{1,2}):(\d\d)$")
ORDINAL = re.compile(r"^(\d+)(st|nd|rd|th)$")
DECIMAL = re.compile(r"^(\d+)\.(\d+)$")
COMMA_INT = re.compile(r"^\d{1,3}(,\d{3})+$")
MONEY = re.compile(r"^\$(\d+(?:,\d{3})*)(?:\.(\d\d))?$")
PERCENT = re.compile(r"^(.+)%$")
EDGE_PUNCTUATION = "\"'()[]{}<>.,;:!?“”‘’«»…-–—"


# --- numbers -------------------------------------------------------------------------------------

def cardinal(n: int) -> list[str]:
    """Flite's cardinal reading: 123 -> one hundred twenty three (no "and")."""
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [ONES[n // 100], "hundred"] + (cardinal(n % 100) if n % 100 else [])
    for value, name in SCALES:
        if n >= value:
            return cardinal(n // value) + [name] + (cardinal(n % value) if n % value else [])
    raise AssertionError("unreachable")


def ordinal(n: int) -> list[str]:
    words = cardinal(n)
    last = words[-1]
    if last in ORDINAL_WORDS:
        words[-1] = ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return words


def _pair(digits: str) -> list[str]:
    """A two-digit group read as flite's `en_exp_id` does: "05" -> oh five, "30" -> thirty."""
    if digits[0] == "0":
        return ["oh", ONES[int(digits[1])]]
    return cardinal(int(digits))


def year(n: int) -> list[str]:
    digits = f"{n:04d}"
    if digits[1:3] == "00":                 # 2000..2009
        return cardinal(n)
    if digits[2:] == "00":
        return cardinal(int(digits[:2])) + ["hundred"]
    return cardinal(int(digits[:2])) + _pair(digits[2:])


def digit_string(digits: str) -> list[str]:
    """A bare run of digits: leading zero -> digit by digit, plausible year -> year, else cardinal."""
    if len(digits) > 1 and digits[0] == "0":
        return [ONES[int(d)] for d in digits]
    n = int(digits)
    if len(digits) == 4 and YEAR_RANGE[0] <= n <= YEAR_RANGE[1]:
        return year(n)
    return cardinal(n)


def number_words(token: str) -> list[str] | None:
    """The words flite speaks for a numeric token, or None when the token is not a number."""
    if token.isdigit():
        return digit_string(token)
    if m := TIME.match(token):
        return cardinal(int(m.group(1))) + ([] if m.group(2) == "00" else _pair(m.group(2)))
    if m := ORDINAL.match(token):
        return ordinal(int(m.group(1)))
    if COMMA_INT.match(token):
        return cardinal(int(token.replace(",", "")))
    if m := DECIMAL.match(token):
        return digit_string(m.group(1)) + ["point"] + [ONES[int(d)] for d in m.group(2)]
    if m := MONEY.match(token):
        whole = int(m.group(1).replace(",", ""))
        words = cardinal(whole) + ["dollar" if whole == 1 else "dollars"]
        if m.group(2) and m.group(2) != "00":
            cents = int(m.group(2))
            words += cardinal(cents) + ["cent" if cents == 1 else "cents"]
        return words
    if (m := PERCENT.match(token)) and (inner := number_words(m.group(1))) is not None:
        return inner + ["per", "cent"]
    return None


# --- text ----------------------------------------------------------------------------------------

def normalize_words(text: str) -> list[str]:
    """Lowercase words with punctuation dropped and numbers written out."""
    words: list[str] = []
    for raw in text.lower().replace("’", "'").split():
        token = raw.strip(EDGE_PUNCTUATION)
        numeric = number_words(token)
        if numeric is not None:
            words += numeric
            continue
        for part in re.sub(r"[^a-z0-9\s]", " ", token.replace("'", "")).split():
            numeric = number_words(part)
            expanded = numeric if numeric is not None else ABBREVIATIONS.get(part, part).split()
            words += expanded
    return words


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, deletions, insertions all cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) after normalisation."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def word_error_rate(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Corpus WER: total edits / total reference words."""
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        e, n = word_errors(ref, hyp)
        errors, words = errors + e, words + n
    if words == 0:
        raise ValueError("the references hold no words")
    return errors / words


# --- sound events --------------------------------------------------------------------------------

def _keyword_pattern(keyword: str) -> re.Pattern:
    return re.compile(r"\b" + r"\s+".join(map(re.escape, keyword.split())))


KEYWORD_PATTERNS = {c.name: [_keyword_pattern(k) for k in c.keywords] for c in EVENT_CLASSES}


def matched_events(answer: str) -> set[str]:
    """The event classes an answer names."""
    text = " ".join(re.sub(r"[^a-z0-9\s]", " ", answer.lower().replace("'", "")).split())
    return {name for name, patterns in KEYWORD_PATTERNS.items() if any(p.search(text) for p in patterns)}


def event_correct(answer: str, label: str) -> bool:
    if label not in KEYWORD_PATTERNS:
        raise ValueError(f"unknown event class {label!r}")
    return label in matched_events(answer)


def event_accuracy(answers: Iterable[str], labels: Iterable[str]) -> float:
    answers, labels = list(answers), list(labels)
    if len(answers) != len(labels) or not labels:
        raise ValueError(f"need as many answers as labels, and at least one ({len(answers)} vs {len(labels)})")
    return sum(event_correct(a, l) for a, l in zip(answers, labels)) / len(labels)


# --- a whole evaluation set ----------------------------------------------------------------------

def read_entries(annotation_file: str | Path) -> list[dict]:
    """The raw entries of an annotation file made by `make_data`, with their scoring fields
    (`metric`: "wer" | "event" | "none", `event`, `voice`, `kind`)."""
    return json.loads(Path(annotation_file).read_text(encoding="utf-8"))["annotation"]


def is_empty_transcript(answer: str) -> bool:
    """A transcript of nothing: no word once punctuation is dropped."""
    return not normalize_words(answer)


def score(entries: list[dict], answers: list[str]) -> dict:
    """WER over the "wer" entries (all, and split by kind: synthetic speech, clean or in acoustic conditions;
    speech over events; real recordings), the share of empty answers over the "empty" entries, and event
    accuracy over the "event" entries (all, and split into event clips / backgrounds behind speech:
    `event_accuracy_event`, `event_accuracy_mix`); counts alongside."""
    if len(entries) != len(answers):
        raise ValueError(f"{len(entries)} entries but {len(answers)} answers")
    result: dict = {}
    groups = {"wer": [(e, a) for e, a in zip(entries, answers) if e.get("metric") == "wer"]}
    groups["wer_synthetic"] = [(e, a) for e, a in groups["wer"] if e.get("kind") == "speech"]
    groups["wer_clean"] = [(e, a) for e, a in groups["wer_synthetic"] if not e.get("condition")]
    groups["wer_conditions"] = [(e, a) for e, a in groups["wer_synthetic"] if e.get("condition")]
    groups["wer_mix"] = [(e, a) for e, a in groups["wer"] if e.get("kind") == "mix"]
    groups["wer_real"] = [(e, a) for e, a in groups["wer"] if e.get("kind") == "real"]
    for name, pairs in groups.items():
        if pairs:
            result[name] = word_error_rate([e["text"] for e, _ in pairs], [a for _, a in pairs])
            result[f"n_{name}"] = len(pairs)
    empty = [a for e, a in zip(entries, answers) if e.get("metric") == "empty"]
    if empty:
        result["empty_rate"] = sum(is_empty_transcript(a) for a in empty) / len(empty)
        result["n_empty"] = len(empty)
    events = {"event_accuracy": [(e, a) for e, a in zip(entries, answers) if e.get("metric") == "event"]}
    events["event_accuracy_event"] = [(e, a) for e, a in events["event_accuracy"] if e.get("kind") == "event"]
    events["event_accuracy_mix"] = [(e, a) for e, a in events["event_accuracy"] if e.get("kind") == "mix"]
    for name, pairs in events.items():
        if pairs:
            result[name] = event_accuracy([a for _, a in pairs], [e["event"] for e, _ in pairs])
            result[name.replace("event_accuracy", "n_event")] = len(pairs)
    return result
