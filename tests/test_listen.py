"""`listen`: the energy VAD on synthetic audio, file replay through the listening loop on the exported
official-tiny model, the same audio captured through a real ALSA capture device (a `file` PCM opened by
PortAudio), and Ctrl-C through the CLI's error handling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO, CLI_ENV as ENV, REPO, default_sigint

from salmonn_cli import listen as listen_module
from salmonn_cli.clock import format_clock
from salmonn_cli.decoding import DecodingOptions, RepetitionGuard
from salmonn_cli.errors import AudioError, SalmonnError
from salmonn_cli.listen import (TRANSCRIBE_PROMPT, Capture, FileStream, ListenOptions, format_heard,
                                listen, parse_device, resolve_prompt)
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
from salmonn_cli.vad import EnergyVad, VadOptions, find_utterances

RATE = 16000
TIME_TOLERANCE_S = 0.2      # utterance start/end vs where the speech really is
MAX_TOKENS = 6
LONG_ANSWER_TOKENS = 120       # long enough for the tiny model's random weights to loop
ALSA_DEFAULT_CONFIG = "/usr/share/alsa/alsa.conf"
ALSA_DEVICE = "salmonn_test"
# CI installs libportaudio2 (the ALSA `file` plugin is part of libasound2): there the device test must run.
DEVICE_REQUIRED = bool(os.environ.get("CI") or os.environ.get("SALMONN_REQUIRE_AUDIO_DEVICE"))


# --- synthetic audio -------------------------------------------------------------------------------

def noise(seconds, level_db, rng):
    return rng.standard_normal(int(round(seconds * RATE))) * 10 ** (level_db / 20)


def speech_like(seconds, level_db, rng):
    """Voiced-speech-like: 120 Hz harmonics, amplitude-modulated at a syllable rate of 4 Hz."""
    t = np.arange(int(round(seconds * RATE))) / RATE
    tone = sum(np.sin(2 * np.pi * 120 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 12))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi))
    wave = tone * envelope
    return wave / np.sqrt(np.mean(wave ** 2)) * 10 ** (level_db / 20)


def bursts(layout, speech_db=-20, noise_db=-65, seed=0):
    """layout: [('silence'|'speech', seconds), ...] -> (wave, [(start, end) of each speech part])."""
    rng = np.random.default_rng(seed)
    parts, truth, t = [], [], 0.0
    for kind, seconds in layout:
        part = noise(seconds, noise_db, rng)
        if kind == "speech":
            part = part + speech_like(seconds, speech_db, rng)
            truth.append((t, t + seconds))
        parts.append(part)
        t += len(part) / RATE
    return np.concatenate(parts).astype(np.float32), truth


LAYOUT = [("silence", 0.83), ("speech", 1.07), ("silence", 1.21), ("speech", 2.49), ("silence", 0.93),
          ("speech", 0.61), ("silence", 1.0)]


def assert_times(utterances, truth):
    assert len(utterances) == len(truth), [(u.start_s, u.end_s) for u in utterances]
    for u, (start, end) in zip(utterances, truth):
        assert abs(u.start_s - start) <= TIME_TOLERANCE_S, (u.start_s, start)
        assert abs(u.end_s - end) <= TIME_TOLERANCE_S, (u.end_s, end)


# --- VAD -------------------------------------------------------------------------------------------

def test_vad_finds_each_burst_with_its_times():
    wave, truth = bursts(LAYOUT)
    assert_times(find_utterances(wave), truth)


def test_vad_adapts_to_a_loud_noise_floor():
    # Background noise at -40 dB is above the absolute minimum level; only the noise floor tells speech apart.
    wave, truth = bursts(LAYOUT, speech_db=-18, noise_db=-40, seed=1)
    assert_times(find_utterances(wave), truth)


def test_vad_streaming_in_any_block_size_equals_offline():
    wave, _ = bursts(LAYOUT, seed=2)
    offline = find_utterances(wave)
    rng = np.random.default_rng(3)
    vad, streamed, i = EnergyVad(), [], 0
    while i < len(wave):
        n = int(rng.integers(1, 5000))
        streamed += vad.push(wave[i:i + n])
        i += n
    streamed += vad.flush()
    assert len(streamed) == len(offline)
    for a, b in zip(streamed, offline):
        assert (a.start_s, a.end_s, a.audio_start_s) == (b.start_s, b.end_s, b.audio_start_s)
        np.testing.assert_array_equal(a.samples, b.samples)  # exact


def test_vad_keeps_pre_roll_and_post_roll_of_the_original_audio():
    options = VadOptions()
    wave, _ = bursts(LAYOUT, seed=4)
    for u in find_utterances(wave, options=options):
        assert u.start_s - u.audio_start_s == pytest.approx(options.pre_roll_s, abs=1e-9)
        first = int(round(u.audio_start_s * RATE))
        np.testing.assert_array_equal(u.samples, wave[first:first + len(u.samples)])  # exact
        kept_after = (first + len(u.samples)) / RATE - u.end_s
        assert kept_after == pytest.approx(options.post_roll_s, abs=1e-9)


def test_vad_drops_clicks_and_silence():
    rng = np.random.default_rng(5)
    click = np.concatenate([noise(1.0, -65, rng), speech_like(0.05, -10, rng), noise(1.0, -65, rng)])
    assert find_utterances(click) == []
    assert find_utterances(np.zeros(3 * RATE, dtype=np.float32)) == []


def test_vad_cuts_long_speech_into_model_chunks():
    options = VadOptions()
    wave, _ = bursts([("silence", 1.0), ("speech", 70.0), ("silence", 1.0)], seed=6)
    utterances = find_utterances(wave, options=options)
    assert len(utterances) == 3
    assert all(len(u.samples) <= options.max_utterance_s * RATE for u in utterances)
    # back to back: each piece's audio starts where the previous one's ended, nothing lost or repeated
    for a, b in zip(utterances, utterances[1:]):
        assert b.audio_start_s == pytest.approx(a.audio_start_s + len(a.samples) / RATE, abs=1e-9)
    assert abs(utterances[0].start_s - 1.0) <= TIME_TOLERANCE_S
    assert abs(utterances[-1].end_s - 71.0) <= TIME_TOLERANCE_S


# --- small helpers -----------------------------------------------------------------------------------

def test_time_format_and_options():
    assert format_clock(0) == "00:00.0"
    assert format_clock(12.34) == "00:12.3"
    assert format_clock(3723.44) == "1:02:03.4"
    assert format_clock(59.96) == "01:00.0"             # the rounding carries into the minutes
    assert format_clock(3599.96) == "1:00:00.0"
    assert resolve_prompt(None, transcribe=True) == TRANSCRIBE_PROMPT
    assert resolve_prompt(None, transcribe=False) == TRANSCRIBE_PROMPT
    assert resolve_prompt("Describe it.", transcribe=False) == "Describe it."
    with pytest.raises(SalmonnError):
        resolve_prompt("Describe it.", transcribe=True)
    assert parse_device("3") == 3 and parse_device("USB mic") == "USB mic" and parse_device(None) is None


def replay(path, speed, **kwargs):
    capture = Capture()
    with FileStream(path, RATE, 1600, capture.callback, capture.end, speed=speed, **kwargs):
        blocks = []
        while (block := capture.queue.get(timeout=30)) is not None:
            blocks.append(block)
    return np.concatenate(blocks)


def test_file_stream_replays_in_real_time_and_exactly(tmp_path):
    wav = tmp_path / "one.wav"
    wave = np.round(np.random.default_rng(7).uniform(-0.5, 0.5, RATE) * 32768).astype(np.int16)
    sf.write(wav, wave, RATE, subtype="PCM_16")
    t0 = time.monotonic()
    played = replay(wav, speed=1.0)
    assert time.monotonic() - t0 >= 0.9          # 1.0 s of audio at real-time pace
    np.testing.assert_array_equal(played, wave / 32768.0)  # exact
    np.testing.assert_array_equal(replay(wav, speed=0), played)


def test_file_stream_resamples_other_rates(tmp_path):
    wav = tmp_path / "44k.wav"
    sf.write(wav, np.zeros(44100 * 2, dtype=np.float32), 44100)
    assert abs(len(replay(wav, speed=0)) - 2 * RATE) <= 1


def test_file_stream_reports_a_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav"):
        FileStream(tmp_path / "nope.wav", RATE, 1600, lambda *a: None)


def test_file_stream_refuses_a_damaged_sample_rate(tmp_path):
    wav = tmp_path / "1hz.wav"
    sf.write(wav, np.zeros(RATE, dtype=np.float32), RATE, subtype="PCM_16")
    data = bytearray(wav.read_bytes())
    data[24:28] = (1).to_bytes(4, "little")          # the fmt chunk's sample rate
    wav.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="sample rate of 1 Hz"):
        FileStream(wav, RATE, 1600, lambda *a: None)


# --- the listening loop on the exported official-tiny model ------------------------------------------

# Real speech from the shared fixtures, with silences between: where each clip's speech is (s).
CLIPS = [("mountain.wav", 0.02, 2.30), ("excitement.wav", 0.0, 1.26)]
GAP_S = 1.5
NOISE_DB = -65


@pytest.fixture(scope="module")
def speech_recording(tmp_path_factory):
    """16-bit 16 kHz recording of the fixture clips separated by quiet noise, and the true speech times."""
    rng = np.random.default_rng(0)
    parts, truth, t = [noise(1.0, NOISE_DB, rng)], [], 1.0
    for name, speech_start, speech_end in CLIPS:
        clip, rate = sf.read(AUDIO / name)
        assert rate == RATE
        parts += [clip + noise(len(clip) / RATE, NOISE_DB, rng), noise(GAP_S, NOISE_DB, rng)]
        truth.append((t + speech_start, t + speech_end))
        t += len(clip) / RATE + GAP_S
    pcm = np.clip(np.round(np.concatenate(parts) * 32768), -32768, 32767).astype("<i2")
    folder = tmp_path_factory.mktemp("listen")
    sf.write(folder / "speech.wav", pcm, RATE, subtype="PCM_16")
    pcm.tofile(folder / "speech.raw")
    return {"wav": folder / "speech.wav", "raw": folder / "speech.raw", "truth": truth,
            "wave": pcm / 32768.0, "seconds": len(pcm) / RATE}


@pytest.fixture(scope="module")
def model_dir(model_f32):
    return model_f32


@pytest.fixture(scope="module")
def pipeline(model_dir):
    with Pipeline(str(model_dir), RuntimeOptions(n_threads=1, device="cpu"), DecodingOptions(max_tokens=MAX_TOKENS)) as p:
        yield p


@pytest.fixture(scope="module")
def replayed(pipeline, speech_recording):
    lines = []
    heard = listen(pipeline, ListenOptions(input_path=str(speech_recording["wav"]), speed=0),
                   DecodingOptions(max_tokens=MAX_TOKENS), on_heard=lambda h: lines.append(format_heard(h)))
    return heard, lines


def test_replay_answers_each_utterance_with_its_time(replayed, speech_recording):
    heard, lines = replayed
    assert_times([h.utterance for h in heard], speech_recording["truth"])
    assert len(lines) == len(heard)
    for h, line in zip(heard, lines):
        assert line.startswith(f"[{format_clock(h.start_s)}–{format_clock(h.end_s)}] ")
        assert h.answer.tokens and h.answer.text


def test_replay_answers_equal_asking_about_the_same_audio(replayed, pipeline, speech_recording):
    decoding = DecodingOptions(max_tokens=MAX_TOKENS)
    for h in replayed[0]:
        first = int(round(h.utterance.audio_start_s * RATE))
        clip = speech_recording["wave"][first:first + len(h.utterance.samples)]
        np.testing.assert_array_equal(h.utterance.samples, clip)  # exact
        embeds, _ = pipeline.embed_wave(clip)
        assert h.answer.tokens == pipeline.answer(embeds, TRANSCRIBE_PROMPT, decoding).tokens  # exact


def test_replay_with_the_repetition_guard_answers_as_a_guarded_ask(pipeline, speech_recording):
    decoding = DecodingOptions(max_tokens=LONG_ANSWER_TOKENS)
    heard = listen(pipeline, ListenOptions(input_path=str(speech_recording["wav"]), speed=0, repetition_guard=True),
                   decoding)
    assert any(h.answer.stop_reason == "repetition" for h in heard)      # measured: the first utterance loops
    for h in heard:
        embeds, _ = pipeline.embed_wave(h.utterance.samples.astype(np.float64))
        guarded = pipeline.answer(embeds, TRANSCRIBE_PROMPT, decoding, stop=RepetitionGuard())
        assert h.answer.tokens == guarded.tokens and h.answer.stop_reason == guarded.stop_reason


def test_replay_at_real_time_pace(pipeline, speech_recording, tmp_path):
    # The first 0.9 s of the recording (no speech) at speed 4 take about 0.23 s; max_seconds stops listening early.
    t0 = time.monotonic()
    heard = listen(pipeline, ListenOptions(input_path=str(speech_recording["wav"]), speed=4, max_seconds=0.9),
                   DecodingOptions(max_tokens=MAX_TOKENS))
    assert heard == []
    assert 0.2 <= time.monotonic() - t0 < 5


def test_a_source_at_another_rate_is_resampled(monkeypatch, pipeline, speech_recording):
    # A microphone that cannot run at 16 kHz is opened at its own rate; listen resamples its blocks.
    def open_at_48k(options, capture, sample_rate):
        stream = FileStream(options.input_path, 48000, 4800, capture.callback, capture.end, speed=0)
        return stream, 48000, "48 kHz source"

    monkeypatch.setattr(listen_module, "open_source", open_at_48k)
    heard = listen(pipeline, ListenOptions(input_path=str(speech_recording["wav"])),
                   DecodingOptions(max_tokens=MAX_TOKENS))
    assert_times([h.utterance for h in heard], speech_recording["truth"])


# --- a real capture device: an ALSA `file` PCM replaying the recording, opened through PortAudio ---------

ALSA_CONFIG = """
pcm.{name} {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm {{ type null }}
            file "/dev/null"
            infile "{infile}"
            format "raw"
        }}
        format S16_LE
        rate {rate}
        channels 1
    }}
    hint {{ show on description "salmonn test capture (file-backed)" }}
}}
"""

DEVICE_SCRIPT = """
import json, sys
from salmonn_cli import listen as listen_module
from salmonn_cli.clock import format_clock
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import AudioError
from salmonn_cli.listen import ListenOptions, input_devices, listen, open_microphone
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
model, device, seconds, max_tokens = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
out = {"devices": [d["name"] for d in input_devices()]}
try:
    open_microphone("no-such-device", None, None)
except AudioError as e:
    out["bad_device_error"] = str(e)
with Pipeline(model, RuntimeOptions(n_threads=1, device="cpu"), DecodingOptions(max_tokens=max_tokens)) as p:
    heard = listen(p, ListenOptions(device=device, max_seconds=seconds), DecodingOptions(max_tokens=max_tokens))
out["heard"] = [h.to_dict() for h in heard]
print(json.dumps(out))
"""


def alsa_device_or_skip(tmp_path, raw):
    reason = None
    if not os.path.exists(ALSA_DEFAULT_CONFIG):
        reason = f"ALSA is not installed ({ALSA_DEFAULT_CONFIG} missing; apt-get install libasound2)"
    else:
        probe = subprocess.run([sys.executable, "-c", "import sounddevice"], capture_output=True, text=True)
        if probe.returncode != 0:
            reason = f"PortAudio is not usable (apt-get install libportaudio2): {probe.stderr.strip()[-200:]}"
    if reason:
        if DEVICE_REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    config = tmp_path / "asound.conf"
    config.write_text(ALSA_CONFIG.format(name=ALSA_DEVICE, infile=raw, rate=RATE))
    # Our file after the system's own configuration (PortAudio asserts if the standard definitions are missing);
    # the environment variable keeps it to the test's processes, away from the user's ~/.asoundrc.
    return {**ENV, "ALSA_CONFIG_PATH": f"{ALSA_DEFAULT_CONFIG}:{config}"}


def test_listen_through_an_alsa_capture_device(tmp_path, model_dir, speech_recording, replayed):
    env = alsa_device_or_skip(tmp_path, speech_recording["raw"])
    r = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(model_dir), ALSA_DEVICE,
                        str(speech_recording["seconds"]), str(MAX_TOKENS)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert ALSA_DEVICE in out["devices"]
    assert "no-such-device" in out["bad_device_error"]
    # The device delivers the recording bit-exactly, so the answers are the file replay's, token for token.
    expected = [(round(h.start_s, 3), round(h.end_s, 3), h.answer.tokens) for h in replayed[0]]
    assert [(h["start"], h["end"], h["tokens"]) for h in out["heard"]] == expected


# --- Ctrl-C ------------------------------------------------------------------------------------------

def test_ctrl_c_stops_listening_cleanly(model_dir, speech_recording, tmp_path):
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.tile(speech_recording["wave"], 4), RATE, subtype="PCM_16")  # ~31 s at real-time pace
    p = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "listen", "--input", str(long_wav), "-m", str(model_dir),
                          "--max-tokens", "4", "--threads", "1", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                         preexec_fn=default_sigint)
    try:
        first = p.stdout.readline()      # the first utterance's answer: listening is under way
        p.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = p.communicate(timeout=60)
        exit_s = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
    assert first.startswith("[00:01.0–00:03."), (first, stderr)
    assert p.returncode == 130, stderr
    assert exit_s < 5, exit_s            # stops promptly, not at the end of the 31 s replay
    assert "Traceback" not in stderr + stdout
    assert stderr.strip().splitlines()[-1] == "salmonn: interrupted"
