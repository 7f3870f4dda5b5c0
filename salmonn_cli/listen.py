"""Live listening: capture audio, cut it into utterances, answer each one with the model.

A source (a PortAudio input device through sounddevice, or an audio file replayed at real-time pace
by `FileStream`) calls `Capture.callback` from its own thread with blocks of samples; the callback
only queues them. The calling thread takes blocks off the queue, runs the voice-activity detector
and, for each finished utterance, the model. Both sources go through exactly the same path.

Times are seconds of audio since listening started (counted in samples, not wall-clock time).
Ctrl-C raises KeyboardInterrupt out of `listen` after the source is stopped and closed; the CLI turns
it into exit status 130 with no traceback.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import soxr

from salmonn_cli import audio
from salmonn_cli.audio_input import open_audio
from salmonn_cli.clock import format_clock
from salmonn_cli.decoding import DecodingOptions
from salmonn_cli.errors import AudioError, SalmonnError, quoted
from salmonn_cli.pipeline import Answer
from salmonn_cli.prompt import TRANSCRIBE_PROMPT
from salmonn_cli.vad import EnergyVad, Utterance, VadOptions

BLOCK_SECONDS = 0.1
# Capture as 16-bit integers, what microphones deliver. (Through ALSA's plug layer, a float32 request
# from a clock-less PCM lost blocks in testing; int16 arrives bit-exact.)
CAPTURE_DTYPE = "int16"
INT16_SCALE = 32768.0
QUEUE_POLL_SECONDS = 0.25   # how often the waiting thread wakes up (keeps Ctrl-C prompt everywhere)
END_OF_STREAM = None


@dataclass
class ListenOptions:
    prompt: str = TRANSCRIBE_PROMPT
    device: int | str | None = None      # PortAudio input device (index or part of its name); None = default
    input_path: str | None = None        # replay this file instead of capturing
    speed: float = 1.0                   # file replay pace (2 = twice real time; 0 = as fast as possible)
    max_seconds: float | None = None     # stop after this much audio (None = until Ctrl-C / end of file)
    vad: VadOptions = field(default_factory=VadOptions)
    repetition_guard: bool | None = None  # cut a looping answer to its first copy; None: the model's own


@dataclass
class Heard:
    """One utterance and the model's answer to it."""
    start_s: float
    end_s: float
    answer: Answer
    encode_s: float
    utterance: Utterance

    def to_dict(self) -> dict:
        return {"start": round(self.start_s, 3), "end": round(self.end_s, 3), **self.answer.to_dict(),
                "timings": self.answer.timings(self.encode_s)}


# --- output ----------------------------------------------------------------------------------------

def format_heard(heard: Heard) -> str:
    return f"[{format_clock(heard.start_s)}–{format_clock(heard.end_s)}] {heard.answer.text}"


def resolve_prompt(prompt: str | None, transcribe: bool) -> str:
    """--transcribe uses the official ASR prompt; without --prompt, listening transcribes too."""
    if transcribe and prompt:
        raise SalmonnError("give either --prompt or --transcribe, not both")
    if prompt is not None and not prompt.strip():
        raise SalmonnError("the prompt is empty")
    return prompt if prompt else TRANSCRIBE_PROMPT


def parse_device(text: str | int | None) -> int | str | None:
    """'3' -> 3 (a PortAudio index); other text is matched against device names by sounddevice."""
    if text is None or isinstance(text, int):
        return text
    text = text.strip()
    return int(text) if text.isdigit() else text


# --- sources ---------------------------------------------------------------------------------------

class Capture:
    """The callback side: blocks from a source's thread into a queue, as float32 mono samples."""

    def __init__(self, limit: int | None = None):
        self.queue: queue.Queue = queue.Queue()
        self.limit = limit            # samples to take before ending (None: no limit)
        self.received = 0
        self.overflows = 0
        self.ended = False

    def callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        if self.ended:
            return
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        block = indata[:, 0]
        if block.dtype.kind == "i":
            block = block.astype(np.float32) / INT16_SCALE
        else:
            block = block.astype(np.float32, copy=True)
        if self.limit is not None:
            block = block[: self.limit - self.received]
        self.received += len(block)
        if len(block):
            self.queue.put(block)
        if self.limit is not None and self.received >= self.limit:
            self.end()

    def end(self) -> None:
        """The source finished (end of file, device gone) or the sample limit was reached."""
        if not self.ended:
            self.ended = True
            self.queue.put(END_OF_STREAM)


class FileStream:
    """An audio file played like an input device: the same callback / finished_callback interface
    and start/stop/close life cycle as `sounddevice.InputStream`, blocks at real-time pace."""

    def __init__(self, path: str, samplerate: int, blocksize: int, callback: Callable,
                 finished_callback: Callable[[], None] | None = None, speed: float = 1.0):
        if speed < 0:
            raise SalmonnError("the replay speed cannot be negative")
        self.samplerate = samplerate
        self.blocksize = blocksize
        self.callback = callback
        self.finished_callback = finished_callback
        self.speed = speed
        self.error: AudioError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._input = open_audio(path)        # "-" is standard input, read as it arrives
        try:
            audio.check_sample_rate(self._input.samplerate, self._input.name)
        except AudioError:
            self._input.close()
            raise
        self.name = self._input.name

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._play, name="salmonn-file-stream", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self) -> None:
        self.stop()
        self._input.close()

    def __enter__(self) -> "FileStream":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _play(self) -> None:
        started = time.monotonic()
        played = 0
        try:
            # the same reader as every input: bounds, NaN check, libsndfile's stderr muted
            for block in audio.read_resampled_blocks(self._input, self.samplerate, self.blocksize / self.samplerate):
                block = block.astype(np.float32)
                if self.speed > 0:
                    due = started + (played + len(block)) / self.samplerate / self.speed
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        break
                elif self._stop.is_set():
                    break
                self.callback(block[:, None], len(block), None, None)
                played += len(block)
        except AudioError as e:
            self.error = e
        finally:
            if self.finished_callback:
                self.finished_callback()


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise AudioError(f"cannot capture audio: {e} "
                         "(install PortAudio, e.g. apt-get install libportaudio2)") from None
    return sounddevice


def input_devices() -> list[dict]:
    """PortAudio's capture devices: index, name, host API, input channels, default sample rate."""
    sd = _sounddevice()
    apis = sd.query_hostapis()
    return [{"index": i, "name": d["name"], "hostapi": apis[d["hostapi"]]["name"],
             "channels": d["max_input_channels"], "default_samplerate": d["default_samplerate"]}
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


def open_microphone(device: int | str | None, callback: Callable, finished_callback: Callable[[], None],
                    sample_rate: int = audio.SAMPLE_RATE):
    """A started-on-enter sounddevice.InputStream on `device`, mono int16 at `sample_rate` when the
    device allows it, else at its default rate (the caller resamples). Returns (stream, rate, device name)."""
    sd = _sounddevice()
    try:
        info = sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        if device is None:
            raise AudioError(f"no microphone found ({e})") from None
        raise AudioError(f"no input device {device!r}: {e} (see the list of input devices)") from None
    index = info.get("index", device)
    rate = sample_rate
    try:
        sd.check_input_settings(device=index, samplerate=rate, channels=1, dtype=CAPTURE_DTYPE)
    except (ValueError, sd.PortAudioError):
        rate = int(info["default_samplerate"])
    try:
        stream = sd.InputStream(device=index, samplerate=rate, channels=1, dtype=CAPTURE_DTYPE,
                                blocksize=int(rate * BLOCK_SECONDS), callback=callback,
                                finished_callback=finished_callback)
    except (ValueError, sd.PortAudioError) as e:
        raise AudioError(f"cannot open input device {info['name']!r}: {e}") from None
    return stream, rate, info["name"]


def open_source(options: ListenOptions, capture: Capture, sample_rate: int):
    """The file replay or the microphone, feeding `capture`; returns (stream, its sample rate, its name)."""
    if options.input_path is not None:
        stream = FileStream(options.input_path, sample_rate, int(sample_rate * BLOCK_SECONDS),
                            capture.callback, capture.end, speed=options.speed)
        return stream, sample_rate, stream.name
    return open_microphone(options.device, capture.callback, capture.end, sample_rate)


# --- the loop --------------------------------------------------------------------------------------

def listen(pipeline, options: ListenOptions, decoding: DecodingOptions | None = None,
           on_heard: Callable[[Heard], None] | None = None,
           log: Callable[[str], None] | None = None) -> list[Heard]:
    """Listen until the source ends, `options.max_seconds` of audio were heard, or Ctrl-C
    (KeyboardInterrupt, raised after the source is closed). Calls `on_heard` as each answer is ready.
    `decoding`: None decodes as the pipeline was opened to."""
    log = log or (lambda message: None)
    max_utterance = min(options.vad.max_utterance_s, pipeline.config.max_seconds)
    model_rate = pipeline.config.sample_rate
    vad = EnergyVad(replace(options.vad, max_utterance_s=max_utterance), model_rate)
    capture = Capture()
    stream, rate, name = open_source(options, capture, model_rate)
    if options.max_seconds is not None:
        capture.limit = int(round(options.max_seconds * rate))
    resampler = None
    if rate != model_rate:
        resampler = soxr.ResampleStream(rate, model_rate, 1, dtype="float32", quality=audio.RESAMPLE_QUALITY)

    heard: list[Heard] = []
    guard = pipeline.repetition_guard(options.repetition_guard)

    def answer(utterances: list[Utterance]) -> None:
        for utterance in utterances:
            embeds, encode_s = pipeline.embed_wave(utterance.samples.astype(np.float64))
            item = Heard(utterance.start_s, utterance.end_s,
                         pipeline.answer(embeds, options.prompt, decoding, stop=guard), encode_s, utterance)
            heard.append(item)
            if on_heard:
                on_heard(item)

    with stream:
        log(f"listening to {quoted(name)} at {rate} Hz (Ctrl-C to stop)")
        while True:
            try:
                block = capture.queue.get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                continue
            if block is END_OF_STREAM:
                break
            if resampler is not None:
                block = resampler.resample_chunk(block)
            answer(vad.push(block))
        error = getattr(stream, "error", None)
        if error is not None:
            raise error
        if resampler is not None:
            answer(vad.push(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)))
        answer(vad.flush())
    if capture.overflows:
        log(f"warning: the input overflowed {capture.overflows} times; some audio was lost")
    return heard
