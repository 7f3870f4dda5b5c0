"""The training loop: AdamW with the official weight-decay groups, linear warm-up + cosine schedule,
gradient accumulation and clipping, autocast (GPU; bf16 on CPU with `[run] cpu_amp`),
DistributedDataParallel under torchrun, validation, a JSONL log, and atomic checkpoints that resume
exactly.

    python -m train CONFIG.toml [--resume]                                # one process
    torchrun --nproc_per_node=N -m train CONFIG.toml [--resume]           # N processes (NCCL / gloo)

Loss normalisation: each optimizer step averages the cross-entropy over all target tokens of the
global batch (every process, every micro-step). For one process and one micro-step that is the
official HF mean; for any other split it gives the same gradient as that one big batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from salmonn_cli.config import SalmonnConfig
from train.align import (ALIGN_LOG_NAME, ALIGN_NAME, AnyCtcHead, CtcObjective, align, alignment_set,
                         clip_tags, load_alignment, save_alignment, target_classes)
from train.beats import load_beats_state_dict
from train.data import (AnnotationDataset, SampleStream, StepBatchSampler, StepPlan, Tokenizer, check_tasks,
                        collate, read_annotations, read_prompts, validation_keys)
from train.encoder_cache import FrozenEncoderCache, encoder_identity
from train.loss import TrainingModel, audio_token_counts, swap_audio
from train.model import LORA_NAME_PARTS, Salmonn
from train.official import apply_checkpoint_state, atomic_save, build_from_parts, load_official, official_model_config
from train.run_config import ConfigError, ModelSection, OptimSection, TrainConfig
from train.weight_decay import decays

CHECKPOINT_NAME = "last.pth"
BEST_NAME = "best.pth"
LOG_NAME = "log.jsonl"
# with [model] train_beats: the trained BEATs of last.pth / best.pth (official BEATs .pt)
BEATS_NAMES = {CHECKPOINT_NAME: "last_beats.pt", BEST_NAME: "best_beats.pt"}
# official optimizer groups: no decay for < 2-D tensors and names containing any of these
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- processes -----------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over all processes (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()


def setup_distributed() -> Dist:
    """torchrun's environment -> a process group (NCCL on GPU, gloo on CPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


# --- optimizer and schedule ----------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float, lora_lr_scale: float = 1.0,
                 split_lora: bool = False, window_lr_scale: float = 1.0) -> list[dict]:
    """The official two AdamW groups (weight decay or not) over the trainable parameters. With
    `lora_lr_scale` != 1 or `split_lora` each is split into connector and LoRA parts, marked
    `lora` and with the LoRA part's learning rate scaled by `lr_scale` (WarmupCosineSchedule); with
    `window_lr_scale` != 1 the parameters that make the window tokens (`Salmonn.in_window_path`)
    are split off with their learning rate scaled by it."""
    split = split_lora or lora_lr_scale != 1.0
    groups: dict[tuple[bool, bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lora = split and any(part in name for part in LORA_NAME_PARTS)
            window = window_lr_scale != 1.0 and model.in_window_path(name)
            groups.setdefault((decays(name, param), lora, window), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": lora_lr_scale if lora else window_lr_scale if window else 1.0, "lora": lora}
            for (decay, lora, window), params in sorted(groups.items(), key=lambda item: (not item[0][0], *item[0][1:]))]


def lr_at(step: int, o: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up from `warmup_start_lr`, then
    cosine from `init_lr` to `min_lr` over the global step count (official LinearWarmupCosine)."""
    if step < o.warmup_steps:
        return o.warmup_start_lr + (o.init_lr - o.warmup_start_lr) * step / o.warmup_steps
    return o.min_lr + (o.init_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / o.max_steps))


class WarmupCosineSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimSection):
        self.optimizer, self.optim, self.step = optimizer, optim, 0

    def set(self, step: int) -> float:
        lr = lr_at(step, self.optim)
        lora_frozen = step < self.optim.lora_start_step
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if lora_frozen and group.get("lora") else lr * group.get("lr_scale", 1.0)
        self.step = step
        return lr

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.set(int(state["step"]))


# --- model ---------------------------------------------------------------------------------------

def cpu_has_bf16_units() -> bool:
    """AVX-512 BF16 or AMX: without them torch's bf16 matmuls run in a generic fallback loop
    (`bf16_dot_with_fp32_arith`), slower than fp32 (seen on an AVX2-only AMD EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_autocast_mode(cpu_amp: str) -> str:
    """`[run] cpu_amp` with "auto" resolved for this CPU."""
    if cpu_amp == "auto":
        return "bf16" if cpu_has_bf16_units() else "none"
    return cpu_amp


def build_model(m: ModelSection) -> tuple[Salmonn, SalmonnConfig]:
    """A fresh model, or the previous stage's (`init_checkpoint`: its shapes, LoRA and template)."""
    if m.init_checkpoint:
        model, config = load_official(Path(m.init_checkpoint), Path(m.whisper_path), Path(m.beats_path),
                                      Path(m.llama_path))
    else:
        model, config = build_from_parts(Path(m.whisper_path), Path(m.beats_path), Path(m.llama_path),
                                         qformer=m.qformer_dims(), lora=m.lora_dims(),
                                         second_per_window=m.second_per_window, second_stride=m.second_stride,
                                         prompt_template=m.prompt_template,
                                         prompt_special_tokens=m.prompt_special_tokens,
                                         trim_windows=m.trim_windows,
                                         normalize_audio_tokens=m.normalize_audio_tokens,
                                         clip_token_hidden=m.clip_token_hidden, audio_vocab=m.audio_vocab)
        with torch.no_grad():
            model.ln_audio.weight.fill_(m.beats_stream_gain)
    for module in model.speech_Qformer.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = m.qformer_dropout
    if m.train_beats:
        model.beats.requires_grad_(True)
    return model, config


def save_beats(beats: torch.nn.Module, path: Path) -> Path:
    """A (trained) BEATs as an official BEATs checkpoint {'cfg', 'model'}, atomically."""
    state = {k: v.detach().cpu().clone() for k, v in beats.state_dict().items()}
    atomic_save({"cfg": asdict(beats.dims), "model": state}, path)
    return path


def checkpoint_model_config(config: SalmonnConfig, m: ModelSection) -> dict:
    """`ckpt['config']['model']`: the official keys, with absolute base-model paths for export."""
    return {**official_model_config(config),
            "whisper_path": str(Path(m.whisper_path).resolve()),
            "beats_path": str(Path(m.beats_path).resolve()),
            "llama_path": str(Path(m.llama_path).resolve()),
            "max_txt_len": m.max_txt_len}


# --- checkpoints ---------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """Python, numpy and torch generator states, in types `torch.load(weights_only=True)` accepts."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(d: Dist) -> list[dict]:
    state = rng_state(d.device)
    if d.world_size == 1:
        return [state]
    states = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


# --- logging -------------------------------------------------------------------------------------

class JsonlLog:
    """One JSON object per line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def progress_bar(enabled: bool, total: int, done: int):
    if not enabled:
        return None, None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn())
    task = progress.add_task("train", total=total, completed=done, info="")
    progress.start()
    return progress, task


# --- validation ----------------------------------------------------------------------------------

def evaluate(net: torch.nn.Module, trainer: TrainingModel, dataset: AnnotationDataset, d: Dist, batch_size: int,
             num_workers: int, autocast) -> dict:
    """Teacher-forced loss and next-token accuracy over the answer tokens of the whole set, and
    `audio_gain`: the loss with each batch's audio given to the wrong samples minus the real loss
    (near 0 means the answers do not depend on the audio: a collapsed connector)."""
    keys = validation_keys(len(dataset), d.rank, d.world_size, batch_size)
    loader = DataLoader(dataset, batch_sampler=keys, collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator())
    ce, n, correct, swapped_ce = 0.0, 0.0, 0.0, 0.0
    net.eval()
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(d.device)
            with autocast():
                audio = trainer.encode(batch)
                batch_ce, batch_n, batch_correct = trainer.loss_sums(batch, audio)
                swapped = swap_audio(audio, audio_token_counts(trainer.model, audio, batch))
                batch_swapped_ce = trainer.loss_sums(batch, swapped)[0] if len(batch) > 1 else batch_ce
            ce, n, correct = ce + float(batch_ce), n + float(batch_n), correct + float(batch_correct)
            swapped_ce += float(batch_swapped_ce)
    net.train()
    ce, n, correct, swapped_ce = d.sum(ce, n, correct, swapped_ce)
    n = max(n, 1.0)
    return {"loss": ce / n, "accuracy": correct / n, "audio_gain": (swapped_ce - ce) / n, "tokens": int(n)}


def run_alignment(cfg: TrainConfig, model: Salmonn, config: SalmonnConfig, train_set: AnnotationDataset,
                  cache: FrozenEncoderCache | None, autocast, d: Dist, resume: bool) -> AnyCtcHead:
    """`[align]`: the CTC warm-up of the connector (train/align.py), or its saved result."""
    out_dir = Path(cfg.run.out_dir)
    aligned = out_dir / ALIGN_NAME
    if aligned.is_file():
        return load_alignment(aligned, model)
    if resume:
        raise ConfigError(f"--resume: {aligned} (the [align] result this run started from) is missing")
    a, o = cfg.align, cfg.optim
    log = JsonlLog(out_dir / ALIGN_LOG_NAME, d.is_main, None)
    tags = clip_tags(cfg.data.train, a.tag_field) if a.tag_field else None
    if tags is not None and not any(tags.values()):
        raise ConfigError(f"[align] tag_field {a.tag_field!r}: no entry of {cfg.data.train} has that field")
    head, tag_head = align(model, alignment_set(train_set, a.tasks), steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                           weight_decay=o.weight_decay, grad_clip=o.grad_clip, seed=cfg.run.seed,
                           eos_token_id=config.llm.eos_token_id, cache=cache, autocast=autocast, log=log.write,
                           tags=tags, tag_weight=a.tag_weight, pieces=a.pieces, whisper_vocab=a.whisper_vocab,
                           window_lr_scale=a.window_lr_scale or o.window_lr_scale, ctc_weight=a.ctc_weight)
    if d.is_main:
        save_alignment(aligned, model, head, {"model": checkpoint_model_config(config, cfg.model), "run": cfg.to_dict()},
                       tag_head)
    return head


def training_stream(cfg: TrainConfig, train_set: AnnotationDataset) -> SampleStream:
    """The LM stage's order of training samples: seeded epochs, grouped by length and with each task's
    `[data] task_repeats` when configured."""
    repeats = [cfg.data.task_repeats.get(sample.task, 1) for sample in train_set.samples] if cfg.data.task_repeats else None
    return SampleStream(len(train_set), cfg.run.seed, train_set.approx_lengths() if cfg.data.group_by_length else None,
                        cfg.optim.batch_size, repeats)


# --- the loop ------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) the configured stage; returns the path of the final checkpoint."""
    d = setup_distributed()
    try:
        return _train(cfg, resume, d)
    finally:
        if d.world_size > 1:
            dist.destroy_process_group()


def frozen_encoder_cache(cfg: TrainConfig, config: SalmonnConfig, amp_dtype: torch.dtype | None,
                         device: torch.device) -> FrozenEncoderCache | None:
    """`[run] cache_encoders` (and `encoder_cache_dir`): the frozen encoders' outputs per clip."""
    r, m = cfg.run, cfg.model
    if not r.cache_encoders:
        return None
    identity = ""
    if r.encoder_cache_dir:
        # what decides how many Whisper frames run and their values, besides the weights and the audio
        geometry = {"trim_windows": config.trim_windows, "window_frames": config.window_frames,
                    "stride_frames": config.stride_frames, "max_seconds": config.max_seconds,
                    "sample_rate": config.sample_rate}
        identity = encoder_identity(m.whisper_path, m.beats_path, geometry, str(amp_dtype))
    return FrozenEncoderCache(cache_beats=not m.train_beats, directory=r.encoder_cache_dir or None,
                              identity=identity, device=device)


def build_datasets(cfg: TrainConfig, annotations: dict[str, list], config: SalmonnConfig
                   ) -> tuple[AnnotationDataset, AnnotationDataset | None]:
    """The train set and (when configured) the validation set, each task checked against the prompts."""
    prompts = read_prompts(cfg.data.prompts, config)
    tokenizer = Tokenizer(cfg.model.llama_path)
    datasets = {}
    for split, samples in annotations.items():
        check_tasks(samples, prompts, getattr(cfg.data, split))
        datasets[split] = AnnotationDataset(samples, prompts, config, tokenizer, cfg.model.max_txt_len, cfg.run.seed)
    return datasets["train"], datasets.get("valid")


def place_model(model: Salmonn, d: Dist, llm_dtype: str) -> None:
    """On this process's device; on a GPU the frozen LLM weights in `llm_dtype` (LoRA stays fp32)."""
    model.to(d.device)
    if d.device.type == "cuda" and llm_dtype != "float32":
        for param in model.llama_model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(LLM_DTYPES[llm_dtype])


def across_processes(trainer: TrainingModel, model: Salmonn, d: Dist) -> torch.nn.Module:
    """The module the loop calls: the trainer itself, or under torchrun the trainer in DDP."""
    if d.world_size == 1:
        return trainer
    # the frozen bases are loaded from the same files everywhere: no need to broadcast them
    frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainer, frozen)
    return DistributedDataParallel(trainer, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def resume_from(last_path: Path, cfg: TrainConfig, model: Salmonn, optimizer, schedule, scaler, plan: StepPlan,
                d: Dist) -> tuple[int, float | None]:
    """Load `last_path` into the model, optimizer, schedule, scaler and RNGs: (step, best accuracy)."""
    r = cfg.run
    ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
    saved = ckpt["data"]
    if saved["global_batch"] != plan.global_batch or saved["seed"] != r.seed:
        raise ConfigError(f"{last_path} was written with global batch {saved['global_batch']} and seed "
                          f"{saved['seed']}; this config has {plan.global_batch} and {r.seed}")
    apply_checkpoint_state(model, ckpt["model"], source=str(last_path))
    if cfg.model.train_beats:
        beats_path = last_path.parent / BEATS_NAMES[CHECKPOINT_NAME]
        beats_state = torch.load(beats_path, map_location="cpu", weights_only=True)["model"]
        load_beats_state_dict(model.beats, beats_state, source=str(beats_path))
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    step = int(ckpt["step"])
    if len(ckpt["rng"]) == d.world_size:
        set_rng_state(ckpt["rng"][d.rank], d.device)
    else:
        torch.manual_seed(r.seed + d.rank + step)
    return step, ckpt.get("best_accuracy")


def exportable(model: Salmonn, config: SalmonnConfig, cfg: TrainConfig, name: str) -> dict:
    """What `salmonn export --checkpoint` reads from checkpoint `name`: trained tensors and the model
    config. A trained BEATs is written beside the checkpoint first and named by its `beats_path`."""
    model_config = checkpoint_model_config(config, cfg.model)
    if cfg.model.train_beats:
        beats = Path(cfg.run.out_dir) / BEATS_NAMES[name]
        model_config["beats_path"] = str(save_beats(model.beats, beats).resolve())
    return {"model": {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()},
            "config": {"model": model_config, "run": cfg.to_dict()}}


def optimizer_step(net: torch.nn.Module, micro_batches: list, global_targets: float, *, ctc_weight: float | None,
                   optimizer, scaler, trainable: list, grad_clip: float, autocast, d: Dist
                   ) -> tuple[float, float, float, float]:
    """Accumulate the micro-batches' gradients (normalised by the global batch's target tokens) and
    step: this process's (cross-entropy sum, correct tokens, CTC sum) and the gradient norm."""
    ce_total, correct_total, ctc_total = 0.0, 0.0, 0.0
    for k, batch in enumerate(micro_batches):
        last_micro = k == len(micro_batches) - 1
        no_sync = net.no_sync() if d.world_size > 1 and not last_micro else nullcontext()
        with no_sync:
            with autocast():
                ce_sum, _, correct, ctc_sum = net(batch)
                objective = ce_sum + ctc_weight * ctc_sum if ctc_weight is not None else ce_sum
            # DDP averages gradients over processes; scaling by world size turns that into a sum
            scaler.scale(objective * d.world_size / global_targets).backward()
        ce_total += float(ce_sum.detach())
        ctc_total += float(ctc_sum.detach())
        correct_total += float(correct)
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in trainable if p.grad is not None])))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return ce_total, correct_total, ctc_total, grad_norm


def _train(cfg: TrainConfig, resume: bool, d: Dist) -> Path:
    m, o, r = cfg.model, cfg.optim, cfg.run
    if r.threads:
        torch.set_num_threads(r.threads)
    out_dir = Path(r.out_dir)
    last_path = out_dir / CHECKPOINT_NAME
    if resume and not last_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {last_path}")
    if not resume and last_path.exists():
        raise ConfigError(f"{last_path} exists; pass --resume to continue that run, or choose another out_dir")

    annotations = {split: read_annotations(path) for split, path in
                   (("train", cfg.data.train), ("valid", cfg.data.valid)) if path}   # fail before loading models
    # identical initialisation on every process, then a per-process seed for dropout (official: seed + rank)
    random.seed(r.seed)
    np.random.seed(r.seed)
    torch.manual_seed(r.seed)
    model, config = build_model(m)
    train_set, valid_set = build_datasets(cfg, annotations, config)
    place_model(model, d, r.llm_dtype)
    amp_dtype = AMP_DTYPES.get(r.amp if d.device.type == "cuda" else cpu_autocast_mode(r.cpu_amp))
    cache = frozen_encoder_cache(cfg, config, amp_dtype, d.device)

    def autocast():
        return torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    ctc = None
    if cfg.align.steps:                     # on resume the checkpoint loaded below replaces the connector
        head = run_alignment(cfg, model, config, train_set, cache, autocast, d, resume)
        if cfg.align.lm_weight > 0:
            targets = target_classes(alignment_set(train_set, cfg.align.tasks), head, config.llm.eos_token_id)
            ctc = CtcObjective(head.to(d.device), targets)
    trainer = TrainingModel(model, cache, ctc)
    net = across_processes(trainer, model, d)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.lora_lr_scale, o.lora_start_step > 0,
                                               o.window_lr_scale),
                                  lr=o.init_lr, betas=(o.beta1, o.beta2))
    schedule = WarmupCosineSchedule(optimizer, o)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    plan = StepPlan(o.batch_size, o.accum_steps, d.world_size)
    stream = training_stream(cfg, train_set)

    start_step, best_accuracy = 0, None
    if resume:
        start_step, best_accuracy = resume_from(last_path, cfg, model, optimizer, schedule, scaler, plan, d)
    else:
        torch.manual_seed(r.seed + d.rank)

    def save(step: int) -> None:
        states = gather_rng_states(d)
        if d.is_main:
            atomic_save({
                **exportable(model, config, cfg, CHECKPOINT_NAME),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": states,
                "data": {"position": plan.data_position(step), "global_batch": plan.global_batch, "seed": r.seed,
                         "epoch": plan.data_position(step) // len(train_set)},
                "step": step,
                "epoch": plan.data_position(step) // len(train_set),
                "world_size": d.world_size,
                "best_accuracy": best_accuracy,
            }, last_path)

    log = JsonlLog(out_dir / LOG_NAME, d.is_main, start_step if resume else None)
    loader = DataLoader(train_set, batch_sampler=StepBatchSampler(stream, plan, d.rank, start_step, o.max_steps),
                        collate_fn=collate, num_workers=cfg.data.num_workers,
                        generator=torch.Generator())
    batches = iter(loader)
    progress, task = progress_bar(d.is_main and r.progress, o.max_steps, start_step)
    net.train()
    try:
        for step in range(start_step, o.max_steps):
            started = time.perf_counter()
            micro_batches = [next(batches).to(d.device) for _ in range(o.accum_steps)]
            local_tokens = sum(b.n_tokens(config) for b in micro_batches)
            global_targets, global_tokens = d.sum(sum(b.n_targets for b in micro_batches), local_tokens)
            lr = schedule.set(step)
            ce_total, correct_total, ctc_total, grad_norm = optimizer_step(
                net, micro_batches, global_targets, ctc_weight=cfg.align.lm_weight if ctc is not None else None,
                optimizer=optimizer, scaler=scaler, trainable=trainable, grad_clip=o.grad_clip, autocast=autocast, d=d)

            done = step + 1
            ce_total, correct_total, ctc_total = d.sum(ce_total, correct_total, ctc_total)
            seconds = time.perf_counter() - started
            record = {"step": done, "split": "train", "loss": ce_total / global_targets,
                      "accuracy": correct_total / global_targets, "lr": lr, "grad_norm": grad_norm,
                      "target_tokens": int(global_targets), "tokens_per_s": global_tokens / seconds,
                      "seconds": seconds,
                      # CTC nats per answer token, as the objective adds it
                      **({"ctc": ctc_total / global_targets} if ctc is not None else {})}
            log.write(record)
            if progress is not None:
                progress.update(task, completed=done, info=f"loss {record['loss']:.4f}  lr {lr:.2e}  "
                                                           f"{record['tokens_per_s']:.0f} tok/s")
            if valid_set is not None and (done % r.val_every == 0 or done == o.max_steps):
                metrics = evaluate(net, trainer, valid_set, d, o.batch_size, cfg.data.num_workers, autocast)
                log.write({"step": done, "split": "valid", **metrics})
                if best_accuracy is None or metrics["accuracy"] > best_accuracy:
                    best_accuracy = metrics["accuracy"]
                    if d.is_main:
                        atomic_save({**exportable(model, config, cfg, BEST_NAME), "step": done, "valid": metrics}, out_dir / BEST_NAME)
            if done % r.save_every == 0 or done == o.max_steps:
                save(done)
    finally:
        if progress is not None:
            progress.stop()
    return last_path
