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
    beams: int = 1                # > 1: beam search (the official decode_config uses 4)


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
    stop_reason: str   # "eos", "max_tokens", "context_full", or what a `stop` check returned


def generate(first_logits: np.ndarray, step: Callable[[int], np.ndarray], *, eos_id: int,
             options: DecodingOptions, room: int, on_token: Callable[[int], None] | None = None,
             suppress: tuple[int, ...] = (),
             stop: Callable[[list[int]], str | None] | None = None) -> Generation:
    """Choose tokens until EOS, `options.max_tokens` or `room` (free context) runs out, or
    `stop(tokens)` (called after each token, e.g. a `RepetitionGuard`) returns a stop reason.

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
        reason = stop(tokens) if stop is not None else None
        if reason:
            return Generation(tokens, reason)
        if len(tokens) >= min(options.max_tokens, room):
            return Generation(tokens, "max_tokens" if len(tokens) >= options.max_tokens
                              else "context_full")
        logits = step(token)


# --- stopping a looping output -------------------------------------------------------------------

STOP_REPETITION = "repetition"


@dataclass
class RepetitionGuard:
    """Notices output that has started looping: the last tokens are one n-gram (n <= `max_period`)
    repeated back to back. A short n-gram must repeat `min_repeats` times and cover `min_span`
    tokens (one token 12 times, a 4-token phrase 3 times); an n-gram of `long_period` tokens or
    more loops after 2 copies (a whole sentence said twice, verbatim, in one window).

    Pass it as `generate(..., stop=guard)`; `trim` then keeps the first copy of the loop.
    """
    max_period: int = 64
    min_repeats: int = 3
    min_span: int = 12
    long_period: int = 16

    def copies_needed(self, period: int) -> int:
        if period >= self.long_period:
            return 2
        return max(self.min_repeats, -(-self.min_span // period))

    def find_loop(self, tokens: list[int]) -> tuple[int, int] | None:
        """(period, start) of a loop ending at the last token: from `start` on, `tokens` repeat
        with that period. None if the output is not looping."""
        n = len(tokens)
        for period in range(1, self.max_period + 1):
            span = period * self.copies_needed(period)
            if span > n or tokens[n - span + period:] != tokens[n - span:n - period]:
                continue
            start = n - span
            while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
                start -= 1
            return period, start
        return None

    def trim(self, tokens: list[int]) -> list[int]:
        """`tokens` up to the end of the loop's first copy (unchanged if not looping)."""
        loop = self.find_loop(tokens)
        if loop is None:
            return list(tokens)
        period, start = loop
        return list(tokens[:start + period])

    def __call__(self, tokens: list[int]) -> str | None:
        return STOP_REPETITION if self.find_loop(tokens) is not None else None


# --- beam search ---------------------------------------------------------------------------------

# transformers 4.28 (the official pin) measures a hypothesis by len(input_ids): with inputs_embeds
# only, that is the BOS it seeds plus the generated tokens, the EOS not counted.
HF_SEEDED_PREFIX = 1


@dataclass
class BeamStep:
    """How the live beams continue: new beam i is old beam `parents[i]` followed by `tokens[i]`."""
    parents: list[int]
    tokens: list[int]


@dataclass
class _Hypothesis:
    score: float            # sum of log-probs / length ** length_penalty
    tokens: list[int]
    ended_by_eos: bool


class BeamSearchDecoder:
    """Beam search with the semantics of transformers 4.28 (`BeamSearchScorer`, early_stopping
    False), the version the official SALMONN decodes with; pure numpy over log-probabilities.

    Each `step(logits)` takes one row of logits per live beam (the first call: one row, the prompt)
    and returns the `BeamStep` to feed to the model next, or None once the search is over; then
    `result()` is the best hypothesis. Per step, as transformers does: the 2N best continuations
    over all beams are ranked by summed log-prob; an EOS ranked among the first N finishes its beam
    (the EOS itself is not part of the answer) and enters the N-best list of finished hypotheses
    if it beats the worst one there; the first N non-EOS continuations become the new beams. The
    search ends when the list is full and the worst finished score is at least the best
    continuation's sum divided by the next length (the "False" early-stopping heuristic), or at
    `max_tokens`, when the live beams join the list as they are.
    """

    def __init__(self, num_beams: int, *, eos_id: int, max_tokens: int, room: int | None = None,
                 length_penalty: float = 1.0, suppress: tuple[int, ...] = (),
                 prefix_length: int = HF_SEEDED_PREFIX):
        if num_beams < 2:
            raise ValueError("beam search needs at least 2 beams (1 beam is greedy decoding)")
        self.num_beams = num_beams
        self.eos_id = eos_id
        self.max_tokens = max_tokens
        self.limit = max_tokens if room is None else min(max_tokens, room)
        self.length_penalty = length_penalty
        self.suppress = tuple(suppress)
        self.prefix_length = prefix_length
        self.beams: list[list[int]] = [[]]                  # token histories of the live beams
        self.scores = np.zeros(1)                           # their summed log-probs
        self.finished: list[_Hypothesis] = []
        self.worst_finished = 1e9
        self.done = max_tokens <= 0
        self.n_steps = 0

    # --- the N-best list of finished hypotheses ------------------------------------------------
    def _length_normalised(self, sum_logprobs: float, tokens: list[int]) -> float:
        return sum_logprobs / (self.prefix_length + len(tokens)) ** self.length_penalty

    def _add_finished(self, tokens: list[int], sum_logprobs: float, ended_by_eos: bool) -> None:
        score = self._length_normalised(sum_logprobs, tokens)
        if len(self.finished) < self.num_beams or score > self.worst_finished:
            self.finished.append(_Hypothesis(score, list(tokens), ended_by_eos))
            if len(self.finished) > self.num_beams:
                ranked = sorted((h.score, i) for i, h in enumerate(self.finished))
                del self.finished[ranked[0][1]]
                self.worst_finished = ranked[1][0]
            else:
                self.worst_finished = min(score, self.worst_finished)

    def _cannot_improve(self, best_sum_logprobs: float, length: int) -> bool:
        if len(self.finished) < self.num_beams:
            return False
        return self.worst_finished >= best_sum_logprobs / length ** self.length_penalty

    # --- one step --------------------------------------------------------------------------------
    def step(self, logits: np.ndarray) -> BeamStep | None:
        if self.done:
            raise RuntimeError("the beam search is already over")
        logits = np.asarray(logits, dtype=np.float64).reshape(len(self.beams), -1)
        if self.suppress:
            logits = logits.copy()
            logits[:, list(self.suppress)] = -np.inf
        top = logits.max(axis=1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        totals = (log_probs + self.scores[:, None]).ravel()
        n_vocab = log_probs.shape[1]

        k = min(2 * self.num_beams, int(np.isfinite(totals).sum()))
        candidates = np.argpartition(-totals, k - 1)[:k] if k < totals.size else np.arange(totals.size)
        candidates = candidates[np.argsort(-totals[candidates], kind="stable")][:k]

        parents, tokens, scores = [], [], []
        for rank, flat in enumerate(candidates):
            beam, token = divmod(int(flat), n_vocab)
            if token == self.eos_id:
                if rank < self.num_beams:
                    self._add_finished(self.beams[beam], float(totals[flat]), ended_by_eos=True)
            else:
                parents.append(beam)
                tokens.append(token)
                scores.append(float(totals[flat]))
            if len(parents) == self.num_beams:
                break

        self.n_steps += 1
        length = self.prefix_length + self.n_steps       # len(input_ids) once this step's token is in
        self.beams = [self.beams[p] + [t] for p, t in zip(parents, tokens)]
        self.scores = np.array(scores)
        if k and self._cannot_improve(float(totals[candidates[0]]), length):
            self.done = True
            return None
        if self.n_steps >= self.limit or not parents:
            for beam, score in zip(self.beams, self.scores):
                self._add_finished(beam, float(score), ended_by_eos=False)
            self.done = True
            return None
        return BeamStep(parents, tokens)

    def result(self) -> Generation:
        """The best hypothesis; on equal scores the one added last, like transformers."""
        if not self.done:
            raise RuntimeError("the beam search is not over yet")
        if not self.finished:
            return Generation([], "max_tokens")
        best = sorted(self.finished, key=lambda h: h.score)[-1]
        if best.ended_by_eos:
            return Generation(best.tokens, "eos")
        cut_by_room = len(best.tokens) < self.max_tokens
        return Generation(best.tokens, "context_full" if cut_by_room else "max_tokens")


def beam_search(first_logits: np.ndarray, advance: Callable[[BeamStep], np.ndarray], *,
                num_beams: int, eos_id: int, max_tokens: int, room: int,
                suppress: tuple[int, ...] = (), length_penalty: float = 1.0) -> Generation:
    """Run `BeamSearchDecoder` on a model: `advance(step)` reorders the beams' caches as `step` says,
    feeds `step.tokens` and returns the next logits, one row per new beam."""
    decoder = BeamSearchDecoder(num_beams, eos_id=eos_id, max_tokens=max_tokens, room=room,
                                length_penalty=length_penalty, suppress=suppress)
    logits = np.asarray(first_logits)
    while not decoder.done:
        step = decoder.step(logits)
        if step is not None:
            logits = advance(step)
    return decoder.result()


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
