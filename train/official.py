"""Official SALMONN checkpoints: build the model from the files, load them, and write the same layout.

A SALMONN checkpoint (`salmonn_v1.pth`, `salmonn_7b_v0.pth`, our own saves) holds only the trained
tensors: `{'model': state_dict, 'config': {'model': {...}}, ...}`. The frozen parts come from their
own files: an HF Whisper folder, the BEATs `.pt`, an HF LLaMA/Vicuna folder. Every shape is read
from those files; nothing here assumes a model size.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.config import (BERT_QFORMER, QFORMER_KINDS, WHISPER_DECODER_QFORMER, LoraDims, QFormerDims,
                                SalmonnConfig)
from salmonn_cli.errors import ModelError
from train.beats import load_beats
from train.ct2_whisper import is_ct2_model, read_ct2_decoder, read_ct2_vocabulary
from train.decoder_qformer import DECODER_QFORMER_LN_EPS, load_whisper_decoder
from train.hf_files import EMBED_KEY, read_byte_level_vocab, read_llm_dims, read_tensors
from train.model import LORA_ADAPTER, Salmonn, build_llama, is_trainable_name, llama_config
from train.vocab_projection import WHISPER_END_OF_TEXT, llm_word_table, load_vocab_projection
from train.whisper import load_whisper_encoder

QFORMER_HEAD_DIM = 64          # BERT convention; the head count is not visible in tensor shapes
QFORMER_PREFIX = "speech_Qformer.bert."
QUERY_TOKENS_KEY = "speech_query_tokens"
POSITION_IDS_KEY = "speech_Qformer.bert.embeddings.position_ids"
INV_FREQ_SUFFIX = "rotary_emb.inv_freq"
LLM_PREFIX = "llama_model."
# frozen BEATs aliases the official save filter keeps (spec: fixture README, "official-format quirk")
BEATS_ALIAS_RE = re.compile(r"^beats\.(encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight)$")
LAYER_INDEX_RE = re.compile(re.escape(QFORMER_PREFIX) + r"encoder\.layer\.(\d+)\.")
LORA_MODULE_RE = re.compile(r"\.(\w+)\.lora_A\.")
# peft <= 0.2 wrote `...lora_A.weight`; current peft (and 0.3, the official pin) `...lora_A.default.weight`
OLD_LORA_RE = re.compile(r"\.(lora_[AB])\.weight$")

# `ckpt['config']['model']` keys and the official defaults used when a key is absent
DEFAULT_LORA_ALPHA = 32.0
DEFAULT_LORA_DROPOUT = 0.1
# Not an official key: written by save_official_format because heads cannot be read from shapes.
QFORMER_HEADS_KEY = "qformer_heads"
# Not an official key: the template's own text holds special tokens (ChatML; salmonn_cli/prompt.py).
PROMPT_SPECIAL_TOKENS_KEY = "prompt_special_tokens"
# Not an official key: the model was trained with its windows trimmed to the clip (salmonn_cli/trim.py).
TRIM_WINDOWS_KEY = "trim_windows"
# Not an official key: audio tokens are rescaled to this RMS after the projection (SalmonnConfig).
AUDIO_TOKEN_RMS_KEY = "audio_token_rms"
# Not an official key: the hidden width of the clip token's MLP; absent or 0 = no clip token (SalmonnConfig).
CLIP_TOKEN_HIDDEN_KEY = "clip_token_hidden"
# Not an official key: the window Q-Former's kind (QFormerDims.kind); absent = the official BERT one.
QFORMER_KIND_KEY = "qformer_kind"
# Not an official key: Whisper vocabulary entries the projection reads through (SalmonnConfig.audio_vocab); absent = 0.
AUDIO_VOCAB_KEY = "audio_vocab"
# Such a projection's LLM-side table: frozen, saved in checkpoints, rebuilt by `read_llm_word_table`.
LLM_WORD_TABLE_KEY = "speech_llama_proj.embeddings"
DECODER_QFORMER_PREFIX = "speech_Qformer.blocks."
DECODER_LAYER_INDEX_RE = re.compile(re.escape(DECODER_QFORMER_PREFIX) + r"(\d+)\.")


def optional_float(value) -> float | None:
    return None if value is None else float(value)


# --- reading -------------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict with LoRA keys in the current spelling, `config['model']` dict or {})."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"SALMONN checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files surface as many exception types
        raise ModelError(f"cannot read SALMONN checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path} is not a SALMONN checkpoint (not a dict)")
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    model_cfg = {}
    if isinstance(ckpt.get("config"), dict) and isinstance(ckpt["config"].get("model"), dict):
        model_cfg = ckpt["config"]["model"]
    normalized = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(f"{path}: entry {key!r} is not a tensor")
        normalized[OLD_LORA_RE.sub(rf".\1.{LORA_ADAPTER}.weight", key)] = tensor
    return normalized, model_cfg


def checkpoint_sources(ckpt_path: Path) -> dict:
    """The base-model paths a checkpoint's config names (official `llama_path`, `whisper_path`,
    `beats_path`), resolved relative to the checkpoint's folder."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read checkpoint {ckpt_path}: {str(e).splitlines()[0]}") from None
    model_cfg = (ckpt.get("config") or {}).get("model") or {} if isinstance(ckpt, dict) else {}
    sources = {}
    for key, name in (("whisper_path", "whisper"), ("beats_path", "beats"), ("llama_path", "llm")):
        value = model_cfg.get(key)
        if not value:
            raise ModelError(f"checkpoint {ckpt_path} does not name its {key}; use --official-ckpt "
                             "with --whisper, --beats and --llm")
        path = Path(value).expanduser()
        sources[name] = path if path.is_absolute() else ckpt_path.parent / path
    return sources


def decoder_qformer_dims_from_state(state: dict[str, torch.Tensor], heads: int | None) -> QFormerDims:
    """The Whisper-decoder Q-Former's shapes (train/decoder_qformer.py); heads must be given."""
    _, n_query, hidden = state[QUERY_TOKENS_KEY].shape
    layers = {int(m.group(1)) for key in state if (m := DECODER_LAYER_INDEX_RE.match(key))}
    fc1_key = f"{DECODER_QFORMER_PREFIX}0.mlp.0.weight"
    if not layers or fc1_key not in state:
        raise ModelError(f"checkpoint has no Whisper-decoder Q-Former blocks ({fc1_key!r})")
    if heads is None or heads < 1 or hidden % heads:
        raise ModelError(f"checkpoint's {QFORMER_HEADS_KEY} ({heads}) does not split its Q-Former width {hidden}")
    return QFormerDims(kind=WHISPER_DECODER_QFORMER, hidden=hidden, n_layers=max(layers) + 1, n_heads=heads,
                       intermediate=state[fc1_key].shape[0], layer_norm_eps=DECODER_QFORMER_LN_EPS,
                       num_query_tokens=n_query)


def qformer_dims_from_state(state: dict[str, torch.Tensor], heads: int | None, kind: str = BERT_QFORMER) -> QFormerDims:
    if QUERY_TOKENS_KEY not in state:
        raise ModelError(f"checkpoint lacks {QUERY_TOKENS_KEY!r}")
    if kind == WHISPER_DECODER_QFORMER:
        return decoder_qformer_dims_from_state(state, heads)
    if kind != BERT_QFORMER:
        raise ModelError(f"checkpoint names an unknown Q-Former kind {kind!r} (known: {', '.join(QFORMER_KINDS)})")
    _, n_query, hidden = state[QUERY_TOKENS_KEY].shape
    layers = {int(m.group(1)) for key in state if (m := LAYER_INDEX_RE.match(key))}
    if not layers:
        raise ModelError(f"checkpoint has no Q-Former layers ({QFORMER_PREFIX}encoder.layer.N.*)")
    intermediate_key = f"{QFORMER_PREFIX}encoder.layer.0.intermediate_query.dense.weight"
    if intermediate_key not in state:
        raise ModelError(f"checkpoint lacks {intermediate_key!r}")
    heads = heads if heads is not None else hidden // QFORMER_HEAD_DIM
    if heads < 1 or hidden % heads:
        raise ModelError(f"Q-Former hidden size {hidden} cannot be split into {heads} heads")
    dims = QFormerDims(hidden=hidden, n_layers=max(layers) + 1, n_heads=heads,
                       intermediate=state[intermediate_key].shape[0], num_query_tokens=n_query)
    if POSITION_IDS_KEY in state:
        dims.max_position_embeddings = state[POSITION_IDS_KEY].shape[-1]
    return dims


def lora_dims_from_state(state: dict[str, torch.Tensor], model_cfg: dict) -> LoraDims:
    targets: list[str] = []
    rank = None
    for key, tensor in state.items():
        match = LORA_MODULE_RE.search(key)
        if match and key.startswith("llama_model."):
            rank = tensor.shape[0]
            if match.group(1) not in targets:
                targets.append(match.group(1))
    if rank is None:
        raise ModelError("checkpoint has no LoRA weights (llama_model...lora_A...); "
                         "checkpoints trained without LoRA are not supported")
    return LoraDims(r=rank, alpha=float(model_cfg.get("lora_alpha", DEFAULT_LORA_ALPHA)),
                    dropout=float(model_cfg.get("lora_dropout", DEFAULT_LORA_DROPOUT)), targets=tuple(targets))


def read_llm_weights(llm_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of an HF LLaMA folder, without `rotary_emb.inv_freq`."""
    arrays = read_tensors(llm_dir, select=lambda name: not name.endswith(INV_FREQ_SUFFIX))
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


# --- loading -------------------------------------------------------------------------------------

def load_official(ckpt_path: Path, whisper_dir: Path, beats_path: Path, llm_dir: Path, *,
                  qformer_heads: int | None = None, llm_weights: bool = True) -> tuple[Salmonn, SalmonnConfig]:
    """Build SALMONN from its four parts, every shape read from the files; eval mode, fp32.

    With `llm_weights=False` the frozen LLM base is left on the meta device (no memory, no file
    read beyond its shapes): enough to export the audio encoder and read the trained LoRA, which
    are real tensors. Such a model cannot run the LLM.
    """
    state, model_cfg = read_checkpoint(ckpt_path)
    whisper_dims, speech_encoder = load_whisper_encoder(whisper_dir)
    beats = load_beats(beats_path)
    llm_dims = read_llm_dims(llm_dir)
    if qformer_heads is None and model_cfg.get(QFORMER_HEADS_KEY) is not None:
        qformer_heads = int(model_cfg[QFORMER_HEADS_KEY])
    defaults = SalmonnConfig()
    config = SalmonnConfig(
        whisper=whisper_dims, beats=beats.dims,
        qformer=qformer_dims_from_state(state, qformer_heads, str(model_cfg.get(QFORMER_KIND_KEY) or BERT_QFORMER)),
        llm=llm_dims, lora=lora_dims_from_state(state, model_cfg),
        second_per_window=float(model_cfg.get("second_per_window", defaults.second_per_window)),
        second_stride=float(model_cfg.get("second_stride", defaults.second_stride)),
        prompt_template=str(model_cfg.get("prompt_template", defaults.prompt_template)),
        prompt_special_tokens=bool(model_cfg.get(PROMPT_SPECIAL_TOKENS_KEY, defaults.prompt_special_tokens)),
        trim_windows=bool(model_cfg.get(TRIM_WINDOWS_KEY, defaults.trim_windows)),
        audio_token_rms=optional_float(model_cfg.get(AUDIO_TOKEN_RMS_KEY, defaults.audio_token_rms)),
        clip_token_hidden=int(model_cfg.get(CLIP_TOKEN_HIDDEN_KEY) or defaults.clip_token_hidden),
        audio_vocab=int(model_cfg.get(AUDIO_VOCAB_KEY) or defaults.audio_vocab),
    )
    n_query = model_cfg.get("num_speech_query_token")
    if n_query is not None and int(n_query) != config.qformer.num_query_tokens:
        raise ModelError(f"{ckpt_path}: config says {n_query} query tokens, "
                         f"{QUERY_TOKENS_KEY} holds {config.qformer.num_query_tokens}")
    if llm_weights:
        llm = build_llama(llm_dims, read_llm_weights(llm_dir))
    else:
        with torch.device("meta"):
            llm = LlamaForCausalLM(llama_config(llm_dims))
    model = Salmonn(config, speech_encoder=speech_encoder, beats=beats, llm=llm)
    apply_checkpoint_state(model, state, source=str(ckpt_path))
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_meta and (is_trainable_name(name) or not name.startswith(LLM_PREFIX))]
    if left_on_meta:
        raise RuntimeError(f"tensors left on the meta device: {left_on_meta[:3]}")
    return model.float().eval(), config


def load_checkpoint_into(model: Salmonn, path: Path) -> None:
    """Load an official-layout checkpoint (official or ours) into an existing model."""
    state, _ = read_checkpoint(path)
    apply_checkpoint_state(model, state, source=str(path))


def apply_checkpoint_state(model: Salmonn, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict on the trained tensors: an unexpected key, a missing trainable key or a shape mismatch
    raises ModelError naming it. `rotary_emb.inv_freq` is ignored; the BEATs rel-pos aliases must
    equal the loaded BEATs table (they are frozen copies of it)."""
    trainable = model.trainable_state_dict()
    beats_state = model.beats.state_dict()
    to_load = {}
    for key, tensor in state.items():
        if key.endswith(INV_FREQ_SUFFIX):
            continue
        alias = BEATS_ALIAS_RE.match(key)
        if alias:
            table = beats_state.get(alias.group(1))
            if table is None:
                raise ModelError(f"{source}: unexpected key {key!r} (BEATs has no such layer)")
            if tuple(tensor.shape) != tuple(table.shape) or not torch.equal(tensor.to(table.dtype), table):
                raise ModelError(f"{source}: {key!r} differs from the BEATs checkpoint's table; "
                                 "the BEATs file does not belong to this SALMONN checkpoint")
            continue
        if key not in trainable and key != POSITION_IDS_KEY:
            raise ModelError(f"{source}: unexpected key {key!r}")
        target = _target(model, trainable, key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        to_load[key] = tensor
    missing = [key for key in trainable if key not in to_load]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{source}: missing trained tensor {missing[0]!r}{more}")
    # Tensors of a model built on the meta device (the LoRA of a weightless LLM) cannot be copied
    # into; they are adopted instead, in the model's dtype.
    on_meta = {key for key in to_load if _target(model, trainable, key).is_meta}
    adopted = {key: to_load.pop(key).to(_target(model, trainable, key).dtype) for key in on_meta}
    with torch.no_grad():
        for tensors, assign in ((to_load, False), (adopted, True)):
            result = model.load_state_dict(tensors, strict=False, assign=assign)
            assert not result.unexpected_keys, result.unexpected_keys


def _target(model: Salmonn, trainable: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return trainable[key] if key in trainable else model.get_buffer(key)


# --- writing -------------------------------------------------------------------------------------

def official_model_config(config: SalmonnConfig) -> dict:
    """The `ckpt['config']['model']` entries that describe the trained tensors."""
    kind = {} if config.qformer.kind == BERT_QFORMER else {QFORMER_KIND_KEY: config.qformer.kind}
    return {**kind,
        "num_speech_query_token": config.qformer.num_query_tokens,
        "second_per_window": config.second_per_window,
        "second_stride": config.second_stride,
        "window_level_Qformer": True,
        "lora": True,
        "lora_rank": config.lora.r,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "prompt_template": config.prompt_template,
        PROMPT_SPECIAL_TOKENS_KEY: config.prompt_special_tokens,
        TRIM_WINDOWS_KEY: config.trim_windows,
        AUDIO_TOKEN_RMS_KEY: config.audio_token_rms,
        CLIP_TOKEN_HIDDEN_KEY: config.clip_token_hidden,
        **({AUDIO_VOCAB_KEY: config.audio_vocab} if config.audio_vocab else {}),
        QFORMER_HEADS_KEY: config.qformer.n_heads,
    }


def atomic_save(obj, path: Path) -> None:
    """torch.save into `path` atomically (atomic_file): a crash leaves the old checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out:
        torch.save(obj, out)


def save_official_format(model: Salmonn, path: Path) -> None:
    """Write `{'model': trained tensors (official names), 'config': {'model': ...}}`."""
    state = {key: tensor.detach().cpu().clone() for key, tensor in model.trainable_state_dict().items()}
    torch.save({"model": state, "config": {"model": official_model_config(model.config)}}, Path(path))


# --- a fresh model for training --------------------------------------------------------------------

def build_from_parts(whisper_dir: Path, beats_path: Path, llm_dir: Path, *, qformer: QFormerDims,
                     lora: LoraDims, second_per_window: float | None = None,
                     second_stride: float | None = None,
                     prompt_template: str | None = None, prompt_special_tokens: bool = False,
                     trim_windows: bool = False,
                     normalize_audio_tokens: bool = False,
                     clip_token_hidden: int = 0, audio_vocab: int = 0) -> tuple[Salmonn, SalmonnConfig]:
    """SALMONN from its three frozen parts (shapes read from the files) with freshly initialised
    trainable parts of the given shapes: what stage-1 training starts from. fp32, eval mode.

    `normalize_audio_tokens` sets `config.audio_token_rms` to the RMS of the LLM's input embeddings.
    A `qformer` of kind "whisper_decoder" takes its shapes and first weights from the Whisper model's
    decoder (train/decoder_qformer.py; a CTranslate2 Whisper). `audio_vocab` > 0 (that Q-Former only) projects
    through that many entries of Whisper's vocabulary into the LLM's embeddings of their text
    (train/vocab_projection.py; the LLM folder's tokenizer.json must be a byte-level BPE)."""
    decoder = None
    if qformer.kind == WHISPER_DECODER_QFORMER:
        if not is_ct2_model(whisper_dir):
            raise ModelError(f"a Whisper-decoder Q-Former is read from a CTranslate2 Whisper (model.bin); "
                             f"{whisper_dir} is not one")
        decoder = read_ct2_decoder(whisper_dir)
        qformer = decoder.qformer_dims()
    elif audio_vocab:
        raise ModelError("audio_vocab needs the Whisper-decoder Q-Former (its window tokens are Whisper's next-word states)")
    whisper_dims, speech_encoder = load_whisper_encoder(whisper_dir)
    beats = load_beats(beats_path)
    llm_dims = read_llm_dims(llm_dir)
    defaults = SalmonnConfig()
    config = SalmonnConfig(
        whisper=whisper_dims, beats=beats.dims, qformer=qformer, llm=llm_dims, lora=lora,
        second_per_window=defaults.second_per_window if second_per_window is None else float(second_per_window),
        second_stride=defaults.second_stride if second_stride is None else float(second_stride),
        prompt_template=defaults.prompt_template if prompt_template is None else prompt_template,
        prompt_special_tokens=prompt_special_tokens,
        trim_windows=trim_windows,
        clip_token_hidden=clip_token_hidden,
        audio_vocab=audio_vocab,
    )
    llm = build_llama(llm_dims, read_llm_weights(llm_dir))
    if normalize_audio_tokens:
        embeddings = llm.get_input_embeddings().weight.detach().float()
        config.audio_token_rms = round(float(embeddings.pow(2).mean().sqrt()), 6)
    model = Salmonn(config, speech_encoder=speech_encoder, beats=beats, llm=llm)
    if decoder is not None:
        load_whisper_decoder(model.speech_Qformer, model.speech_query_tokens, model.ln_speech, decoder)
    if audio_vocab:
        table = read_llm_word_table(decoder.vocabulary, audio_vocab, llm_dir, llm.get_input_embeddings().weight.detach())
        load_vocab_projection(model.speech_llama_proj, decoder.token_embedding, list(decoder.vocabulary), table)
    return model.float().eval(), config


def rebuild_llm_word_table(whisper_dir: Path, llm_dir: Path, audio_vocab: int) -> torch.Tensor:
    """`read_llm_word_table` from the two base model folders: what packaging checks and leaves out and the
    default model's build makes again (Whisper's vocabulary.txt and the LLM's embedding are all it reads)."""
    return read_llm_word_table(read_ct2_vocabulary(whisper_dir), audio_vocab, llm_dir)


def read_llm_word_table(whisper_vocabulary, audio_vocab: int, llm_dir: Path,
                        llm_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen LLM-side table of an `audio_vocab` projection (`LLM_WORD_TABLE_KEY`), from Whisper's
    vocabulary and the LLM folder (its embedding read from the folder unless given)."""
    llm_vocab = read_byte_level_vocab(llm_dir)
    end_of_text = llm_vocab.get(WHISPER_END_OF_TEXT, read_llm_dims(llm_dir).eos_token_id)
    if llm_embeddings is None:
        llm_embeddings = torch.from_numpy(read_tensors(llm_dir, select=lambda name: name == EMBED_KEY)[EMBED_KEY])
    try:
        return llm_word_table(list(whisper_vocabulary), audio_vocab, llm_vocab, end_of_text, llm_embeddings)
    except ValueError as exc:
        raise ModelError(f"audio_vocab: {exc}") from None
