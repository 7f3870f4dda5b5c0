"""The training loss of SALMONN (spec §7.3), on a `Batch` from train/data.py.

Each sample's LLM input is [BOS] + prompt-before + audio + prompt-after + answer + EOS; labels are
-100 everywhere except on the answer and its EOS. The loss is the HF shifted cross-entropy: the
output at position t predicts the token at t + 1.

Two deliberate differences from the official batching, both invisible for a batch of one:
- each sample's tokens are contiguous and the padding goes at the end of the sequence. The
  official code pads the prompt-after part in the middle, so for shorter prompts the first answer
  token is predicted from a pad position and positions differ from inference (spec §7.3.5).
- BEATs runs on each clip unpadded and its output is zero-padded to the Whisper length, exactly as
  at inference; the official batch pads the waveforms instead and passes BEATs' outputs at the
  padded positions on to the Q-Former.

With `config.trim_windows` (salmonn_cli/trim.py) each sample has its own number of audio tokens;
its row stays contiguous, so positions and masking are those of the sample alone.

`TrainingModel.forward` returns sums (cross-entropy, target tokens, correct argmax predictions)
rather than a mean, so that the caller can normalise by the token count of the whole global batch:
then any split over processes and micro-steps gives the same gradient (train/loop.py).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from salmonn_cli.trim import audio_token_count, mel_frame_count
from train.data import IGNORE_INDEX, Batch
from train.encoder_cache import FrozenEncoderCache
from train.model import Salmonn, pad_time, project_audio_tokens, window_index, window_starts


def beats_grad(model: Salmonn):
    """Autograd through BEATs only when it trains (`[model] train_beats`); frozen by default."""
    trains = any(p.requires_grad for p in model.beats.parameters())
    return torch.set_grad_enabled(torch.is_grad_enabled() and trains)


def frozen_states(model: Salmonn, mel: torch.Tensor, fbanks: list[torch.Tensor],
                  keys: list[tuple[str, ...]] | None = None,
                  cache: FrozenEncoderCache | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per clip, before their LayerNorms: Whisper's last hidden state (T, d) (with
    `config.trim_windows` only the frames its windows read) and BEATs' output (T_b, width).

    Without a cache Whisper runs batched (over the clips of equal length when trimming); with one,
    each missing clip runs alone and is stored under `keys[i]` (train/encoder_cache.py).
    """
    config = model.config
    encoder = model.audio_encoder()
    trimmed = config.trim_windows
    mel_frames = [mel_frame_count(config, f.shape[0]) if trimmed else mel.shape[-1] for f in fbanks]
    speech: list[torch.Tensor | None] = [None] * len(fbanks)
    sounds: list[torch.Tensor | None] = [None] * len(fbanks)
    if cache is not None:
        for i, key in enumerate(keys):
            entry = cache.get(key)
            if entry is not None:
                speech[i], sounds[i] = entry
    missing = [i for i, s in enumerate(speech) if s is None]
    groups = ([[i] for i in missing] if cache is not None else
              [[i for i in missing if mel_frames[i] == n] for n in sorted({mel_frames[i] for i in missing})])
    with torch.no_grad():
        for rows in groups:
            for row, state in zip(rows, encoder.whisper(mel[rows, :, :mel_frames[rows[0]]])):
                speech[row] = state
    with beats_grad(model):
        for i, fbank in enumerate(fbanks):
            if sounds[i] is None:
                sounds[i] = model.beats(fbank.unsqueeze(0))[0]
    if cache is not None:
        for i in missing:
            cache.put(keys[i], speech[i], sounds[i])
    return speech, sounds


def encode_batch(model: Salmonn, mel: torch.Tensor, fbanks: list[torch.Tensor],
                 keys: list[tuple[str, ...]] | None = None,
                 cache: FrozenEncoderCache | None = None) -> torch.Tensor:
    """(B, n_mels, frames), B x (F_i, 128) -> audio embeddings (B, n_audio_tokens, llm_hidden).

    The frozen encoders run without autograd (or come from `cache`, by clip `keys`); the
    LayerNorms, Q-Former and projection train. With `config.trim_windows` sample i has
    `audio_token_count(config, F_i)` tokens, zero-padded at the end to the longest
    (`assemble_inputs` takes each sample's own count), each clip cut to its own windows
    (salmonn_cli/trim.py) exactly as `Salmonn.encode_audio` computes one clip.
    """
    speech, sounds = frozen_states(model, mel, fbanks, keys, cache)
    config = model.config
    encoder = model.audio_encoder()
    kernel, stride = config.window_frames, config.stride_frames
    if config.trim_windows:
        fused = [encoder.join(model.ln_speech(s.unsqueeze(0)), model.ln_audio(a.unsqueeze(0))) for s, a in zip(speech, sounds)]
        # the clips end to end on one time axis, each cut into its own windows
        starts = [window_starts(f.shape[1], kernel, stride, f.device) for f in fused]
        offsets = itertools.accumulate((f.shape[1] for f in fused[:-1]), initial=0)
        index = window_index(torch.cat([s + offset for s, offset in zip(starts, offsets)]), kernel)
        counts = [len(s) for s in starts]
        queries = model.speech_Qformer.read(model.speech_query_tokens, torch.cat(fused, dim=1), index)
    else:
        speech = model.ln_speech(torch.stack(speech))
        sounds = [model.ln_audio(s) for s in sounds]
        frames = max(speech.shape[1], *(s.shape[0] for s in sounds))
        sounds = torch.stack([pad_time(s.unsqueeze(0), frames)[0] for s in sounds])
        fused = torch.cat([pad_time(speech, frames), sounds], dim=-1)
        starts = window_starts(frames, kernel, stride, fused.device)
        counts = [len(starts)] * fused.shape[0]
        queries = model.speech_Qformer.read(model.speech_query_tokens, fused, window_index(starts, kernel))
        fused = list(fused.unsqueeze(1))
    tokens = project_audio_tokens(model.speech_llama_proj, queries, config.audio_token_rms)
    per_clip = [t.reshape(-1, t.shape[-1]) for t in tokens.split(counts)]
    if model.clip_token_head is not None:
        # each clip's frames with its own log-mel columns (those Whisper read when trimmed), one padded batch;
        # detached: the clip token reads the LayerNorms' output without training them (its gradient through
        # them cost salmonn-nano ~0.04 s of a 0.31 s [align] step)
        frames = [encoder.clip_frames(f.detach(), mel[i:i + 1, :, :f.shape[1] * config.mel_columns_per_frame]
                                      if config.trim_windows else mel[i:i + 1])[0] for i, f in enumerate(fused)]
        n_frames = [f.shape[0] for f in frames]
        clip_tokens = encoder.clip_token(torch.stack([pad_time(f[None], max(n_frames))[0] for f in frames]), n_frames)
        per_clip = [torch.cat([t, c.to(t.dtype)]) for t, c in zip(per_clip, clip_tokens)]
    longest = max(t.shape[0] for t in per_clip)
    return torch.stack([F.pad(t, (0, 0, 0, longest - t.shape[0])) for t in per_clip])


def audio_token_counts(model: Salmonn, audio_embeds: torch.Tensor, batch: Batch) -> list[int]:
    """Each sample's number of audio tokens in `audio_embeds` (its padding excluded)."""
    if not model.config.trim_windows:
        return [audio_embeds.shape[1]] * len(batch)
    return [audio_token_count(model.config, fbank.shape[0]) for fbank in batch.fbanks]


def window_token_counts(model: Salmonn, audio_embeds: torch.Tensor, batch: Batch) -> list[int]:
    """Each sample's window tokens: its audio tokens less the clip token that ends them, if any."""
    return [n - model.config.n_clip_tokens for n in audio_token_counts(model, audio_embeds, batch)]


def assemble_inputs(model: Salmonn, audio_embeds: torch.Tensor,
                    batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> inputs_embeds (B, T, H), attention_mask (B, T), labels (B, T); right-padded."""
    embed = model.llama_model.get_input_embeddings()
    device = audio_embeds.device
    bos = model.config.llm.bos_token_id
    n_audio = audio_token_counts(model, audio_embeds, batch)
    rows, labels = [], []
    for i in range(len(batch)):
        before = [bos, *batch.ids_before[i]]
        text = torch.tensor(before + batch.ids_after[i] + batch.answer_ids[i], dtype=torch.long, device=device)
        text_embeds = embed(text)
        audio = audio_embeds[i, :n_audio[i]].to(text_embeds.dtype)
        rows.append(torch.cat([text_embeds[:len(before)], audio, text_embeds[len(before):]]))
        n_prompt = len(before) + audio.shape[0] + len(batch.ids_after[i])
        labels.append([IGNORE_INDEX] * n_prompt + batch.answer_ids[i])
    length = max(r.shape[0] for r in rows)
    inputs = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
    mask = torch.tensor([[1] * r.shape[0] + [0] * (length - r.shape[0]) for r in rows], device=device)
    label_tensor = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels], device=device)
    return inputs, mask, label_tensor


def shifted_loss_sums(model: Salmonn, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, number of targets, number of correct argmax predictions).

    The LM head runs only on the positions that predict a target, not on the audio and prompt.
    """
    llm = model.llm
    hidden = llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    predicts = targets != IGNORE_INDEX
    logits = llm.lm_head(hidden[:, :-1][predicts]).float()
    wanted = targets[predicts]
    ce_sum = F.cross_entropy(logits, wanted, reduction="sum")
    correct = (logits.argmax(dim=-1) == wanted).sum()
    return ce_sum, predicts.sum(), correct


def swap_audio(audio_embeds: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Give sample i the audio tokens of sample i + 1 (cut or zero-padded to its own count).

    The loss on swapped audio minus the real loss says how much the model uses the audio: about 0
    when the connector has collapsed and the LLM answers from the prompt alone.
    """
    swapped = torch.zeros_like(audio_embeds)
    for i, count in enumerate(counts):
        j = (i + 1) % len(counts)
        keep = min(count, counts[j])
        swapped[i, :keep] = audio_embeds[j, :keep]
    return swapped


class TrainingModel(nn.Module):
    """What DistributedDataParallel wraps: forward(batch) -> (ce_sum, n_targets, n_correct, ctc_sum);
    ctc_sum is `ctc`'s loss on the batch's audio (train/align.py `CtcObjective`), 0 without one."""

    def __init__(self, model: Salmonn, encoder_cache: FrozenEncoderCache | None = None,
                 ctc: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.encoder_cache = encoder_cache
        self.ctc = ctc

    def encode(self, batch: Batch) -> torch.Tensor:
        """The batch's audio embeddings, the frozen encoders' outputs taken from the cache if any."""
        cache = self.encoder_cache if len(batch.clips) == len(batch) else None
        return encode_batch(self.model, batch.mel, batch.fbanks, batch.clips, cache)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        audio = self.encode(batch)
        ce_sum, n_targets, n_correct = self.loss_sums(batch, audio)
        if self.ctc is None:
            return ce_sum, n_targets, n_correct, torch.zeros((), device=audio.device)
        return ce_sum, n_targets, n_correct, self.ctc(audio, batch.clips, window_token_counts(self.model, audio, batch))

    def loss_sums(self, batch: Batch, audio_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` on audio embeddings already computed (validation also scores them swapped)."""
        inputs, mask, labels = assemble_inputs(self.model, audio_embeds, batch)
        return shifted_loss_sums(self.model, inputs, mask, labels)
