"""Write a LLaMA-architecture HF checkpoint, with SALMONN's LoRA merged in, as one llama.cpp GGUF file.

Weights are read one tensor at a time (train/hf_files.py: safetensors through a memory map, or
pytorch .bin through torch's mmap loader), so exporting a 13B model never holds more than a tensor
or two in RAM.
The tokenizer goes in as llama.cpp's "llama" (SentencePiece `tokenizer.model`) or "gpt2" (byte-level
BPE `tokenizer.json`) tokenizer model; `read_tokenizer` is the one place to teach another format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np

from salmonn_cli.config import LlmDims
from salmonn_cli.errors import ModelError
from train.hf_files import as_float32, open_checkpoint
from train.pre_tokenizers import pre_tokenizer_name

ARCH = "llama"
OUT_TYPES = {  # out_type -> (numpy dtype of 2-D weights, GGUF general.file_type)
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# HF name -> GGUF name; "{n}" is the layer index
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)     # transformers 4.28 saved the RoPE buffer
VOCAB_ROW_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

# SentencePiece ModelProto piece types -> GGUF token types
SENTENCEPIECE_TOKEN_TYPES = {
    1: gguf.TokenType.NORMAL, 2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL,
    4: gguf.TokenType.USER_DEFINED, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE,
}

OFFICIAL_LORA_PREFIX = "llama_model.base_model.model."
OFFICIAL_LORA_A_SUFFIX = ".lora_A.default.weight"
OFFICIAL_LORA_B_SUFFIX = ".lora_B.default.weight"
# llama.cpp LoRA adapter GGUF: tensors `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r)
ADAPTER_A_SUFFIX = ".lora_a"
ADAPTER_B_SUFFIX = ".lora_b"
ADAPTER_MERGED_SCALE_KEY = "salmonn.lora.merged_scale"    # informational; llama.cpp ignores it

ProgressCallback = Callable[[int, int], None]   # (tensors written, total tensors)


# --- LoRA ----------------------------------------------------------------------------------------

def merge_lora(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale * B @ A, in float32 (peft's forward: x W^T + scale * x A^T B^T)."""
    w = np.asarray(weight, dtype=np.float32)
    delta = np.asarray(lora_b, dtype=np.float32) @ np.asarray(lora_a, dtype=np.float32)
    if delta.shape != w.shape:
        raise ValueError(f"LoRA B @ A has shape {delta.shape}, weight has {w.shape}")
    return w + np.float32(scale) * delta


def official_lora_pairs(state_dict: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LoRA (A, B) pairs of an official SALMONN checkpoint's `ckpt['model']`, keyed by HF module name.

    `llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`
    -> `model.layers.0.self_attn.q_proj`. Values may be torch tensors or numpy arrays.
    """
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in state_dict:
        if not (key.startswith(OFFICIAL_LORA_PREFIX) and key.endswith(OFFICIAL_LORA_A_SUFFIX)):
            continue
        module = key[len(OFFICIAL_LORA_PREFIX):-len(OFFICIAL_LORA_A_SUFFIX)]
        b_key = key[:-len(OFFICIAL_LORA_A_SUFFIX)] + OFFICIAL_LORA_B_SUFFIX
        if b_key not in state_dict:
            raise ModelError(f"checkpoint has {key} but no {b_key}")
        pairs[module] = (as_float32(state_dict[key]), as_float32(state_dict[b_key]))
    return pairs


# --- rotary layout -------------------------------------------------------------------------------

def permute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's interleaved pairs.

    Per head, HF keeps the two halves of each rotary pair `head_dim/2` rows apart; llama.cpp wants
    them adjacent. This is the same reordering llama.cpp's HF converter applies (for k with the KV
    head count).
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


# --- tokenizer -----------------------------------------------------------------------------------

@dataclass
class TokenizerVocab:
    """Everything GGUF stores about a tokenizer. `model` is llama.cpp's tokenizer.ggml.model."""
    model: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None
    merges: list[str] = field(default_factory=list)     # BPE tokenizers only
    pre: str | None = None                              # BPE pre-tokenizer name
    pad_id: int | None = None


def read_tokenizer(llm_dir: str | Path) -> TokenizerVocab:
    """The tokenizer of an HF model directory: SentencePiece `tokenizer.model` if there is one,
    else a GPT-2-style byte-level BPE `tokenizer.json`."""
    llm_dir = Path(llm_dir)
    config = llm_dir / TOKENIZER_CONFIG_FILE
    c = json.loads(config.read_text()) if config.is_file() else {}
    if (llm_dir / SENTENCEPIECE_FILE).is_file():
        vocab = _read_sentencepiece(llm_dir / SENTENCEPIECE_FILE)
    elif (llm_dir / TOKENIZER_JSON_FILE).is_file():
        vocab = _read_byte_level_bpe(llm_dir / TOKENIZER_JSON_FILE, c)
    else:
        raise ModelError(f"{llm_dir} has neither {SENTENCEPIECE_FILE} nor {TOKENIZER_JSON_FILE}: "
                         "no tokenizer to export")
    vocab.add_bos = bool(c.get("add_bos_token", vocab.add_bos))
    vocab.add_eos = bool(c.get("add_eos_token", vocab.add_eos))
    return vocab


def _read_sentencepiece(path: Path) -> TokenizerVocab:
    from sentencepiece import sentencepiece_model_pb2   # needs protobuf (an onnx dependency)

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        raise ModelError(f"{path} is not a SentencePiece model") from None
    if not proto.pieces:
        raise ModelError(f"{path} is not a SentencePiece model (no pieces)")
    spec = proto.trainer_spec

    def token_id(i: int) -> int | None:
        return i if 0 <= i < len(proto.pieces) else None

    return TokenizerVocab(
        model="llama",
        tokens=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        types=[int(SENTENCEPIECE_TOKEN_TYPES.get(p.type, gguf.TokenType.NORMAL)) for p in proto.pieces],
        bos_id=token_id(spec.bos_id), eos_id=token_id(spec.eos_id), unk_id=token_id(spec.unk_id),
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def _special_token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_byte_level_bpe(path: Path, tokenizer_config: dict) -> TokenizerVocab:
    """A GPT-2-style tokenizer (byte-level BPE, no normalizer) as llama.cpp's "gpt2" model."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab, merges = dict(model["vocab"]), list(model["merges"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ModelError(f"{path} is not a tokenizers tokenizer.json") from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
        raise ModelError(f"{path} is not a GPT-2-style byte-level BPE tokenizer "
                         f"(model {model.get('type')}, normalizer {data.get('normalizer')}); it cannot be exported")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    token_types = {}
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        token_types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens = [None] * (max(vocab.values()) + 1)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    if None in tokens:
        raise ModelError(f"{path}: the vocabulary has no token with id {tokens.index(None)}")
    by_text = {text: i for i, text in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        text = _special_token_text(tokenizer_config.get(key))
        if text is not None and text not in by_text:
            raise ModelError(f"{path}: the {key} {text!r} of {TOKENIZER_CONFIG_FILE} is not in the vocabulary")
        return by_text.get(text)

    return TokenizerVocab(
        model="gpt2", tokens=tokens, scores=[],
        types=[int(token_types.get(i, gguf.TokenType.NORMAL)) for i in range(len(tokens))],
        bos_id=special_id("bos_token"), eos_id=special_id("eos_token"), unk_id=special_id("unk_token"),
        pad_id=special_id("pad_token"), add_bos=False, add_space_prefix=False,
        merges=[m if isinstance(m, str) else " ".join(m) for m in merges], pre=pre,
    )


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: TokenizerVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores:                    # BPE vocabularies have none (merge order is the rank)
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                          (vocab.unk_id, writer.add_unk_token_id), (vocab.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


# --- tensor plan ---------------------------------------------------------------------------------

@dataclass
class _TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    dtype: type


def _expected_shapes(dims: LlmDims, n_vocab_rows: int) -> dict[str, tuple[int, ...]]:
    h, kv = dims.hidden_size, dims.n_kv_heads * dims.head_dim
    shapes = {"model.embed_tokens.weight": (n_vocab_rows, h), "model.norm.weight": (h,)}
    if not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (n_vocab_rows, h)
    per_layer = {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (dims.intermediate_size, h), "mlp.up_proj.weight": (dims.intermediate_size, h),
        "mlp.down_proj.weight": (h, dims.intermediate_size),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    for n in range(dims.n_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{n}.{suffix}"] = shape
    return shapes


def _gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    _, _, n, suffix = hf_name.split(".", 3)     # model.layers.{n}.{suffix}
    return f"blk.{n}.{LAYER_TENSORS[suffix]}"


def _plan(reader, dims: LlmDims, n_vocab: int, weight_dtype) -> list[_TensorPlan]:
    names = set(reader.names())
    if dims.tie_word_embeddings:
        names.discard("lm_head.weight")     # some tied checkpoints still store the alias
    n_rows = reader.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in names else n_vocab
    if n_rows < n_vocab:
        raise ModelError(f"the tokenizer has {n_vocab} tokens but the embedding only {n_rows} rows")
    expected = _expected_shapes(dims, n_rows)
    missing = sorted(set(expected) - names)
    if missing:
        raise ModelError(f"LLM checkpoint lacks {missing[0]} (and {len(missing) - 1} more)"
                         if len(missing) > 1 else f"LLM checkpoint lacks {missing[0]}")
    unexpected = sorted(n for n in names - set(expected) if not n.endswith(SKIPPED_SUFFIXES))
    if unexpected:
        raise ModelError(f"LLM checkpoint has a tensor a LLaMA model does not: {unexpected[0]}")
    plans = []
    for hf_name, shape in expected.items():
        if reader.shape(hf_name) != shape:
            raise ModelError(f"{hf_name} has shape {reader.shape(hf_name)}, the config says {shape}")
        if hf_name in VOCAB_ROW_TENSORS:
            shape = (n_vocab, *shape[1:])     # drop rows beyond the tokenizer (Vicuna's [PAD])
        dtype = np.float32 if len(shape) == 1 else weight_dtype
        plans.append(_TensorPlan(hf_name, _gguf_name(hf_name), shape, dtype))
    return plans


def _check_lora(lora: dict[str, tuple[np.ndarray, np.ndarray]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every LoRA pair fits a weight matrix of `shapes` (HF tensor name -> shape)."""
    for module, (a, b) in lora.items():
        weight = module + ".weight"
        if weight not in shapes or len(shapes[weight]) != 2:
            raise ModelError(f"LoRA targets {module}, which is not a weight matrix of the LLM")
        if (b.shape[0], a.shape[1]) != shapes[weight] or a.shape[0] != b.shape[1]:
            raise ModelError(f"LoRA for {module} has A {a.shape} / B {b.shape}, "
                             f"which do not fit the weight {shapes[weight]}")


def _final_tensor(reader, plan: _TensorPlan, dims: LlmDims, lora, lora_scale: float) -> np.ndarray:
    w = reader.load(plan.hf_name)
    module = plan.hf_name[:-len(".weight")]
    if module in lora:
        a, b = lora[module]
        w = merge_lora(w, a, b, lora_scale)
    if plan.hf_name.endswith("self_attn.q_proj.weight"):
        w = permute_rotary_rows(w, dims.n_heads)
    elif plan.hf_name.endswith("self_attn.k_proj.weight"):
        w = permute_rotary_rows(w, dims.n_kv_heads)
    if plan.hf_name in VOCAB_ROW_TENSORS:
        w = w[:plan.shape[0]]
    return np.ascontiguousarray(w, dtype=plan.dtype)


# --- writer --------------------------------------------------------------------------------------

def write_llama_gguf(out_path: str | Path, llm_dir: str | Path, dims: LlmDims,
                     lora: dict[str, tuple[np.ndarray, np.ndarray]], lora_scale: float,
                     out_type: str = "f32", progress: ProgressCallback | None = None) -> None:
    """Write the HF LLaMA in `llm_dir`, with `lora` merged (W + lora_scale * B @ A), to `out_path`.

    `lora` maps HF module names (`model.layers.0.self_attn.q_proj`) to (A, B). 2-D weights are
    written as `out_type` ('f32' or 'f16'), 1-D norms always as f32. Writes `out_path` only.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {sorted(OUT_TYPES)}, not {out_type!r}")
    llm_dir = Path(llm_dir)
    weight_dtype, file_type = OUT_TYPES[out_type]
    vocab = read_tokenizer(llm_dir)
    reader = open_checkpoint(llm_dir)
    plans = _plan(reader, dims, len(vocab.tokens), weight_dtype)
    _check_lora(lora, {p.hf_name: p.shape for p in plans})

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_name(llm_dir.name)
    writer.add_context_length(dims.max_position_embeddings)
    writer.add_embedding_length(dims.hidden_size)
    writer.add_block_count(dims.n_layers)
    writer.add_feed_forward_length(dims.intermediate_size)
    writer.add_head_count(dims.n_heads)
    writer.add_head_count_kv(dims.n_kv_heads)
    writer.add_layer_norm_rms_eps(dims.rms_norm_eps)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_rope_dimension_count(dims.head_dim)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, vocab)
    for p in plans:
        nbytes = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(p.dtype), nbytes)

    try:
        writer.write_header_to_file(Path(out_path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plans):
            writer.write_tensor_data(_final_tensor(reader, p, dims, lora, lora_scale))
            if progress is not None:
                progress(i + 1, len(plans))
    finally:
        writer.close()


# --- LoRA adapter --------------------------------------------------------------------------------

def _layer_order(module: str) -> tuple[int, str]:
    parts = module.split(".")          # model.layers.{n}.self_attn.q_proj
    return int(parts[2]), module


def write_lora_adapter_gguf(out_path: str | Path, dims: LlmDims,
                            lora: dict[str, tuple[np.ndarray, np.ndarray]], *,
                            merged_scale: float | None = None, name: str | None = None) -> None:
    """Write `lora` as an f32 llama.cpp LoRA adapter GGUF for the model `write_llama_gguf` writes.

    `lora` maps HF module names (`model.layers.0.self_attn.q_proj`) to (A, B), as for
    `write_llama_gguf`. The file has no `adapter.lora.alpha`, so llama.cpp adds exactly
    `scale * B @ A` for the scale given at run time. B's rows of q/k projections are permuted like
    the base weights. `merged_scale` records the scale already merged into the model GGUF.
    Only per-layer weight matrices can carry a LoRA here.
    """
    if not lora:
        raise ModelError("there are no LoRA weights to write as an adapter")
    per_layer = {n: s for n, s in _expected_shapes(dims, dims.vocab_size).items()
                 if n.startswith("model.layers.")}
    _check_lora(lora, per_layer)

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if name:
        writer.add_name(name)
    if merged_scale is not None:
        writer.add_float32(ADAPTER_MERGED_SCALE_KEY, float(merged_scale))
    for module in sorted(lora, key=_layer_order):
        a, b = lora[module]
        if module.endswith("self_attn.q_proj"):
            b = permute_rotary_rows(b, dims.n_heads)
        elif module.endswith("self_attn.k_proj"):
            b = permute_rotary_rows(b, dims.n_kv_heads)
        base = _gguf_name(module + ".weight")
        writer.add_tensor(base + ADAPTER_A_SUFFIX, np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(base + ADAPTER_B_SUFFIX, np.ascontiguousarray(b, dtype=np.float32))
    try:
        writer.write_header_to_file(Path(out_path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
