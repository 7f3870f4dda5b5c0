"""A training run's settings: one TOML file (train/stages/*.toml) read into `TrainConfig`.

Sections `[model]`, `[data]`, `[optim]`, `[run]`, `[align]` map onto the dataclasses below; an unknown key is an
error. Defaults are the official SALMONN v1 recipe (spec §7.1). Relative paths are taken relative to
the current directory, like the official configs. `--set section.key=value` overrides any key.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from salmonn_cli.config import QFORMER_KINDS, WHISPER_DECODER_QFORMER, LoraDims, QFormerDims
from salmonn_cli.errors import SalmonnError

AMP_MODES = ("fp16", "bf16", "none")
CPU_AMP_MODES = ("auto", "bf16", "none")
LLM_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(SalmonnError):
    """The training config file or an override is invalid."""


@dataclass
class ModelSection:
    whisper_path: str = ""
    beats_path: str = ""
    llama_path: str = ""
    # a previous stage's checkpoint: its trained tensors and shapes replace the fresh ones below
    init_checkpoint: str = ""
    # "bert" (official) or "whisper_decoder": Whisper's text decoder as the window Q-Former, its shapes and
    # first weights read from `whisper_path` (then the qformer_* sizes below are not used)
    qformer_kind: str = "bert"
    qformer_hidden: int = 768
    qformer_layers: int = 2
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    num_query_tokens: int = 1
    qformer_dropout: float = 0.1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    prompt_template: str = "USER: {}\nASSISTANT:"
    # the template's own text holds special tokens (ChatML); False for Vicuna's plain-text template
    prompt_special_tokens: bool = False
    # keep only the windows that cover the clip (salmonn_cli/trim.py); False = official 88 windows
    trim_windows: bool = False
    # rescale each audio token to the RMS of the LLM's token embeddings (SalmonnConfig.audio_token_rms);
    # False = the official unscaled projection
    normalize_audio_tokens: bool = False
    # > 0: one clip-level token after each clip's window tokens, from an attention-pooled MLP of this hidden
    # width over the fused frames (SalmonnConfig.clip_token_hidden); 0 = the official window tokens only
    clip_token_hidden: int = 0
    # > 0 (qformer_kind "whisper_decoder" only): project each window token through this many entries of
    # Whisper's vocabulary into the LLM's embeddings of their text (SalmonnConfig.audio_vocab); 0 = linear
    audio_vocab: int = 0
    # train BEATs with the connector (salmonn-nano's BEATs starts random); its weights are saved as an
    # official BEATs .pt beside each checkpoint, which that checkpoint's `beats_path` names
    train_beats: bool = False
    # initial scale of `ln_audio` (the BEATs half of each fused frame) in a fresh model; the official
    # LayerNorm starts at 1. 0 mutes a random BEATs at first: its gradient still lets the stream grow
    # where it helps (salmonn-nano: train/nano/README.md)
    beats_stream_gain: float = 1.0
    max_txt_len: int = 300          # answer tokens (EOS included) kept per sample

    def qformer_dims(self) -> QFormerDims:
        return QFormerDims(kind=self.qformer_kind, hidden=self.qformer_hidden, n_layers=self.qformer_layers,
                           n_heads=self.qformer_heads, intermediate=self.qformer_intermediate,
                           num_query_tokens=self.num_query_tokens)

    def lora_dims(self) -> LoraDims:
        return LoraDims(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                        targets=tuple(self.lora_targets))


@dataclass
class DataSection:
    train: str = ""                 # annotation file {"annotation": [...]}
    valid: str = ""                 # optional, same format
    prompts: str = "train/stages/prompts.json"
    num_workers: int = 0            # DataLoader worker processes computing features
    # batches of samples of similar length (train/data.py SampleStream): less right-padding in the LLM
    group_by_length: bool = False
    # task -> how many times each training annotation of that task is drawn per epoch of the LM stage
    # (absent: once); [align] is not affected
    task_repeats: dict[str, int] = field(default_factory=dict)


@dataclass
class OptimSection:
    init_lr: float = 3e-5
    min_lr: float = 1e-5
    warmup_start_lr: float = 1e-6
    warmup_steps: int = 3000
    max_steps: int = 90000          # official: 30 epochs x 3000 iterations
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0          # max global grad norm; 0 = no clipping (official)
    lora_lr_scale: float = 1.0      # LoRA lr = schedule x this (connector: the schedule); 1 = official
    # LoRA frozen (lr 0) for the first N steps, so that the connector learns to carry the audio before
    # the LLM can learn to answer from the prompt alone; 0 = official (all train from the start)
    lora_start_step: int = 0
    # lr multiplier (LM stage and [align]) for what makes the window tokens (LayerNorms, Q-Former, projection:
    # Salmonn.in_window_path); the clip token's head and LoRA keep the schedule's rate. 1 = one rate (official)
    window_lr_scale: float = 1.0
    batch_size: int = 8             # samples per process per micro-step
    accum_steps: int = 1            # micro-steps per optimizer step


@dataclass
class RunSection:
    out_dir: str = "runs/stage1"
    seed: int = 42
    amp: str = "fp16"               # GPU autocast ("fp16" official, "bf16", "none")
    cpu_amp: str = "none"           # CPU autocast: "bf16", "none" (fp32), or "auto" (bf16 where the CPU has bf16 units)
    llm_dtype: str = "float32"      # GPU only: dtype of the frozen LLM base weights
    save_every: int = 3000          # steps between checkpoints (and one at the end)
    val_every: int = 3000           # steps between validations (and one at the end)
    threads: int = 0                # torch CPU threads per process; 0 = torch's default
    progress: bool = True           # rich progress bar on rank 0
    cache_encoders: bool = False    # keep each clip's frozen-encoder outputs in memory (train/encoder_cache.py)
    # with cache_encoders: also keep them in this folder, where later runs with the same encoders, window
    # geometry and audio files find them ("" = in memory only)
    encoder_cache_dir: str = ""


@dataclass
class AlignSection:
    """Connector warm-up by CTC before the LM stage (train/align.py); not in the official recipe."""
    steps: int = 0                  # 0 = no alignment (official)
    lr: float = 3e-3
    batch_size: int = 16
    tasks: list[str] = field(default_factory=lambda: ["asr", "audiocaption"])   # target per clip, by preference
    lm_weight: float = 0.0          # the CTC loss kept in the LM stage's objective at this weight; 0 = off
    tag_field: str = ""             # annotation field naming a clip's sound class: learned by a TagHead too; "" = off
    tag_weight: float = 1.0         # that head's cross-entropy weight beside the CTC loss
    pieces: int = 0                 # CTC units: 0 = the LLM's token ids; N = N word pieces learned from the transcripts
    # the CTC loss's weight; 0 = only the tag head and the clip token train (a connector whose window tokens
    # start as the LLM's words, `[model] audio_vocab`, lost them to the CTC: train/nano/README.md)
    ctc_weight: float = 1.0
    # CTC units: the Whisper tokens the window tokens project through ([model] audio_vocab), blank <|endoftext|>,
    # scored by the projection's own Whisper logits; transcripts only (train/align.py `WhisperVocabCtcHead`)
    whisper_vocab: bool = False
    window_lr_scale: float = 0.0    # the window path's lr multiplier here; 0 = [optim] window_lr_scale


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection,
            "align": AlignSection}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    align: AlignSection = field(default_factory=AlignSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"[{name}] must be a table")
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = set(values) - set(known)
            if bad:
                raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(bad))}")
            sections[name] = section_cls(**{k: _coerce(name, known[k], v) for k, v in values.items()})
        config = cls(**sections)
        config.validate()
        return config

    def validate(self) -> None:
        m, o, r = self.model, self.optim, self.run
        for key in ("whisper_path", "beats_path", "llama_path"):
            if not getattr(m, key):
                raise ConfigError(f"[model] {key} is required")
        if not self.data.train:
            raise ConfigError("[data] train (an annotation file) is required")
        if r.amp not in AMP_MODES:
            raise ConfigError(f"[run] amp must be one of {', '.join(AMP_MODES)}, not {r.amp!r}")
        if r.cpu_amp not in CPU_AMP_MODES:
            raise ConfigError(f"[run] cpu_amp must be one of {', '.join(CPU_AMP_MODES)}, not {r.cpu_amp!r}")
        if r.llm_dtype not in LLM_DTYPES:
            raise ConfigError(f"[run] llm_dtype must be one of {', '.join(LLM_DTYPES)}, not {r.llm_dtype!r}")
        if r.encoder_cache_dir and not r.cache_encoders:
            raise ConfigError("[run] encoder_cache_dir needs cache_encoders = true")
        for section, key in (("optim", "batch_size"), ("optim", "accum_steps"), ("optim", "max_steps"),
                             ("run", "save_every"), ("run", "val_every"), ("model", "max_txt_len")):
            if getattr(getattr(self, section), key) < 1:
                raise ConfigError(f"[{section}] {key} must be at least 1")
        if m.qformer_kind not in QFORMER_KINDS:
            raise ConfigError(f"[model] qformer_kind must be one of {', '.join(QFORMER_KINDS)}, not {m.qformer_kind!r}")
        if m.audio_vocab < 0 or (m.audio_vocab and m.qformer_kind != WHISPER_DECODER_QFORMER):
            raise ConfigError(f"[model] audio_vocab must be 0, or > 0 with qformer_kind = "
                              f"{WHISPER_DECODER_QFORMER!r} (got {m.audio_vocab} with {m.qformer_kind!r})")
        if not 0 <= m.beats_stream_gain < float("inf"):        # also refuses TOML's nan
            raise ConfigError(f"[model] beats_stream_gain must be a finite number >= 0, not {m.beats_stream_gain}")
        a = self.align
        if a.steps < 0 or a.batch_size < 1 or not 0 < a.lr < float("inf") or not a.tasks:
            raise ConfigError("[align] steps must be >= 0, batch_size >= 1, lr a positive number and tasks not empty")
        if not 0 <= a.lm_weight < float("inf") or (a.lm_weight > 0 and a.steps == 0):
            raise ConfigError("[align] lm_weight must be a finite number >= 0, and needs steps > 0 (the CTC head)")
        if not 0 <= a.tag_weight < float("inf"):
            raise ConfigError(f"[align] tag_weight must be a finite number >= 0, not {a.tag_weight}")
        if isinstance(a.pieces, bool) or not isinstance(a.pieces, int) or a.pieces < 0 or 0 < a.pieces < 32:
            raise ConfigError(f"[align] pieces must be 0 (the LLM's token ids) or at least 32 word pieces, not {a.pieces!r}")
        if not 0 <= a.ctc_weight < float("inf") or (a.ctc_weight == 0 and a.steps and (not a.tag_field or a.lm_weight)):
            raise ConfigError("[align] ctc_weight must be a finite number >= 0; 0 needs a tag_field (something to "
                              "train) and lm_weight 0 (the CTC head stays untrained)")
        if a.whisper_vocab and (not m.audio_vocab or a.pieces or a.lm_weight):
            raise ConfigError("[align] whisper_vocab needs [model] audio_vocab > 0, and pieces 0 and lm_weight 0 "
                              "(the Whisper logits are not the LM stage's audio tokens)")
        if not 0 <= a.window_lr_scale < float("inf"):
            raise ConfigError(f"[align] window_lr_scale must be a finite number >= 0, not {a.window_lr_scale}")
        if a.tag_field and a.steps == 0:
            raise ConfigError("[align] tag_field needs steps > 0 (the tag head trains during alignment)")
        if not 0 < o.window_lr_scale < float("inf"):
            raise ConfigError(f"[optim] window_lr_scale must be a positive number, not {o.window_lr_scale}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.data.task_repeats.values()):
            raise ConfigError(f"[data] task_repeats must map tasks to whole numbers >= 1, not {self.data.task_repeats}")
        if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
            raise ConfigError("[optim] warmup_steps, grad_clip and weight_decay must not be negative")


def _coerce(section: str, f: dataclasses.Field, value):
    """TOML gives ints where a float is meant (`init_lr = 1` ); anything else must match the default's type."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"[{section}] {f.name} must be of type {type(default).__name__}, got {value!r}")
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """`section.key=value`, the value in TOML syntax (a bare word is taken as a string)."""
    target, sep, text = assignment.partition("=")
    section, dot, key = target.strip().partition(".")
    if not (sep and dot and section and key):
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    raw.setdefault(section, {})[key] = value


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return TrainConfig.from_dict(raw)
