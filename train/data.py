"""Training data in the official formats, turned into batches by the runtime's own front end.

- annotations: `{"annotation": [{"path", "text", "task", "Q", "expand_wav"}]}` (spec §7.4); `task`
  defaults to "asr", `Q` to "". Relative audio paths are relative to the annotation file.
- prompts: `{task: [prompt, ...]}`, each prompt containing `<SpeechHere>`; prompts without it are
  dropped, the rest are wrapped in the model's template; `{}` is filled with the sample's `Q`.
- order: a seeded permutation per epoch, read as one endless stream. Optimizer step `s` takes the
  stream positions [s*G, (s+1)*G) (G = global batch), so the data position is a function of the
  step and a resumed run reads exactly what the interrupted one would have. The prompt of each
  draw is chosen from (seed, stream position): the same on any number of processes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile
import torch

from salmonn_cli import audio, features
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.errors import SalmonnError
from salmonn_cli.prompt import prompt_token_ids
from salmonn_cli.trim import audio_token_count, clip_fbank_frames, max_samples, mel_frame_count

DEFAULT_TASK = "asr"
EXPAND_GAP_SAMPLES = 1600       # zeros between a clip and each `expand_wav` (0.1 s at 16 kHz)
SENTENCEPIECE_FILE = "tokenizer.model"
IGNORE_INDEX = -100


class DataError(SalmonnError):
    """An annotation or prompt file is missing, malformed, or does not fit together."""


# --- files ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: str
    text: str
    task: str = DEFAULT_TASK
    question: str = ""
    expand_wav: tuple[str, ...] = ()


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def read_annotations(path: str | Path) -> list[Sample]:
    path = Path(path)
    data = _read_json(path, "annotation file")
    entries = data.get("annotation") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected {{\"annotation\": [...]}} with at least one entry")

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else path.parent / p)

    samples = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("text"), str):
            raise DataError(f"{path}: annotation {i} needs string fields \"path\" and \"text\"")
        expand = e.get("expand_wav") or []
        if isinstance(expand, str):
            expand = [expand]
        samples.append(Sample(path=resolve(e["path"]), text=e["text"], task=str(e.get("task") or DEFAULT_TASK),
                              question=str(e.get("Q") or ""), expand_wav=tuple(resolve(p) for p in expand)))
    return samples


def read_prompts(path: str | Path, config: SalmonnConfig) -> dict[str, list[str]]:
    """task -> prompts wrapped in `config.prompt_template`, each holding the audio placeholder once."""
    raw = _read_json(Path(path), "prompt file")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected {{task: [prompts]}}")
    prompts = {}
    for task, items in raw.items():
        items = [items] if isinstance(items, str) else items
        kept = [config.prompt_template.format(p) for p in items
                if isinstance(p, str) and p.count(config.audio_placeholder) == 1]
        if kept:
            prompts[task] = kept
    if not prompts:
        raise DataError(f"{path}: no prompt contains {config.audio_placeholder}")
    return prompts


def check_tasks(samples: list[Sample], prompts: dict[str, list[str]], source: str) -> None:
    missing = sorted({s.task for s in samples} - set(prompts))
    if missing:
        raise DataError(f"{source}: task(s) {', '.join(missing)} have no prompt in the prompt file")


# --- tokenizer -----------------------------------------------------------------------------------

class Tokenizer:
    """Text -> ids with no BOS/EOS. SentencePiece models are run by sentencepiece itself, which
    tokenizes exactly like the official slow LlamaTokenizer and llama.cpp (the transformers fast
    tokenizer differs on repeated spaces). Special-token text ("<|im_end|>") is plain text unless
    `special`, as in llama.cpp. Loaded lazily so that it crosses into workers as a path."""

    def __init__(self, llm_dir: str | Path):
        self.llm_dir = str(llm_dir)
        self._encode = None

    def __getstate__(self):
        return {"llm_dir": self.llm_dir, "_encode": None}

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self._codec()[0](text, special)

    def decode(self, ids: list[int]) -> str:
        return self._codec()[1](ids)

    def _codec(self):
        if self._encode is None:
            self._encode = _load_codec(self.llm_dir)
        return self._encode


def _load_codec(llm_dir: str):
    """(encode, decode) functions for the tokenizer of an LLM folder."""
    spm_file = Path(llm_dir) / SENTENCEPIECE_FILE
    if spm_file.is_file():
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))

        def encode_spm(text: str, special: bool) -> list[int]:
            if special:     # sentencepiece never turns text into control tokens
                raise DataError(f"the SentencePiece tokenizer of {llm_dir} cannot parse special tokens; "
                                "use a template without them (prompt_special_tokens = false)")
            return list(processor.encode(text))

        return encode_spm, (lambda ids: processor.decode(list(ids)))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a tokenizer from {llm_dir}: {exc}") from None
    return ((lambda text, special: list(tokenizer(text, add_special_tokens=False,
                                                  split_special_tokens=not special).input_ids)),
            (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)))


# --- one item ------------------------------------------------------------------------------------

def load_wave(sample: Sample, config: SalmonnConfig) -> np.ndarray:
    """The official training waveform: channel 0, `expand_wav` clips appended after 0.1 s of
    silence, padded to `min_seconds`, cut to `max_seconds` (float64, 16 kHz)."""
    rate = config.sample_rate
    parts = [audio.load_audio(sample.path, rate)]
    for extra in sample.expand_wav:
        parts += [np.zeros(EXPAND_GAP_SAMPLES * rate // audio.SAMPLE_RATE), audio.load_audio(extra, rate)]
    wave, _ = audio.fit_to_chunk(np.concatenate(parts), rate, config.min_seconds, config.max_seconds)
    return wave


def clip_features(wave: np.ndarray, config: SalmonnConfig) -> tuple[np.ndarray, np.ndarray]:
    """The encoders' inputs, computed by the runtime's front end: Whisper log-mel of the full
    `max_seconds` chunk (n_mels, frames) and the BEATs fbank of the clip itself (F, 128).

    With `config.trim_windows` Whisper reads only the first `mel_frame_count` columns, so the
    spectrogram is computed over the clip and enough of its zero padding to cover them and to end on
    a column of pure silence (an STFT frame that sees only padding); the remaining columns, silence
    too in the full computation, repeat that one. The values equal the full chunk's (tested) at a
    fraction of its cost (a 3 s clip: ~2 ms instead of ~11 ms).
    """
    fbank = features.beats_fbank(wave)
    full = int(round(config.max_seconds * config.sample_rate))
    n_samples = full
    if config.trim_windows:
        hop = features.HOP_LENGTH
        needed = max(len(wave), mel_frame_count(config, fbank.shape[0]) * hop) + features.N_FFT + hop
        n_samples = min(full, -(-needed // hop) * hop)
    mel = features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels, n_samples=n_samples)
    if n_samples < full:
        mel = np.pad(mel, ((0, 0), (0, full // features.HOP_LENGTH - mel.shape[1])), mode="edge")
    return mel, fbank


def choose_prompt(prompts: dict[str, list[str]], sample: Sample, seed: int, draw: int) -> str:
    """One prompt of the sample's task, fixed by (seed, draw); `{}` filled with the question."""
    options = prompts[sample.task]
    prompt = options[int(np.random.default_rng([seed, draw]).integers(len(options)))]
    return prompt.replace("{}", sample.question, 1) if "{}" in prompt else prompt


@dataclass
class Item:
    index: int
    mel: np.ndarray                 # (n_mels, frames) float32
    fbank: np.ndarray               # (F, 128) float32
    ids_before: list[int]           # text before the audio, without BOS
    ids_after: list[int]
    answer_ids: list[int]           # answer + EOS, cut to max_txt_len
    clip: tuple[str, ...] = ()      # the audio files it was made from (FrozenEncoderCache key)


class AnnotationDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, draw): the draw picks the prompt (see `choose_prompt`)."""

    def __init__(self, samples: list[Sample], prompts: dict[str, list[str]], config: SalmonnConfig,
                 tokenizer: Tokenizer, max_txt_len: int, seed: int):
        self.samples, self.prompts, self.config = samples, prompts, config
        self.tokenizer, self.max_txt_len, self.seed = tokenizer, max_txt_len, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, draw = key
        sample = self.samples[index]
        cfg = self.config
        mel, fbank = clip_features(load_wave(sample, cfg), cfg)
        ids_before, ids_after = prompt_token_ids(cfg, choose_prompt(self.prompts, sample, self.seed, draw),
                                                 self._tokens)
        answer = (self._tokens(sample.text) + [cfg.llm.eos_token_id])[:self.max_txt_len]
        return Item(index, mel, fbank, ids_before, ids_after, answer, (sample.path, *sample.expand_wav))

    def _tokens(self, text: str, special: bool = False) -> list[int]:
        return _cached_encode(self.tokenizer, text, special)

    def approx_lengths(self) -> list[int]:
        """Each sample's LLM positions without the prompt template: its audio tokens (from the clips'
        durations in their file headers) plus its question and answer tokens. What `[data]
        group_by_length` sorts by; a clip whose header cannot be read counts as empty."""
        cfg = self.config
        lengths = []
        for sample in self.samples:
            seconds = sum(_header_seconds(p) for p in (sample.path, *sample.expand_wav))
            n_samples = min(int(seconds * cfg.sample_rate), max_samples(cfg))
            lengths.append(audio_token_count(cfg, clip_fbank_frames(cfg, n_samples)) +
                           len(self._tokens(sample.question)) + len(self._tokens(sample.text)))
        return lengths


@lru_cache(maxsize=65536)
def _header_seconds(path: str) -> float:
    try:
        info = soundfile.info(path)
    except (OSError, RuntimeError):          # LibsndfileError is a RuntimeError
        return 0.0
    return info.frames / info.samplerate


@lru_cache(maxsize=4096)
def _cached_encode(tokenizer: Tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer.encode(text, special)


# --- batches -------------------------------------------------------------------------------------

@dataclass
class Batch:
    indices: list[int]
    mel: torch.Tensor               # (B, n_mels, frames)
    fbanks: list[torch.Tensor]      # B x (F_i, 128): BEATs runs per clip, unpadded
    ids_before: list[list[int]]
    ids_after: list[list[int]]
    answer_ids: list[list[int]]
    clips: list[tuple[str, ...]] = field(default_factory=list)   # Item.clip of each sample

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_targets(self) -> int:
        return sum(len(a) for a in self.answer_ids)

    def n_tokens(self, config: SalmonnConfig) -> int:
        """LLM input positions, padding excluded: BOS, prompt, audio, answer."""
        text = sum(1 + len(b) + len(a) + len(t) for b, a, t in zip(self.ids_before, self.ids_after, self.answer_ids))
        return text + sum(audio_token_count(config, f.shape[0]) for f in self.fbanks)

    def to(self, device) -> "Batch":
        return Batch(self.indices, self.mel.to(device), [f.to(device) for f in self.fbanks],
                     self.ids_before, self.ids_after, self.answer_ids, self.clips)


def collate(items: list[Item]) -> Batch:
    return Batch(
        indices=[it.index for it in items],
        mel=torch.from_numpy(np.stack([it.mel for it in items])),
        fbanks=[torch.from_numpy(it.fbank) for it in items],
        ids_before=[it.ids_before for it in items],
        ids_after=[it.ids_after for it in items],
        answer_ids=[it.answer_ids for it in items],
        clips=[it.clip for it in items],
    )


# --- order ---------------------------------------------------------------------------------------

class SampleStream:
    """Stream position -> sample index: a fresh seeded permutation for every epoch.

    With `lengths` and `group` (a micro-batch size), each run of `group` consecutive positions holds
    samples of similar length, so that a right-padded batch wastes few LLM positions: the epoch's
    permutation is cut into chunks of GROUP_CHUNK micro-batches, each chunk sorted by length, cut into
    micro-batches, and those shuffled within the chunk. Still a function of (seed, epoch) alone.
    """

    GROUP_CHUNK = 64

    def __init__(self, n_samples: int, seed: int, lengths: list[int] | None = None, group: int = 0,
                 repeats: list[int] | None = None):
        if lengths is not None and len(lengths) != n_samples:
            raise ValueError(f"{len(lengths)} lengths for {n_samples} samples")
        if repeats is not None and (len(repeats) != n_samples or min(repeats, default=1) < 1):
            raise ValueError(f"repeats must be {n_samples} counts of at least 1")
        # with `repeats`, sample i takes repeats[i] places in every epoch
        self.pool = np.repeat(np.arange(n_samples), repeats) if repeats is not None else None
        self.n, self.seed = (n_samples if self.pool is None else len(self.pool)), seed
        lengths = None if lengths is None or group <= 1 else np.asarray(lengths)
        self.lengths = lengths if lengths is None or self.pool is None else lengths[self.pool]
        self.group = group

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            return order
        chunk = self.group * self.GROUP_CHUNK
        grouped = []
        for start in range(0, self.n, chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches = [part[i:i + self.group] for i in range(0, len(part), self.group)]
            grouped += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(grouped)

    def __getitem__(self, position: int) -> int:
        place = int(self._permutation(position // self.n)[position % self.n])
        return place if self.pool is None else int(self.pool[place])


@dataclass
class StepPlan:
    """Which stream positions each process reads at each micro-step."""
    batch_size: int                 # per process per micro-step
    accum_steps: int
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    def positions(self, step: int, rank: int, micro: int) -> range:
        start = step * self.global_batch + (rank * self.accum_steps + micro) * self.batch_size
        return range(start, start + self.batch_size)

    def data_position(self, step: int) -> int:
        """Samples consumed (by all processes) before optimizer step `step`."""
        return step * self.global_batch


class StepBatchSampler:
    """DataLoader batch sampler: this process's micro-batches from `start_step` to `stop_step`,
    each a list of (sample index, draw) keys."""

    def __init__(self, stream: SampleStream, plan: StepPlan, rank: int, start_step: int, stop_step: int):
        self.stream, self.plan, self.rank = stream, plan, rank
        self.start_step, self.stop_step = start_step, stop_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            for micro in range(self.plan.accum_steps):
                yield [(self.stream[p], p) for p in self.plan.positions(step, self.rank, micro)]

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.plan.accum_steps


def validation_keys(n_samples: int, rank: int, world_size: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Every validation sample once, split over processes; the draw is the index (fixed prompts)."""
    mine = list(range(rank, n_samples, world_size))
    return [[(i, i) for i in mine[k:k + batch_size]] for k in range(0, len(mine), batch_size)]
