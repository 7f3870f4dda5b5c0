"""Whisper encoder: the stock transformers `WhisperEncoder`, built from `WhisperDims` and loaded from disk.

`load_whisper_encoder(path)` picks a reader by what `path` holds (an HF folder, read by
train/hf_files.py, or a CTranslate2 folder / `model.bin`, read by train/ct2_whisper.py); each reader
returns the dims and the encoder's state dict in HF names, so another format only needs a new
reader in `WHISPER_READERS`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from salmonn_cli.config import WhisperDims
from salmonn_cli.errors import ModelError
from train.ct2_whisper import is_ct2_model, read_ct2_whisper
from train.hf_files import read_json, read_tensors

HF_CONFIG = "config.json"
# `WhisperModel` saves the encoder as `encoder.*`, `WhisperForConditionalGeneration` as `model.encoder.*`.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")


# --- the encoder ---------------------------------------------------------------------------------

def build_whisper_encoder(dims: WhisperDims) -> WhisperEncoder:
    """A randomly initialised HF Whisper encoder of the given shape (dropouts 0, eval mode)."""
    config = WhisperConfig(
        num_mel_bins=dims.n_mels, d_model=dims.d_model,
        encoder_layers=dims.n_layers, encoder_attention_heads=dims.n_heads, encoder_ffn_dim=dims.ffn_dim,
        max_source_positions=dims.max_source_positions,
        # the decoder is never built; keep its config small and consistent
        decoder_layers=1, decoder_attention_heads=dims.n_heads, decoder_ffn_dim=dims.ffn_dim,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
    )
    return WhisperEncoder(config).eval()


def whisper_dims_from_hf_config(config: dict) -> WhisperDims:
    try:
        return WhisperDims(
            n_mels=int(config["num_mel_bins"]), d_model=int(config["d_model"]),
            n_layers=int(config["encoder_layers"]), n_heads=int(config["encoder_attention_heads"]),
            ffn_dim=int(config["encoder_ffn_dim"]),
            max_source_positions=int(config["max_source_positions"]),
        )
    except KeyError as exc:
        raise ModelError(f"Whisper config.json lacks {exc.args[0]!r}") from exc


def read_hf_whisper(hf_dir: Path) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    """HF Whisper folder -> (dims, encoder state dict without the `encoder.` prefix)."""
    dims = whisper_dims_from_hf_config(read_json(Path(hf_dir) / HF_CONFIG))
    weights = read_tensors(hf_dir, select=lambda name: name.startswith(ENCODER_PREFIXES))
    state = {}
    for name, array in weights.items():
        prefix = next(p for p in ENCODER_PREFIXES if name.startswith(p))
        state[name[len(prefix):]] = torch.from_numpy(array)
    return dims, state


def is_hf_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


# (predicate on the path, reader) pairs, tried in order; a CTranslate2 folder also holds a
# config.json (not HF's), so its reader comes first
WHISPER_READERS: list[tuple[Callable[[Path], bool], Callable[[Path], tuple[WhisperDims, dict]]]] = [
    (is_ct2_model, read_ct2_whisper),
    (is_hf_dir, read_hf_whisper),
]


def load_whisper_encoder(path: Path) -> tuple[WhisperDims, WhisperEncoder]:
    """Load a Whisper encoder (strict on the encoder's keys), fp32, eval mode."""
    path = Path(path)
    for accepts, reader in WHISPER_READERS:
        if accepts(path):
            dims, state = reader(path)
            break
    else:
        raise ModelError(f"not a Whisper model (an HF folder with {HF_CONFIG}, or a CTranslate2 "
                         f"folder or model.bin): {path}")
    encoder = build_whisper_encoder(dims)
    expected = set(encoder.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing encoder weight {missing[0]!r}" if missing else f"unexpected encoder weight {unexpected[0]!r}"
        raise ModelError(f"Whisper weights in {path} do not fit the encoder: {what}")
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"Whisper weights in {path} do not fit the encoder: {exc}") from exc
    return dims, encoder.eval()
