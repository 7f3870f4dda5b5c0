"""Whisper encoder: the stock transformers `WhisperEncoder`, built from `WhisperDims` and loaded from disk.

`load_whisper_encoder(path)` picks a reader by what `path` holds; each reader returns the dims and
the encoder's state dict in HF names, so another format (e.g. CTranslate2 `model.bin`) only needs a
new reader in `WHISPER_READERS`. Also home of `read_hf_weights`, the reader of HF weight folders
(safetensors or torch `.bin`, single file or sharded) that the LLM loader uses too.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from salmonn_cli.config import WhisperDims
from salmonn_cli.errors import ModelError

HF_CONFIG = "config.json"
# Single-file and sharded weight layouts of `save_pretrained`, in order of preference.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN_FILE = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# `WhisperModel` saves the encoder as `encoder.*`, `WhisperForConditionalGeneration` as `model.encoder.*`.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")


# --- HF weight folders ---------------------------------------------------------------------------

def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF model folder (one file, or the shards an index names)."""
    hf_dir = Path(hf_dir)
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (TORCH_BIN_FILE, TORCH_BIN_INDEX)):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
        if (hf_dir / index).is_file():
            try:
                weight_map = json.loads((hf_dir / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"cannot read {hf_dir / index}: {exc}") from exc
            files = [hf_dir / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"weight shard listed in {index} is missing: {missing[0]}")
            return files
    raise ModelError(f"no {SAFETENSORS_FILE}, {TORCH_BIN_FILE} or sharded index in {hf_dir}")


def read_hf_weights(hf_dir: Path, select: Callable[[str], bool] = lambda name: True,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors of an HF model folder whose name passes `select`; floating tensors cast to `dtype`."""
    weights: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(hf_dir):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if select(name):
                            weights[name] = _cast(f.get_tensor(name), dtype)
            else:
                shard = torch.load(path, map_location="cpu", weights_only=True)
                for name in list(shard):
                    tensor = shard.pop(name)
                    if select(name):
                        weights[name] = _cast(tensor, dtype)
        except ModelError:
            raise
        except Exception as exc:  # corrupt or foreign files surface as many different exception types
            raise ModelError(f"cannot read weights from {path}: {exc}") from exc
    return weights


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


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
    weights = read_hf_weights(hf_dir, select=lambda name: name.startswith(ENCODER_PREFIXES))
    state = {}
    for name, tensor in weights.items():
        prefix = next(p for p in ENCODER_PREFIXES if name.startswith(p))
        state[name[len(prefix):]] = tensor
    return dims, state


def is_hf_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


# (predicate on the path, reader) pairs, tried in order
WHISPER_READERS: list[tuple[Callable[[Path], bool], Callable[[Path], tuple[WhisperDims, dict]]]] = [
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
        raise ModelError(f"not a Whisper model folder (no {HF_CONFIG}): {path}")
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
