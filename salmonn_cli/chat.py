"""`salmonn chat`: follow-up questions about one recording, the earlier turns kept in the prompt.

The conversation is the model's own prompt template turn after turn: the first turn is exactly
`salmonn ask`'s prompt (BOS, template around the speech tag and question); each answer is closed by
EOS, and each follow-up is BOS + the template around the question alone, as a single question starts.
SALMONN was trained on single questions, so follow-ups are as good as the LLM makes them.

The KV cache keeps the audio and every earlier turn (`Pipeline.answer_ids` with `reuse_audio`): a
turn decodes only its own new tokens. When a turn would not leave room for a whole answer in the
context, the earlier turns are dropped and the question is asked about the audio alone.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from salmonn_cli.decoding import DecodingOptions, StopCheck, verify_options
from salmonn_cli.pipeline import Answer, Pipeline
from salmonn_cli.prompt import build_prompt, follow_up_token_ids


class Conversation:
    def __init__(self, pipeline: Pipeline, embeds: np.ndarray):
        self.pipeline = pipeline
        self.embeds = embeds
        self.history: list[int] = []    # ids after the audio of the turns so far, each answer closed by EOS

    def ask(self, question: str, on_text: Callable[[str], None] | None = None,
            on_forget: Callable[[int], None] | None = None, decoding: DecodingOptions | None = None,
            stop: StopCheck | None = None) -> Answer:
        """Answer `question` after the earlier turns (decoded as `Pipeline.answer` decodes, `stop` checked after
        each token); `on_forget(n_ctx)` is told when they no longer fit and are dropped."""
        pipeline, llm = self.pipeline, self.pipeline.llm
        limit = pipeline.decoding.beams
        decoding = pipeline.decoding if decoding is None else verify_options(decoding, default_beams=limit, max_beams=limit)
        prompt = build_prompt(pipeline.config, question, llm.tokenize)
        ids_after = prompt.ids_after
        if self.history:
            follow_up = self.history + [llm.bos_id] + follow_up_token_ids(pipeline.config, question, llm.tokenize)
            answer_room = decoding.beams * decoding.max_tokens
            if 1 + len(prompt.ids_before) + len(self.embeds) + len(follow_up) + answer_room <= llm.n_ctx:
                ids_after = follow_up
            elif on_forget is not None:
                on_forget(llm.n_ctx)
        answer = pipeline.answer_ids(self.embeds, prompt.ids_before, ids_after, decoding, on_text, stop,
                                     reuse_audio=True)
        self.history = ids_after + answer.tokens + [llm.eos_id]
        return answer
