"""Reading HF model folders (`save_pretrained` layouts) without loading them whole.

`open_checkpoint` gives a reader over a folder's weights that reads one tensor at a time:
safetensors through a memory map (any float dtype, BF16 included, comes out as float32 numpy),
or pytorch `.bin` files through torch's mmap loader. torch is imported only for `.bin` files, so
the GGUF export of a safetensors LLM needs none. `read_llm_dims` reads a LLaMA folder's shape.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from salmonn_cli.config import LlmDims
from salmonn_cli.errors import ModelError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_BIN_GLOB = "pytorch_model*.bin"
# safetensors dtype -> numpy dtype it is stored as; BF16 is widened to float32 on load
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
SAFETENSORS_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
DEFAULT_ROPE_THETA = 10000.0


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def as_float32(tensor) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 too) or array-like as a float32 numpy array."""
    if hasattr(tensor, "detach"):     # numpy has no bfloat16, so upcast in torch
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, dtype=np.float32)


# --- weight readers ------------------------------------------------------------------------------

class SafetensorsShards:
    """safetensors files read through a memory map; floats come out as float32, integers as they are."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[np.memmap, dict, Path]] = {}
        for path in files:
            with open(path, "rb") as f:
                try:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
                except (struct.error, ValueError, OverflowError, MemoryError):
                    raise ModelError(f"{path} is not a valid safetensors file") from None
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (data, info, path)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def load(self, name: str) -> np.ndarray:
        data, info, path = self._where[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise ModelError(f"{path} is truncated (tensor {name} ends past the end of the file)")
        raw = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":     # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if info["dtype"] in SAFETENSORS_FLOAT_DTYPES:
            return raw.astype(np.float32)
        return raw.copy()


class TorchBinShards:
    """pytorch_model*.bin files, memory-mapped by torch where the file format allows it."""

    def __init__(self, files: list[Path]):
        import torch

        self._tensors = {}
        for path in files:
            try:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    # pre-1.6 (non-zip) files cannot be memory-mapped
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # corrupt or foreign files surface as many exception types
                raise ModelError(f"cannot read {path}: {exc}".splitlines()[0]) from None
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.is_floating_point():
            return as_float32(tensor)
        return tensor.numpy().copy()


def open_checkpoint(hf_dir: str | Path) -> SafetensorsShards | TorchBinShards:
    """A reader over the weights of an HF model folder (safetensors preferred over .bin)."""
    hf_dir = Path(hf_dir)
    for index_name, reader in ((SAFETENSORS_INDEX, SafetensorsShards), (TORCH_BIN_INDEX, TorchBinShards)):
        index = hf_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(read_json(index)["weight_map"].values()))
            except (KeyError, AttributeError, TypeError):
                raise ModelError(f"{index} has no weight_map") from None
            missing = [s for s in shards if not (hf_dir / s).is_file()]
            if missing:
                raise ModelError(f"{hf_dir}: shard {missing[0]} named in {index_name} is missing")
            return reader([hf_dir / s for s in shards])
    if (hf_dir / SAFETENSORS_FILE).is_file():
        return SafetensorsShards([hf_dir / SAFETENSORS_FILE])
    safetensors = sorted(hf_dir.glob("*.safetensors"))
    if safetensors:
        return SafetensorsShards(safetensors)
    bins = sorted(hf_dir.glob(TORCH_BIN_GLOB))
    if bins:
        return TorchBinShards(bins)
    raise ModelError(f"{hf_dir} has no *.safetensors or {TORCH_BIN_GLOB} weights")


def read_tensors(hf_dir: str | Path, select: Callable[[str], bool] = lambda name: True) -> dict[str, np.ndarray]:
    """The tensors of an HF model folder whose name passes `select` (floats as float32)."""
    reader = open_checkpoint(hf_dir)
    return {name: reader.load(name) for name in reader.names() if select(name)}


# --- LLaMA config --------------------------------------------------------------------------------

def read_llm_dims(llm_dir: str | Path) -> LlmDims:
    """LlmDims of an HF LLaMA folder, without loading a weight.

    The vocabulary size is the embedding's row count (32000 as shipped, 32001 when saved after
    the official [PAD] resize), read from the weight file's header. bos/eos come from
    generation_config.json when present (it is what generation uses), else config.json.
    """
    llm_dir = Path(llm_dir)
    path = llm_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{llm_dir} has no {CONFIG_FILE}")
    c = read_json(path)
    generation = llm_dir / GENERATION_CONFIG_FILE
    generation = read_json(generation) if generation.is_file() else {}
    if c.get("model_type", "llama") != "llama":
        raise ModelError(f"{path}: model_type {c.get('model_type')!r} is not a LLaMA model")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}   # transformers 5 / 4 names
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{path}: RoPE scaling {rope_type!r} is not supported")
    try:
        n_heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        if int(c.get("head_dim") or hidden // n_heads) != hidden // n_heads:
            raise ModelError(f"{path}: head_dim {c['head_dim']} != hidden_size / num_attention_heads "
                             f"({hidden // n_heads}) is not supported")
        dims = LlmDims(
            hidden_size=hidden, n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            intermediate_size=int(c["intermediate_size"]), vocab_size=_vocab_rows(llm_dir),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta") or rope.get("rope_theta", DEFAULT_ROPE_THETA)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=_token_id(generation.get("bos_token_id", c.get("bos_token_id", 1))),
            eos_token_id=_token_id(generation.get("eos_token_id", c.get("eos_token_id", 2))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot read the LLM config {path}: {exc!r}") from None
    return dims


def _vocab_rows(llm_dir: Path) -> int:
    reader = open_checkpoint(llm_dir)
    names = set(reader.names())
    if EMBED_KEY not in names:
        raise ModelError(f"LLM weights in {llm_dir} lack {EMBED_KEY!r}")
    rows = reader.shape(EMBED_KEY)[0]
    if LM_HEAD_KEY in names and reader.shape(LM_HEAD_KEY)[0] != rows:
        raise ModelError(f"LLM {LM_HEAD_KEY} has {reader.shape(LM_HEAD_KEY)[0]} rows but the embedding {rows}")
    return rows


def _token_id(value) -> int:
    """generation_config may list several eos ids; the first is the canonical one."""
    return int(value[0] if isinstance(value, list) else value)


TOKENIZER_FILE = "tokenizer.json"


def read_byte_level_vocab(llm_dir: str | Path) -> dict[str, int]:
    """A folder's tokenizer.json vocabulary (token spelling -> id) with its added tokens: a byte-level BPE's
    spellings use GPT-2's byte alphabet, as Whisper's do."""
    data = read_json(Path(llm_dir) / TOKENIZER_FILE)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(f"{Path(llm_dir) / TOKENIZER_FILE} is not a byte-level BPE tokenizer")
    vocab = {str(token): int(i) for token, i in model["vocab"].items()}
    vocab.update({str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or [] if "content" in t})
    return vocab
