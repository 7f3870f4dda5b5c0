"""`salmonn ask`: the audio of a file (any length) as LLM prefix embeddings, then the answer.

The official model hears one 30 s chunk (88 audio tokens). Longer audio is cut into chunks at
quiet seams (salmonn_cli/chunks.py) whose embeddings are placed back to back, as many as the LLM
context leaves room for; `truncate=True` keeps the official behaviour (the first 30 s only).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from salmonn_cli.audio_input import STDIN, STDIN_NAME, AudioInput, open_audio
from salmonn_cli.chunks import SEAM_SEARCH_SECONDS, AudioChunk, iter_chunks
from salmonn_cli.clock import format_clock
from salmonn_cli.decoding import DecodingOptions, StopCheck
from salmonn_cli.errors import AudioError, quoted
from salmonn_cli.pipeline import Answer, Pipeline


@dataclass
class FileAudio:
    name: str                 # as messages show it ("<stdin>" for "-")
    seconds: float            # length of the file's audio (as far as it was read, if unknown)
    used_seconds: float       # audio that reached the model
    chunks: list[tuple[float, float]]
    embeds: np.ndarray        # (n_chunks * n_audio_tokens, llm_hidden)
    truncated: bool           # some of the file did not reach the model
    encode_s: float           # reading, features and the ONNX encoder


def file_chunks(pipeline: Pipeline, source: AudioInput, truncate: bool) -> Iterator[AudioChunk]:
    # truncate: exactly the first max_seconds, as the official code cuts
    return iter_chunks(source, pipeline.config.sample_rate, pipeline.config.max_seconds,
                       seam_search_seconds=0.0 if truncate else SEAM_SEARCH_SECONDS)


def embed_file(pipeline: Pipeline, source: str | AudioInput, *, truncate: bool = False,
               max_chunks: int | None = None) -> FileAudio:
    """Embed up to `max_chunks` chunks (default: what fits in the context; 1 with `truncate`).

    The context is counted in audio tokens: a chunk is kept while its tokens fit beside those
    already kept (with `trim_windows` a short last chunk needs fewer than a full one)."""
    t0 = time.perf_counter()
    audio_in = open_audio(source)
    limit = 1 if truncate else max_chunks
    room = pipeline.audio_token_room
    embeds, spans = [], []
    n_tokens = 0
    end_of_file = 0.0
    truncated = False
    chunks = file_chunks(pipeline, audio_in, truncate)
    try:
        for chunk in chunks:
            end_of_file = chunk.end_s
            needed = pipeline.audio_tokens(len(chunk.wave))
            if len(spans) == limit or (spans and n_tokens + needed > room):
                truncated = True
                break
            n_tokens += needed
            embeds.append(pipeline.embed_wave(chunk.wave)[0])
            spans.append((chunk.start_s, chunk.end_s))
    finally:
        chunks.close()        # stops reading (a stream's threads end) and closes the input
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
                "chunks": len(audio.chunks), "prompt_tokens": self.answer.prompt_tokens, "beams": self.answer.beams,
                **self.model, "timings": self.answer.timings(audio.encode_s)}


@dataclass
class FileAnswers:
    """Answers to several prompts about one file, whose audio was encoded and prefilled once."""
    audio: FileAudio
    prompts: list[str]
    answers: list[Answer]
    model: dict

    def to_dict(self) -> dict:
        audio = self.audio
        answers = [{"prompt": prompt, **answer.to_dict(), "prompt_tokens": answer.prompt_tokens,
                    "timings": answer.timings()} for prompt, answer in zip(self.prompts, self.answers)]
        return {"audio": display_name(audio.name), "answers": answers, "audio_seconds": round(audio.seconds, 3),
                "used_seconds": round(audio.used_seconds, 3), "truncated": audio.truncated,
                "chunks": len(audio.chunks), "beams": self.answers[0].beams, **self.model,
                "timings": {"encode_s": round(audio.encode_s, 4)}}


@dataclass
class ChunkAnswer:
    start_s: float
    end_s: float
    answer: Answer
    audio_tokens: int

    def to_dict(self) -> dict:
        return {"start": round(self.start_s, 3), "end": round(self.end_s, 3), **self.answer.to_dict()}


@dataclass
class PerChunkAnswers:
    """One answer per chunk of a file (`--per-chunk`)."""
    audio: str
    chunks: list[ChunkAnswer]

    def to_dict(self) -> dict:
        return {"audio": self.audio, "chunks": [c.to_dict() for c in self.chunks]}


def answer_file(pipeline: Pipeline, audio_in: AudioInput, prompt: str, *, truncate: bool = False,
                decoding: DecodingOptions | None = None, on_audio: Callable[[FileAudio], None] | None = None,
                on_text: Callable[[str], None] | None = None, stop: StopCheck | None = None) -> FileAnswer:
    """Embed the file (`embed_file`), tell `on_audio` what reached the model, then answer."""
    result = answer_prompts(pipeline, audio_in, [prompt], truncate=truncate, decoding=decoding,
                            on_audio=on_audio, on_text=on_text, stop=stop)
    return FileAnswer(result.audio, result.answers[0], result.model)


def answer_prompts(pipeline: Pipeline, audio_in: AudioInput, prompts: list[str], *, truncate: bool = False,
                   decoding: DecodingOptions | None = None, on_audio: Callable[[FileAudio], None] | None = None,
                   on_prompt: Callable[[str], None] | None = None, on_text: Callable[[str], None] | None = None,
                   stop: StopCheck | None = None) -> FileAnswers:
    """`answer_file` for each prompt in turn: the audio is encoded once, and its part of the LLM's
    KV cache (BOS, the text before the audio, the audio) is decoded once and kept for every prompt.
    `on_prompt` is told of each prompt before its answer."""
    audio = embed_file(pipeline, audio_in, truncate=truncate)
    if on_audio is not None:
        on_audio(audio)
    answers = []
    for prompt in prompts:
        if on_prompt is not None:
            on_prompt(prompt)
        answers.append(pipeline.answer(audio.embeds, prompt, decoding, on_text=on_text, stop=stop, reuse_audio=True))
    return FileAnswers(audio, prompts, answers, {"quant": pipeline.manifest.quant,
                                                 "encoder_provider": pipeline.encoder.provider,
                                                 "device": pipeline.placement.as_dict()})


def answer_each_chunk(pipeline: Pipeline, audio_in: AudioInput, prompt: str, *,
                      decoding: DecodingOptions | None = None,
                      on_chunk: Callable[[AudioChunk], None] | None = None,
                      on_text: Callable[[str], None] | None = None,
                      stop: StopCheck | None = None) -> PerChunkAnswers:
    """Answer each chunk of the file on its own; `on_chunk` is told of each before its answer."""
    answers = []
    for chunk in file_chunks(pipeline, audio_in, truncate=False):
        embeds = pipeline.embed_wave(chunk.wave)[0]
        if on_chunk is not None:
            on_chunk(chunk)
        answer = pipeline.answer(embeds, prompt, decoding, on_text=on_text, stop=stop)
        answers.append(ChunkAnswer(chunk.start_s, chunk.end_s, answer, len(embeds)))
    return PerChunkAnswers(display_name(audio_in.name), answers)


def chunk_label(chunk: AudioChunk | ChunkAnswer) -> str:
    """What leads a chunk's answer (`--per-chunk`): where the chunk starts and ends."""
    return f"[{format_clock(chunk.start_s)}–{format_clock(chunk.end_s)}] "


def display_name(name: str) -> str:
    return STDIN_NAME if name == STDIN else os.fspath(name)
