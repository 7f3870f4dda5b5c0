"""Decoding as small swappable parts: logit filters, token choosers, the generation loop, text streaming."""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


@dataclass
class DecodingOptions:
    max_tokens: int = 200         # official decode_config: max_new_tokens 200
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


# --- logit filters -------------------------------------------------------------------------------

def suppress_tokens(logits: np.ndarray, token_ids) -> np.ndarray:
    logits = logits.copy()
    logits[list(token_ids)] = -np.inf
    return logits


def nucleus_probabilities(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Softmax at `temperature`, keeping the smallest set of tokens whose mass reaches `top_p`."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep = max(1, int(np.count_nonzero(mass_before < top_p - 1e-9)))
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


# --- token choosers ------------------------------------------------------------------------------

class TokenChooser(Protocol):
    def __call__(self, logits: np.ndarray) -> int: ...


class GreedyChooser:
    def __call__(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))


class SamplingChooser:
    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        probs = nucleus_probabilities(logits, self.temperature, self.top_p)
        return int(self.rng.choice(len(probs), p=probs))


def make_chooser(options: DecodingOptions) -> TokenChooser:
    if options.temperature <= 0:
        return GreedyChooser()
    return SamplingChooser(options.temperature, options.top_p, options.seed)


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Generation:
    tokens: list[int]
    stop_reason: str   # "eos", "max_tokens" or "context_full"


def generate(first_logits: np.ndarray, step: Callable[[int], np.ndarray], *, eos_id: int,
             options: DecodingOptions, room: int, on_token: Callable[[int], None] | None = None,
             suppress: tuple[int, ...] = ()) -> Generation:
    """Choose tokens until EOS, `options.max_tokens` or `room` (free context) runs out.

    `step(token)` feeds a chosen token to the model and returns the next logits.
    """
    choose = make_chooser(options)
    tokens: list[int] = []
    logits = first_logits
    while True:
        if len(tokens) >= options.max_tokens:
            return Generation(tokens, "max_tokens")
        token = choose(suppress_tokens(logits, suppress) if suppress else logits)
        if token == eos_id:
            return Generation(tokens, "eos")
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) >= min(options.max_tokens, room):
            return Generation(tokens, "max_tokens" if len(tokens) >= options.max_tokens
                              else "context_full")
        logits = step(token)


# --- text ----------------------------------------------------------------------------------------

class TextStream:
    """Turns token pieces (bytes) into text as they come, never splitting a UTF-8 character."""

    def __init__(self, piece: Callable[[int], bytes]):
        self.piece = piece
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started = False

    def push(self, token: int) -> str:
        text = self.decoder.decode(self.piece(token))
        if not self.started and text:
            # SentencePiece marks word starts with a space; the answer's first one is not text.
            text = text[1:] if text.startswith(" ") else text
            self.started = bool(text)
        return text

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
