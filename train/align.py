"""Connector warm-up by CTC (`[align] steps`), run before the LM stage.

A fresh Q-Former's tokens mean nothing to the LLM, and in the LM stage the connector learns only
from gradients that come back through the whole LLM; on salmonn-nano the LLM learned the answers'
wording from the prompt long before it read the audio (train/nano/README.md). Alignment gives the
connector a direct target and costs no LLM pass: every audio token is scored by its dot product with
the LLM's own (frozen) input embeddings of the token ids that occur in the targets, plus a learned
blank, and CTC sums over all monotonic alignments of a clip's target ids to its audio tokens. The
LM stage then starts from tokens that already lie near the embeddings of the words they carry.

Target: one per clip, its transcript (task asr) when it has one, else its answer for the first other
task of `[align] tasks` it has (a caption): two targets for the same frames would contradict each
other. A target longer than the clip's audio tokens cannot be aligned and adds no gradient
(`zero_infinity`): the windows must be short enough for the target's units a second.

The units are either the LLM's own token ids (`CtcHead`, the default) or, with `[align] pieces = N`, a
vocabulary of N word pieces learned (byte-pair merges) from the training transcripts themselves
(`PieceCtcHead`, a trained linear classifier). The first puts each audio token near the LLM's embedding of
the word it carries, but an open-vocabulary set has thousands of ids seen a few times each, and a head
that must tell them apart from a few examples learns the frequent words only. A few hundred pieces are
each heard hundreds of times and spell any word, so the connector learns how words sound.

With `[align] whisper_vocab` (a model with `[model] audio_vocab`, whose window tokens are Whisper's next-word
distributions written as LLM embeddings: train/vocab_projection.py) the units are Whisper's own kept tokens and
the scores the projection's Whisper logits themselves (`WhisperVocabCtcHead`, no parameters): the blank is
<|endoftext|>, what the decoder predicts where nothing is said. CTC then teaches the decoder to write each word
on a window where it is heard, in the vocabulary it already reads, and the LLM embeddings follow; only clips
whose target is a transcript count (a clip with no speech: all blank), a caption is not what its windows say.
CTC over the LLM's ids on such a connector collapsed its word tokens (train/nano/README.md).

With `[align] tag_field` (an annotation field naming each clip's sound class, e.g. nano's "event") a
`TagHead` also learns to name that class from the clip's audio tokens (attention pooling over them),
at `tag_weight`: CTC alone teaches speech clips' tokens to spell the words, and a sound behind the
speech, which no transcript mentions, is otherwise lost (train/nano/README.md).
Clips without the field are class "" (nothing but speech). A model with a clip token
(`[model] clip_token_hidden`) learns the class on that token instead (`ClipTagHead`): it is scored
against the LLM's own input embedding of each class's name, so the token the LLM reads starts out
looking like the word for the sound; the window tokens are then left to the CTC loss alone.

Only the connector trains here (LayerNorms, Q-Former, projection), not LoRA nor a trainable BEATs.
With `[align] lm_weight` > 0 the same CTC loss (`CtcObjective`, the head frozen) stays in the LM stage's
objective at that weight, so the connector keeps learning to spell the words while the LLM learns to read.
Its result, OUT_DIR/align.pth, holds the trainable tensors in the official key layout (LoRA as
initialised) and the CTC head; a run
that finds the file loads it instead of aligning again (alignment itself is not resumable mid-way:
killed, it starts over). Under torchrun every process aligns alone on the same data in the same order,
and DistributedDataParallel then starts every process from rank 0's weights.
"""
from __future__ import annotations

import json
import math
import re
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from train.data import AnnotationDataset, Batch, Sample, SampleStream, collate, read_annotations
from train.encoder_cache import FrozenEncoderCache
from train.loss import encode_batch, window_token_counts
from train.model import Salmonn
from train.official import apply_checkpoint_state, atomic_save
from train.vocab_projection import (WHISPER_END_OF_TEXT, VocabProjection, byte_level_words, from_byte_level,
                                    split_into)
from train.weight_decay import decays

ALIGN_NAME = "align.pth"
ALIGN_LOG_NAME = "align.jsonl"
LOG_EVERY = 50
TRANSCRIPT_TASK = "asr"           # the task whose answers are what the clip's windows say
WARMUP_FRACTION = 0.05          # linear warm-up over the first 5 % of the steps
FINAL_LR_FRACTION = 0.1         # then cosine down to a tenth


def ctc_targets(samples: list[Sample], tasks: list[str]) -> list[Sample]:
    """One sample per clip: its asr transcript if any, else its answer of the first listed task it has."""
    rank = {task: i for i, task in enumerate(tasks)}
    best: dict[tuple[str, ...], Sample] = {}
    for sample in samples:
        if sample.task not in rank:
            continue
        key = (sample.path, *sample.expand_wav)
        kept = best.get(key)
        if kept is None or rank[sample.task] < rank[kept.task]:
            best[key] = sample
    return list(best.values())


class CtcHead(nn.Module):
    """Audio tokens (B, T, H) -> log-probabilities (B, T, 1 + V): class 0 is the blank, class k the
    LLM token `ids[k - 1]`, scored against that token's frozen input embedding."""

    def __init__(self, embeddings: torch.Tensor, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long))
        self.register_buffer("targets", embeddings[self.ids].detach().clone())
        self.blank = nn.Parameter(torch.zeros(embeddings.shape[1]))
        self.blank_bias = nn.Parameter(torch.zeros(()))
        self.log_scale = nn.Parameter(torch.zeros(()))       # learned sharpness of the dot products

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = tokens.dtype
        blank = tokens @ self.blank.to(dtype) + self.blank_bias.to(dtype)
        logits = torch.cat([blank.unsqueeze(-1), tokens @ self.targets.to(dtype).T], dim=-1)
        return (logits.float() * self.log_scale.exp()).log_softmax(dim=-1)

    def classes(self, llm_ids: list[int]) -> list[int]:
        index = {int(token): k + 1 for k, token in enumerate(self.ids.tolist())}
        return [index[token] for token in llm_ids]

    def greedy(self, log_probs: torch.Tensor) -> list[int]:
        """(T, 1 + V) of one clip -> LLM token ids: best class per token, repeats merged, blanks dropped."""
        best = log_probs.argmax(dim=-1).tolist()
        return [int(self.ids[c - 1]) for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])]


def spoken_form(text: str) -> str:
    """What a transcript's pieces spell: lowercase letters, digits and apostrophes, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


class PieceVocabulary:
    """N word pieces learned by byte-pair merges from transcripts (`tokenizers`' BPE, words marked by a
    leading "▁" as in sentencepiece, so that pieces decode back to the words with their spaces)."""

    UNKNOWN = "<unk>"

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer

        self.serialized = serialized
        self._tokenizer = Tokenizer.from_str(serialized)

    @classmethod
    def train(cls, texts: list[str], size: int) -> "PieceVocabulary":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token=cls.UNKNOWN))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[cls.UNKNOWN], show_progress=False)
        tokenizer.train_from_iterator(sorted({spoken_form(t) for t in texts} - {""}), trainer)
        return cls(tokenizer.to_str())

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        text = spoken_form(text)
        return self._tokenizer.encode(text).ids if text else []

    def decode(self, pieces: list[int]) -> str:
        return self._tokenizer.decode(pieces).strip()


class PieceCtcHead(nn.Module):
    """Audio tokens (B, T, H) -> log-probabilities (B, T, 1 + N): class 0 is the blank, class k the word
    piece k - 1 of `vocabulary`, scored by a trained linear layer (after a LayerNorm: the audio tokens
    may be rescaled to the small RMS of the LLM's embeddings)."""

    def __init__(self, hidden: int, vocabulary: PieceVocabulary):
        super().__init__()
        self.vocabulary = vocabulary
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, 1 + len(vocabulary))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(tokens.float())).log_softmax(dim=-1)

    def target(self, text: str) -> list[int]:
        return [piece + 1 for piece in self.vocabulary.encode(text)]

    def transcript(self, log_probs: torch.Tensor) -> str:
        """(T, 1 + N) of one clip -> text: best class per token, repeats merged, blanks dropped."""
        best = log_probs.argmax(dim=-1).tolist()
        return self.vocabulary.decode([c - 1 for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])])


class WhisperVocabCtcHead(nn.Module):
    """The window tokens' Whisper logits (B, T, N + 1; `VocabProjection.logits`, the kept text tokens then
    <|endoftext|>) -> log-probabilities (B, T, 1 + N): class 0, the blank, is <|endoftext|>, class k the kept
    Whisper token k - 1 (`pieces`, byte-level BPE spellings). No parameters: the scores are the projection's."""

    def __init__(self, pieces: tuple[str, ...]):
        super().__init__()
        if len(pieces) < 2 or pieces[-1] != WHISPER_END_OF_TEXT:
            raise ValueError(f"Whisper's kept pieces must end with {WHISPER_END_OF_TEXT}")
        self.pieces = tuple(pieces)
        self._class = {piece: k + 1 for k, piece in enumerate(self.pieces[:-1])}

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        log_probs = logits.float().log_softmax(dim=-1)
        return torch.cat([log_probs[..., -1:], log_probs[..., :-1]], dim=-1)

    def target(self, text: str) -> list[int]:
        """A transcript -> classes: its byte-level spelling (after a space, as Whisper writes a transcript's
        first word), each pre-tokenized word cut into kept pieces by greedy longest match; "" -> [] (all blank)."""
        text = text.strip()
        return [c for word in byte_level_words(" " + text) for c in split_into(word, self._class)] if text else []

    def transcript(self, log_probs: torch.Tensor) -> str:
        """(T, 1 + N) of one clip -> text: best class per token, repeats merged, blanks dropped."""
        best = log_probs.argmax(dim=-1).tolist()
        kept = [self.pieces[c - 1] for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])]
        return from_byte_level("".join(kept)).strip()


AnyCtcHead = CtcHead | PieceCtcHead | WhisperVocabCtcHead


class TagHead(nn.Module):
    """Audio tokens (B, T, H) of clips with `counts` real tokens -> class logits (B, C): a per-token
    linear classifier averaged with learned attention weights over each clip's own tokens."""

    def __init__(self, hidden: int, classes: list[str]):
        super().__init__()
        self.classes = list(classes)
        self.attention = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, len(classes))

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        tokens = tokens.float()
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < torch.tensor(counts, device=tokens.device)[:, None]
        weights = self.attention(tokens).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(dim=-1)
        return (weights.unsqueeze(-1) * self.classifier(tokens)).sum(dim=1)


class ClipTagHead(nn.Module):
    """Clip tokens (B, H) -> class logits (B, C): each class scored by the token's dot product with the
    LLM's frozen input embedding of its name (the mean over the name's tokens); class "" (no sound but
    speech), which has no word, by a learned vector. `classes` sorted, so "" (if present) comes first."""

    def __init__(self, classes: list[str], name_embeddings: dict[str, torch.Tensor]):
        super().__init__()
        self.classes = list(classes)
        hidden = next(iter(name_embeddings.values())).shape[-1]
        self.register_buffer("names", torch.stack([name_embeddings[c].detach().clone() for c in self.classes if c])
                             if any(self.classes) else torch.zeros(0, hidden))
        self.none = nn.Parameter(torch.zeros(hidden)) if "" in self.classes else None
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        rows = self.names if self.none is None else torch.cat([self.none[None], self.names])
        return (tokens @ rows.T) * self.log_scale.exp()


def name_embeddings(model: Salmonn, dataset: AnnotationDataset, names: list[str]) -> dict[str, torch.Tensor]:
    """Class name -> the mean of the LLM's input embeddings of its tokens, spelt as inside a sentence
    (after a space: "A bell rings.")."""
    embeddings = model.llama_model.get_input_embeddings().weight.detach()
    eos = model.config.llm.eos_token_id
    return {name: embeddings[[t for t in dataset._tokens(" " + name) if t != eos]].float().mean(dim=0)
            for name in names if name}


def clip_tags(annotation_file: str | Path, field: str) -> dict[tuple[str, ...], str]:
    """Clip key -> the value of `field` in its annotation entries ("" where absent)."""
    entries = json.loads(Path(annotation_file).read_text(encoding="utf-8"))["annotation"]
    tags: dict[tuple[str, ...], str] = {}
    for sample, entry in zip(read_annotations(annotation_file), entries):
        key = (sample.path, *sample.expand_wav)
        tags[key] = tags.get(key) or str(entry.get(field) or "")
    return tags


def whisper_pieces(model: Salmonn) -> tuple[str, ...]:
    """The Whisper pieces `model`'s vocabulary projection reads (`[align] whisper_vocab` needs them)."""
    projection = model.speech_llama_proj
    if not isinstance(projection, VocabProjection) or not projection.pieces:
        raise ValueError("[align] whisper_vocab needs a model built with [model] audio_vocab > 0 from Whisper's vocabulary")
    return projection.pieces


def ctc_log_probs(model: Salmonn, head: AnyCtcHead, batch: Batch,
                  cache: FrozenEncoderCache | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A batch's audio tokens (B, T, H), the CTC head's log-probabilities of its window tokens
    (B, T', classes) and each sample's window-token count. A `WhisperVocabCtcHead` scores the Whisper
    logits the projection computes on the way to the tokens (caught there, not computed twice)."""
    if not isinstance(head, WhisperVocabCtcHead):
        tokens = encode_batch(model, batch.mel, batch.fbanks, batch.clips, cache)
        return tokens, head(tokens), window_token_counts(model, tokens, batch)
    caught = []
    hook = model.speech_llama_proj.logits.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        tokens = encode_batch(model, batch.mel, batch.fbanks, batch.clips, cache)
    finally:
        hook.remove()
    counts = window_token_counts(model, tokens, batch)
    # one row per window token of the batch, clip after clip, as `encode_batch` cuts its tokens
    logits = caught[0].reshape(-1, caught[0].shape[-1])
    return tokens, head(pad_sequence(list(logits.split(counts)), batch_first=True)), counts


def ctc_loss(log_probs: torch.Tensor, targets: list[list[int]], counts: list[int], reduction: str) -> torch.Tensor:
    """CTC of (B, T, 1 + V) log-probabilities (blank 0) against each sample's target classes; a target
    that cannot fit its sample's `counts` tokens adds nothing."""
    device = log_probs.device
    # torch's CPU CTC has no bf16 kernel, and CPU autocast may leave the head's output in bf16
    return F.ctc_loss(log_probs.float().transpose(0, 1), torch.tensor([c for t in targets for c in t], device=device),
                      torch.tensor(counts), torch.tensor([len(t) for t in targets]), blank=0,
                      reduction=reduction, zero_infinity=True)


def lr_factor(step: int, steps: int) -> float:
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def align(model: Salmonn, dataset: AnnotationDataset, *, steps: int, lr: float, batch_size: int,
          weight_decay: float, grad_clip: float, seed: int, eos_token_id: int,
          cache: FrozenEncoderCache | None, autocast: Callable[[], AbstractContextManager],
          log: Callable[[dict], None], tags: dict[tuple[str, ...], str] | None = None,
          tag_weight: float = 0.0, pieces: int = 0, whisper_vocab: bool = False,
          window_lr_scale: float = 1.0, ctc_weight: float = 1.0) -> tuple[AnyCtcHead, TagHead | ClipTagHead | None]:
    """Train the connector of `model` by CTC on `dataset` (one target per clip) for `steps` steps: over the
    LLM's token ids, with `pieces` > 0 over that many word pieces learned from the targets, or with
    `whisper_vocab` over the Whisper tokens its vocabulary projection reads (transcripts only); with
    `tags` (clip key -> class, see `clip_tags`) also by a `TagHead`'s cross-entropy at `tag_weight`. Connector
    parameters that make the window tokens (`Salmonn.in_window_path`) move at `window_lr_scale` times `lr`.
    The CTC loss counts at `ctc_weight`; at 0 it is only logged and the window tokens do not train."""

    device = next(model.parameters()).device
    embeddings = model.llama_model.get_input_embeddings().weight.detach()
    if whisper_vocab:
        head = WhisperVocabCtcHead(whisper_pieces(model)).to(device)
    elif pieces:
        vocabulary = PieceVocabulary.train([s.text for s in dataset.samples], pieces)
        head = PieceCtcHead(embeddings.shape[1], vocabulary).to(device)
    else:
        ids = sorted({t for s in dataset.samples for t in dataset._tokens(s.text) if t != eos_token_id})
        head = CtcHead(embeddings, ids).to(device)
    clip_targets = target_classes(dataset, head, eos_token_id)
    tag_head = None
    if tags is not None:
        classes = sorted({tags.get((s.path, *s.expand_wav), "") for s in dataset.samples} | {""})
        if model.clip_token_head is not None:
            tag_head = ClipTagHead(classes, name_embeddings(model, dataset, classes)).to(device)
        else:
            tag_head = TagHead(embeddings.shape[1], classes).to(device)
    heads = list(head.parameters()) + (list(tag_head.parameters()) if tag_head is not None else [])
    connector = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad and ".lora_" not in n and not n.startswith("beats.")
                 and (ctc_weight or n.startswith("clip_token_head."))]      # without CTC only the clip token learns
    # clipped apart: the CTC side (connector and CTC head) and the tag side (tag head, clip token head), so
    # that the tag loss's gradient does not shrink the CTC's (nano: one shared clip slowed the CTC by ~half)
    tag_side = [p for n, p in connector if n.startswith("clip_token_head.")] + (
        list(tag_head.parameters()) if tag_head is not None else [])
    ctc_side = [p for n, p in connector if not n.startswith("clip_token_head.")] + list(head.parameters())
    groups = []
    for window in (False, True):
        scale = window_lr_scale if window else 1.0
        mine = [(n, p) for n, p in connector if model.in_window_path(n) == window]
        groups += [{"params": [p for n, p in mine if decays(n, p)], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for n, p in mine if not decays(n, p)] + ([] if window else heads),
                    "weight_decay": 0.0, "lr_scale": scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    stream = SampleStream(len(dataset), seed)
    model.train()
    started, losses, tag_losses, tag_hits = time.perf_counter(), [], [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps) * group["lr_scale"]
        batch = collate([dataset[(stream[step * batch_size + i], 0)] for i in range(batch_size)]).to(device)
        with autocast():
            tokens, log_probs, counts = ctc_log_probs(model, head, batch, cache)
        rows = [i for i, clip in enumerate(batch.clips) if clip in clip_targets]
        ctc = (ctc_loss(log_probs[rows], [clip_targets[batch.clips[i]] for i in rows], [counts[i] for i in rows], "mean")
               if rows else log_probs.sum() * 0.0)
        losses.append(float(ctc.detach()))
        loss = ctc_weight * ctc if ctc_weight else 0.0
        if tag_head is not None:
            labels = torch.tensor([tag_head.classes.index(tags.get(clip, "")) for clip in batch.clips], device=device)
            if isinstance(tag_head, ClipTagHead):       # the clip token follows each clip's window tokens
                logits = tag_head(tokens[torch.arange(len(counts)), torch.tensor(counts)])
            else:
                logits = tag_head(tokens, counts)
            tag_loss = F.cross_entropy(logits, labels)
            tag_losses.append(float(tag_loss.detach()))
            tag_hits.append(float((logits.argmax(dim=-1) == labels).float().mean()))
            loss = loss + tag_weight * tag_loss
        loss.backward()
        if grad_clip > 0:
            for side in (ctc_side, tag_side):
                if side:
                    torch.nn.utils.clip_grad_norm_(side, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            record = {"step": step + 1, "split": "align", "ctc": sum(losses) / len(losses),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
                      "cached_clips": len(cache) if cache is not None else 0}
            if tag_losses:
                record.update(tag=sum(tag_losses) / len(tag_losses), tag_accuracy=sum(tag_hits) / len(tag_hits))
            log(record)
            losses, tag_losses, tag_hits = [], [], []
    return head, tag_head


def save_alignment(path: Path, model: Salmonn, head: AnyCtcHead, checkpoint_config: dict,
                   tag_head: TagHead | ClipTagHead | None = None) -> None:

    def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    saved = {"model": {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()},
             "head": cpu(head), "config": checkpoint_config}
    if isinstance(head, PieceCtcHead):
        saved["pieces"] = head.vocabulary.serialized
    if isinstance(head, WhisperVocabCtcHead):
        saved["whisper_vocab"] = True
    if tag_head is not None:
        saved.update(tag_head=cpu(tag_head), tag_classes=tag_head.classes)
    atomic_save(saved, path)


def load_alignment(path: Path, model: Salmonn) -> AnyCtcHead:
    """Put the aligned connector of `path` into `model`; returns the CTC head."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    apply_checkpoint_state(model, saved["model"], source=str(path))
    if saved.get("whisper_vocab"):
        return WhisperVocabCtcHead(whisper_pieces(model))
    head_state = saved["head"]
    embeddings = model.llama_model.get_input_embeddings().weight.detach().cpu()
    if "pieces" in saved:
        head = PieceCtcHead(embeddings.shape[1], PieceVocabulary(saved["pieces"]))
    else:
        head = CtcHead(embeddings, head_state["ids"].tolist())
    head.load_state_dict(head_state)
    return head


def alignment_set(dataset: AnnotationDataset, tasks: list[str]) -> AnnotationDataset:
    """`dataset` cut down to one CTC target per clip (`ctc_targets`)."""
    return AnnotationDataset(ctc_targets(dataset.samples, tasks), dataset.prompts, dataset.config,
                             dataset.tokenizer, dataset.max_txt_len, dataset.seed)



def target_classes(dataset: AnnotationDataset, head: AnyCtcHead,
                   eos_token_id: int) -> dict[tuple[str, ...], list[int]]:
    """Clip key -> its CTC target as head classes, for the clips of an alignment set (a
    `WhisperVocabCtcHead`: only the clips whose target is a transcript)."""
    if isinstance(head, WhisperVocabCtcHead):
        return {(s.path, *s.expand_wav): head.target(s.text) for s in dataset.samples if s.task == TRANSCRIPT_TASK}
    if isinstance(head, PieceCtcHead):
        return {(s.path, *s.expand_wav): head.target(s.text) for s in dataset.samples}
    return {(s.path, *s.expand_wav): head.classes([t for t in dataset._tokens(s.text) if t != eos_token_id])
            for s in dataset.samples}


def transcript(head: AnyCtcHead, log_probs: torch.Tensor, dataset: AnnotationDataset) -> str:
    """Greedy CTC decoding of one clip's (T, classes) log-probabilities, as text."""
    if isinstance(head, (PieceCtcHead, WhisperVocabCtcHead)):
        return head.transcript(log_probs)
    return dataset.tokenizer.decode(head.greedy(log_probs))


class CtcObjective(nn.Module):
    """The alignment's CTC loss during the LM stage: summed over the samples of a batch whose clip has a
    target (other samples add nothing), in nats per clip, like the LM loss's per-token sums."""

    def __init__(self, head: CtcHead, targets: dict[tuple[str, ...], list[int]]):
        super().__init__()
        self.head = head.requires_grad_(False)
        self.targets = targets

    def forward(self, audio_embeds: torch.Tensor, clips: list[tuple[str, ...]], counts: list[int]) -> torch.Tensor:
        rows = [i for i, clip in enumerate(clips) if clip in self.targets]
        if not rows:
            return audio_embeds.new_zeros((), dtype=torch.float32)
        return ctc_loss(self.head(audio_embeds[rows]), [self.targets[clips[i]] for i in rows],
                        [counts[i] for i in rows], "sum")
