"""Every shape and constant of a SALMONN model, in one dataclass.

The same `SalmonnConfig` is used by training, by export and (through the manifest that export
writes) by the runtime. It is plain data: no torch, so the runtime can import it. The named model
shapes (official 13B/7B, tiny, salmonn-nano's) are train/presets.py's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Prompt templates; "{}" receives the speech tag + the instruction.
VICUNA_PROMPT_TEMPLATE = "USER: {}\nASSISTANT:"
# ChatML (SmolLM2). The LLM input always starts with the BOS token, and SmolLM2's BOS is
# <|im_start|>, so the template leaves out the <|im_start|> that opens the user turn:
# BOS + template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n".
CHATML_PROMPT_TEMPLATE = "user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Window Q-Former kinds: the official BERT one, or Whisper's text decoder (salmonn-nano)
BERT_QFORMER = "bert"
WHISPER_DECODER_QFORMER = "whisper_decoder"
QFORMER_KINDS = (BERT_QFORMER, WHISPER_DECODER_QFORMER)


@dataclass
class WhisperDims:
    """Whisper encoder (HF `WhisperConfig` names in comments)."""
    n_mels: int = 80                    # num_mel_bins
    d_model: int = 1280                 # d_model
    n_layers: int = 32                  # encoder_layers
    n_heads: int = 20                   # encoder_attention_heads
    ffn_dim: int = 5120                 # encoder_ffn_dim
    max_source_positions: int = 1500    # encoder output frames for 30 s (50 Hz)

    @property
    def n_mel_frames(self) -> int:
        # conv2 has stride 2: 3000 mel frames give 1500 encoder frames
        return 2 * self.max_source_positions


@dataclass
class BeatsDims:
    """BEATs encoder. Field names are the official `BEATsConfig` keys (the `cfg` dict in the .pt)."""
    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_class: int = 527


@dataclass
class QFormerDims:
    """Window-level Q-Former: a BERT-base variant with cross-attention in every layer (`kind` "bert", the
    official one), or Whisper's text decoder read without recurrence (`kind` "whisper_decoder", not official:
    pre-LN blocks; the query tokens are a fixed prompt and only its last position becomes the window's token)."""
    kind: str = BERT_QFORMER
    hidden: int = 768
    n_layers: int = 2
    n_heads: int = 12
    intermediate: int = 3072
    layer_norm_eps: float = 1e-12
    num_query_tokens: int = 1
    max_position_embeddings: int = 512  # only the `position_ids` buffer of the official checkpoint uses it

    def __post_init__(self):
        if self.kind not in QFORMER_KINDS:
            raise ValueError(f"unknown Q-Former kind {self.kind!r} (known: {', '.join(QFORMER_KINDS)})")

    @property
    def tokens_per_window(self) -> int:
        """LLM tokens each window yields: one per query, or the prompt's last position alone."""
        return 1 if self.kind == WHISPER_DECODER_QFORMER else self.num_query_tokens


@dataclass
class LlmDims:
    """LLaMA-architecture causal LM (HF `LlamaConfig` names)."""
    hidden_size: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclass
class LoraDims:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class SalmonnConfig:
    whisper: WhisperDims = field(default_factory=WhisperDims)
    beats: BeatsDims = field(default_factory=BeatsDims)
    qformer: QFormerDims = field(default_factory=QFormerDims)
    llm: LlmDims = field(default_factory=LlmDims)
    lora: LoraDims = field(default_factory=LoraDims)
    # Window-level Q-Former geometry (official: 0.333333 s windows, no overlap -> 17 frames, 88 windows)
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    # Audio
    sample_rate: int = 16000
    max_seconds: float = 30.0
    min_seconds: float = 1.0
    # Not official: keep only the windows that cover the clip instead of always padding to
    # max_seconds (formula in salmonn_cli/trim.py). False = the official behaviour.
    trim_windows: bool = False
    # Not official: every audio token is rescaled after the projection to this root-mean-square
    # (salmonn-nano: the RMS of its LLM's token embeddings, so that the audio cannot grow into a
    # huge-norm token the LLM learns to ignore). None = the official unscaled projection.
    audio_token_rms: float | None = None
    # Not official: > 0 appends one clip-level token after the window tokens of each clip: the fused
    # frames, each with the log-mel columns under it, attention-pooled through an MLP of this hidden width
    # (train/model.py `ClipTokenHead`), so that what lasts through the clip (a sound behind the speech)
    # reaches the LLM in one token.
    # 0 = the official window tokens only.
    clip_token_hidden: int = 0
    # Not official: > 0 projects each window token through this many entries of Whisper's vocabulary (the
    # Whisper-decoder Q-Former only): softmax over Whisper's next-token logits, times the LLM's input
    # embedding of each entry's text, plus a linear path (train/vocab_projection.py).
    # 0 = the official linear projection.
    audio_vocab: int = 0
    # Prompt: `prompt_template` wraps the instruction; `speech_tag` is the instruction's audio part,
    # and `audio_placeholder` marks where the audio embeddings go.
    prompt_template: str = VICUNA_PROMPT_TEMPLATE
    speech_tag: str = "<Speech><SpeechHere></Speech> "
    audio_placeholder: str = "<SpeechHere>"
    # False (official): each text piece around the audio is tokenized whole as plain text.
    # True: the template's own text is tokenized with special tokens parsed (ChatML's
    # <|im_end|>), the speech tag and instruction as plain text (salmonn_cli/prompt.py).
    prompt_special_tokens: bool = False

    # --- derived geometry --------------------------------------------------------------------
    @property
    def encoder_frames(self) -> int:
        """Fused (Whisper) frames for `max_seconds` of audio."""
        return self.whisper.max_source_positions

    @property
    def frames_per_second(self) -> float:
        return self.encoder_frames / self.max_seconds

    @property
    def window_frames(self) -> int:
        return int(round(self.frames_per_second * self.second_per_window))

    @property
    def stride_frames(self) -> int:
        return int(round(self.frames_per_second * self.second_stride))

    @property
    def n_windows(self) -> int:
        return (self.encoder_frames - self.window_frames) // self.stride_frames + 1

    @property
    def n_clip_tokens(self) -> int:
        """Clip-level tokens after the window tokens: 1 with `clip_token_hidden`, else 0."""
        return 1 if self.clip_token_hidden > 0 else 0

    @property
    def n_audio_tokens(self) -> int:
        return self.n_windows * self.qformer.tokens_per_window + self.n_clip_tokens

    @property
    def fused_width(self) -> int:
        return self.whisper.d_model + self.beats.encoder_embed_dim

    @property
    def mel_columns_per_frame(self) -> int:
        """Log-mel columns under one fused (Whisper output) frame: Whisper's conv2 halves them."""
        return self.whisper.n_mel_frames // self.encoder_frames

    def prompt_pieces(self, instruction: str) -> tuple[str, str]:
        """Text before and after the audio embeddings, as the official code splits them."""
        full = self.prompt_template.format(self.speech_tag + instruction.strip())
        before, after = full.split(self.audio_placeholder, 1)
        return before, after

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SalmonnConfig":
        d = dict(d)
        parts = {"whisper": WhisperDims, "beats": BeatsDims, "qformer": QFormerDims,
                 "llm": LlmDims, "lora": LoraDims}
        kwargs = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        for name, value in d.items():
            if name in parts:
                sub = dict(value)
                if name == "lora" and "targets" in sub:
                    sub["targets"] = tuple(sub["targets"])
                kwargs[name] = parts[name](**sub)
            else:
                kwargs[name] = value
        return cls(**kwargs)
