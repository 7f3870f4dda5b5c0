"""Long audio and `transcribe`: chunks cut at quiet seams from block-wise reading, the task
prompts and language table, the repetition guard, subtitle formats, atomic output, bounded memory,
and the whole flow on the exported official-tiny model (random weights: the text is gibberish, so
these tests check structure, not words)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO
from salmonn_cli import audio, chunks, clock, subtitles
from salmonn_cli.decoding import (STOP_REPETITION, DecodingOptions, GreedyChooser, OneBeamDecoder,
                                  RepetitionGuard, decode)
from salmonn_cli.errors import AudioError, SalmonnError
from salmonn_cli.output_paths import format_from_suffix
from salmonn_cli.transcribe import (LANGUAGES, TRANSCRIBE_PROMPT, Segment, TranscribeOptions,
                                    language_name, progress_wanted, task_prompt, transcribe_file)

NARRATION = AUDIO / "narration-moon-landing.mp3"   # 17.4 s, 44.1 kHz mono speech
SR = audio.SAMPLE_RATE
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The streamed resampler gives the same samples as resampling the whole file (measured: 0.0).
STREAM_RESAMPLE_TOL = 1e-9
# Peak RSS growth allowed while chunking a 10-minute file, whose decoded size is 212 MB at its own
# rate (float64) and 77 MB at 16 kHz (measured growth: about 10 MB: one chunk plus one block).
CHUNKING_RSS_BOUND = 25e6
SPEECH_LEVEL = 0.01                                  # |sample| above this is speech (espeak-ng)


# --- helpers --------------------------------------------------------------------------------------

def narration() -> tuple[np.ndarray, int]:
    return sf.read(NARRATION)


def write(path, wave, rate):
    sf.write(path, wave, rate, subtype="PCM_16" if str(path).endswith(".wav") else None)
    return path


def validate_subtitles(text: str, fmt: str) -> list[tuple[float, float, str]]:
    """Parse SRT or WebVTT strictly; check numbering, time format, order and no overlap."""
    marker = "," if fmt == "srt" else "."
    stamp = rf"(\d{{2,}}):([0-5]\d):([0-5]\d){re.escape(marker)}(\d{{3}})"
    timing = re.compile(rf"^{stamp} --> {stamp}$")
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n")
        text = text[len("WEBVTT\n\n"):]
    assert text == "" or text.endswith("\n\n")
    cues = []
    for number, block in enumerate([b for b in text.split("\n\n") if b], start=1):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines.pop(0) == str(number)
        m = timing.match(lines[0])
        assert m, lines[0]
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        body = "\n".join(lines[1:])
        assert body.strip() and "-->" not in body
        if fmt == "vtt":
            assert "<" not in body and not re.search(r"&(?!amp;|lt;)", body)
        assert start < end
        if cues:
            assert start >= cues[-1][1]          # monotonic, not overlapping
        cues.append((start, end, body))
    return cues


# --- language table and prompts -------------------------------------------------------------------

def test_language_codes_and_names():
    assert language_name("de") == "German"
    assert language_name("JA") == "Japanese"
    assert language_name("zh-CN") == "Chinese"
    assert language_name("pt_BR") == "Portuguese"
    assert language_name("german") == "German"
    assert language_name(" French ") == "French"
    assert language_name("Mandarin") == "Chinese"
    for code in "de ja zh fr es it pt ru ko ar hi nl pl sv tr uk vi".split():
        assert code in LANGUAGES
    assert all(name[0].isupper() for name in LANGUAGES.values())


@pytest.mark.parametrize("bad", ["xx", "klingon", "", "d"])
def test_unknown_language_is_one_clear_line(bad):
    with pytest.raises(SalmonnError) as e:
        language_name(bad)
    assert "\n" not in str(e.value) and "ISO 639-1" in str(e.value)


def test_task_prompts_are_the_official_ones():
    assert task_prompt() == TRANSCRIBE_PROMPT == "Recognize the speech and give me the transcription."
    assert task_prompt("de") == "Listen to the speech and translate it into German."
    assert task_prompt("Japanese") == "Listen to the speech and translate it into Japanese."


# --- repetition guard -----------------------------------------------------------------------------

def test_repetition_guard_finds_loops_and_trims_to_one_copy():
    guard = RepetitionGuard()
    assert guard([5] * 11) is None
    assert guard([9, 8] + [5] * 12) == STOP_REPETITION
    assert guard.trim([9, 8] + [5] * 12) == [9, 8, 5]
    phrase = [10, 11, 12, 13]
    assert guard([1, 2] + phrase * 2) is None
    assert guard([1, 2] + phrase * 3) == STOP_REPETITION
    assert guard.trim([1, 2] + phrase * 3 + phrase[:2]) == [1, 2] + phrase
    sentence = list(range(100, 120))                     # 20 tokens: two copies are a loop
    assert guard([7] + sentence + sentence[:19]) is None
    assert guard([7] + sentence * 2) == STOP_REPETITION
    assert guard.trim([7] + sentence * 2) == [7] + sentence
    rng = np.random.default_rng(0)
    varied = rng.integers(0, 32000, 200).tolist()
    assert all(guard(varied[:n]) is None for n in range(len(varied) + 1))
    assert guard.trim(varied) == varied


def test_repetition_guard_notices_a_loop_whose_period_varies_and_keeps_its_first_copy():
    guard = RepetitionGuard()
    said = [40, 41, 42, 43, 44, 45, 46, 47]              # varied: never a loop
    # "what you remember of what you remembered of ...": no exact n-gram repeats back to back 3 times
    a, b = [1, 2, 3, 4], [1, 2, 5, 4]
    loop = a + b + a + a + b + b + a + b + a
    assert all(guard.find_loop(said + loop[:n]) is None for n in range(len(loop) + 1))
    stop = next(n for n in range(len(loop) + 1) if guard(said + loop[:n]))
    assert stop == 31                                    # the last 32 tokens (47 and 31 of the loop) hold 6 distinct ones
    assert guard.trim(said + loop[:stop]) == said + [1, 2, 3, 4, 1, 2, 5]   # up to the first 5: every token of the loop
    # one distinct token more than `max_distinct` in every 32 is not a loop
    seven = [1, 2, 3, 4, 5, 6, 7] * 6
    assert all(guard.find_varying_loop(said + seven[:n]) is None for n in range(len(seven) + 1))
    # a word said before the loop that the loop reuses is kept, with the loop's first copy after it
    assert guard.trim([9, 1, 8] + loop[:stop]) == [9, 1, 8, 1, 2, 3, 4, 1, 2, 5]


def test_decoding_stops_on_the_guard_and_stays_compatible_without_it():
    vocab = 16
    script = [3, 4] + [5, 6] * 20                        # a model that loops on "5 6"

    def logits_for(i):
        out = np.zeros(vocab, dtype=np.float32)
        out[script[i] if i < len(script) else 2] = 1.0
        return out

    position = {"i": 0}

    def step(token):
        position["i"] += 1
        return logits_for(position["i"])

    def greedy(stop=None):
        return OneBeamDecoder(GreedyChooser(), eos_id=2, max_tokens=100, room=1000, stop=stop)

    g = decode(logits_for(0), lambda s: step(s.tokens[0]), greedy(RepetitionGuard()))
    assert g.stop_reason == STOP_REPETITION and g.tokens == [3, 4] + [5, 6] * 6
    position["i"] = 0
    plain = decode(logits_for(0), lambda s: step(s.tokens[0]), greedy())
    assert plain.stop_reason == "eos" and plain.tokens == script


# --- subtitle formats and atomic output -----------------------------------------------------------

def test_timestamp_formats():
    assert clock.format_timestamp(62.345) == "00:01:02,345"
    assert clock.format_timestamp(62.345, ".") == "00:01:02.345"
    assert clock.format_timestamp(0) == "00:00:00,000"
    assert clock.format_timestamp(59.9996) == "00:01:00,000"
    assert clock.format_timestamp(3 * 3600 + 25 * 60 + 7.5, ".") == "03:25:07.500"
    assert clock.format_timestamp(100 * 3600) == "100:00:00,000"
    with pytest.raises(ValueError):
        clock.format_timestamp(-1)


TRICKY = [Segment(0.0, 29.5, "Hello --> world\n\n\nsecond line"),
          Segment(29.5, 58.25, "<i>fish</i> & chips"),
          Segment(58.25, 3700.125, "past an hour")]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_srt_and_vtt_validate(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    subtitles.write_subtitles(TRICKY, fmt, path)
    cues = validate_subtitles(path.read_text(encoding="utf-8"), fmt)
    assert [(c[0], c[1]) for c in cues] == [(0.0, 29.5), (29.5, 58.25), (58.25, 3700.125)]
    assert cues[0][2] == "Hello -> world\nsecond line"
    if fmt == "vtt":
        assert cues[1][2] == "&lt;i>fish&lt;/i> &amp; chips"


def test_txt_and_json(tmp_path, capsys):
    subtitles.write_subtitles(TRICKY, "txt", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text().splitlines()[-1] == "past an hour"
    subtitles.write_subtitles(TRICKY, "json", tmp_path / "out.json", metadata={"audio": "a.wav"})
    doc = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert doc["audio"] == "a.wav"
    assert doc["segments"][2] == {"start": 58.25, "end": 3700.125, "text": "past an hour"}
    subtitles.write_subtitles(TRICKY[:1], "srt", "-")            # "-" is stdout
    assert capsys.readouterr().out.startswith("1\n00:00:00,000 --> 00:00:29,500\n")


def test_format_from_option_or_extension():
    assert format_from_suffix("a/b.SRT", None) == "srt"
    assert format_from_suffix("b.vtt", "json") == "json"
    assert format_from_suffix("notes", None) == "txt"                 # no extension: txt
    assert format_from_suffix("talk.wav", "srt") == "srt"             # --format decides
    for unknown in ("notes.md", "talk.wav", "out.docx"):               # never silently txt
        with pytest.raises(SalmonnError, match="give --format"):
            format_from_suffix(unknown, None)
    with pytest.raises(SalmonnError):
        format_from_suffix("x.srt", "docx")


def test_output_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "subs.srt"

    def failing_writer(segments, out, metadata=None):
        out.write("1\n00:00:00,000 --> 00:00:01,000\npartial")
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(subtitles.WRITERS, "srt", failing_writer)
    with pytest.raises(RuntimeError):
        subtitles.write_subtitles(TRICKY, "srt", target)
    assert list(tmp_path.iterdir()) == []                     # no file, no temp file
    target.write_text("old")
    with pytest.raises(RuntimeError):
        subtitles.write_subtitles(TRICKY, "srt", target)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    subtitles.write_subtitles(TRICKY, "srt", target)
    assert target.read_text().startswith("1\n") and list(tmp_path.iterdir()) == [target]


def test_new_output_file_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        subtitles.write_subtitles(TRICKY, "txt", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_output_into_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SalmonnError, match="does not exist"):
        subtitles.write_subtitles(TRICKY, "srt", tmp_path / "nope" / "a.srt")


# --- chunks ---------------------------------------------------------------------------------------

def test_chunks_tile_the_file_and_match_whole_file_resampling(tmp_path):
    wave, rate = narration()
    path = write(tmp_path / "long70.flac", np.tile(wave, 4), rate)     # 69.8 s at 44.1 kHz
    cut = list(chunks.iter_chunks(path))
    whole = audio.load_audio(path)
    assert len(cut) == 3
    assert cut[0].start_s == 0 and cut[-1].end_s == pytest.approx(len(whole) / SR)
    for a, b in zip(cut, cut[1:]):
        assert a.end_s == b.start_s
    for w in cut:
        assert len(w.wave) <= 30 * SR and len(w.wave) == round(w.seconds * SR)
    streamed = np.concatenate([w.wave for w in cut])
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= STREAM_RESAMPLE_TOL


def test_seam_falls_in_a_silence_gap(tmp_path):
    wave, rate = narration()
    gap_start, gap_end = 27.5, 28.5
    before = np.concatenate([wave, wave])[:int(gap_start * rate)]
    signal = np.concatenate([before, np.zeros(int((gap_end - gap_start) * rate)), wave])
    signal += 1e-4 * np.random.default_rng(0).standard_normal(len(signal))   # not digital silence
    path = write(tmp_path / "gap.wav", signal, rate)
    cut = list(chunks.iter_chunks(path))
    assert len(cut) == 2
    assert gap_start + 0.05 < cut[0].end_s < gap_end - 0.05


def test_short_exact_and_16k_files(tmp_path):
    tone = 0.1 * np.sin(np.arange(30 * SR) * 0.05)
    (only,) = chunks.iter_chunks(write(tmp_path / "exact30.wav", tone, SR))
    assert only.end_s == 30.0 and np.array_equal(only.wave, audio.load_audio(tmp_path / "exact30.wav"))
    (short,) = chunks.iter_chunks(write(tmp_path / "short.wav", tone[:SR // 2], SR))
    assert short.end_s == 0.5
    stereo = np.stack([tone[:SR], -tone[:SR]], axis=1)
    (first,) = chunks.iter_chunks(write(tmp_path / "stereo.wav", stereo, SR))
    assert np.allclose(first.wave, tone[:SR], atol=1 / 32768)          # channel 0, PCM16 rounding


def test_unreadable_and_empty_files_are_audio_errors(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    empty = write(tmp_path / "empty.wav", np.zeros(0), SR)
    for bad in (tmp_path / "junk.wav", empty, tmp_path / "missing.wav"):
        with pytest.raises(AudioError):
            list(chunks.iter_chunks(bad))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_seams_fall_between_espeak_sentences(tmp_path):
    sentences = ["The quick brown fox jumps over the lazy dog near the river bank.",
                 "Every evening the old lighthouse keeper climbed the narrow stairs.",
                 "She sells sea shells by the sea shore on sunny summer mornings.",
                 "A journey of a thousand miles begins with a single step forward.",
                 "The committee will meet again next Tuesday to discuss the budget."]
    pieces, speech, t = [], [], 0.0
    for i in range(18):
        out = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(out), sentences[i % len(sentences)]], check=True)
        clip, rate = sf.read(out)
        loud = np.flatnonzero(np.abs(clip) > SPEECH_LEVEL)
        speech.append((t + loud[0] / rate, t + loud[-1] / rate))
        pause = np.zeros(int(0.4 * rate))
        pieces += [clip, pause]
        t += (len(clip) + len(pause)) / rate
    path = write(tmp_path / "speech.wav", np.concatenate(pieces), rate)
    cut = list(chunks.iter_chunks(path))
    assert len(cut) >= 2
    for w in cut[:-1]:
        assert not any(a < w.end_s < b for a, b in speech), f"cut at {w.end_s:.2f} s is inside a sentence"


MEMORY_SCRIPT = """
import resource, sys
from salmonn_cli import chunks
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
list(chunks.iter_chunks(sys.argv[2]))           # warm up: imports, soxr, first allocations
before = peak()
n = samples = 0
for w in chunks.iter_chunks(sys.argv[1]):
    n += 1
    samples += len(w.wave)
print(n, samples, peak() - before)
"""


def test_ten_minute_file_is_chunked_with_bounded_memory(tmp_path):
    wave, rate = narration()
    path = tmp_path / "ten_minutes.wav"
    with sf.SoundFile(path, "w", rate, 1, "PCM_16") as f:   # written in blocks too
        copies, rest = divmod(600 * rate, len(wave))
        for _ in range(copies):
            f.write(wave)
        f.write(wave[:rest])
    decoded_bytes_16k = 600 * SR * 8
    warm = write(tmp_path / "warm.wav", wave, rate)
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(warm)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    n, samples, growth = map(int, r.stdout.split())
    assert n >= 20 and abs(samples - 600 * SR) <= 1
    assert growth < CHUNKING_RSS_BOUND < decoded_bytes_16k / 3, growth


# --- the whole flow on the exported tiny model ----------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(model_f32):
    from salmonn_cli.pipeline import Pipeline, RuntimeOptions

    with Pipeline(str(model_f32), RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=200)) as p:
        yield p


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    wave, rate = narration()
    return write(tmp_path_factory.mktemp("audio") / "long70.flac", np.tile(wave, 4), rate)


def test_transcribe_70_seconds_of_speech(pipeline, long_speech, tmp_path):
    seen = []
    options = TranscribeOptions(decoding=DecodingOptions(max_tokens=12))
    transcript = transcribe_file(pipeline, long_speech, options, on_segment=seen.append, progress=False)
    assert transcript.n_chunks == 3 and transcript.skipped_silent == 0
    assert transcript.seconds == pytest.approx(69.76, abs=0.01)
    assert transcript.prompt == TRANSCRIBE_PROMPT and transcript.task == "transcribe"
    assert seen == transcript.segments and len(seen) == 3
    assert seen[0].start == 0 and seen[-1].end == transcript.seconds
    assert all(s.text and 0 < len(s.tokens) <= 12 for s in seen)
    # each segment is what `answer` gives for its chunk alone
    first = next(chunks.iter_chunks(long_speech))
    embeds, _ = pipeline.embed_wave(first.wave)
    direct = pipeline.answer(embeds, TRANSCRIBE_PROMPT, DecodingOptions(max_tokens=12))
    assert seen[0].tokens == direct.tokens and seen[0].text == direct.text
    for fmt in ("srt", "vtt"):
        out = tmp_path / f"t.{fmt}"
        subtitles.write_subtitles(transcript.segments, fmt, out)
        cues = validate_subtitles(out.read_text(encoding="utf-8"), fmt)
        assert [c[0] for c in cues] == [round(s.start, 3) for s in seen]
    subtitles.write_subtitles(transcript.segments, "json", tmp_path / "t.json", transcript.metadata())
    doc = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert doc["chunks"] == 3 and len(doc["segments"]) == 3 and doc["task"] == "transcribe"


def test_translation_prompt_and_unknown_language(pipeline, long_speech):
    options = TranscribeOptions(translate="ja", decoding=DecodingOptions(max_tokens=2))
    transcript = transcribe_file(pipeline, NARRATION, options, progress=False)
    assert transcript.task == "translate" and transcript.language == "Japanese"
    assert transcript.prompt == "Listen to the speech and translate it into Japanese."
    assert transcript.n_chunks == 1
    with pytest.raises(SalmonnError, match="unknown language"):
        transcribe_file(pipeline, long_speech, TranscribeOptions(translate="xx"))


def test_the_guard_cuts_looping_chunks(pipeline, long_speech):
    # the tiny model's random weights loop within 200 tokens on this audio (measured: every chunk)
    transcript = transcribe_file(pipeline, long_speech, TranscribeOptions(), progress=False)
    looped = [s for s in transcript.segments if s.stop_reason == STOP_REPETITION]
    assert looped
    guard = RepetitionGuard()
    for s in looped:
        assert guard.find_loop(s.tokens) is None and len(s.tokens) < 200


def test_silent_chunks_are_skipped(pipeline, tmp_path):
    wave, rate = narration()
    path = write(tmp_path / "quiet_then_speech.wav",
                 np.concatenate([np.zeros(40 * rate), wave[:5 * rate]]), rate)
    transcript = transcribe_file(pipeline, path, TranscribeOptions(decoding=DecodingOptions(max_tokens=2)),
                                 progress=False)
    assert transcript.n_chunks == 2 and transcript.skipped_silent == 1
    assert len(transcript.segments) == 1 and transcript.segments[0].start >= 25


def test_transcribe_never_loads_the_whole_file(pipeline, tmp_path, monkeypatch):
    wave, rate = narration()
    path = tmp_path / "ten_minutes.flac"
    with sf.SoundFile(path, "w", rate, 1) as f:
        for _ in range(35):
            f.write(wave)
    monkeypatch.setattr(audio, "load_audio", lambda *a, **k: pytest.fail("whole-file read"))
    options = TranscribeOptions(decoding=DecodingOptions(max_tokens=1), skip_silence=False)
    transcript = transcribe_file(pipeline, path, options, progress=False)
    assert transcript.n_chunks >= 20 and transcript.seconds == pytest.approx(35 * len(wave) / rate)
    assert all(s.end - s.start <= 30 for s in transcript.segments)


def test_progress_only_for_several_chunks_on_a_terminal(monkeypatch):
    assert not progress_wanted(20.0, 30.0, True)
    assert not progress_wanted(None, 30.0, True)
    assert progress_wanted(70.0, 30.0, True)
    assert not progress_wanted(70.0, 30.0, False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_wanted(70.0, 30.0, None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_wanted(70.0, 30.0, None)


def test_forced_progress_bar_keeps_stdout_apart(pipeline, long_speech, capsys):
    transcript = transcribe_file(pipeline, long_speech,
                                 TranscribeOptions(decoding=DecodingOptions(max_tokens=1)),
                                 on_segment=lambda s: print(f"SEGMENT {s.start:.2f}"), progress=True)
    assert transcript.n_chunks == 3
    captured = capsys.readouterr()
    # segments printed to a piped stdout stay on stdout; the bar is on stderr only
    assert captured.out.splitlines() == [f"SEGMENT {s.start:.2f}" for s in transcript.segments]
    assert "SEGMENT" not in captured.err and "70/70 s" in captured.err.replace("\x1b", "")
