"""A loaded model: audio file -> embeddings (ONNX Runtime) -> answer (llama.cpp). Torch-free."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from salmonn_cli import audio, features
from salmonn_cli.decoding import DecodingOptions, Generation, TextStream, generate
from salmonn_cli.encoder import AudioEncoder
from salmonn_cli.errors import ModelError, SalmonnError
from salmonn_cli.llm import LlamaModel
from salmonn_cli.manifest import Manifest, load_manifest
from salmonn_cli.prompt import build_prompt

# Room for the prompt text around the audio tokens when sizing the llama.cpp context.
PROMPT_TEXT_BUDGET = 256


def default_threads() -> int:
    # With two cores and another busy process, a second llama.cpp thread spins instead of
    # working (measured in BENCHMARKS.md); one thread per two cores is the safe default.
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class RuntimeOptions:
    n_threads: int = field(default_factory=default_threads)
    n_gpu_layers: int = 0
    use_gpu: bool = True


@dataclass
class AudioInput:
    path: str
    seconds: float            # length of the file's audio
    truncated: bool           # longer than the model's window; only the start was used
    embeds: np.ndarray        # (n_audio_tokens, llm_hidden)
    load_s: float             # reading + resampling
    encode_s: float           # features + ONNX encoder


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stop_reason: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float


class Pipeline:
    def __init__(self, model_dir: str | None, options: RuntimeOptions, max_tokens: int):
        self.manifest: Manifest = load_manifest(model_dir)
        self.config = self.manifest.config
        self.encoder = AudioEncoder(self.manifest.path(self.manifest.audio_encoder),
                                    n_threads=options.n_threads, use_gpu=options.use_gpu)
        n_ctx = min(self.config.llm.max_position_embeddings,
                    1 + self.config.n_audio_tokens + PROMPT_TEXT_BUDGET + max_tokens)
        self.llm = LlamaModel(self.manifest.path(self.manifest.llm), n_ctx=n_ctx,
                              n_threads=options.n_threads, n_gpu_layers=options.n_gpu_layers,
                              exact=self.manifest.exact_attention)
        if self.llm.n_embd != self.config.llm.hidden_size:
            raise ModelError(f"the GGUF's embedding width {self.llm.n_embd} does not match the "
                             f"audio encoder's {self.config.llm.hidden_size}")
        # Rows beyond the tokenizer (e.g. the official [PAD] row) must never be produced.
        self.suppress = tuple(range(self.config.llm.vocab_size, self.llm.n_vocab))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- audio -----------------------------------------------------------------------------
    def embed_audio(self, path: str) -> AudioInput:
        """Read a file and encode its first `max_seconds` (the official behaviour)."""
        t0 = time.perf_counter()
        wave = audio.load_audio(path, self.config.sample_rate)
        load_s = time.perf_counter() - t0
        seconds = len(wave) / self.config.sample_rate
        truncated = seconds > self.config.max_seconds
        embeds, encode_s = self.embed_wave(wave)
        return AudioInput(str(path), seconds, truncated, embeds, load_s, encode_s)

    def embed_wave(self, wave: np.ndarray) -> tuple[np.ndarray, float]:
        """16 kHz mono samples (at most `max_seconds` are used) -> ((n_audio_tokens, llm_hidden), seconds taken)."""
        cfg = self.config
        t0 = time.perf_counter()
        wave, _ = audio.fit_to_window(wave, cfg.sample_rate, cfg.min_seconds, cfg.max_seconds)
        mel = features.log_mel_spectrogram(wave, n_mels=cfg.whisper.n_mels,
                                           n_samples=int(cfg.max_seconds * cfg.sample_rate))
        fbank = features.beats_fbank(wave)
        embeds = self.encoder(mel, fbank)
        expected = (cfg.n_audio_tokens, cfg.llm.hidden_size)
        if embeds.shape != expected:
            raise ModelError(f"audio encoder returned {embeds.shape}, the manifest says {expected}")
        return embeds, time.perf_counter() - t0

    # --- text ------------------------------------------------------------------------------
    def answer(self, embeds: np.ndarray, instruction: str, options: DecodingOptions,
               on_text: Callable[[str], None] | None = None) -> Answer:
        """Generate the answer to `instruction` about the audio embeddings `embeds` (n, llm_hidden)."""
        llm = self.llm
        prompt = build_prompt(self.config, instruction, llm.tokenize)
        n_prompt = 1 + len(prompt.ids_before) + len(embeds) + len(prompt.ids_after)
        if n_prompt >= llm.n_ctx:
            raise SalmonnError(f"the prompt needs {n_prompt} tokens with the audio, more than the "
                               f"context of {llm.n_ctx}; shorten the prompt")
        llm.reset()
        t0 = time.perf_counter()
        llm.decode_tokens([llm.bos_id] + prompt.ids_before)
        llm.decode_embeddings(embeds)
        logits = llm.decode_tokens(prompt.ids_after)
        t1 = time.perf_counter()

        stream = TextStream(llm.token_to_bytes)
        pieces: list[str] = []

        def on_token(token: int) -> None:
            text = stream.push(token)
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        generation: Generation = generate(
            logits, lambda token: llm.decode_tokens([token]), eos_id=llm.eos_id, options=options,
            room=llm.n_ctx - n_prompt, on_token=on_token, suppress=self.suppress)
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        t2 = time.perf_counter()
        return Answer("".join(pieces).strip(), generation.tokens, generation.stop_reason,
                      n_prompt, t1 - t0, t2 - t1)
