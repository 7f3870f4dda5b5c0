"""Outputs of the frozen encoders, kept per clip for the whole run (`[run] cache_encoders`).

Whisper is always frozen and BEATs is unless `[model] train_beats`; both are in eval mode and the
data has no load-time augmentation, so a clip's encoder outputs are the same at every epoch.
Computing them once saves their forward pass on every later visit.

An entry is computed for its clip alone (batch of one), so its value does not depend on which
clips happened to share its first batch: a resumed run rebuilds exactly the same cache. Entries
stay on the device they were computed on, about 105 kB per second of audio (Whisper fp32 and BEATs
bf16 under `cpu_amp`): a small set like nano's fits. Opt-in, since an official-size
set (30 s of Whisper large per clip, ~8 MB) would not fit in memory.
"""
from __future__ import annotations

import torch


class FrozenEncoderCache:
    """clip key -> (Whisper last hidden state (T, d), BEATs output (T_b, width) or None)."""

    def __init__(self, cache_beats: bool = True):
        self.cache_beats = cache_beats
        self.entries: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: tuple[str, ...], speech: torch.Tensor, sounds: torch.Tensor | None) -> None:
        self.entries[key] = (speech.detach(), sounds.detach() if self.cache_beats else None)
