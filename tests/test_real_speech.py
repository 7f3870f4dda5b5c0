"""The real-speech catalog (train/nano/real_speech.py): every hedgewars transcript names a recording of an
English pack that is not a grunt, texts are words, no recording is there twice, held-out speakers stay
out of training, recordings load as 16 kHz mono.

Needs the Debian packages hedgewars-data, ktuberling-data, klettres-data and alsa-utils; skipped
without them.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import soundfile

from train.nano import real_speech
from train.nano.real_speech import (HEDGEWARS_GRUNTS, HEDGEWARS_LINES, HELD_OUT_SPEAKERS, RealUtterance,
                                    catalog, catalog_order, held_out_items, load, missing_packages,
                                    train_items)

MISSING = missing_packages()
pytestmark = pytest.mark.skipif(bool(MISSING), reason="needs Debian packages: apt-get install -y "
                                                      f"--no-install-recommends {' '.join(MISSING)}")

# A word, possibly with an apostrophe or a hyphen inside ("you'll", "uh-oh") or a possessive one after
# ("Jones'"); words separated by a space and maybe punctuation; the text ends with punctuation.
WORD = r"[A-Za-z]+(?:['-][A-Za-z]+)*'?"
TEXT_RE = re.compile(rf"{WORD}(?:[,.!?]* {WORD})*(?:[.!?]|\.\.\.)")
LENGTH_TOLERANCE = 0.01          # resampled length vs the file's duration


@lru_cache(maxsize=1)
def items() -> tuple[RealUtterance, ...]:
    return tuple(catalog())


def test_every_hedgewars_line_is_a_recording_with_words():
    for pack, lines in HEDGEWARS_LINES.items():
        on_disk = real_speech.hedgewars_stems(pack)
        assert set(lines) <= on_disk, (pack, sorted(set(lines) - on_disk))
        assert not set(lines) & HEDGEWARS_GRUNTS, pack
    used = {(Path(item.path).parent.name, Path(item.path).stem)
            for item in items() if item.source == "hedgewars"}
    assert used == {(pack, stem) for pack, lines in HEDGEWARS_LINES.items() for stem in lines}


def test_only_english_hedgewars_packs_are_used():
    packs = {item.speaker.split("/", 1)[1] for item in items() if item.source == "hedgewars"}
    assert packs == set(HEDGEWARS_LINES)
    assert not packs & {"Default_es", "Default_pl", "Default_ru", "Default_uk", "Russian_pl", "Robot"}


def test_texts_are_words():
    for item in items():
        assert TEXT_RE.fullmatch(item.text), (item.path, item.text)
        assert item.text[0].isupper(), item.text


def test_the_catalog_is_sorted_unique_and_on_disk():
    got = items()
    assert list(got) == sorted(got, key=catalog_order)
    assert len({item.path for item in got}) == len(got)
    assert {item.source for item in got} == set(real_speech.SOURCES)
    assert not any(path.endswith("Noise.wav") for path in (item.path for item in got))
    assert all(item.path.startswith("/") for item in got)


def test_no_recording_is_catalogued_twice():
    digests = {}
    for item in items():
        digest = hashlib.sha1(Path(item.path).read_bytes()).hexdigest()
        assert digest not in digests, (item.path, digests.get(digest))
        digests[digest] = item.path


def test_package_metadata_texts():
    texts = {Path(item.path).name: item.text for item in items() if item.source != "hedgewars"}
    assert texts["egypt_palmtree.ogg"] == "Palm tree."
    assert texts["pizzeria_broccolli.ogg"] == "Broccoli."
    assert texts["umbrella.ogg"] == "Umbrella."
    assert texts["Q.ogg"] == "Q." and texts["dog.ogg"] == "Dog."
    assert texts["Front_Center.wav"] == "Front center."
    assert not {"aw.ogg", "ch.ogg", "th.ogg", "tv_tree.ogg"} & set(texts)     # sounds; not in the theme


def test_held_out_speakers_are_disjoint_from_training():
    everything = list(items())
    train, held_out = train_items(everything), held_out_items(everything)
    train_speakers = {item.speaker for item in train}
    held_out_speakers = {item.speaker for item in held_out}
    assert held_out_speakers == set(HELD_OUT_SPEAKERS)        # each named speaker exists
    assert not train_speakers & held_out_speakers
    assert len(train) + len(held_out) == len(everything)
    assert train and held_out


def test_load_gives_16khz_mono_float_of_the_file_length():
    by_source = {}
    for item in items():
        by_source.setdefault(item.source, item)
    assert soundfile.info(by_source["hedgewars"].path).channels == 2      # a stereo file is averaged
    for item in by_source.values():
        wave = load(item)
        assert wave.dtype == np.float64 and wave.ndim == 1
        expected = soundfile.info(item.path).duration * 16000
        assert abs(len(wave) - expected) <= LENGTH_TOLERANCE * expected, item.path
        assert 0.2 <= len(wave) / 16000 <= 8.0, item.path
        # decoded Vorbis may overshoot full scale a little
        assert np.isfinite(wave).all() and 0.01 < np.max(np.abs(wave)) < 2.0, item.path
    alsa = by_source["alsa"]                                                # 48 kHz
    assert abs(len(load(alsa, 8000)) - len(load(alsa)) / 2) <= 2


def test_missing_package_is_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(real_speech.PACKAGE_MARKERS, "klettres", tmp_path / "absent.xml")
    assert real_speech.missing_packages() == ["klettres-data"]
    with pytest.raises(real_speech.RealSpeechError, match="apt-get install .*klettres-data"):
        catalog()


def test_main_counts(capsys):
    assert real_speech.main([]) == 0
    out = capsys.readouterr().out
    assert f"{len(items())} utterances" in out
    for speaker in HELD_OUT_SPEAKERS:
        assert re.search(rf"^{re.escape(speaker)} .* held out$", out, re.M), speaker
