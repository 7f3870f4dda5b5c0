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
from salmonn_cli.decoding import (STOP_REPETITION, DecodingOptions, RepetitionGuard, StopCheck, SuppressTokens,
                                  TextStream, decode, make_decoder, render_tokens, verify_options)
from salmonn_cli.device import (Placement, check_device, llm_gpu_layers, offloaded_layers, require_cuda,
                                why_cpu)
from salmonn_cli.encoder import AudioEncoder
from salmonn_cli.errors import ModelError, SalmonnError, quoted
from salmonn_cli.llm import BeamSequences, LlamaModel, sequences_for_beams
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
class CachedPrompt:
    """What sequence 0 of the LLM's KV cache holds: BOS, `ids_before`, the audio `embeds`, then
    `ids_after` (the tokens after the audio, as far as they are in the cache)."""
    embeds: np.ndarray
    ids_before: list[int]
    ids_after: list[int]
    resets: int               # the LLM's reset count when this was decoded

    @property
    def audio_end(self) -> int:
        return 1 + len(self.ids_before) + len(self.embeds)


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

    def timings(self, encode_s: float | None = None) -> dict:
        """Where the time went, `encode_s` being the audio's reading, features and encoder (left out
        when None: answers that share one file's audio)."""
        n = len(self.tokens)
        encode = {} if encode_s is None else {"encode_s": round(encode_s, 4)}
        return {**encode, "prefill_s": round(self.prefill_s, 4),
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
                              n_seq_max=sequences_for_beams(beams))
        self.placement = Placement(self.encoder.provider, offloaded_layers(gpu_layers, self.llm.n_layer),
                                   self.llm.n_layer + 1,
                                   why_cpu(options.device, self.encoder.provider, options.n_gpu_layers, gpu_layers))
        if self.llm.n_embd != self.config.llm.hidden_size:
            raise ModelError(f"the GGUF's embedding width {self.llm.n_embd} does not match the "
                             f"audio encoder's {self.config.llm.hidden_size}")
        # Rows beyond the tokenizer (e.g. the official [PAD] row) must never be produced.
        self.suppress = SuppressTokens(range(self.config.llm.vocab_size, self.llm.n_vocab))
        self.cached: CachedPrompt | None = None
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

    def uses_repetition_guard(self, asked: bool | None) -> bool:
        """Whether answers get a `RepetitionGuard`: as `asked`, or None: the model's own (its manifest)."""
        return self.manifest.default_repetition_guard if asked is None else asked

    def repetition_guard(self, asked: bool | None) -> RepetitionGuard | None:
        """The `stop` check for `answer` that `uses_repetition_guard(asked)` calls for (None: no guard)."""
        return RepetitionGuard() if self.uses_repetition_guard(asked) else None

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
               on_text: Callable[[str], None] | None = None, stop: StopCheck | None = None, *,
               reuse_audio: bool = False) -> Answer:
        """Generate the answer to `instruction` about the audio embeddings `embeds` (n, llm_hidden),
        decoded as `decoding` says (None: `self.decoding`; beams None: `self.decoding`'s). `stop` is
        checked after each token of each sequence (`decoding.RepetitionGuard`, a cancel check); a loop
        that a `RepetitionGuard` stopped is cut to its first copy (`on_text` has seen the copies). More
        than one beam runs beam search (transformers 4.28 semantics, as the official model); its text
        comes through `on_text` when the search ends. `reuse_audio`: see `answer_ids`."""
        prompt = build_prompt(self.config, instruction, self.llm.tokenize)
        return self.answer_ids(embeds, prompt.ids_before, prompt.ids_after, decoding, on_text, stop,
                               reuse_audio=reuse_audio)

    def answer_ids(self, embeds: np.ndarray, ids_before: list[int], ids_after: list[int],
                   decoding: DecodingOptions | None = None, on_text: Callable[[str], None] | None = None,
                   stop: StopCheck | None = None, *, reuse_audio: bool = False) -> Answer:
        """`answer` for a prompt already cut and tokenized: BOS, `ids_before`, the audio, `ids_after`.

        `reuse_audio`: when the KV cache still holds BOS, `ids_before` and these embeddings (the last
        answer was about the same audio), they are not decoded again; only `ids_after` is, continuing
        from the cached tokens after the audio when `ids_after` extends them (a chat's earlier turns),
        else right after the audio. The tokens decoded are the same, so is the answer."""
        if decoding is None:
            decoding = self.decoding
        else:       # beams None: self.decoding's, whose beams it may not pass
            decoding = verify_options(decoding, default_beams=self.decoding.beams, max_beams=self.decoding.beams)
        llm = self.llm
        n_prompt = 1 + len(ids_before) + len(embeds) + len(ids_after)
        if n_prompt >= llm.n_ctx:
            raise SalmonnError(f"the prompt needs {n_prompt} tokens with the audio, more than the "
                               f"context of {llm.n_ctx}; shorten the prompt")
        kept = self._cached_after(embeds, ids_before, ids_after) if reuse_audio else None
        self.cached = None          # until this answer is through: an interrupted one leaves it unknown
        t0 = time.perf_counter()
        if kept is None:
            llm.reset()
            llm.decode_tokens([llm.bos_id] + ids_before)
            llm.decode_embeddings(embeds)
            kept = 0
        audio_end = n_prompt - len(ids_after)
        logits = llm.decode_tokens(ids_after[kept:], start_pos=audio_end + kept)
        t1 = time.perf_counter()
        generated, stop_reason, text = self._generate(logits, decoding, n_prompt, on_text, stop)
        # sequence 0 holds the prompt and, with one beam, the answer's tokens as far as they were fed back
        self.cached = CachedPrompt(embeds, list(ids_before), (list(ids_after) + generated)[:llm.n_past - audio_end],
                                   llm.resets)
        tokens = generated
        if stop_reason == STOP_REPETITION and isinstance(stop, RepetitionGuard):
            tokens = stop.trim(generated)
            text = render_tokens(tokens, llm.token_to_bytes)
        return Answer(text, tokens, stop_reason, n_prompt, t1 - t0, time.perf_counter() - t1, decoding.beams)

    def _cached_after(self, embeds: np.ndarray, ids_before: list[int], ids_after: list[int]) -> int | None:
        """How many of `ids_after` the KV cache already holds after these very audio embeddings (at
        most all but one: the last prompt token's logits are needed), or None: decode all again."""
        c = self.cached
        if (c is None or c.resets != self.llm.resets or c.ids_before != ids_before
                or self.llm.n_past != c.audio_end + len(c.ids_after)
                or not (c.embeds is embeds or np.array_equal(c.embeds, embeds))):
            return None
        n = len(c.ids_after)
        return n if n < len(ids_after) and ids_after[:n] == c.ids_after else 0

    def _generate(self, logits: np.ndarray, decoding: DecodingOptions, n_prompt: int,
                  on_text: Callable[[str], None] | None, stop: StopCheck | None) -> tuple[list[int], str, str]:
        """Decode from the prompt's last logits: (tokens, stop reason, text)."""
        llm = self.llm
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
            try:
                generation = decode(logits, lambda step: sequences.advance(step.parents, step.tokens), decoder,
                                    filters=(self.suppress,))
            finally:
                sequences.release()
            for token in generation.tokens:     # beams cannot stream: the text comes at the end
                show(stream.push(token))
        else:
            generation = decode(logits, lambda step: llm.decode_tokens(step.tokens), decoder,
                                filters=(self.suppress,), on_step=lambda step: show(stream.push(step.tokens[0])))
        show(stream.flush())
        return generation.tokens, generation.stop_reason, "".join(pieces).strip()
