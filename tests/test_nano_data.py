"""salmonn-nano data (train/nano): the `--quick` set made by the real command, read by the training
data loader; held-out voice and sentences kept out of training; the same seed gives the same bytes;
transcripts are exactly what flite says; WER and event-accuracy scoring on known cases.

Tolerances: WER values are ratios of small integers, compared to 1e-12; everything else is exact.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from salmonn_cli.config import SalmonnConfig
from train.data import check_tasks, clip_features, load_wave, read_annotations, read_prompts
from train.nano import data, events, evaluate, speech
from train.nano.evaluate import (edit_distance, event_accuracy, event_correct, matched_events,
                                 normalize_words, word_error_rate, word_errors)
from train.nano.sentences import VOCABULARY, all_templates, fill, generate_sentences

REPO = Path(__file__).resolve().parents[1]
SET_FILES = ("train.json", "valid.json", "test.json", "prompts.json", "dataset.json")
WER_TOL = 1e-12

needs_tools = pytest.mark.skipif(
    shutil.which("flite") is None or bool(events.missing_sound_files()),
    reason="needs apt packages flite and sound-theme-freedesktop")


def make_quick(out: Path, jobs: int) -> None:
    r = subprocess.run([sys.executable, "-m", "train.nano.make_data", str(out), "--seed", "0", "--quick",
                        "--jobs", str(jobs)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def quick_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano") / "quick"
    make_quick(out, jobs=2)
    return out


def entries(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())["annotation"]


# --- the quick set -------------------------------------------------------------------------------

@needs_tools
def test_quick_set_loads_in_the_trainer(quick_set):
    config = SalmonnConfig()
    prompts = read_prompts(quick_set / "prompts.json", config)
    assert set(prompts) == {"asr", "audiocaption", "QA"}
    n_clips = 0
    for split in data.SPLITS:
        samples = read_annotations(quick_set / f"{split}.json")
        check_tasks(samples, prompts, split)
        assert {s.task for s in samples} == {"asr", "audiocaption", "QA"}
        assert all(s.question for s in samples if s.task == "QA")
        paths = sorted({s.path for s in samples})
        n_clips += len(paths)
        for path in paths:
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert data.MIN_CLIP_SECONDS - 1e-3 <= info.duration <= data.MAX_CLIP_SECONDS + 1e-3
    assert 40 <= n_clips <= 60
    mel, fbank = clip_features(load_wave(samples[0], config), config)     # the trainer's front end
    assert np.isfinite(mel).all() and np.isfinite(fbank).all() and fbank.shape[1] == 128
    summary = json.loads((quick_set / "dataset.json").read_text())
    assert summary["event_classes"] == list(events.EVENT_NAMES)


@needs_tools
def test_quick_set_audio_is_not_silent(quick_set):
    for path in sorted((quick_set / "audio").rglob("*.wav")):
        wave, _ = sf.read(path)
        assert 0.01 < np.abs(wave).max() <= data.MAX_PEAK + 1e-4, path


@needs_tools
def test_held_out_voice_and_sentences_stay_out_of_training(quick_set):
    test = entries(quick_set, "test")
    assert {e["voice"] for e in test if "voice" in e} == {speech.HELD_OUT_VOICE}
    held_out = {e["text"] for e in test if e["task"] == "asr"}
    assert held_out
    for split in ("train", "valid"):
        seen = entries(quick_set, split)
        assert speech.HELD_OUT_VOICE not in {e.get("voice") for e in seen}
        assert not held_out & {e["text"] for e in seen}
        assert not held_out & {e["Q"] for e in seen}


def test_full_plan_keeps_splits_apart():
    clips = data.plan(0, data.FULL_SIZES)
    sentences = {split: {c.sentence.text for c in clips[split] if c.sentence} for split in data.SPLITS}
    assert len(sentences["train"]) == sum(c.kind != "event" for c in clips["train"])     # all distinct
    assert not sentences["test"] & sentences["train"] and not sentences["test"] & sentences["valid"]
    assert not sentences["valid"] & sentences["train"]
    normalized_train = {" ".join(normalize_words(s)) for s in sentences["train"]}
    assert not {" ".join(normalize_words(s)) for s in sentences["test"]} & normalized_train
    assert {c.voice.name for c in clips["test"] if c.voice} == {speech.HELD_OUT_VOICE}
    assert {c.voice.name for c in clips["train"] if c.voice} == set(speech.TRAIN_VOICES)
    for split in data.SPLITS:                   # every class, balanced
        counts = np.unique([c.event for c in clips[split] if c.kind == "event"], return_counts=True)[1]
        assert len(counts) == len(events.EVENT_NAMES) and counts.max() - counts.min() <= 1


@needs_tools
def test_same_seed_same_bytes(quick_set, tmp_path):
    again = tmp_path / "again"
    make_quick(again, jobs=1)                   # another worker count must not matter
    for name in SET_FILES:
        assert (again / name).read_bytes() == (quick_set / name).read_bytes(), name
    wavs = sorted(p.relative_to(quick_set) for p in (quick_set / "audio").rglob("*.wav"))
    assert wavs == sorted(p.relative_to(again) for p in (again / "audio").rglob("*.wav"))
    for rel in wavs:
        assert (again / rel).read_bytes() == (quick_set / rel).read_bytes(), rel


def test_another_seed_another_plan():
    a = data.plan(0, data.QUICK_SIZES)
    b = data.plan(1, data.QUICK_SIZES)
    assert [c.sentence for c in a["train"]] != [c.sentence for c in b["train"]]
    assert a == data.plan(0, data.QUICK_SIZES)


# --- sentences and flite -------------------------------------------------------------------------

def test_sentences_are_distinct_and_seeded():
    sentences = generate_sentences(3, 500)
    assert len({s.text for s in sentences}) == 500
    assert sentences == generate_sentences(3, 500)
    assert all(s.text[0].isupper() and s.text[-1] in ".?" for s in sentences)
    assert not any(ch.isdigit() for s in sentences for ch in s.text)


def _flite_words(text: str) -> list[str]:
    words = []
    for w in speech.spoken_words(text):
        if w.startswith("'") and words:     # flite splits "it's" into "it 's"
            words[-1] += w[1:]
        else:
            words.append(w)
    return words


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs apt package flite")
def test_transcripts_are_what_flite_says():
    rng = np.random.default_rng(0)
    sentences = [fill(template, rng) for template, _ in all_templates()]        # every template once
    sentences += [" ".join(values) + "." for values in VOCABULARY.values()]      # every word at least once
    for text in sentences:
        assert normalize_words(text) == _flite_words(text), text


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs apt package flite")
@pytest.mark.parametrize("token", ["1969", "2024", "2005", "2010", "1900", "12", "100", "123456", "1000",
                                   "1234567", "0", "07", "21st", "3rd", "12th", "101st", "9:30", "10:05",
                                   "12:00", "3.5", "1,200", "50%", "$5"])
def test_numbers_read_like_flite(token):
    assert normalize_words(token) == _flite_words(token)


# --- WER -----------------------------------------------------------------------------------------

def test_edit_distance():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b"], []) == 2
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0


def test_normalization():
    assert normalize_words("Please turn off the Kitchen lights, at nine o'clock!") == \
        "please turn off the kitchen lights at nine oclock".split()
    assert normalize_words("It's 9:30.") == ["its", "nine", "thirty"]
    assert normalize_words("twenty-one") == normalize_words("21") == ["twenty", "one"]
    assert normalize_words("July 21st, 1969") == "july twenty first nineteen sixty nine".split()
    assert normalize_words("“Hello” — world…") == ["hello", "world"]
    assert normalize_words("Mr Smith paid $3.50") == "mister smith paid three dollars fifty cents".split()


@pytest.mark.parametrize("ref, hyp, errors, words", [
    ("the cat sat on the mat", "the cat sat on the mat", 0, 6),
    ("the cat sat on the mat", "The cat sat on a mat.", 1, 6),        # substitution
    ("the cat sat on the mat", "the cat on the mat", 1, 6),           # deletion
    ("the cat sat on the mat", "the black cat sat on the mat", 1, 6),  # insertion
    ("the cat sat", "", 3, 3),
    ("Meet me at nine thirty.", "meet me at 9:30", 0, 5),
    ("The train leaves at half past two", "train leaves at half past to", 2, 7),
])
def test_word_errors(ref, hyp, errors, words):
    assert word_errors(ref, hyp) == (errors, words)


def test_corpus_wer_weights_by_reference_length():
    wer = word_error_rate(["a b c d", "e f"], ["a b c x", "e f"])
    assert abs(wer - 1 / 6) < WER_TOL
    assert abs(word_error_rate(["a"], ["b c d"]) - 3.0) < WER_TOL       # insertions can exceed 100 %
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])
    with pytest.raises(ValueError):
        word_error_rate([""], ["a"])


# --- events --------------------------------------------------------------------------------------

def test_each_description_names_only_its_class():
    for cls in events.EVENT_CLASSES:
        texts = list(cls.captions) + [cls.background, cls.source, cls.noun,
                                      f"A man is speaking while {cls.background}."]
        for text in texts:
            assert matched_events(text) == {cls.name}, text


@pytest.mark.parametrize("answer, label, right", [
    ("I can hear someone knocking at the door.", "knock", True),
    ("A telephone is ringing.", "phone", True),
    ("the sound of a SIREN", "siren", True),
    ("It sounds like static.", "hiss", True),
    ("Music is playing.", "bell", False),
    ("A dog is barking.", "rumble", False),
    ("There is a camera shutter and a bell.", "bell", True),
])
def test_event_correct(answer, label, right):
    assert event_correct(answer, label) is right


def test_event_accuracy():
    assert event_accuracy(["A bell.", "Static noise.", "a dog"], ["bell", "hiss", "knock"]) == 2 / 3
    with pytest.raises(ValueError):
        event_correct("a bell", "dog")
    with pytest.raises(ValueError):
        event_accuracy([], [])


@pytest.mark.skipif(bool(events.missing_sound_files()), reason="needs apt package sound-theme-freedesktop")
def test_every_class_renders():
    for name in events.EVENT_NAMES:
        for seed in range(4):                   # theme sounds and synthetic ones
            wave = events.render_event(name, 1.5, np.random.default_rng(seed))
            assert wave.shape == (24000,) and np.isfinite(wave).all(), name
            assert abs(np.abs(wave).max() - 1) < 1e-9, name


@needs_tools
def test_score_of_perfect_answers(quick_set):
    test = evaluate.read_entries(quick_set / "test.json")
    result = evaluate.score(test, [e["text"] for e in test])
    assert result["wer"] == 0 and result["event_accuracy"] == 1
    assert result["n_wer"] == result["n_wer_clean"] + result["n_wer_mix"]
    assert result["n_event"] == sum(e["metric"] == "event" for e in test) == result["n_event_event"] + result["n_event_mix"]
    assert result["event_accuracy_event"] == result["event_accuracy_mix"] == 1


@pytest.mark.parametrize("beams", ["0", "17", "two"])
def test_report_refuses_a_bad_beam_count_before_running(beams, tmp_path):
    out = tmp_path / "REPORT.md"
    done = subprocess.run([sys.executable, "-m", "train.nano.report", str(tmp_path / "no-model"), str(tmp_path),
                           "--out", str(out), "--beams", beams], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"argument --beams: must be a whole number from 1 to 16, not {beams!r}")
    assert "Traceback" not in done.stderr and not out.exists()
