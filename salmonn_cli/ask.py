"""`salmonn ask`: the audio of a file (any length) as LLM prefix embeddings, then the answer.

The official model hears one 30 s window (88 audio tokens). Longer audio is cut into windows at
quiet seams (salmonn_cli/windows.py) whose embeddings are placed back to back, as many as the LLM
context leaves room for; `truncate=True` keeps the official behaviour (the first 30 s only).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from salmonn_cli.audio_input import STDIN, STDIN_NAME, AudioInput, open_audio
from salmonn_cli.errors import AudioError, quoted
from salmonn_cli.pipeline import Pipeline
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


def each_window(pipeline: Pipeline, source: str | AudioInput) -> Iterator[tuple[AudioWindow, np.ndarray]]:
    """(window, its embeddings) for every window of the file, one at a time (`--per-window`)."""
    for window in file_windows(pipeline, open_audio(source), truncate=False):
        yield window, pipeline.embed_wave(window.wave)[0]


def display_name(name: str) -> str:
    return STDIN_NAME if name == STDIN else os.fspath(name)
