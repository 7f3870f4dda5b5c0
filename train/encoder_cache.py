"""Outputs of the frozen encoders, kept per clip for the whole run (`[run] cache_encoders`), and on
disk for later runs too (`[run] encoder_cache_dir`).

Whisper is always frozen and BEATs is unless `[model] train_beats`; both are in eval mode and the
data has no load-time augmentation, so a clip's encoder outputs are the same at every epoch.
Computing them once saves their forward pass on every later visit.

An entry is computed for its clip alone (batch of one), so its value does not depend on which
clips happened to share its first batch: a resumed run rebuilds exactly the same cache. Entries
stay on the device they were computed on, about 105 kB per second of audio (Whisper fp32 and BEATs
bf16 under `cpu_amp`): a small set like nano's fits. Opt-in, since an official-size
set (30 s of Whisper large per clip, ~8 MB) would not fit in memory.

On disk an entry is one file named by a digest of what decides its value: the encoders' weight
files, the window geometry that decides how many Whisper frames are computed, the autocast type,
and each audio file of the clip by path, size and modification time. A changed data set, encoder
or geometry therefore misses instead of reading stale outputs; nothing is ever overwritten in place
(each file is written under a temporary name and renamed), so concurrent processes can share it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from salmonn_cli.atomic_file import atomic_file

ENTRY_SUFFIX = ".pt"


def file_stamp(path: str | os.PathLike) -> str:
    """Path, size and modification time: changes whenever the file is rewritten."""
    st = os.stat(path)
    return f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


def tree_stamp(path: str | os.PathLike) -> str:
    """`file_stamp` of a file, or of every file under a folder (an HF or CTranslate2 model folder)."""
    path = Path(path)
    if path.is_file():
        return file_stamp(path)
    return "\n".join(file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file())


def encoder_identity(whisper_path: str, beats_path: str, geometry: dict, autocast: str) -> str:
    """What, besides the audio, decides a clip's frozen-encoder outputs."""
    parts = [tree_stamp(whisper_path), tree_stamp(beats_path),
             repr(sorted(geometry.items())), autocast, torch.__version__]
    return hashlib.sha256("\n\n".join(parts).encode()).hexdigest()


class FrozenEncoderCache:
    """clip key -> (Whisper last hidden state (T, d), BEATs output (T_b, width) or None).

    `directory`: also read entries from and write them to this folder; `identity` (`encoder_identity`)
    must then say what produced them."""

    def __init__(self, cache_beats: bool = True, directory: str | os.PathLike | None = None,
                 identity: str = "", device: torch.device | str = "cpu"):
        self.cache_beats = cache_beats
        self.device = torch.device(device)
        self.directory = Path(directory) if directory else None
        if self.directory is not None:
            if not identity:
                raise ValueError("an on-disk encoder cache needs the encoders' identity")
            self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.entries: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def entry_path(self, key: tuple[str, ...]) -> Path:
        digest = hashlib.sha256("\n".join([self.identity, str(self.cache_beats),
                                           *(file_stamp(p) for p in key)]).encode()).hexdigest()
        return self.directory / f"{digest[:40]}{ENTRY_SUFFIX}"

    def get(self, key: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        entry = self.entries.get(key)
        if entry is None and self.directory is not None:
            entry = self._read(self.entry_path(key), self.device)
            if entry is not None:
                self.entries[key] = entry
                self.disk_hits += 1
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: tuple[str, ...], speech: torch.Tensor, sounds: torch.Tensor | None) -> None:
        entry = (speech.detach(), sounds.detach() if self.cache_beats else None)
        self.entries[key] = entry
        if self.directory is not None:
            with atomic_file(self.entry_path(key)) as f:
                torch.save({"speech": entry[0].cpu(), "sounds": None if entry[1] is None else entry[1].cpu()}, f)

    @staticmethod
    def _read(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not path.is_file():
            return None
        saved = torch.load(path, map_location=device, weights_only=True)
        return saved["speech"], saved["sounds"]
