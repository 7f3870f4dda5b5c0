"""A loaded model: audio file -> embeddings (ONNX Runtime) -> answer (llama.cpp). Torch-free."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from salmonn_cli import audio, features
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.decoding import (DecodingOptions, StopCheck, SuppressTokens, TextStream, decode,
                                  make_decoder, verify_options)
from salmonn_cli.device import (Placement, check_device, llm_gpu_layers, offloaded_layers, require_cuda,
                                why_cpu)
from salmonn_cli.encoder import AudioEncoder
from salmonn_cli.errors import ModelError, SalmonnError, quoted
from salmonn_cli.llm import BeamSequences, LlamaModel
from salmonn_cli.manifest import Manifest, load_manifest
from salmonn_cli.prompt import build_prompt
from salmonn_cli.trim import audio_token_count, clip_fbank_frames, mel_frame_count

# Room for the prompt text around the audio tokens when sizing the llama.cpp context.
PROMPT_TEXT_BUDGET = 256
DEFAULT_CONTEXT = 2048


def default_threads() -> int:
    # With two cores and another busy process, a second llama.cpp thread spins instead of
    # working (benchmarks/llm_threads.md: 0.48x); one thread per two cores is the safe default.
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class RuntimeOptions:
    n_threads: int = field(default_factory=default_threads)
    # auto: CUDA for each part where it works (salmonn_cli/device.py); cpu; cuda: fail without it
    device: str = "auto"
    # LLM layers offloaded when the LLM runs on CUDA; None = all
    n_gpu_layers: int | None = None
    # LoRA scale of the LLM; None keeps the scale merged at export (alpha / r, officially 4.0).
    lora_scale: float | None = None
    # LLM context in tokens; None = DEFAULT_CONTEXT (or what one chunk needs), capped at the
    # model's trained length. Audio past 30 s fills what the prompt and answer leave free.
    context: int | None = None


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stop_reason: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    beams: int

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stop_reason": self.stop_reason}

    def timings(self, encode_s: float) -> dict:
        """Where the time went, `encode_s` being the audio's reading, features and encoder."""
        n = len(self.tokens)
        return {"encode_s": round(encode_s, 4), "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4),
                "decode_tokens_per_s": round(n / self.decode_s, 2) if n and self.decode_s > 0 else None}


def check_lora_scale(manifest: Manifest, lora_scale: float | None) -> None:
    """A requested LoRA scale must be finite and the model directory must ship the adapter."""
    if lora_scale is None:
        return
    if not math.isfinite(lora_scale):
        raise SalmonnError(f"the LoRA scale must be a finite number, not {lora_scale}")
    if manifest.lora_adapter is None:
        raise ModelError(f"{quoted(manifest.model_dir)} has no LoRA adapter, so its LoRA scale is fixed at "
                         f"{manifest.merged_lora_scale:g}; re-export it with `salmonn export` to "
                         "use --lora-scale")


def context_size(config, requested: int | None, needed: int) -> int:
    trained = config.llm.max_position_embeddings
    if requested is not None and requested > trained:
        raise SalmonnError(f"--context {requested} is longer than the {trained} tokens the LLM was trained on")
    return min(trained, requested if requested is not None else max(needed, DEFAULT_CONTEXT))


def encoder_inputs(wave: np.ndarray, config: SalmonnConfig) -> tuple[np.ndarray, np.ndarray]:
    """A clip already fitted to a chunk (`audio.fit_to_chunk`) -> what the audio encoder reads: the
    Whisper log-mel (over `max_seconds`, cut to the clip's windows' columns) and the BEATs fbank."""
    mel = features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels,
                                       n_samples=int(config.max_seconds * config.sample_rate))
    fbank = features.beats_fbank(wave)
    return mel[:, :mel_frame_count(config, len(fbank))], fbank


class Pipeline:
    def __init__(self, model_dir: str | None, options: RuntimeOptions,
                 decoding: DecodingOptions = DecodingOptions()):
        """`decoding`: how `answer` decodes unless told otherwise (beams None: the model's own,
        `manifest.default_beams`), kept verified in `self.decoding`. Its beams and max_tokens size the
        LLM context: an `answer` may ask for no more beams than these."""
        self.manifest: Manifest = load_manifest(model_dir)
        self.config = self.manifest.config
        self.decoding = verify_options(decoding, default_beams=self.manifest.default_beams)
        beams = self.decoding.beams
        check_lora_scale(self.manifest, options.lora_scale)
        check_device(options.device)
        require_cuda(options.device, options.n_gpu_layers)      # before anything loads
        gpu_layers = llm_gpu_layers(options.device, options.n_gpu_layers)
        self.encoder = AudioEncoder(self.manifest.path(self.manifest.audio_encoder),
                                    n_threads=options.n_threads, device=options.device)
        # every beam holds up to max_tokens cells of its own; the prompt's cells are shared
        self.answer_room = PROMPT_TEXT_BUDGET + beams * self.decoding.max_tokens
        n_ctx = context_size(self.config, options.context, 1 + self.config.n_audio_tokens + self.answer_room)
        self.llm = LlamaModel(self.manifest.path(self.manifest.llm), n_ctx=n_ctx,
                              n_threads=options.n_threads, n_gpu_layers=gpu_layers,
                              exact=self.manifest.exact_attention,
                              n_seq_max=2 * beams if beams > 1 else 1)
        self.placement = Placement(self.encoder.provider, offloaded_layers(gpu_layers, self.llm.n_layer),
                                   self.llm.n_layer + 1,
                                   why_cpu(options.device, self.encoder.provider, options.n_gpu_layers, gpu_layers))
        if self.llm.n_embd != self.config.llm.hidden_size:
            raise ModelError(f"the GGUF's embedding width {self.llm.n_embd} does not match the "
                             f"audio encoder's {self.config.llm.hidden_size}")
        # Rows beyond the tokenizer (e.g. the official [PAD] row) must never be produced.
        self.suppress = SuppressTokens(range(self.config.llm.vocab_size, self.llm.n_vocab))
        self._adapter_loaded = False
        self.use_lora_scale(options.lora_scale)

    def use_lora_scale(self, lora_scale: float | None) -> None:
        """Answer from now on with LoRA strength `lora_scale` (None: the scale merged at export; also for
        a server whose requests ask for different scales). The merged model (W + merged·BA) behaves as
        W + lora_scale·BA: the adapter adds (lora_scale − merged)·BA. It is loaded the first time a
        scale other than the merged one is asked for."""
        check_lora_scale(self.manifest, lora_scale)
        delta = 0.0 if lora_scale is None else lora_scale - self.manifest.merged_lora_scale
        if delta == self.llm.lora_scale:
            return
        if not self._adapter_loaded:
            self.llm.load_lora_adapter(self.manifest.path(self.manifest.lora_adapter))
            self._adapter_loaded = True
        self.llm.set_lora_scale(delta)

    @property
    def audio_token_room(self) -> int:
        """Audio embeddings that fit in the context beside the prompt and the answer."""
        return self.llm.n_ctx - 1 - self.answer_room

    def audio_tokens(self, n_samples: int) -> int:
        """Audio embeddings `embed_wave` returns for `n_samples` of 16 kHz audio."""
        return audio_token_count(self.config, clip_fbank_frames(self.config, n_samples))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- audio -----------------------------------------------------------------------------
    def embed_wave(self, wave: np.ndarray) -> tuple[np.ndarray, float]:
        """16 kHz mono samples (at most `max_seconds` are used) -> ((n_audio_tokens, llm_hidden), seconds taken).

        With `config.trim_windows` the encoder reads only the mel columns of the clip's own windows
        and returns `audio_tokens(len(wave))` embeddings (salmonn_cli/trim.py)."""
        cfg = self.config
        t0 = time.perf_counter()
        wave, _ = audio.fit_to_chunk(wave, cfg.sample_rate, cfg.min_seconds, cfg.max_seconds)
        mel, fbank = encoder_inputs(wave, cfg)
        embeds = self.encoder(mel, fbank)
        expected = (audio_token_count(cfg, len(fbank)), cfg.llm.hidden_size)
        if embeds.shape != expected:
            raise ModelError(f"audio encoder returned {embeds.shape}, the manifest says {expected}")
        return embeds, time.perf_counter() - t0

    # --- text ------------------------------------------------------------------------------
    def answer(self, embeds: np.ndarray, instruction: str, decoding: DecodingOptions | None = None,
               on_text: Callable[[str], None] | None = None, stop: StopCheck | None = None) -> Answer:
        """Generate the answer to `instruction` about the audio embeddings `embeds` (n, llm_hidden),
        decoded as `decoding` says (None: `self.decoding`; beams None: `self.decoding`'s). `stop` is
        checked after each token of each sequence (`decoding.RepetitionGuard`, a cancel check). More
        than one beam runs beam search (transformers 4.28 semantics, as the official model); its text
        comes through `on_text` when the search ends."""
        if decoding is None:
            decoding = self.decoding
        else:       # beams None: self.decoding's, whose beams it may not pass
            decoding = verify_options(decoding, default_beams=self.decoding.beams, max_beams=self.decoding.beams)
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

        def show(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        decoder = make_decoder(decoding, eos_id=llm.eos_id, room=llm.n_ctx - n_prompt, stop=stop)
        if decoding.beams > 1:
            sequences = BeamSequences(llm, decoding.beams, next_pos=n_prompt)
            generation = decode(logits, lambda step: sequences.advance(step.parents, step.tokens), decoder,
                                filters=(self.suppress,))
            for token in generation.tokens:     # beams cannot stream: the text comes at the end
                show(stream.push(token))
        else:
            generation = decode(logits, lambda step: llm.decode_tokens(step.tokens), decoder,
                                filters=(self.suppress,), on_step=lambda step: show(stream.push(step.tokens[0])))
        show(stream.flush())
        t2 = time.perf_counter()
        return Answer("".join(pieces).strip(), generation.tokens, generation.stop_reason,
                      n_prompt, t1 - t0, t2 - t1, decoding.beams)
