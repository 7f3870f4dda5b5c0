"""The projection through Whisper's vocabulary (salmonn-nano with the Whisper-decoder Q-Former; not official).

The Whisper-decoder Q-Former's window token is the decoder's final hidden state, which Whisper reads
through its token embedding as the next word's logits. This projection does the same, then writes the
LLM's own input embedding of that word: softmax(h E_whisper^T) E_llm, plus a linear path from h (which
starts at zero) for what words cannot say (a sound, a voice). From the first step each audio token is
then a mixture of embeddings of the words the LLM already reads as text, where the official linear
projection starts as a random direction the LLM has to learn to read (train/nano/README.md measures it).

Only the first `n_text` Whisper tokens are kept (byte-pair merges are numbered by frequency, so they are
the common words and pieces) plus <|endoftext|>, what the decoder predicts after nothing said; that one
writes the LLM's own end-of-text embedding.
"""
from __future__ import annotations

import torch
from tokenizers import decoders, pre_tokenizers
from torch import nn

WHISPER_END_OF_TEXT = "<|endoftext|>"


class VocabProjection(nn.Module):
    """Window tokens (..., hidden) -> LLM-space tokens (..., llm_hidden) through a vocabulary of `vocab` words.

    `logits` is Whisper's token embedding (the rows kept), `embeddings` the LLM's input embedding of each
    kept word (frozen: it is the LLM's own table), `direct` the linear path."""

    def __init__(self, hidden: int, llm_hidden: int, vocab: int):
        super().__init__()
        self.logits = nn.Linear(hidden, vocab, bias=False)
        self.embeddings = nn.Parameter(torch.zeros(vocab, llm_hidden), requires_grad=False)
        self.direct = nn.Linear(hidden, llm_hidden)
        # each row's Whisper piece (byte-level spelling), known once loaded from Whisper (`load_vocab_projection`)
        self.pieces: tuple[str, ...] = ()
        nn.init.zeros_(self.direct.weight)
        nn.init.zeros_(self.direct.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        words = torch.softmax(self.logits(hidden).float(), dim=-1).to(hidden.dtype)
        return words @ self.embeddings.to(hidden.dtype) + self.direct(hidden)


def kept_whisper_ids(vocabulary: list[str], n_text: int) -> list[int]:
    """The Whisper token ids the projection reads: the first `n_text` text tokens, then <|endoftext|>."""
    if WHISPER_END_OF_TEXT not in vocabulary:
        raise ValueError(f"Whisper's vocabulary lacks {WHISPER_END_OF_TEXT}")
    end = vocabulary.index(WHISPER_END_OF_TEXT)
    if not 0 < n_text <= end:
        raise ValueError(f"audio_vocab {n_text + 1} must keep between 1 and {end} of Whisper's {end} text tokens "
                         "(plus <|endoftext|>)")
    return [*range(n_text), end]


def byte_level_words(text: str) -> list[str]:
    """Text -> its byte-level BPE spelling (GPT-2's alphabet: one character per UTF-8 byte, " " -> "Ġ"), cut
    where GPT-2's pre-tokenizer cuts (a word with its leading space, a run of punctuation): no BPE piece,
    Whisper's included, spans two of these."""
    return [word for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


def from_byte_level(spelling: str) -> str:
    """`byte_level_words` undone (their concatenation) (bytes that end mid-character read as U+FFFD)."""
    return decoders.ByteLevel().decode([spelling])


def split_into(piece: str, llm_vocab: dict[str, int]) -> list[int]:
    """A byte-level piece -> LLM token ids by greedy longest match; a byte the LLM never saw (one that no
    UTF-8 text holds, say) is skipped."""
    ids, start = [], 0
    while start < len(piece):
        stop = next((stop for stop in range(len(piece), start, -1) if piece[start:stop] in llm_vocab), None)
        if stop is None:
            start += 1
            continue
        ids.append(llm_vocab[piece[start:stop]])
        start = stop
    return ids


def llm_embeddings_of(pieces: list[str], llm_vocab: dict[str, int], llm_end_of_text: int,
                      llm_embeddings: torch.Tensor) -> torch.Tensor:
    """(len(pieces), llm_hidden): each Whisper piece's LLM embedding, the mean over the LLM tokens that
    spell it; <|endoftext|>, and a piece of bytes the LLM never saw, -> the LLM's end-of-text token."""
    rows, unspelled = [], 0
    for piece in pieces:
        ids = [] if piece == WHISPER_END_OF_TEXT else split_into(piece, llm_vocab)
        unspelled += piece != WHISPER_END_OF_TEXT and not ids
        rows.append(llm_embeddings[ids or [llm_end_of_text]].float().mean(dim=0))
    if unspelled > len(pieces) // 2:
        raise ValueError(f"the LLM's vocabulary spells none of {unspelled} of {len(pieces)} Whisper pieces: "
                         "not a byte-level BPE vocabulary")
    return torch.stack(rows)


def llm_word_table(whisper_vocabulary: list[str], audio_vocab: int, llm_vocab: dict[str, int], llm_end_of_text: int,
                   llm_embeddings: torch.Tensor) -> torch.Tensor:
    """(audio_vocab, llm_hidden): `VocabProjection.embeddings`, the LLM's embedding of each kept Whisper word.
    Frozen and a function of the two base models only, so it can be rebuilt instead of stored."""
    ids = kept_whisper_ids(whisper_vocabulary, audio_vocab - 1)
    return llm_embeddings_of([whisper_vocabulary[i] for i in ids], llm_vocab, llm_end_of_text, llm_embeddings)


@torch.no_grad()
def load_vocab_projection(projection: VocabProjection, whisper_embedding: torch.Tensor, whisper_vocabulary: list[str],
                          llm_table: torch.Tensor) -> None:
    """Start the projection as "Whisper's next word, written as the LLM's embedding of it" (`llm_word_table`)."""
    ids = kept_whisper_ids(whisper_vocabulary, projection.logits.out_features - 1)
    projection.logits.weight.copy_(whisper_embedding[ids])
    projection.pieces = tuple(whisper_vocabulary[i] for i in ids)
    projection.embeddings.copy_(llm_table)
