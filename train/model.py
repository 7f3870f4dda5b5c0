"""The SALMONN model in PyTorch: Whisper + BEATs, fused frame by frame, window Q-Former, LoRA LLaMA.

Submodule names match the official checkpoint (`speech_encoder`, `beats`, `ln_speech`, `ln_audio`,
`speech_Qformer`, `speech_query_tokens`, `speech_llama_proj`, `llama_model`), so the official
state-dict keys address this model directly.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from salmonn_cli.config import WHISPER_DECODER_QFORMER, LlmDims, LoraDims, SalmonnConfig
from salmonn_cli.errors import ModelError
from salmonn_cli.trim import mel_frame_count
from train.beats import BEATs
from train.decoder_qformer import WhisperDecoderQFormer
from train.qformer import QFormer
from train.vocab_projection import VocabProjection
from train.whisper import build_whisper_encoder

LORA_ADAPTER = "default"       # peft's adapter name; appears in the official key names
# Parameters the official code trains (and its checkpoints store), by name.
TRAINABLE_PREFIXES = ("speech_Qformer.", "speech_query_tokens", "speech_llama_proj.", "ln_speech.", "ln_audio.",
                      "clip_token_head.")     # the last only with `config.clip_token_hidden` (not official)
# What makes the window tokens (Salmonn.in_window_path)
WINDOW_PATH_PREFIXES = ("ln_speech.", "ln_audio.", "speech_Qformer.", "speech_query_tokens", "speech_llama_proj.")
LORA_NAME_PARTS = (".lora_A.", ".lora_B.")
LN_SPEECH_EPS = 1e-5           # nn.LayerNorm default, as in the official code (both LNs)
QUERY_TOKEN_INIT_STD = 0.02
AUDIO_TOKEN_RMS_EPS = 1e-6     # inside the square root of `audio_token_rms` scaling


# --- LLM -----------------------------------------------------------------------------------------

def llama_config(dims: LlmDims) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.n_layers, num_attention_heads=dims.n_heads, num_key_value_heads=dims.n_kv_heads,
        max_position_embeddings=dims.max_position_embeddings, rms_norm_eps=dims.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta},
        tie_word_embeddings=dims.tie_word_embeddings,
        bos_token_id=dims.bos_token_id, eos_token_id=dims.eos_token_id, pad_token_id=None,
    )


def build_llama(dims: LlmDims, weights: dict[str, torch.Tensor] | None = None) -> LlamaForCausalLM:
    """A LlamaForCausalLM of shape `dims`: random init, or exactly `weights` (HF names, strict).

    With weights the model is built on the meta device and the tensors are adopted as they are, so
    a 13B model is never initialised randomly nor held twice in memory.
    """
    config = llama_config(dims)
    if weights is None:
        return LlamaForCausalLM(config).eval()
    weights = dict(weights)
    if dims.tie_word_embeddings and "model.embed_tokens.weight" in weights:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    expected = llm.state_dict()
    for name in expected:
        if name not in weights:
            raise ModelError(f"LLM weights lack {name!r}")
    for name, tensor in weights.items():
        if name not in expected:
            raise ModelError(f"unexpected LLM weight {name!r}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(f"LLM weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(expected[name].shape)}")
    llm.load_state_dict(weights, strict=True, assign=True)
    # non-persistent buffers (RoPE inverse frequencies) were created on the meta device
    llm.model.rotary_emb = LlamaRotaryEmbedding(config)
    if dims.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    left_on_meta = [name for name, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"LLM tensors left uninitialised: {left_on_meta}")
    return llm.eval()


def wrap_lora(llm: LlamaForCausalLM, lora: LoraDims) -> nn.Module:
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(llm, config, adapter_name=LORA_ADAPTER)


# --- audio path ----------------------------------------------------------------------------------

def pad_time(x: torch.Tensor, frames) -> torch.Tensor:
    """Zero-pad (B, T, C) at the end of the time axis to `frames`."""
    return F.pad(x, (0, 0, 0, frames - x.shape[1]))


def whisper_states(encoder: WhisperEncoder, mel: torch.Tensor) -> torch.Tensor:
    """HF `WhisperEncoder.forward` for a log-mel of any even length up to the full one.

    HF insists on exactly the full length (its position table is added whole); here the table is
    cut to the frames present. Same modules, same order: the full length gives HF's output.
    """
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[:x.shape[1]]
    for layer in encoder.layers:
        x = layer(x, None)
    return encoder.layer_norm(x)


def window_starts(frames, kernel: int, stride: int, device=None) -> torch.Tensor:
    """First frame of each window over `frames` frames: L = (frames - kernel) // stride + 1 of them;
    trailing frames are dropped."""
    return torch.arange((frames - kernel) // stride + 1, device=device) * stride


def window_index(starts: torch.Tensor, kernel: int) -> torch.Tensor:
    """(L,) window starts -> (L, kernel) frame indices: `x[:, index]` cuts (B, T, C) into (B, L, kernel, C)."""
    return starts.unsqueeze(1) + torch.arange(kernel, device=starts.device).unsqueeze(0)


def scale_to_rms(tokens: torch.Tensor, rms: float | None) -> torch.Tensor:
    """Each token (last axis) rescaled to root-mean-square `rms`; unchanged for None."""
    if rms is None:
        return tokens
    return tokens * (rms * torch.rsqrt(tokens.pow(2).mean(dim=-1, keepdim=True) + AUDIO_TOKEN_RMS_EPS))


def project_audio_tokens(projection: nn.Linear, queries: torch.Tensor, rms: float | None) -> torch.Tensor:
    """`speech_llama_proj`, then (with `config.audio_token_rms`) each token scaled to that RMS."""
    return scale_to_rms(projection(queries), rms)


def mel_frames(mel: torch.Tensor, columns_per_frame: int, frames) -> torch.Tensor:
    """Log-mel (B, n_mels, M) -> (B, frames, columns_per_frame * n_mels): the columns under each fused
    frame side by side, zero-padded at the end to `frames` (>= M / columns_per_frame)."""
    b, n_mels, columns = mel.shape
    grouped = mel.transpose(1, 2).reshape(b, columns // columns_per_frame, columns_per_frame * n_mels)
    return pad_time(grouped, frames)


class ClipTokenHead(nn.Module):
    """Frames (B, T, C) -> one LLM-space token per clip (B, llm_hidden) (`config.clip_token_hidden`);
    a frame is a fused frame and the log-mel columns under it (`clip_token_input_width`).

    Each frame goes through a GELU layer; a learned score per frame weights them (softmax over the
    clip's frames); the weighted mean is projected to the LLM width. A window token sees 0.17-0.33 s
    and, trained to carry the words, drops a quiet sound behind them; this token sees the whole clip.
    The log-mel is there because Whisper's last layer keeps less of a sound behind speech than its
    input has (train/nano/README.md).
    """

    def __init__(self, input_width: int, hidden: int, llm_hidden: int):
        super().__init__()
        self.score = nn.Linear(input_width, 1)
        self.frame = nn.Linear(input_width, hidden)
        self.out = nn.Linear(hidden, llm_hidden)

    def forward(self, frames: torch.Tensor, n_frames: list[int] | None = None) -> torch.Tensor:
        """`n_frames`: each clip's own frames when a batch is zero-padded at the end (None: all of them)."""
        scores = self.score(frames)
        if n_frames is not None:
            valid = torch.arange(frames.shape[1], device=frames.device)[None, :] < torch.tensor(n_frames, device=frames.device)[:, None]
            scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        return self.out((scores.softmax(dim=1) * F.gelu(self.frame(frames))).sum(dim=1))


def clip_token_input_width(config: SalmonnConfig) -> int:
    return config.fused_width + config.mel_columns_per_frame * config.whisper.n_mels


class AudioEncoder(nn.Module):
    """(mel, fbank) -> LLM-space audio embeddings, holding the very submodules of a `Salmonn`.

    `forward` takes batch 1 and returns (n_audio_tokens, llm_hidden): the export signature.
    With `config.trim_windows` the mel is already cut to the clip (salmonn_cli/trim.py): Whisper
    runs on it whole and the BEATs stream is padded or cut to its length.
    """

    def __init__(self, model: "Salmonn"):
        super().__init__()
        self.speech_encoder = model.speech_encoder
        self.beats = model.beats
        self.ln_speech = model.ln_speech
        self.ln_audio = model.ln_audio
        self.speech_Qformer = model.speech_Qformer
        self.speech_query_tokens = model.speech_query_tokens
        self.speech_llama_proj = model.speech_llama_proj
        self.window_frames = model.config.window_frames
        self.stride_frames = model.config.stride_frames
        self.clip_token_head = model.clip_token_head
        self.mel_columns_per_frame = model.config.mel_columns_per_frame
        self.trim_windows = model.config.trim_windows
        self.audio_token_rms = model.config.audio_token_rms

    def whisper(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, M) -> Whisper's last hidden state (B, M / 2, whisper_d)."""
        if self.trim_windows:
            return whisper_states(self.speech_encoder, mel)
        return self.speech_encoder(mel).last_hidden_state

    def join(self, speech: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Normalised streams (B, T, whisper_d), (B, T_b, beats_width) -> (B, T', fused_width)."""
        if self.trim_windows:
            # the windows are sized to Whisper's frames; BEATs (fewer frames) is padded to them
            frames = speech.shape[1]
            audio = audio[:, :frames]
        else:
            frames = torch.sym_max(speech.shape[1], audio.shape[1])
            speech = pad_time(speech, frames)
        return torch.cat([speech, pad_time(audio, frames)], dim=-1)

    def fuse(self, mel: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, M), (B, F, 128) -> (B, T, whisper_d + beats_width): the official `qformer_in`."""
        return self.join(self.ln_speech(self.whisper(mel)), self.ln_audio(self.beats(fbank)))

    def qformer(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> Q-Former output (B * L, tokens per window, qformer_hidden)."""
        starts = window_starts(fused.shape[1], self.window_frames, self.stride_frames, fused.device)
        return self.speech_Qformer.read(self.speech_query_tokens, fused, window_index(starts, self.window_frames))

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """Q-Former output (..., qformer_hidden) -> LLM-space tokens (..., llm_hidden)."""
        return project_audio_tokens(self.speech_llama_proj, queries, self.audio_token_rms)

    def clip_frames(self, fused: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """Fused frames (B, T, C) and the log-mel Whisper read (B, n_mels, M) -> what the clip token
        pools: (B, T, C + columns per frame x n_mels)."""
        return torch.cat([fused, mel_frames(mel, self.mel_columns_per_frame, fused.shape[1])], dim=-1)

    def clip_token(self, frames: torch.Tensor, n_frames: list[int] | None = None) -> torch.Tensor:
        """`clip_frames` -> the clip tokens (B, 1, llm_hidden) (`config.clip_token_hidden`), scaled as the others."""
        return scale_to_rms(self.clip_token_head(frames, n_frames), self.audio_token_rms).unsqueeze(1)

    def embed(self, mel: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 3000), (B, F, 128) -> (B, L * Q [+ 1 clip token], llm_hidden)."""
        batch = mel.shape[0]
        fused = self.fuse(mel, fbank)
        tokens = self.project(self.qformer(fused))
        tokens = tokens.reshape(batch, -1, tokens.shape[-1])
        if self.clip_token_head is None:
            return tokens
        return torch.cat([tokens, self.clip_token(self.clip_frames(fused, mel))], dim=1)

    def forward(self, mel: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
        return self.embed(mel, fbank)[0]


# --- the model -----------------------------------------------------------------------------------

class Salmonn(nn.Module):
    """SALMONN v1. Pre-built encoders / LLM may be passed in (loaded weights); otherwise random init.

    Frozen: Whisper, BEATs, the LLM base. Trainable: Q-Former, query tokens, projection, both
    LayerNorms and the LoRA matrices, exactly the set the official checkpoint stores.
    """

    def __init__(self, config: SalmonnConfig, *, speech_encoder: nn.Module | None = None,
                 beats: nn.Module | None = None, llm: LlamaForCausalLM | None = None):
        super().__init__()
        self.config = config
        self.speech_encoder = speech_encoder if speech_encoder is not None else build_whisper_encoder(config.whisper)
        self.beats = beats if beats is not None else BEATs(config.beats)
        self.ln_speech = nn.LayerNorm(config.whisper.d_model, eps=LN_SPEECH_EPS)
        self.ln_audio = nn.LayerNorm(config.beats.encoder_embed_dim, eps=LN_SPEECH_EPS)
        qformer = WhisperDecoderQFormer if config.qformer.kind == WHISPER_DECODER_QFORMER else QFormer
        self.speech_Qformer = qformer(config.qformer, config.fused_width)
        self.speech_query_tokens = nn.Parameter(
            torch.randn(1, config.qformer.num_query_tokens, config.qformer.hidden) * QUERY_TOKEN_INIT_STD)
        if config.audio_vocab > 0:
            self.speech_llama_proj = VocabProjection(config.qformer.hidden, config.llm.hidden_size, config.audio_vocab)
        else:
            self.speech_llama_proj = nn.Linear(config.qformer.hidden, config.llm.hidden_size)
        self.clip_token_head = None
        if config.clip_token_hidden > 0:
            # drawn without moving the random stream: the rest of the model and the training (dropout) then
            # see the very draws they see without a clip token
            with torch.random.fork_rng(devices=[]):
                self.clip_token_head = ClipTokenHead(clip_token_input_width(config), config.clip_token_hidden,
                                                     config.llm.hidden_size)
        llm = llm if llm is not None else build_llama(config.llm)
        self.llama_model = wrap_lora(llm, config.lora)
        for name, param in self.named_parameters():
            # a trained module's own frozen tensors (the LLM table in VocabProjection) stay frozen, though saved
            param.requires_grad_(is_trainable_name(name) and param.requires_grad)
        self._lora_scale = config.lora.scale
        self.eval()

    def train(self, mode: bool = True) -> "Salmonn":
        super().train(mode)
        # the encoders are frozen feature extractors: never dropout / layerdrop
        self.speech_encoder.eval()
        self.beats.eval()
        return self

    # --- audio ---------------------------------------------------------------------------------
    def audio_encoder(self) -> AudioEncoder:
        """An export-friendly view sharing this model's submodules (not copies)."""
        return AudioEncoder(self)

    def fuse(self, mel: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
        return self.audio_encoder().fuse(mel, fbank)

    def encode_audio(self, mel: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 3000), (B, F, 128) -> (B, n_audio_tokens, llm_hidden).

        With `config.trim_windows` the mel is cut here to the clip's columns (salmonn_cli/trim.py);
        a mel already cut to them passes unchanged.
        """
        if self.config.trim_windows:
            mel = mel[..., :mel_frame_count(self.config, fbank.shape[1])]
        return self.audio_encoder().embed(mel, fbank)

    # --- LLM -----------------------------------------------------------------------------------
    @property
    def llm(self) -> LlamaForCausalLM:
        """The LoRA-wrapped LlamaForCausalLM itself (its q/v projections carry the adapters)."""
        return self.llama_model.base_model.model

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids -> (1, len, llm_hidden)."""
        embedding = self.llama_model.get_input_embeddings()
        ids = torch.as_tensor(ids, dtype=torch.long, device=embedding.weight.device).reshape(1, -1)
        return embedding(ids)

    def llm_input_embeds(self, audio_embeds: torch.Tensor, ids_before: list[int],
                         ids_after: list[int]) -> torch.Tensor:
        """[BOS] + before + audio + after, the official order (spec §5.5): (1, T, llm_hidden)."""
        before = self.embed_ids([self.config.llm.bos_token_id, *ids_before])
        after = self.embed_ids(list(ids_after))
        return torch.cat([before, audio_embeds.to(before.dtype), after], dim=1)

    @property
    def lora_scale(self) -> float:
        """LoRA scaling (alpha / r = 4.0 officially); 0 disables the adapters."""
        return self._lora_scale

    @lora_scale.setter
    def lora_scale(self, value: float) -> None:
        for module in self.llama_model.modules():
            if isinstance(module, LoraLayer) and LORA_ADAPTER in module.scaling:
                module.scaling[LORA_ADAPTER] = float(value)
        self._lora_scale = float(value)

    def in_window_path(self, name: str) -> bool:
        """True for the trainable parameters that make the window tokens: both LayerNorms, the Q-Former with its
        query tokens, the projection (not the clip token's head, not LoRA). `[optim] window_lr_scale` moves them
        at their own rate: salmonn-nano's Whisper-decoder connector starts out writing SmolLM2's words and, at
        the rate the clip token and LoRA need, drifts away from them (train/nano/README.md)."""
        return name.startswith(WINDOW_PATH_PREFIXES)

    # --- checkpoints ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters under their official names (what a SALMONN checkpoint holds)."""
        return {name: p.detach() for name, p in self.named_parameters() if is_trainable_name(name)}


def is_trainable_name(name: str) -> bool:
    """True for the parameters SALMONN trains: connector, LayerNorms, LoRA (not the frozen bases)."""
    if name.startswith(TRAINABLE_PREFIXES):
        return True
    return name.startswith("llama_model.") and any(part in name for part in LORA_NAME_PARTS)
