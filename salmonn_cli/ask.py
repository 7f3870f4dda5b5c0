"""`salmonn ask`: the audio of a file (any length) as LLM prefix embeddings, then the answer.

The official model hears one 30 s window (88 audio tokens). Longer audio is cut into windows at
quiet seams (salmonn_cli/windows.py) whose embeddings are placed back to back, as many as the LLM
context leaves room for; `truncate=True` keeps the official behaviour (the first 30 s only).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from salmonn_cli.audio_input import STDIN, STDIN_NAME, AudioInput, open_audio
from salmonn_cli.clock import format_clock
from salmonn_cli.decoding import DecodingOptions, StopCheck
from salmonn_cli.errors import AudioError, quoted
from salmonn_cli.pipeline import Answer, Pipeline
from salmonn_cli.windows import AudioWindow, iter_windows


@dataclass
class FileAudio:
    name: str                 # as messages show it ("<stdin>" for "-")
    seconds: float            # length of the file's audio (as far as it was read, if unknown)
    used_seconds: float       # audio that reached the model
    windows: list[tuple[float, float]]
    embeds: np.ndarray        # (n_windows * n_audio_tokens, llm_hidden)
    truncated: bool           # some of the file did not reach the model
    encode_s: float           # reading, features and the ONNX encoder


def file_windows(pipeline: Pipeline, source: AudioInput, truncate: bool) -> Iterator[AudioWindow]:
    cfg = pipeline.config
    if truncate:   # exactly the first max_seconds, as the official code cuts
        return iter_windows(source, cfg.sample_rate, cfg.max_seconds, seam_search_seconds=0.0)
    return iter_windows(source, cfg.sample_rate, cfg.max_seconds)


def embed_file(pipeline: Pipeline, source: str | AudioInput, *, truncate: bool = False,
               max_windows: int | None = None) -> FileAudio:
    """Embed up to `max_windows` windows (default: what fits in the context; 1 with `truncate`).

    The context is counted in audio tokens: a window is kept while its tokens fit beside those
    already kept (with `trim_windows` a short last window needs fewer than a full one)."""
    t0 = time.perf_counter()
    audio_in = open_audio(source)
    limit = 1 if truncate else max_windows
    room = pipeline.audio_token_room
    embeds, spans = [], []
    n_tokens = 0
    end_of_file = 0.0
    truncated = False
    windows = file_windows(pipeline, audio_in, truncate)
    try:
        for window in windows:
            end_of_file = window.end_s
            needed = pipeline.audio_tokens(len(window.wave))
            if len(spans) == limit or (spans and n_tokens + needed > room):
                truncated = True
                break
            n_tokens += needed
            embeds.append(pipeline.embed_wave(window.wave)[0])
            spans.append((window.start_s, window.end_s))
    finally:
        windows.close()       # stops reading (a stream's threads end) and closes the input
    if not spans:
        raise AudioError(f"audio file has no samples: {quoted(audio_in.name)}")
    seconds = audio_in.seconds if audio_in.seconds is not None else end_of_file
    return FileAudio(audio_in.name, seconds, spans[-1][1], spans, np.concatenate(embeds), truncated,
                     time.perf_counter() - t0)


@dataclass
class FileAnswer:
    """The answer about one whole file (as much of it as fits in the context)."""
    audio: FileAudio
    answer: Answer
    model: dict               # where it ran: quant, encoder_provider, device

    def to_dict(self) -> dict:
        audio = self.audio
        return {"audio": display_name(audio.name), **self.answer.to_dict(), "audio_seconds": round(audio.seconds, 3),
                "used_seconds": round(audio.used_seconds, 3), "truncated": audio.truncated,
                "windows": len(audio.windows), "prompt_tokens": self.answer.prompt_tokens, "beams": self.answer.beams,
                **self.model, "timings": self.answer.timings(audio.encode_s)}


@dataclass
class WindowAnswer:
    start_s: float
    end_s: float
    answer: Answer
    audio_tokens: int

    def to_dict(self) -> dict:
        return {"start": round(self.start_s, 3), "end": round(self.end_s, 3), **self.answer.to_dict()}


@dataclass
class PerWindowAnswers:
    """One answer per window of a file (`--per-window`)."""
    audio: str
    windows: list[WindowAnswer]

    def to_dict(self) -> dict:
        return {"audio": self.audio, "windows": [w.to_dict() for w in self.windows]}


def answer_file(pipeline: Pipeline, audio_in: AudioInput, prompt: str, *, truncate: bool = False,
                decoding: DecodingOptions | None = None, on_audio: Callable[[FileAudio], None] | None = None,
                on_text: Callable[[str], None] | None = None, stop: StopCheck | None = None) -> FileAnswer:
    """Embed the file (`embed_file`), tell `on_audio` what reached the model, then answer."""
    audio = embed_file(pipeline, audio_in, truncate=truncate)
    if on_audio is not None:
        on_audio(audio)
    answer = pipeline.answer(audio.embeds, prompt, decoding, on_text=on_text, stop=stop)
    return FileAnswer(audio, answer, {"quant": pipeline.manifest.quant, "encoder_provider": pipeline.encoder.provider,
                                      "device": pipeline.placement.as_dict()})


def answer_each_window(pipeline: Pipeline, audio_in: AudioInput, prompt: str, *,
                       decoding: DecodingOptions | None = None,
                       on_window: Callable[[AudioWindow], None] | None = None,
                       on_text: Callable[[str], None] | None = None,
                       stop: StopCheck | None = None) -> PerWindowAnswers:
    """Answer each window of the file on its own; `on_window` is told of each before its answer."""
    answers = []
    for window in file_windows(pipeline, audio_in, truncate=False):
        embeds = pipeline.embed_wave(window.wave)[0]
        if on_window is not None:
            on_window(window)
        answer = pipeline.answer(embeds, prompt, decoding, on_text=on_text, stop=stop)
        answers.append(WindowAnswer(window.start_s, window.end_s, answer, len(embeds)))
    return PerWindowAnswers(display_name(audio_in.name), answers)


def window_label(window: AudioWindow | WindowAnswer) -> str:
    """What leads a window's answer (`--per-window`): where the window starts and ends."""
    return f"[{format_clock(window.start_s)}–{format_clock(window.end_s)}] "


def display_name(name: str) -> str:
    return STDIN_NAME if name == STDIN else os.fspath(name)
