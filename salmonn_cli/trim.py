"""How many Q-Former windows a clip gets: the one formula training, export and runtime share.

Officially (`SalmonnConfig.trim_windows = False`) every clip is padded to `max_seconds`, Whisper
reads the full 3000-frame log-mel and the LLM always gets `config.n_windows` windows (88).

With `trim_windows = True` a clip keeps only the windows that cover its audio. The clip's length
is measured by its BEATs fbank frame count F, the one measure every path holds exactly (the
runtime and training compute the fbank of the clip itself; the ONNX graph takes it as input):

    covered   = (F - 1) * 160 + 400                     samples the F fbank frames read
    frames    = ceil(covered * encoder_frames / max_samples)        fused frames (20 ms) with audio
    n_windows = ceil((frames - window) / stride) + 1, at least 1, at most config.n_windows

Whisper then runs on exactly the frames those windows read, (n_windows - 1) * stride + window
fused frames: the first columns of the official log-mel (still computed over the full
`max_seconds`, so its dynamic-range clamp is the official one), with Whisper's position table
cut to match. Whisper's attention is bidirectional, so its outputs differ from the padded run;
a model is trained and served with one setting, never mixed.

Clips shorter than `min_seconds` are padded to it first (as everywhere): 0.3 s counts as 1 s.
Official geometry (17-frame windows, 50 frames/s): 1 s -> 3 windows, 3 s -> 9, 3.2 s -> 10,
29.9 s and 30 s -> 88.
"""
from __future__ import annotations

from salmonn_cli.config import SalmonnConfig
from salmonn_cli.features import FBANK_FRAME_LENGTH, FBANK_FRAME_SHIFT


def max_samples(config: SalmonnConfig) -> int:
    return int(round(config.max_seconds * config.sample_rate))


def clip_fbank_frames(config: SalmonnConfig, n_samples: int) -> int:
    """BEATs fbank frames of a clip of `n_samples`, after the padding to `min_seconds` and the cut
    to `max_seconds` that every path applies."""
    min_samples = int(round(config.min_seconds * config.sample_rate))
    n = min(max(int(n_samples), min_samples, FBANK_FRAME_LENGTH), max_samples(config))
    return 1 + (n - FBANK_FRAME_LENGTH) // FBANK_FRAME_SHIFT


def window_count(config: SalmonnConfig, fbank_frames: int) -> int:
    """Q-Former windows (LLM tokens per query) of a clip whose fbank has `fbank_frames` frames."""
    if not config.trim_windows:
        return config.n_windows
    covered = (max(int(fbank_frames), 1) - 1) * FBANK_FRAME_SHIFT + FBANK_FRAME_LENGTH
    frames = -(-covered * config.encoder_frames // max_samples(config))      # ceil
    beyond_first = max(frames - config.window_frames, 0)
    n_windows = -(-beyond_first // config.stride_frames) + 1                 # ceil + 1
    return min(n_windows, config.n_windows)


def window_token_count(config: SalmonnConfig, fbank_frames: int) -> int:
    """The Q-Former's tokens of a clip: its windows times the tokens per window."""
    return window_count(config, fbank_frames) * config.qformer.tokens_per_window


def audio_token_count(config: SalmonnConfig, fbank_frames: int) -> int:
    """All the audio embeddings of a clip: its window tokens, then its clip token if the config has one."""
    return window_token_count(config, fbank_frames) + config.n_clip_tokens


def encoder_frame_count(config: SalmonnConfig, fbank_frames: int) -> int:
    """Whisper output frames the encoder computes: all of them officially, else those the windows read."""
    if not config.trim_windows:
        return config.encoder_frames
    return (window_count(config, fbank_frames) - 1) * config.stride_frames + config.window_frames


def mel_frame_count(config: SalmonnConfig, fbank_frames: int) -> int:
    """Log-mel columns Whisper reads (conv2 halves them): the first this many of the official mel."""
    return encoder_frame_count(config, fbank_frames) * config.mel_columns_per_frame
