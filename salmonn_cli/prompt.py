"""The LLM input around the audio: BOS, text before, audio embeddings, text after (official order)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from salmonn_cli.config import SalmonnConfig
from salmonn_cli.errors import SalmonnError


# The official SALMONN task prompts (test_prompt.json) for speech recognition and translation.
TRANSCRIBE_PROMPT = "Recognize the speech and give me the transcription."
TRANSLATE_PROMPT = "Listen to the speech and translate it into {language}."


@dataclass
class Prompt:
    text_before: str
    text_after: str
    ids_before: list[int]
    ids_after: list[int]


def check_instruction(instruction: str) -> str:
    try:
        instruction.encode("utf-8")
    except UnicodeEncodeError:
        raise SalmonnError("the prompt is not valid UTF-8 text") from None
    if not instruction.strip():
        raise SalmonnError("the prompt is empty")
    return instruction


def build_prompt(config: SalmonnConfig, instruction: str,
                 tokenize: Callable[[str], list[int]]) -> Prompt:
    """Split the templated instruction at the audio placeholder; tokenize each piece on its own
    (each gets SentencePiece's leading-space prefix, as the official code does)."""
    before, after = config.prompt_pieces(check_instruction(instruction))
    return Prompt(before, after, tokenize(before), tokenize(after))
