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
from train.nano import augment, data, events, evaluate, real_speech, sounds, text, voices
from train.nano.evaluate import (edit_distance, event_accuracy, event_correct, matched_events,
                                 normalize_words, word_error_rate, word_errors)

REPO = Path(__file__).resolve().parents[1]
SET_FILES = ("train.json", "valid.json", "test.json", "prompts.json", "dataset.json")
WER_TOL = 1e-12

needs_tools = pytest.mark.skipif(
    bool(data_missing := voices.missing_engines() + text.missing_packages() + real_speech.missing_packages()
         + ([events.FREEDESKTOP_PACKAGE] if events.missing_sound_files() else [])),
    reason="needs apt packages flite espeak-ng festival festvox-kdlpc16k wordnet-base fortunes fortunes-min "
           "hedgewars-data ktuberling-data klettres-data alsa-utils sound-theme-freedesktop")
needs_piper = pytest.mark.skipif(voices.piper_python() is None, reason="needs Piper's environment (make piper)")


def make_quick(out: Path, jobs: int) -> None:
    r = subprocess.run([sys.executable, "-m", "train.nano.make_data", str(out), "--seed", "0", "--quick",
                        "--jobs", str(jobs)], cwd=REPO, capture_output=True, text=True, timeout=600)
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
@needs_piper
def test_quick_set_loads_in_the_trainer(quick_set):
    config = SalmonnConfig()
    prompts = read_prompts(quick_set / "prompts.json", config)
    assert set(prompts) == {"asr", "audiocaption", "QA"}
    n_clips = 0
    for split in data.SPLITS:
        samples = read_annotations(quick_set / f"{split}.json")
        check_tasks(samples, prompts, split)
        assert {s.task for s in samples} >= {"asr", "audiocaption"}
        assert all(s.question for s in samples if s.task == "QA")
        paths = sorted({s.path for s in samples})
        n_clips += len(paths)
        for path in paths:
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.5 <= info.duration <= data.MAX_CLIP_SECONDS + 1e-3
    assert n_clips == sum(sum(data.QUICK_SIZES[s].count(k) for k in data.KINDS) for s in data.SPLITS)
    mel, fbank = clip_features(load_wave(samples[0], config), config)     # the trainer's front end
    assert np.isfinite(mel).all() and np.isfinite(fbank).all() and fbank.shape[1] == 128
    summary = json.loads((quick_set / "dataset.json").read_text())
    assert set(summary["event_classes"]) <= set(sounds.CLASS_NAMES)


@needs_tools
@needs_piper
def test_nothing_said_nothing_written(quick_set):
    for split in data.SPLITS:
        for e in entries(quick_set, split):
            if e["kind"] in ("event", "quiet") and e["task"] == "asr":
                assert e["text"] == "" and e["metric"] == "empty"
            if e["kind"] in ("speech", "real", "mix") and e["task"] == "asr":
                assert evaluate.normalize_words(e["text"]) and e["metric"] == "wer"


@needs_tools
@needs_piper
def test_quick_set_audio_is_not_silent(quick_set):
    for e in entries(quick_set, "train") + entries(quick_set, "test"):
        if e["kind"] == "quiet":
            continue
        wave, _ = sf.read(quick_set / e["path"])
        assert 0.01 < np.abs(wave).max() <= data.MAX_PEAK + 1e-4, e["path"]


@needs_tools
@needs_piper
def test_held_out_voices_speakers_and_text_stay_out_of_training(quick_set):
    test = entries(quick_set, "test")
    held_out_voices = {v.speaker for v in voices.held_out_speakers()} | set(real_speech.HELD_OUT_SPEAKERS)
    test_speakers = {s for e in test if "voice" in e for s in e["voice"].split(data.SPEAKER_SEPARATOR)}
    assert test_speakers and test_speakers <= held_out_voices
    held_out = {e["text"] for e in test if e["task"] == "asr" and e["kind"] != "real"} - {""}
    assert held_out
    for split in ("train", "valid"):
        seen = entries(quick_set, split)
        assert not {s for e in seen if "voice" in e for s in e["voice"].split(data.SPEAKER_SEPARATOR)} & held_out_voices
        said = " ".join(e["text"] for e in seen)
        assert not any(sentence in said for t in held_out for sentence in [t])


def test_full_plan_keeps_splits_apart():
    clips = data.plan(0, data.FULL_SIZES)
    sentences = {split: {t for c in clips[split] for t in c.sentences} for split in data.SPLITS}
    assert not sentences["test"] & sentences["train"] and not sentences["test"] & sentences["valid"]
    assert not sentences["valid"] & sentences["train"]
    assert {v.speaker for c in clips["test"] for v in c.voices} <= {v.speaker for v in voices.held_out_speakers()}
    assert not {v.speaker for c in clips["train"] for v in c.voices} & {v.speaker for v in voices.held_out_speakers()}
    engines = {v.engine for c in clips["train"] for v in c.voices}
    assert engines == {"flite", "espeak", "festival", "piper"}
    assert len({v.speaker for c in clips["train"] for v in c.voices}) >= 20
    long_clips = [c for c in clips["train"] if c.kind == "speech" and len(c.sentences) > 1]
    assert 0.5 < len(long_clips) / data.FULL_SIZES["train"].speech < 0.8
    assert any(len({v.speaker for v in c.voices}) == 2 for c in long_clips)       # conversations
    assert {c.quiet for c in clips["train"] if c.kind == "quiet"} == {"silence", "noise", "hum"}
    for split in data.SPLITS:                   # every class the split has, balanced
        counts = np.unique([c.event for c in clips[split] if c.kind == "event"], return_counts=True)[1]
        assert counts.max() - counts.min() <= 1


@needs_tools
@needs_piper
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
    assert [c.sentences for c in a["train"]] != [c.sentences for c in b["train"]]
    assert a == data.plan(0, data.QUICK_SIZES)


# --- text, voices, conditions --------------------------------------------------------------------

@pytest.mark.skipif(bool(text.missing_packages()), reason="needs apt packages wordnet-base fortunes fortunes-min")
def test_text_is_open_and_held_out_by_source():
    summary = text.summary()
    assert summary["sentences"]["train"] > 20000 and summary["sentences"]["test"] > 1000
    assert summary["vocabulary"]["train"] > 20000
    assert not set(summary["sources"]["test"]) & set(summary["sources"]["train"])
    assert not set(summary["sources"]["test"]) & set(summary["sources"]["valid"])
    for line in text.lines_for("train")[:2000] + text.lines_for("test")[:500]:
        words = evaluate.normalize_words(line.text)
        assert text.MIN_WORDS <= len(words) <= text.MAX_WORDS, line
        assert not any(ch.isdigit() for ch in line.text), line
        assert line.text[0].isupper() and line.text[-1] in ".!?", line


@pytest.mark.parametrize("raw, spoken", [
    ("the price rose 5% in 1999", "The price rose five per cent in nineteen ninety nine."),
    ("He paid $3.50 for it", "He paid three dollars fifty cents for it."),
    ("meet me at 9:30 -- or later", "Meet me at nine thirty, or later."),
    ("'rays' is a word", None),                   # a word named, not said
    ("see http://x.org/a", None),
    ("too short", None),
])
def test_spoken_text(raw, spoken):
    assert text.spoken_text(raw) == spoken


def _flite_words(sentence: str) -> list[str]:
    done = subprocess.run(["flite", "-voice", "kal16", "-t", sentence, "-pw", "-o", "none"],
                          capture_output=True, text=True, timeout=60)
    words = []
    for w in done.stdout.split():
        if w.startswith("'") and words:     # flite splits "it's" into "it 's"
            words[-1] += w[1:]
        else:
            words.append(w)
    return words


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs apt package flite")
@pytest.mark.parametrize("token", ["1969", "2024", "2005", "2010", "1900", "12", "100", "123456", "1000",
                                   "1234567", "0", "07", "21st", "3rd", "12th", "101st", "9:30", "10:05",
                                   "12:00", "3.5", "1,200", "50%", "$5"])
def test_numbers_read_like_flite(token):
    assert normalize_words(token) == _flite_words(token)


@pytest.mark.skipif(bool(voices.missing_engines()), reason="needs apt packages flite espeak-ng festival festvox-kdlpc16k")
def test_every_engine_speaks_and_is_deterministic():
    sentence = "The quick brown fox jumps over the lazy dog."
    for voice in (voices.Voice("flite", "slt", 1.2, 0.9), voices.Voice("espeak", "en-gb-scotland+f3", 0.85, 1.1),
                  voices.Voice("festival", "ked_diphone", 1.1)):
        a, b = voices.synthesize_many([sentence, sentence], voice)
        assert np.array_equal(a, b) and 1.5 < len(a) / 16000 < 5, voice
        assert 0.05 < np.abs(a).max() <= 1.0
    slow = voices.synthesize(sentence, voices.Voice("espeak", "en-us+m1", 0.8))
    fast = voices.synthesize(sentence, voices.Voice("espeak", "en-us+m1", 1.25))
    assert len(slow) > 1.3 * len(fast)


@needs_piper
def test_piper_speaks():
    wave = voices.synthesize("Hello there, how are you today?", voices.Voice("piper", "joe"))
    assert 1.0 < len(wave) / 16000 < 4 and np.abs(wave).max() > 0.05


def test_held_out_voices_are_whole_speakers():
    train = {v.speaker for v in voices.train_speakers()}
    held = {v.speaker for v in voices.held_out_speakers()}
    assert not train & held and len(train) >= 20 and "flite/rms" in held
    assert {v.engine for v in voices.train_speakers()} == {"flite", "espeak", "festival", "piper"}


def test_conditions_keep_length_and_level():
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    for apply in (augment.room, augment.telephone, augment.lossy_codec,
                  lambda y, r: augment.noise(y, r, 10.0, float(np.sqrt(np.mean(y ** 2))))):
        y = apply(x, rng)
        assert y.shape == x.shape and np.isfinite(y).all()
        assert 0.3 < np.sqrt(np.mean(y ** 2)) / np.sqrt(np.mean(x ** 2)) < 3
    band = augment.telephone(rng.standard_normal(32000), rng)
    spectrum = np.abs(np.fft.rfft(band)) ** 2
    freqs = np.fft.rfftfreq(32000, 1 / 16000)
    assert spectrum[freqs > 4500].sum() < 0.01 * spectrum.sum()        # nothing above the phone band


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
    for cls in sounds.CLASSES:
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
        event_correct("a bell", "unicorn")
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
@needs_piper
def test_score_of_perfect_answers(quick_set):
    test = evaluate.read_entries(quick_set / "test.json")
    result = evaluate.score(test, [e["text"] for e in test])
    assert result["wer"] == 0 and result["event_accuracy"] == 1 and result["empty_rate"] == 1
    assert result["n_wer"] == result["n_wer_synthetic"] + result["n_wer_mix"] + result["n_wer_real"]
    assert result["n_wer_synthetic"] == result.get("n_wer_clean", 0) + result.get("n_wer_conditions", 0)
    wrong = evaluate.score(test, ["A dog is barking." for _ in test])
    assert wrong["empty_rate"] == 0 and wrong["wer"] > 0.5
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


def test_long_recording_strings_clean_held_out_speech_together(tmp_path, monkeypatch):
    from train.nano import report

    entries = []
    for i, (kind, condition) in enumerate([("speech", None), ("event", None), ("speech", "room"), ("speech", None),
                                           ("speech", None)]):
        sf.write(tmp_path / f"{i}.wav", np.full(16000, 0.1 * (i + 1)), 16000, subtype="PCM_16")
        entry = {"path": f"{i}.wav", "task": "asr", "kind": kind, "text": f"sentence {i}."}
        entries.append({**entry, "condition": condition} if condition else entry)
    monkeypatch.setattr(report, "LONG_RECORDING_SECONDS", 4.0)        # three 1 s clips with their pauses
    path, text, seconds = report.long_recording(tmp_path, entries, tmp_path / "long.wav")
    assert text == "sentence 0. sentence 3. sentence 4."            # clean speech only, in order
    wave, rate = sf.read(path)
    assert rate == 16000 and len(wave) / rate == pytest.approx(seconds) and seconds >= 4.0
    assert report.long_recording(tmp_path, entries[:2], tmp_path / "short.wav") is None


def test_minutes_covered_counts_minutes_with_text():
    from train.nano.report import minutes_covered

    segments = [{"start": 0.0, "end": 30.0, "text": "a"}, {"start": 30.0, "end": 59.5, "text": "b"},
                {"start": 125.0, "end": 150.0, "text": "c"}, {"start": 150.0, "end": 170.0, "text": ""}]
    assert minutes_covered(segments, 200.0) == (2, 4)
    assert minutes_covered([], 61.0) == (0, 2)
