"""Decoding in one loop with swappable parts: options checked once, logit filters, decoders (one beam:
greedy or sampling; beam search), stop checks (the repetition guard), a ranker, and text streaming."""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, replace
from typing import Callable, Union

import numpy as np

from salmonn_cli.beams import MAX_BEAMS, is_beam_count
from salmonn_cli.errors import SalmonnError


@dataclass(frozen=True)
class DecodingOptions:
    max_tokens: int = 200         # official decode_config: max_new_tokens 200
    beams: int | None = None      # > 1: beam search (official: 4); None: the model's own, 1 when sampling
    temperature: float = 0.0      # 0 = the most likely token; > 0 samples (one beam)
    top_p: float = 1.0
    seed: int | None = None


def verify_options(options: DecodingOptions, *, default_beams: int = 1,
                   max_beams: int = MAX_BEAMS) -> DecodingOptions:
    """The one check of decoding options. Returns them with `beams` filled in (None: `default_beams`,
    or 1 when sampling: beam search does not sample); `max_beams` is what the LLM context was sized for."""
    if options.beams is None:
        options = replace(options, beams=1 if options.temperature > 0 else default_beams)
    if not is_beam_count(options.beams):
        raise SalmonnError(f"the number of beams must be between 1 and {MAX_BEAMS}, not {options.beams}")
    if options.beams > max_beams:
        raise SalmonnError(f"the model was loaded for at most {max_beams} beam(s), not {options.beams}")
    if isinstance(options.max_tokens, bool) or not isinstance(options.max_tokens, int) or options.max_tokens < 1:
        raise SalmonnError(f"the most tokens to generate must be a whole number >= 1, not {options.max_tokens}")
    if not (math.isfinite(options.temperature) and options.temperature >= 0 and 0 <= options.top_p <= 1):
        raise SalmonnError("the temperature must be a finite number >= 0 and top_p between 0 and 1")
    if options.beams > 1 and options.temperature > 0:
        raise SalmonnError("beam search does not sample: use temperature 0 with more than one beam")
    return options


# --- logit filters: applied to every row of logits before a decoder chooses ---------------------

class SuppressTokens:
    """Tokens that must never be produced (e.g. rows beyond the tokenizer, as the official [PAD])."""

    def __init__(self, token_ids):
        self.token_ids = list(token_ids)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits = np.array(logits, copy=True)
        logits[..., self.token_ids] = -np.inf
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


# --- token choosers (the one-beam decoder's part): logits -> a token id ---------------------------

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


# --- stopping a looping output -------------------------------------------------------------------

STOP_REPETITION = "repetition"
# A stop check sees a sequence's tokens after each new one and returns a stop reason, or None.
StopCheck = Callable[[list[int]], "str | None"]


@dataclass
class RepetitionGuard:
    """Notices output that has started looping: the last tokens are one n-gram (n <= `max_period`)
    repeated back to back. A short n-gram must repeat `min_repeats` times and cover `min_span`
    tokens (one token 12 times, a 4-token phrase 3 times); an n-gram of `long_period` tokens or
    more loops after 2 copies (a whole sentence said twice, verbatim, in one chunk). A loop whose
    period varies ("O.O.O. O.O.O.O.", "of what you remember of what you remembered") is noticed by
    its poverty: its last `variety_window` tokens hold at most `max_distinct` distinct tokens, which
    no transcript of the nano data sets does (train/nano/README.md).

    A stop check for either decoder (a looping beam ends there); `trim` then keeps the first copy.
    """
    max_period: int = 64
    min_repeats: int = 3
    min_span: int = 12
    long_period: int = 16
    variety_window: int = 32
    max_distinct: int = 6

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

    def find_varying_loop(self, tokens: list[int]) -> int | None:
        """Where the first copy of a loop with a varying period ends: the loop is the longest stretch
        ending at the last token that uses only the few distinct tokens of the last `variety_window`;
        its first copy is the shortest start of it that holds each of them (so no word said before
        the loop is lost). None if the last tokens are varied enough."""
        n = len(tokens)
        if n < self.variety_window:
            return None
        recent = set(tokens[n - self.variety_window:])
        if len(recent) > self.max_distinct:
            return None
        start = n - self.variety_window
        while start > 0 and tokens[start - 1] in recent:
            start -= 1
        missing = set(recent)
        end = start
        while missing:                      # ends inside the stretch: each of `recent` occurs in it
            missing.discard(tokens[end])
            end += 1
        return end

    def first_copy_end(self, tokens: list[int]) -> int | None:
        """How many of `tokens` to keep: up to the end of the loop's first copy; None if not looping."""
        loop = self.find_loop(tokens)
        if loop is not None:
            period, start = loop
            return start + period
        return self.find_varying_loop(tokens)

    def trim(self, tokens: list[int]) -> list[int]:
        """`tokens` up to the end of the loop's first copy (unchanged if not looping)."""
        end = self.first_copy_end(tokens)
        return list(tokens if end is None else tokens[:end])

    def __call__(self, tokens: list[int]) -> str | None:
        return STOP_REPETITION if self.first_copy_end(tokens) is not None else None


# --- decoders: given one row of logits per live sequence, choose how each goes on -----------------

@dataclass
class Generation:
    tokens: list[int]
    stop_reason: str   # "eos", "max_tokens", "context_full", or what a stop check returned


@dataclass
class BeamStep:
    """How the live sequences continue: new sequence i is old sequence `parents[i]` + `tokens[i]`."""
    parents: list[int]
    tokens: list[int]


def _cut_reason(n_tokens: int, max_tokens: int) -> str:
    return "max_tokens" if n_tokens >= max_tokens else "context_full"


class OneBeamDecoder:
    """One sequence, a token at a time, chosen by `choose` (greedy or sampling). Ends at EOS (not
    part of the answer), when `stop` returns a reason, or after min(max_tokens, room) tokens."""

    def __init__(self, choose: Callable[[np.ndarray], int], *, eos_id: int, max_tokens: int, room: int,
                 stop: StopCheck | None = None):
        self.choose = choose
        self.eos_id = eos_id
        self.max_tokens = max_tokens
        self.room = room
        self.stop = stop
        self.tokens: list[int] = []
        self.done = max_tokens <= 0
        self.stop_reason = "max_tokens"

    def step(self, logits: np.ndarray) -> BeamStep | None:
        token = self.choose(np.asarray(logits).reshape(-1))
        if token == self.eos_id:
            self.done, self.stop_reason = True, "eos"
            return None
        self.tokens.append(token)
        reason = self.stop(self.tokens) if self.stop is not None else None
        if not reason and len(self.tokens) >= min(self.max_tokens, self.room):
            reason = _cut_reason(len(self.tokens), self.max_tokens)
        if reason:
            self.done, self.stop_reason = True, reason
        return BeamStep([0], [token])

    def result(self) -> Generation:
        return Generation(self.tokens, self.stop_reason)


# transformers 4.28 (the official pin) measures a hypothesis by len(input_ids): with inputs_embeds
# only, that is the BOS it seeds plus the generated tokens, the EOS not counted.
HF_SEEDED_PREFIX = 1


@dataclass
class _Hypothesis:
    score: float            # the ranker's score
    tokens: list[int]
    stop_reason: str | None  # "eos" or a stop check's reason; None: cut at the length limit


@dataclass(frozen=True)
class LengthNormalisedRanker:
    """Ranks finished sequences as transformers does: summed log-prob / length ** length_penalty,
    where the length counts the `prefix_length` seeded tokens too; on equal scores the one
    finished last wins."""
    length_penalty: float = 1.0
    prefix_length: int = HF_SEEDED_PREFIX

    def score(self, sum_logprobs: float, n_tokens: int) -> float:
        return sum_logprobs / (self.prefix_length + n_tokens) ** self.length_penalty

    def best(self, hypotheses: list[_Hypothesis]) -> _Hypothesis:
        return sorted(hypotheses, key=lambda h: h.score)[-1]


class BeamSearchDecoder:
    """Beam search with the semantics of transformers 4.28 (`BeamSearchScorer`, early_stopping
    False), the version the official SALMONN decodes with; pure numpy over log-probabilities.

    Each `step(logits)` takes one row of logits per live beam (the first call: one row, the prompt)
    and returns the `BeamStep` to feed to the model next, or None once the search is over; then
    `result()` is the best hypothesis. Per step, as transformers does: the 2N best continuations
    over all beams are ranked by summed log-prob; an EOS ranked among the first N finishes its beam
    (the EOS itself is not part of the answer) and enters the N-best list of finished hypotheses
    if it beats the worst one there; the first N non-EOS continuations become the new beams. A
    continuation that `stop` ends (e.g. a loop) is handled as an EOS, its last token kept. The
    search ends when the list is full and the worst finished score is at least the best
    continuation's sum divided by the next length (the "False" early-stopping heuristic), or at
    `max_tokens` (or `room`), when the live beams join the list as they are.
    """

    def __init__(self, num_beams: int, *, eos_id: int, max_tokens: int, room: int | None = None,
                 ranker: LengthNormalisedRanker = LengthNormalisedRanker(),
                 stop: StopCheck | None = None):
        if num_beams < 2:
            raise ValueError("beam search needs at least 2 beams (1 beam is greedy decoding)")
        self.num_beams = num_beams
        self.eos_id = eos_id
        self.max_tokens = max_tokens
        self.limit = max_tokens if room is None else min(max_tokens, room)
        self.ranker = ranker
        self.stop = stop
        self.beams: list[list[int]] = [[]]                  # token histories of the live beams
        self.scores = np.zeros(1)                           # their summed log-probs
        self.finished: list[_Hypothesis] = []
        self.worst_finished = 1e9
        self.done = max_tokens <= 0
        self.n_steps = 0

    # --- the N-best list of finished hypotheses ------------------------------------------------
    def _add_finished(self, tokens: list[int], sum_logprobs: float, stop_reason: str | None) -> None:
        score = self.ranker.score(sum_logprobs, len(tokens))
        if len(self.finished) < self.num_beams or score > self.worst_finished:
            self.finished.append(_Hypothesis(score, list(tokens), stop_reason))
            if len(self.finished) > self.num_beams:
                ranked = sorted((h.score, i) for i, h in enumerate(self.finished))
                del self.finished[ranked[0][1]]
                self.worst_finished = ranked[1][0]
            else:
                self.worst_finished = min(score, self.worst_finished)

    def _cannot_improve(self, best_sum_logprobs: float) -> bool:
        if len(self.finished) < self.num_beams:
            return False
        # the next length: len(input_ids) once this step's token is in
        return self.worst_finished >= self.ranker.score(best_sum_logprobs, self.n_steps)

    # --- one step --------------------------------------------------------------------------------
    def step(self, logits: np.ndarray) -> BeamStep | None:
        if self.done:
            raise RuntimeError("the beam search is already over")
        logits = np.asarray(logits, dtype=np.float64).reshape(len(self.beams), -1)
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
            history, reason = self.beams[beam], "eos"
            if token != self.eos_id:
                history = history + [token]
                reason = self.stop(history) if self.stop is not None else None
            if reason:
                if rank < self.num_beams:
                    self._add_finished(history, float(totals[flat]), reason)
            else:
                parents.append(beam)
                tokens.append(token)
                scores.append(float(totals[flat]))
            if len(parents) == self.num_beams:
                break

        self.n_steps += 1
        self.beams = [self.beams[p] + [t] for p, t in zip(parents, tokens)]
        self.scores = np.array(scores)
        if k and self._cannot_improve(float(totals[candidates[0]])):
            self.done = True
            return None
        if self.n_steps >= self.limit or not parents:
            for beam, score in zip(self.beams, self.scores):
                self._add_finished(beam, float(score), None)
            self.done = True
            return None
        return BeamStep(parents, tokens)

    def result(self) -> Generation:
        """The best hypothesis, as the ranker says."""
        if not self.done:
            raise RuntimeError("the beam search is not over yet")
        if not self.finished:
            return Generation([], "max_tokens")
        best = self.ranker.best(self.finished)
        return Generation(best.tokens, best.stop_reason or _cut_reason(len(best.tokens), self.max_tokens))


Decoder = Union[OneBeamDecoder, BeamSearchDecoder]     # step(logits) -> BeamStep | None, done, result()


def make_decoder(options: DecodingOptions, *, eos_id: int, room: int,
                 stop: StopCheck | None = None) -> Decoder:
    """The decoder `options` (verified) ask for; `room`: free context cells, shared by the beams."""
    if options.beams > 1:
        return BeamSearchDecoder(options.beams, eos_id=eos_id, max_tokens=options.max_tokens,
                                 room=room // options.beams, stop=stop)
    choose = (GreedyChooser() if options.temperature <= 0
              else SamplingChooser(options.temperature, options.top_p, options.seed))
    return OneBeamDecoder(choose, eos_id=eos_id, max_tokens=options.max_tokens, room=room, stop=stop)


# --- the loop ------------------------------------------------------------------------------------

LogitFilter = Callable[[np.ndarray], np.ndarray]


def decode(first_logits: np.ndarray, advance: Callable[[BeamStep], np.ndarray], decoder: Decoder, *,
           filters: tuple[LogitFilter, ...] = (),
           on_step: Callable[[BeamStep], None] | None = None) -> Generation:
    """Run `decoder` on a model until it is done: the logits (one row per live sequence; the first
    call: the prompt's) go through `filters`, the decoder chooses a `BeamStep`, and `advance(step)`
    feeds it to the model (reordering the sequences' caches as it says) and returns the next logits.
    `on_step` sees every step chosen (with one beam, each token as it comes)."""
    logits = first_logits
    while not decoder.done:
        for apply in filters:
            logits = apply(logits)
        step = decoder.step(logits)        # None only once the decoder is done
        if step is not None and on_step is not None:
            on_step(step)
        if not decoder.done:
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


def render_tokens(tokens: list[int], piece: Callable[[int], bytes]) -> str:
    stream = TextStream(piece)
    return ("".join(stream.push(t) for t in tokens) + stream.flush()).strip()
