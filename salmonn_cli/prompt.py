"""The LLM input around the audio: BOS, text before, audio embeddings, text after (official order).

Runtime (llama.cpp) and training (train/data.py) both turn a templated prompt into ids with
`prompt_token_ids`, so they cannot disagree. A `tokenize(text)` callable tokenizes plain text;
with `config.prompt_special_tokens` it is also called as `tokenize(text, special=True)` for the
template's own text, so that "<|im_end|>" there is the special token while the same characters
typed by the user stay plain text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from salmonn_cli.config import SalmonnConfig
from salmonn_cli.errors import SalmonnError


TEMPLATE_MARKER = "\0"      # stands in for "{}" to cut a template into its own text

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


Segment = tuple[str, bool]      # (text, parse special tokens in it)


def template_affixes(config: SalmonnConfig) -> tuple[str, str]:
    """The template's own text before and after its "{}"."""
    prefix, suffix = config.prompt_template.format(TEMPLATE_MARKER).split(TEMPLATE_MARKER)
    return prefix, suffix


def prompt_segments(config: SalmonnConfig, prompt: str) -> tuple[list[Segment], list[Segment]]:
    """A templated prompt (template around speech tag + instruction) cut at the audio placeholder.

    Officially each side is one plain piece. With `prompt_special_tokens` the template's own
    text is split off: [template prefix (special), user text before the audio (plain)] and
    [user text after the audio (plain), template suffix (special)].
    """
    if not config.prompt_special_tokens:
        before, after = _split_at_audio(config, prompt)
        return [(before, False)], [(after, False)]
    prefix, suffix = template_affixes(config)
    if (len(prompt) < len(prefix) + len(suffix) or not prompt.startswith(prefix)
            or not prompt.endswith(suffix)):
        raise SalmonnError(f"the prompt {prompt!r} is not wrapped in the template {config.prompt_template!r}")
    before, after = _split_at_audio(config, prompt[len(prefix):len(prompt) - len(suffix)])
    return [(prefix, True), (before, False)], [(after, False), (suffix, True)]


def _split_at_audio(config: SalmonnConfig, text: str) -> tuple[str, str]:
    if config.audio_placeholder not in text:
        raise SalmonnError(f"the prompt {text!r} has no audio placeholder {config.audio_placeholder}")
    before, after = text.split(config.audio_placeholder, 1)
    return before, after


def tokenize_segments(segments: list[Segment], tokenize: Callable[..., list[int]]) -> list[int]:
    ids: list[int] = []
    for text, special in segments:
        if text:
            ids += tokenize(text, special=True) if special else tokenize(text)
    return ids


def prompt_token_ids(config: SalmonnConfig, prompt: str,
                     tokenize: Callable[..., list[int]]) -> tuple[list[int], list[int]]:
    """Ids of the templated `prompt` before and after the audio (no BOS)."""
    before, after = prompt_segments(config, prompt)
    return tokenize_segments(before, tokenize), tokenize_segments(after, tokenize)


def build_prompt(config: SalmonnConfig, instruction: str,
                 tokenize: Callable[..., list[int]]) -> Prompt:
    """Wrap the instruction in the template and split it at the audio placeholder; each piece
    is tokenized on its own (each gets SentencePiece's leading-space prefix, as the official
    code does)."""
    instruction = check_instruction(instruction)
    prompt = config.prompt_template.format(config.speech_tag + instruction.strip())
    before, after = prompt_segments(config, prompt)
    return Prompt("".join(text for text, _ in before), "".join(text for text, _ in after),
                  tokenize_segments(before, tokenize), tokenize_segments(after, tokenize))


def follow_up_token_ids(config: SalmonnConfig, instruction: str,
                        tokenize: Callable[..., list[int]]) -> list[int]:
    """Ids of a follow-up question: the template around the instruction alone, no audio (no BOS).
    Tokenized as `build_prompt` tokenizes the text after the audio."""
    instruction = check_instruction(instruction).strip()
    if not config.prompt_special_tokens:
        return tokenize_segments([(config.prompt_template.format(instruction), False)], tokenize)
    prefix, suffix = template_affixes(config)
    return tokenize_segments([(prefix, True), (instruction, False), (suffix, True)], tokenize)
