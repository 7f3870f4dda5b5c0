"""Issue 21: nothing the user has is ever lost, through the real command line.

One test (or a parametrized group) per row of the issue's table: output paths that are an input,
a device, a FIFO, a socket, a symlink or a clash between inputs (all refused before any audio is
read, and left untouched); stdin, FIFOs and process substitutions read once and as they arrive
(bounded memory on 5 minutes of stdin, Ctrl-C within 2 s on an endless or stalled one); files cut
short; manifests naming files outside their directory or holding absurd values; write errors on
stdout; --threads above the core count; file names with a newline; usage errors; a closed pipe.

Root-safe: device nodes are made with mknod inside the test's own folder (skipped where that is not
allowed), never under /dev. Refusals that must come before any audio is read are run against a
model directory that does not exist: the refusal, not the missing model, must be the error.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import CLI_ENV, OFFICIAL_TINY, default_sigint
from salmonn_cli import audio_input
from salmonn_cli.errors import AudioError, ModelError
from salmonn_cli.manifest import MANIFEST_NAME, load_manifest
from salmonn_cli.output_paths import plan_outputs
from test_reliability import ERROR_EXIT, assert_one_line_error, stderr_lines

SPEECH = OFFICIAL_TINY / "speech_2p5s.wav"
PROMPT = "Describe the audio."
INTERRUPT_EXIT = 130
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE          # as a shell reports a process ended by SIGPIPE
FAST = ("--max-tokens", "2", "--threads", "1")
CLI_TIMEOUT = 300
NO_MODEL = "/nonexistent/salmonn-model"      # any error about it means the output was not checked first
DEVICE_NULL = (1, 3)                          # Linux char device numbers of null and full
DEVICE_FULL = (1, 7)
FSIZE_LIMIT = 16                              # RLIMIT_FSIZE on stdout's file: full after 16 bytes

# stdin streams: 96 kHz stereo 16-bit PCM WAV (the bytes of 5 minutes: 115 MB; decoded whole as
# float64 they would take 460 MB)
STREAM_RATE = 96000
STREAM_CHANNELS = 2
LONG_STREAM_SECONDS = 300
SHORT_STREAM_SECONDS = 60
# Peak RSS may grow by at most this from 1 to 5 minutes of stdin. Measured through `transcribe -`:
# 223 MB after 1 minute, 238 MB after 5 and 10, 242 MB after 20; the reader that held
# all of stdin grew by 111 MB from 30 s to 5 minutes.
STREAM_RSS_BOUND = 40e6
INTERRUPT_WITHIN_S = 2.0
# audio the feeder must have sent (far more than a pipe buffers) before Ctrl-C; a stalled feeder stops here
STREAM_SECONDS_BEFORE_SIGINT = 3


def run_cli(args, *, env=None, input=None, stdin=None, stdout=subprocess.PIPE, preexec_fn=None,
            pass_fds=(), timeout=CLI_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "salmonn_cli", *map(str, args)], input=input, stdin=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, env={**CLI_ENV, **(env or {})},
                          preexec_fn=preexec_fn, pass_fds=pass_fds, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry of `folder`: its kind and, for a regular file, its bytes; for a link, its target."""
    state = {}
    for p in sorted(folder.iterdir()):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            state[p.name] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            state[p.name] = ("file", p.read_bytes(), st.st_ino)
        else:
            state[p.name] = ("other", stat.S_IFMT(st.st_mode), st.st_ino)
    return state


def make_device(path: Path, numbers: tuple[int, int]) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*numbers))
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")
    return path


def wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    """A 16-bit PCM WAV header; data_bytes 0xFFFFFFFF is what streaming writers put for 'unknown'."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", data_bytes))


# A feeder process writes a WAV stream of zeros to its stdout: `seconds` of it, or endless
# ("inf"), or three seconds and then nothing more while keeping the pipe open ("stall"). After each
# second it writes how many it has sent into its progress file: past the pipe's buffer, that shows
# the reader is reading.
FEEDER = """
import sys, time
rate, channels, mode, header, progress = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
out = sys.stdout.buffer
second = bytes(rate * channels * 2)
try:
    out.write(bytes.fromhex(header))
    sent = 0
    while mode in ("inf", "stall") or sent < float(mode):
        out.write(second)
        out.flush()
        sent += 1
        with open(progress, "w") as f:
            f.write(str(sent))
        if mode == "stall" and sent == 3:
            time.sleep(3600)
except BrokenPipeError:
    pass
"""


def feeder(mode: str, progress: Path, seconds_in_header: float | None = None) -> subprocess.Popen:
    data_bytes = (0xFFFFFFFF if seconds_in_header is None
                  else int(seconds_in_header * STREAM_RATE) * STREAM_CHANNELS * 2)
    header = wav_header(STREAM_RATE, STREAM_CHANNELS, data_bytes)
    return subprocess.Popen([sys.executable, "-c", FEEDER, str(STREAM_RATE), str(STREAM_CHANNELS), mode, header.hex(),
                             str(progress)], stdout=subprocess.PIPE)


def seconds_fed(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except FileNotFoundError:
        return 0


@pytest.fixture
def speech_copy(tmp_path) -> Path:
    return Path(shutil.copyfile(SPEECH, tmp_path / "same.wav"))


# --- row 1: an output that is an input; an unknown extension ---------------------------------------

@pytest.mark.parametrize("output, extra, fragment", [
    ("same.wav", (), "cannot tell the output format from '.wav'"),
    ("same.wav", ("-f", "srt"), "it is the input"),
    ("out.docx", (), "cannot tell the output format from '.docx'"),
    ("hardlink.srt", (), "it is the input"),
    ("symlink.srt", (), "it is the input"),
])
def test_output_that_is_an_input_or_of_unknown_format_is_refused(speech_copy, tmp_path, output, extra, fragment):
    os.link(speech_copy, tmp_path / "hardlink.srt")
    (tmp_path / "symlink.srt").symlink_to(speech_copy)
    before = snapshot(tmp_path)
    r = run_cli(["transcribe", speech_copy, "-o", tmp_path / output, *extra, "-m", NO_MODEL, *FAST])
    assert_one_line_error(r, fragment)
    assert snapshot(tmp_path) == before


# --- row 2: devices, FIFOs, sockets, symlinks -------------------------------------------------------

def test_output_onto_a_device_fifo_socket_or_directory_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.srt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "socket.srt"))
    (tmp_path / "to-fifo.srt").symlink_to("fifo.srt")
    targets = {"fifo.srt": "a FIFO", "socket.srt": "a socket", "to-fifo.srt": "a FIFO"}
    if os.geteuid() == 0:
        make_device(tmp_path / "null.srt", DEVICE_NULL)
        (tmp_path / "to-null.srt").symlink_to("null.srt")
        targets.update({"null.srt": "a device", "to-null.srt": "a device"})
    # `-o DIR/` where the transcript's own name is taken by a directory
    (tmp_path / "speech_2p5s.srt").mkdir()
    try:
        before = snapshot(tmp_path)
        for name, kind in targets.items():
            r = run_cli(["transcribe", SPEECH, "-o", tmp_path / name, "-m", NO_MODEL, *FAST])
            assert_one_line_error(r, name, kind)
        r = run_cli(["transcribe", SPEECH, "-o", f"{tmp_path}/", "-f", "srt", "-m", NO_MODEL, *FAST])
        assert_one_line_error(r, "speech_2p5s.srt", "a directory")
        assert snapshot(tmp_path) == before
    finally:
        sock.close()


def test_a_device_made_here_is_never_replaced(model_f32, tmp_path):
    # as root, the issue saw `-o /dev/full` become a regular file; here a private device node
    device = make_device(tmp_path / "mynull", DEVICE_NULL)
    r = run_cli(["transcribe", SPEECH, "-o", device, "-f", "srt", "-m", model_f32, *FAST])
    assert_one_line_error(r, "a device")
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_a_symlink_is_written_through(model_f32, tmp_path):
    real = tmp_path / "real.srt"
    real.write_text("old\n")
    real.chmod(0o640)
    link = tmp_path / "link.srt"
    link.symlink_to(real.name)
    dangling = tmp_path / "new-link.srt"
    dangling.symlink_to("created.srt")
    for target in (link, dangling):
        r = run_cli(["transcribe", SPEECH, "-o", target, "-m", model_f32, *FAST])
        assert r.returncode == 0, stderr_lines(r)
        assert target.is_symlink()
    assert os.readlink(link) == "real.srt" and real.read_text().startswith("1\n00:00:00,000 --> ")
    assert real.stat().st_mode & 0o777 == 0o640              # the file's own permissions stay
    assert (tmp_path / "created.srt").read_text().startswith("1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["created.srt", "link.srt", "new-link.srt", "real.srt"]


# --- rows 3, 4, 7: -o DIR, clashing names, existing files, missing directories -------------------

def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copyfile(SPEECH, tmp_path / folder / "x.wav")
    out = tmp_path / "outd"
    out.mkdir()
    r = run_cli(["transcribe", tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", "-o", out, "-f", "srt",
                 "-m", NO_MODEL, *FAST])
    assert_one_line_error(r, "a/x.wav", "b/x.wav", "x.srt")
    assert list(out.iterdir()) == []


def test_an_existing_transcript_is_replaced_and_anything_else_is_kept(model_f32, tmp_path):
    transcript = tmp_path / "exist.srt"
    transcript.write_text("precious\n")
    r = run_cli(["transcribe", SPEECH, "-o", transcript, "-m", model_f32, *FAST])
    assert r.returncode == 0, stderr_lines(r)
    assert transcript.read_text().startswith("1\n")                # the README's rule: replaced
    notes = tmp_path / "notes.md"
    notes.write_text("precious\n")
    r = run_cli(["transcribe", SPEECH, "-o", notes, "-f", "srt", "-m", NO_MODEL, *FAST])
    assert_one_line_error(r, "refusing to replace", "notes.md")
    assert notes.read_text() == "precious\n"


def test_a_directory_output_takes_any_number_of_inputs(model_f32, tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    for output in (subs, f"{subs}/"):                              # existing, with or without the slash
        r = run_cli(["transcribe", SPEECH, "-o", output, "-f", "vtt", "-m", model_f32, *FAST])
        assert r.returncode == 0, stderr_lines(r)
        assert [p.name for p in subs.iterdir()] == ["speech_2p5s.vtt"]
    r = run_cli(["transcribe", "-", "-o", f"{subs}/", "-m", model_f32, *FAST], input=SPEECH.read_bytes())
    assert r.returncode == 0, stderr_lines(r)
    assert sorted(p.name for p in subs.iterdir()) == ["speech_2p5s.vtt", "stdin.txt"]
    r = run_cli(["transcribe", SPEECH, "-o", f"{tmp_path / 'missing'}/", "-m", NO_MODEL, *FAST])
    assert_one_line_error(r, "missing", "does not exist")


def test_a_bad_output_path_is_reported_before_any_audio_is_read(tmp_path):
    never = tmp_path / "never.wav"
    os.mkfifo(never)                      # reading it would block: the refusal must come first
    for output, fragment in ((tmp_path / "nodir" / "x.srt", "output directory does not exist"),
                             (tmp_path / "x.docx", "'.docx'")):
        r = run_cli(["transcribe", never, "-o", output, "-m", NO_MODEL, *FAST], timeout=60)
        assert_one_line_error(r, fragment)
    if os.geteuid() != 0:                # root writes anywhere
        unwritable = tmp_path / "locked"
        unwritable.mkdir()
        unwritable.chmod(0o500)
        r = run_cli(["transcribe", never, "-o", unwritable / "x.srt", "-m", NO_MODEL, *FAST], timeout=60)
        assert_one_line_error(r, "cannot write", "Permission denied")


def test_plan_outputs_names_each_target(tmp_path):
    (tmp_path / "d").mkdir()
    plan = plan_outputs(["a/x.wav", "b/y.flac", "-"], f"{tmp_path / 'd'}/", "json")
    assert plan.format == "json"
    assert [p.name for p in plan.targets] == ["x.json", "y.json", "stdin.json"]
    assert plan_outputs(["a.wav"], None, None).targets == [None]
    assert plan_outputs(["a.wav"], "-", "srt").format == "srt"
    assert plan_outputs(["a.wav"], str(tmp_path / "t"), None).format == "txt"     # no extension: txt


# --- rows 5, 6: stdin, FIFOs and process substitutions --------------------------------------------

def peak_rss_of_transcribe_from(feed: subprocess.Popen, model, tmp_path) -> tuple[int, dict]:
    out = tmp_path / "stdin.json"
    process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "transcribe", "-", "-m", str(model),
                                "-o", str(out), *FAST], stdin=feed.stdout, stderr=subprocess.PIPE, env=CLI_ENV)
    feed.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    err = process.stderr.read().decode()
    feed.wait()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return usage.ru_maxrss * 1024, json.loads(out.read_text())


def test_five_minutes_of_stdin_take_bounded_memory(model_f32, tmp_path):
    peaks = {}
    for seconds in (SHORT_STREAM_SECONDS, LONG_STREAM_SECONDS):
        feed = feeder(str(seconds), tmp_path / "fed")
        peaks[seconds], result = peak_rss_of_transcribe_from(feed, model_f32, tmp_path)
        assert result["audio_seconds"] == pytest.approx(seconds, abs=0.01)
        assert result["skipped_silent_chunks"] == result["chunks"] >= seconds // 30
    assert peaks[LONG_STREAM_SECONDS] - peaks[SHORT_STREAM_SECONDS] < STREAM_RSS_BOUND, peaks


@pytest.mark.parametrize("mode", ["inf", "stall"], ids=["endless", "stalled"])
def test_endless_stdin_ends_at_ctrl_c(model_f32, tmp_path, mode):
    progress = tmp_path / "fed"
    feed = feeder(mode, progress)
    # started as a background job is: SIGINT ignored here; the child must get the default back
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", "transcribe", "-", "-m", str(model_f32),
                                    *FAST], stdin=feed.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=CLI_ENV, preexec_fn=default_sigint)
    finally:
        signal.signal(signal.SIGINT, ignored)
    feed.stdout.close()
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while seconds_fed(progress) < STREAM_SECONDS_BEFORE_SIGINT:      # salmonn is reading stdin
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        for p in (process, feed):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert process.returncode == INTERRUPT_EXIT, stderr
    assert took < INTERRUPT_WITHIN_S, took
    assert [line for line in stderr.decode().splitlines() if line.strip()] == ["salmonn: interrupted"]


def ask_json(args, model, **kw) -> dict:
    r = run_cli(["ask", *args, PROMPT, "-m", model, "--json", "--truncate", *FAST], **kw)
    assert r.returncode == 0, stderr_lines(r)
    return json.loads(r.stdout)


def test_a_fifo_and_a_process_substitution_are_read_once(model_f32, tmp_path):
    expected = ask_json([SPEECH], model_f32)["tokens"]
    fifo = tmp_path / "ff.wav"
    os.mkfifo(fifo)

    def write_later():
        time.sleep(1)
        with open(fifo, "wb") as f:
            f.write(SPEECH.read_bytes())
    writer = threading.Thread(target=write_later)
    writer.start()
    assert ask_json([fifo], model_f32, timeout=120)["tokens"] == expected
    writer.join()
    # `<(cat speech.wav)`: a pipe named /dev/fd/N
    read_end, write_end = os.pipe()
    pump = threading.Thread(target=lambda: (os.write(write_end, SPEECH.read_bytes()), os.close(write_end)))
    pump.start()
    try:
        assert ask_json([f"/dev/fd/{read_end}"], model_f32, pass_fds=(read_end,))["tokens"] == expected
    finally:
        pump.join()
        os.close(read_end)


@pytest.mark.parametrize("fmt", ["FLAC", "MP3", "OGG"])
def test_every_format_reads_from_a_pipe(model_f32, tmp_path, fmt):
    # FLAC and MP3 need seeking (spooled to a temporary file), Ogg is decoded as it arrives
    wave, rate = sf.read(SPEECH)
    path = tmp_path / f"speech.{fmt.lower()}"
    sf.write(path, wave, rate, format=fmt)
    from_file = ask_json([path], model_f32)
    from_pipe = ask_json(["-"], model_f32, input=path.read_bytes())
    assert from_pipe["tokens"] == from_file["tokens"]
    assert from_pipe["audio_seconds"] == pytest.approx(from_file["audio_seconds"], abs=0.01)


def test_a_seeking_format_past_the_spool_limit_is_refused(tmp_path):
    flac = tmp_path / "a.flac"
    sf.write(flac, np.zeros(16000), 16000)
    read_end, write_end = os.pipe()
    os.write(write_end, flac.read_bytes())
    os.close(write_end)
    with pytest.raises(AudioError, match="FLAC stream of more than 100 bytes"):
        audio_input.open_stream(read_end, "<stdin>", close_source=True, spool_limit=100)


def test_an_unrecognised_stream_fails_at_once(tmp_path):
    read_end, write_end = os.pipe()
    threading.Thread(target=lambda: (os.write(write_end, bytes(1 << 16)), os.close(write_end)), daemon=True).start()
    with pytest.raises(AudioError, match="Format not recognised"):
        open_audio_fd(read_end)


def open_audio_fd(fd: int):
    return audio_input.open_stream(fd, "<stdin>", close_source=True)


# --- row 8: a file cut short ----------------------------------------------------------------------

def test_a_file_cut_short_is_used_with_a_warning(model_f32, tmp_path):
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(16000 * 231), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(long_wav.read_bytes()[:200000])                     # as `truncate -s 200000`
    for source, kw in ((cut, {}), ("-", {"input": cut.read_bytes()})):
        r = run_cli(["transcribe", source, "-m", model_f32, "--format", "json", *FAST], **kw)
        assert r.returncode == 0, stderr_lines(r)
        (line,) = stderr_lines(r)
        assert line.startswith("salmonn: warning: ") and "cut short" in line
        assert "promises 231.0 s of audio, only 6.2 s are there" in line, line
        assert json.loads(r.stdout)["audio_seconds"] == pytest.approx(6.25, abs=0.01)


def test_shortfall_is_not_claimed_for_streams_of_unknown_length():
    read_end, write_end = os.pipe()
    data = wav_header(16000, 1, 0xFFFFFFFF) + bytes(32000)
    threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)), daemon=True).start()
    with open_audio_fd(read_end) as stream:
        assert stream.length_frames is None and stream.header_frames is None
        assert sum(len(b) for b in stream.blocks(4000)) == 16000
        assert stream.shortfall() is None and stream.seconds == 1.0


# --- rows 9, 10: model directories are closed, manifests validated --------------------------------

def manifest_copy(model: Path, dest: Path, change) -> Path:
    shutil.copytree(model, dest)
    data = json.loads((dest / MANIFEST_NAME).read_text())
    change(data)
    (dest / MANIFEST_NAME).write_text(json.dumps(data))
    return dest


def outside_encoder(data):
    entry = data["files"].pop("audio_encoder.onnx")
    data["files"]["../../other/audio_encoder.onnx"] = entry
    data["audio_encoder"] = "../../other/audio_encoder.onnx"


def passwd_llm(data):
    entry = data["files"].pop(data["llm"])
    data["files"]["/etc/passwd"] = entry
    data["llm"] = "/etc/passwd"


BAD_MANIFESTS = {
    "file_outside_the_directory": (outside_encoder, "is not a file name inside the model directory"),
    "absolute_path": (passwd_llm, "is not a file name inside the model directory"),
    "empty_placeholder": (lambda d: d["config"].__setitem__("audio_placeholder", ""), "audio_placeholder is empty"),
    "placeholder_not_in_speech_tag": (lambda d: d["config"].__setitem__("audio_placeholder", "<Sound>"), "lacks the audio placeholder"),
    "negative_width": (lambda d: d["config"]["llm"].__setitem__("hidden_size", -64), "llm.hidden_size = -64"),
    "absurd_layer_count": (lambda d: d["config"]["whisper"].__setitem__("n_layers", 10 ** 9), "whisper.n_layers"),
    "absurd_chunk": (lambda d: d["config"].__setitem__("max_seconds", 1e9), "max_seconds"),
    "zero_sample_rate": (lambda d: d["config"].__setitem__("sample_rate", 0), "sample_rate"),
    "eos_outside_vocabulary": (lambda d: d["config"]["llm"].__setitem__("eos_token_id", 10 ** 6), "eos_token_id"),
    "bad_sha256": (lambda d: d["files"]["audio_encoder.onnx"].__setitem__("sha256", "xyz"), "64 hexadecimal"),
    "negative_size": (lambda d: d["files"]["audio_encoder.onnx"].__setitem__("size", -1), "whole number of bytes"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_one_line(model_f32, tmp_path, case):
    change, fragment = BAD_MANIFESTS[case]
    model = manifest_copy(model_f32, tmp_path / "model", change)
    with pytest.raises(ModelError, match="malformed"):
        load_manifest(model, verify=False)
    r = run_cli(["ask", SPEECH, PROMPT, "-m", model, *FAST])
    assert_one_line_error(r, "malformed", fragment)
    assert "internal error" not in r.stderr.decode()


# --- row 11, item 6: stdout that cannot be written, a closed pipe ---------------------------------

def limit_stdout_file() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_a_full_stdout_is_a_one_line_error(model_f32, tmp_path):
    with open(tmp_path / "stdout.txt", "wb") as out:
        r = run_cli(["ask", SPEECH, PROMPT, "-m", model_f32, "--json", *FAST], stdout=out, preexec_fn=limit_stdout_file)
    assert_one_line_error(r, "cannot write to standard output", "File too large")
    if os.geteuid() == 0:                        # the issue's >/dev/full, with a private device node
        full = make_device(tmp_path / "full", DEVICE_FULL)
        with open(full, "wb") as out:
            r = run_cli(["ask", SPEECH, PROMPT, "-m", model_f32, *FAST], stdout=out)
        assert_one_line_error(r, "cannot write to standard output", "No space left on device")


@pytest.mark.parametrize("command", [["transcribe", SPEECH], ["ask", SPEECH, PROMPT]])
def test_a_closed_pipe_ends_quietly(model_f32, command):
    process = subprocess.Popen([sys.executable, "-m", "salmonn_cli", *map(str, command), "-m", str(model_f32),
                                *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLI_ENV)
    process.stdout.close()                       # `| head -0`: the reader is gone before the answer
    _, stderr = process.communicate(timeout=CLI_TIMEOUT)
    assert process.returncode == BROKEN_PIPE_EXIT, stderr
    assert stderr == b""


@pytest.mark.parametrize("args, fragment", [
    (["ask", SPEECH, PROMPT, "--max-tokens", "0"], "'--max-tokens'"),
    (["ask", SPEECH, PROMPT, "--max-tokens", "many"], "'--max-tokens'"),
    (["ask"], "Missing argument"),
    (["transcribe", SPEECH, "--beams", "99"], "'--beams'"),
    (["frobnicate"], "No such command"),
    (["ask", SPEECH, PROMPT, "--json", "--jsonl"], "--json or --jsonl"),
    (["ask", SPEECH, PROMPT, "-m", ""], "--model is empty"),
    (["transcribe", SPEECH, "-o", "x.srt", "--jsonl"], "--jsonl"),
    (["transcribe", "-", "-"], "only once"),
])
def test_usage_errors_are_one_line(args, fragment):
    assert_one_line_error(run_cli(args), fragment)


# --- rows 12, 13: --threads, file names ----------------------------------------------------------

def test_threads_above_the_cores_are_capped_with_a_note(model_f32):
    cores = len(os.sched_getaffinity(0))
    started = time.monotonic()
    r = run_cli(["ask", SPEECH, PROMPT, "-m", model_f32, "--max-tokens", "2", "--threads", "999"])
    assert r.returncode == 0, stderr_lines(r)
    assert stderr_lines(r) == [f"salmonn: notice: --threads 999 is more than the {cores} cores available; "
                               f"using {cores}"]
    assert time.monotonic() - started < 120


def test_a_newline_in_a_file_name_stays_on_one_line(model_f32, tmp_path):
    missing = tmp_path / "no\nexist.wav"
    line = assert_one_line_error(run_cli(["ask", missing, PROMPT, "-m", model_f32, *FAST]), "no\\nexist.wav")
    assert repr(str(missing)) in line
    odd = Path(shutil.copyfile(SPEECH, tmp_path / "odd\nname.wav"))
    r = run_cli(["ask", odd, SPEECH, "-p", PROMPT, "-m", model_f32, *FAST])
    assert r.returncode == 0, stderr_lines(r)
    assert r.stdout.decode().splitlines()[0] == f"==> {str(odd)!r} <=="


# --- also seen: listen reads standard input too ---------------------------------------------------

def test_listen_reads_standard_input(model_f32):
    r = run_cli(["listen", "--input", "-", "--speed", "0", "-m", model_f32, "--json", *FAST],
                input=SPEECH.read_bytes())
    assert r.returncode == 0, stderr_lines(r)
    heard = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert heard and all(0 <= h["start"] < h["end"] <= 2.6 for h in heard)
    assert "listening to '<stdin>'" in r.stderr.decode()
