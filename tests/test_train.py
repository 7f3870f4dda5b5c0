"""The training pipeline (train/): data formats, the §7.3 loss, optimizer groups and schedule, and whole
runs on a tiny official-format model written to a temporary folder (tests/official_format.py):
the loss falls, two gloo processes equal one, a SIGKILLed run resumes exactly, and an overfitted
checkpoint exports and answers through `salmonn ask`.

Tolerances: the loss against transformers' own `labels=` loss 1e-5 abs (float32, same graph, measured
~1e-6); the training encoder path against the inference path 1e-5 abs (measured 0 to 1e-6); two DDP
processes against gradient accumulation bitwise, and against one process 5e-5 abs on the parameters
after 2 AdamW steps at lr 3e-3 and 2e-5 abs on Adam's first moments, whose largest entries are ~1
(measured 1.6e-5 and 6.3e-6: the batch-of-2 matmuls sum in another order, and AdamW magnifies that
noise where a gradient is ~0); kill-and-resume bitwise.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import OFFICIAL_TINY
from official_format import OtherShapes, build_official_model
from train.presets import tiny
from train import loop, official
from train.data import (IGNORE_INDEX, Batch, DataError, Sample, SampleStream, StepPlan, check_tasks,
                        choose_prompt, clip_features, load_wave, read_annotations, read_prompts)
from train.loop import WarmupCosineSchedule, lr_at, param_groups
from train.loss import assemble_inputs, encode_batch, shifted_loss_sums, swap_audio
from train.run_config import ConfigError, OptimSection, TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "train" / "stages"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
LOSS_ATOL = 1e-5
ENCODE_ATOL = 1e-5
DDP_ATOL = 5e-5
GRAD_ATOL = 2e-5
SAMPLE_RATE = 16000
TONES = {"clip0.wav": 440.0, "clip1.wav": 220.0, "clip2.wav": 880.0}
OVERFIT_ANSWER = "beep beep"
OVERFIT_PROMPT = "Describe the audio."
OVERFIT_STEPS = 20


# --- a tiny official-format model and data -------------------------------------------------------

def tiny_shapes() -> OtherShapes:
    t = tiny()
    return OtherShapes(whisper=t.whisper, beats=t.beats, qformer=t.qformer, llm=t.llm, lora=t.lora,
                       second_per_window=t.second_per_window, second_stride=t.second_stride)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-base")
    torch.set_num_threads(2)
    build_official_model(root / "base", tiny_shapes(), OFFICIAL_TINY / "vicuna", seed=0, old_lora_keys=False)
    t = np.arange(int(1.2 * SAMPLE_RATE)) / SAMPLE_RATE
    for name, hz in TONES.items():
        sf.write(root / name, 0.3 * np.sin(2 * np.pi * hz * t), SAMPLE_RATE)
    annotation = [{"path": "clip0.wav", "text": "a high tone", "task": "audiocaption"},
                  {"path": "clip1.wav", "text": "a low tone", "task": "audiocaption"},
                  {"path": "clip2.wav", "text": "yes", "task": "QA", "Q": "Is it a tone?"},
                  {"path": "clip0.wav", "text": "beep", "task": "asr"}]
    (root / "train.json").write_text(json.dumps({"annotation": annotation}))
    (root / "valid.json").write_text(json.dumps({"annotation": annotation[:2]}))
    (root / "overfit.json").write_text(json.dumps(
        {"annotation": [{"path": "clip0.wav", "text": OVERFIT_ANSWER, "task": "audiocaption"}]}))
    (root / "one_prompt.json").write_text(json.dumps(
        {"audiocaption": [f"<Speech><SpeechHere></Speech> {OVERFIT_PROMPT}"]}))
    return root


def run_config(base: Path, out_dir: Path, **sections) -> dict:
    """A raw config (TOML tables as dicts) for the tiny model; `sections` update the tables."""
    t = tiny()
    raw = {
        "model": {"whisper_path": str(base / "base/whisper"), "beats_path": str(base / "base/beats.pt"),
                  "llama_path": str(base / "base/vicuna"), "qformer_hidden": t.qformer.hidden,
                  "qformer_heads": t.qformer.n_heads, "qformer_intermediate": t.qformer.intermediate},
        "data": {"train": str(base / "train.json"), "prompts": str(STAGES / "prompts.json")},
        "optim": {"init_lr": 3e-3, "min_lr": 1e-4, "warmup_start_lr": 1e-4, "warmup_steps": 1, "max_steps": 2,
                  "batch_size": 2},
        "run": {"out_dir": str(out_dir), "save_every": 2, "val_every": 2, "threads": 1, "progress": False},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)         # strings and lists of strings: JSON escapes are valid TOML


def write_toml(raw: dict, path: Path) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_in_process(raw: dict, resume: bool = False) -> Path:
    threads = torch.get_num_threads()
    try:
        return loop.train(TrainConfig.from_dict(raw), resume=resume)
    finally:
        torch.set_num_threads(threads)


def train_command(config: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "train", str(config), *extra]


def read_log(out_dir: Path, split: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["split"] == split]


def trained(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def first_moments(path: Path) -> dict[int, torch.Tensor]:
    """AdamW's running mean of the gradients (the averaged gradients themselves, scaled)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]["state"]
    return {k: v["exp_avg"] for k, v in state.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tiny_model(base):
    torch.manual_seed(0)
    model, config = loop.build_model(TrainConfig.from_dict(run_config(base, base / "unused")).model)
    return model, config


# --- config files --------------------------------------------------------------------------------

def test_stage_configs_parse_with_the_official_recipe():
    configs = {name: load_train_config(STAGES / f"{name}.toml")
               for name in ("stage1_pretrain", "stage2_instruct", "stage3_activation")}
    stage1 = configs["stage1_pretrain"]
    assert (stage1.optim.init_lr, stage1.optim.min_lr, stage1.optim.warmup_start_lr) == (3e-5, 1e-5, 1e-6)
    assert (stage1.optim.warmup_steps, stage1.optim.max_steps, stage1.optim.batch_size) == (3000, 90000, 8)
    assert (stage1.optim.weight_decay, stage1.optim.grad_clip, stage1.run.amp) == (0.05, 0.0, "fp16")
    assert stage1.model.init_checkpoint == ""
    assert configs["stage2_instruct"].model.init_checkpoint == "runs/stage1/last.pth"
    stage3 = configs["stage3_activation"]
    assert stage3.model.init_checkpoint == "runs/stage2/last.pth"
    assert (stage3.optim.max_steps, stage3.optim.batch_size) == (12, 1)     # paper: 12 steps, one story each
    prompts = json.loads((STAGES / "prompts.json").read_text())
    assert all(p.count("<SpeechHere>") == 1 for ps in prompts.values() for p in ps)


def test_config_errors_and_overrides(tmp_path):
    path = write_toml(run_config(tmp_path, tmp_path / "out"), tmp_path / "c.toml")
    cfg = load_train_config(path, ["optim.max_steps=7", "run.amp=bf16", 'model.lora_targets=["q_proj"]'])
    assert (cfg.optim.max_steps, cfg.run.amp, cfg.model.lora_targets) == (7, "bf16", ["q_proj"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="max_steps must be of type int"):
        load_train_config(path, ["optim.max_steps=1.5"])
    with pytest.raises(ConfigError, match="amp must be one of"):
        load_train_config(path, ["run.amp=fp8"])
    with pytest.raises(ConfigError, match="cpu_amp must be one of"):
        load_train_config(path, ["run.cpu_amp=fp16"])
    assert load_train_config(path, ['run.cpu_amp="auto"']).run.cpu_amp == "auto"
    with pytest.raises(ConfigError, match="qformer_kind must be one of bert, whisper_decoder, not 'gpt'"):
        load_train_config(path, ['model.qformer_kind="gpt"'])
    with pytest.raises(ConfigError, match="audio_vocab must be 0, or > 0 with qformer_kind = 'whisper_decoder'"):
        load_train_config(path, ["model.audio_vocab=4096"])
    with pytest.raises(ConfigError, match="window_lr_scale must be a positive number"):
        load_train_config(path, ["optim.window_lr_scale=0.0"])
    with pytest.raises(ConfigError, match=r"\[align\] whisper_vocab needs \[model\] audio_vocab > 0"):
        load_train_config(path, ["align.whisper_vocab=true"])
    decoder = ['model.qformer_kind="whisper_decoder"', "model.audio_vocab=64", "align.whisper_vocab=true"]
    for conflict in ("align.pieces=40", "align.lm_weight=0.5"):
        with pytest.raises(ConfigError, match="pieces 0 and lm_weight 0"):
            load_train_config(path, [*decoder, "align.steps=5", conflict])
    assert load_train_config(path, decoder).align.whisper_vocab
    with pytest.raises(ConfigError, match=r"\[align\] window_lr_scale must be a finite number >= 0"):
        load_train_config(path, ["align.window_lr_scale=-0.5"])
    assert load_train_config(path, ["data.task_repeats={audiocaption = 3}"]).data.task_repeats == {"audiocaption": 3}
    for repeats in ("{audiocaption = 0}", '{QA = "2"}', "{asr = 1.5}"):
        with pytest.raises(ConfigError, match="task_repeats must map tasks to whole numbers >= 1"):
            load_train_config(path, [f"data.task_repeats={repeats}"])
    with pytest.raises(ConfigError, match="task_repeats must be of type dict"):
        load_train_config(path, ["data.task_repeats=[3]"])
    for gain in ("-1.0", "nan", "inf"):
        with pytest.raises(ConfigError, match="beats_stream_gain must be a finite number"):
            load_train_config(path, [f"model.beats_stream_gain={gain}"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.toml")


# --- data ----------------------------------------------------------------------------------------

def test_annotations_prompts_and_expand_wav(base, tmp_path):
    config = tiny()
    (tmp_path / "a.json").write_text(json.dumps({"annotation": [
        {"path": str(base / "clip0.wav"), "text": "x"},
        {"path": "rel.wav", "text": "y", "task": "QA", "Q": "Why?", "expand_wav": [str(base / "clip1.wav")]}]}))
    samples = read_annotations(tmp_path / "a.json")
    assert (samples[0].task, samples[0].question) == ("asr", "")               # official defaults
    assert samples[1].path == str(tmp_path / "rel.wav")                         # relative to the file
    (tmp_path / "p.json").write_text(json.dumps({"QA": ["<Speech><SpeechHere></Speech> {}"],
                                                 "asr": ["no placeholder", "<Speech><SpeechHere></Speech> Say it."]}))
    prompts = read_prompts(tmp_path / "p.json", config)
    assert prompts["asr"] == ["USER: <Speech><SpeechHere></Speech> Say it.\nASSISTANT:"]
    assert choose_prompt(prompts, samples[1], seed=0, draw=5) == "USER: <Speech><SpeechHere></Speech> Why?\nASSISTANT:"
    with pytest.raises(DataError, match="audiocaption"):
        check_tasks([Sample("x.wav", "t", task="audiocaption")], prompts, "a.json")
    with pytest.raises(DataError, match="annotation"):
        (tmp_path / "bad.json").write_text(json.dumps({"annotation": [{"text": "no path"}]}))
        read_annotations(tmp_path / "bad.json")

    one = sf.read(base / "clip0.wav")[0]
    two = sf.read(base / "clip1.wav")[0]
    wave = load_wave(Sample(str(base / "clip0.wav"), "", expand_wav=(str(base / "clip1.wav"),)), config)
    np.testing.assert_array_equal(wave, np.concatenate([one, np.zeros(1600), two]))  # spec §1.1 step 3
    short = load_wave(Sample(str(OFFICIAL_TINY / "short_0p4s.wav"), ""), config)
    assert len(short) == SAMPLE_RATE                                            # padded to 1 s
    long = load_wave(Sample(str(OFFICIAL_TINY / "long_40s.wav"), ""), config)
    assert len(long) == 30 * SAMPLE_RATE                                        # cut to 30 s


def test_sample_order_is_seeded_and_split_over_processes():
    stream = SampleStream(5, seed=3)
    for epoch in range(3):
        assert sorted(stream[p] for p in range(5 * epoch, 5 * epoch + 5)) == list(range(5))
    assert [stream[p] for p in range(5)] != [stream[p] for p in range(5, 10)]   # reshuffled each epoch
    assert [SampleStream(5, seed=3)[p] for p in range(12)] == [stream[p] for p in range(12)]
    one = StepPlan(batch_size=4, accum_steps=1, world_size=1)
    two = StepPlan(batch_size=1, accum_steps=2, world_size=2)
    for step in range(3):
        single = list(one.positions(step, 0, 0))
        split = [p for rank in range(2) for micro in range(2) for p in two.positions(step, rank, micro)]
        assert split == single
    assert one.data_position(3) == two.data_position(3) == 12



def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    lengths = list(np.random.default_rng(0).integers(5, 200, size=1000))
    grouped = SampleStream(1000, seed=3, lengths=lengths, group=8)
    plain = SampleStream(1000, seed=3)
    for epoch in range(2):
        assert sorted(grouped[p] for p in range(1000 * epoch, 1000 * (epoch + 1))) == list(range(1000))
    assert [grouped[p] for p in range(1000)] != [grouped[p] for p in range(1000, 2000)]
    assert [SampleStream(1000, seed=3, lengths=lengths, group=8)[p] for p in range(50)] == [grouped[p] for p in range(50)]

    def padded_positions(stream):
        batches = np.array([lengths[stream[p]] for p in range(992)]).reshape(-1, 8)
        return int((batches.max(axis=1, keepdims=True) - batches).sum())
    assert padded_positions(grouped) < 0.1 * padded_positions(plain)
    # the batches still come in a shuffled order, not short to long within a chunk
    means = [np.mean([lengths[grouped[p]] for p in range(b * 8, b * 8 + 8)]) for b in range(64)]
    assert means != sorted(means)
    with pytest.raises(ValueError):
        SampleStream(10, seed=0, lengths=[1] * 9, group=2)


def test_repeated_samples_fill_their_places_in_every_epoch():
    # [data] task_repeats: sample 1 twice and sample 3 three times an epoch, the rest once
    lengths = [10, 50, 12, 48, 11]
    stream = SampleStream(5, seed=3, lengths=lengths, group=2, repeats=[1, 2, 1, 3, 1])
    for epoch in range(2):
        drawn = [stream[p] for p in range(8 * epoch, 8 * epoch + 8)]
        assert sorted(drawn) == [0, 1, 1, 2, 3, 3, 3, 4]
    assert [SampleStream(5, seed=3, lengths=lengths, group=2, repeats=[1, 2, 1, 3, 1])[p] for p in range(16)] == \
        [stream[p] for p in range(16)]
    # all ones: the very order of a stream without repeats
    assert [SampleStream(5, seed=3, repeats=[1] * 5)[p] for p in range(15)] == [SampleStream(5, seed=3)[p] for p in range(15)]
    for bad in ([1, 1, 1, 1], [1, 0, 1, 1, 1]):
        with pytest.raises(ValueError):
            SampleStream(5, seed=0, repeats=bad)


def test_the_lm_stage_draws_each_task_as_often_as_task_repeats_says(tmp_path):
    class Samples(list):                    # what training_stream reads of an AnnotationDataset
        samples = property(lambda self: list(self))
        approx_lengths = lambda self: [10 * (i + 1) for i in range(len(self))]     # noqa: E731

    path = write_toml(run_config(tmp_path, tmp_path / "out"), tmp_path / "c.toml")
    train_set = Samples(Sample(path=f"{i}.wav", text="x", task=t) for i, t in enumerate(["asr", "audiocaption", "QA", "audiocaption"]))
    plain = loop.training_stream(load_train_config(path), train_set)
    repeated = loop.training_stream(load_train_config(path, ["data.task_repeats={audiocaption = 3}"]), train_set)
    assert sorted(plain[p] for p in range(4)) == [0, 1, 2, 3]
    assert sorted(repeated[p] for p in range(8)) == [0, 1, 1, 1, 2, 3, 3, 3]


def test_approx_lengths_count_audio_question_and_answer_tokens(tiny_model, base):
    from train.data import AnnotationDataset, Tokenizer

    model, config = tiny_model
    samples = read_annotations(base / "train.json")
    tokenizer = Tokenizer(base / "base/vicuna")
    dataset = AnnotationDataset(samples, read_prompts(STAGES / "prompts.json", config), config, tokenizer, 300, seed=0)
    from salmonn_cli.trim import audio_token_count, clip_fbank_frames
    audio_tokens = audio_token_count(config, clip_fbank_frames(config, int(1.2 * SAMPLE_RATE)))
    assert dataset.approx_lengths() == [audio_tokens + len(tokenizer.encode(s.question)) + len(tokenizer.encode(s.text))
                                        for s in samples]
    missing = AnnotationDataset([Sample(path=str(base / "nowhere.wav"), text="a")], dataset.prompts, config,
                                tokenizer, 300, seed=0)
    assert missing.approx_lengths() == [audio_token_count(config, clip_fbank_frames(config, 0)) + len(tokenizer.encode("a"))]

# --- the loss (§7.3) -----------------------------------------------------------------------------

def test_loss_masking_on_a_hand_checked_batch(tiny_model):
    model, config = tiny_model
    n_audio = config.n_audio_tokens                      # 88
    batch = Batch(indices=[0, 1], mel=torch.zeros(2, 80, 3000), fbanks=[],
                  ids_before=[[10, 11], [10, 11]], ids_after=[[20], [20, 21, 22]],
                  answer_ids=[[30, 2], [31, 32, 33, 2]])
    audio = torch.randn(2, n_audio, config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    inputs, mask, labels = assemble_inputs(model, audio, batch)
    # sample 0: BOS 10 11 | 88 audio | 20 | 30 EOS | 4 pads; sample 1: BOS 10 11 | 88 audio | 20 21 22 | 31 32 33 EOS
    ignore = [IGNORE_INDEX]
    assert labels[0].tolist() == ignore * (3 + n_audio + 1) + [30, 2] + ignore * 4
    assert labels[1].tolist() == ignore * (3 + n_audio + 3) + [31, 32, 33, 2]
    assert mask.tolist() == [[1] * (3 + n_audio + 3) + [0] * 4, [1] * (3 + n_audio + 7)]
    embed = model.llama_model.get_input_embeddings()
    with torch.no_grad():
        np.testing.assert_array_equal(inputs[0, :3], embed(torch.tensor([1, 10, 11])))     # BOS first
        np.testing.assert_array_equal(inputs[0, 3:3 + n_audio], audio[0])
        np.testing.assert_array_equal(inputs[1, 3 + n_audio:], embed(torch.tensor([20, 21, 22, 31, 32, 33, 2])))
        assert not inputs[0, -4:].any()

        ce_sum, n_targets, _ = shifted_loss_sums(model, inputs, mask, labels)
        hf = model.llama_model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        # per sample, alone (no padding): the padded batch changes nothing
        alone = sum(shifted_loss_sums(model, inputs[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())],
                                      labels[i:i + 1, :int(mask[i].sum())])[0] for i in range(2))
    assert int(n_targets) == 6
    assert abs(float(ce_sum) / 6 - float(hf)) <= LOSS_ATOL
    assert abs(float(ce_sum) - float(alone)) <= 6 * LOSS_ATOL


def test_training_encoder_path_equals_inference_path(tiny_model, base):
    """Per-clip BEATs, zero-padded to the Whisper length, as `salmonn ask` computes it."""
    from train.data import clip_features

    model, config = tiny_model
    feats = [clip_features(load_wave(Sample(str(p), ""), config), config)
             for p in (base / "clip0.wav", OFFICIAL_TINY / "speech_2p5s.wav")]
    with torch.no_grad():
        batched = encode_batch(model, torch.stack([torch.from_numpy(m) for m, _ in feats]),
                               [torch.from_numpy(f) for _, f in feats])
        for i, (mel, fbank) in enumerate(feats):
            alone = model.encode_audio(torch.from_numpy(mel)[None], torch.from_numpy(fbank)[None])
            assert float((batched[i] - alone[0]).abs().max()) <= ENCODE_ATOL


def test_frozen_encoders_stay_in_eval_mode_and_get_no_gradient(tiny_model, base):
    from train.data import AnnotationDataset, Tokenizer, collate
    from train.loss import TrainingModel

    model, config = tiny_model
    trainer = TrainingModel(model).train()
    assert not any(m.training for m in [*model.speech_encoder.modules(), *model.beats.modules()])
    assert model.speech_Qformer.training and model.llama_model.training
    prompts = read_prompts(STAGES / "prompts.json", config)
    dataset = AnnotationDataset(read_annotations(base / "train.json"), prompts, config,
                                Tokenizer(base / "base/vicuna"), 300, seed=0)
    ce_sum, *_ = trainer(collate([dataset[(0, 0)], dataset[(2, 1)]]))
    ce_sum.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    model.zero_grad(set_to_none=True)
    model.eval()


# --- optimizer and schedule ----------------------------------------------------------------------

def test_weight_decay_groups(tiny_model):
    model, _ = tiny_model
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "speech_query_tokens" in decayed                                     # 3-D, decayed officially
    assert "speech_llama_proj.weight" in decayed
    assert "speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in decayed
    assert any(".lora_A." in n for n in decayed) and any(".lora_B." in n for n in decayed)
    assert {"ln_speech.weight", "ln_speech.bias", "ln_audio.weight", "speech_llama_proj.bias",
            "speech_Qformer.bert.embeddings.LayerNorm.weight"} <= kept
    assert all(n.endswith("bias") or "LayerNorm" in n or n.startswith(("ln_speech", "ln_audio")) for n in kept)


def test_lora_groups_scale_and_start_step(tiny_model):
    model, _ = tiny_model
    groups = param_groups(model, 0.05, lora_lr_scale=0.25, split_lora=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        is_lora = {(".lora_A." in names[id(p)] or ".lora_B." in names[id(p)]) for p in group["params"]}
        assert is_lora == {group["lora"]}
        assert group["lr_scale"] == (0.25 if group["lora"] else 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    o = OptimSection(init_lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=100, lora_start_step=10)
    optimizer = torch.optim.AdamW(groups, lr=o.init_lr)
    schedule = WarmupCosineSchedule(optimizer, o)
    schedule.set(9)
    assert {g["lr"] for g in optimizer.param_groups if g["lora"]} == {0.0}
    assert {g["lr"] for g in optimizer.param_groups if not g["lora"]} == {lr_at(9, o)}
    schedule.set(10)
    lora_lrs = [g["lr"] for g in optimizer.param_groups if g["lora"]]
    assert lora_lrs and lora_lrs == pytest.approx([0.25 * lr_at(10, o)] * len(lora_lrs))
    # the official default: the two weight-decay groups only
    assert [g["lora"] for g in param_groups(model, 0.05)] == [False, False]


def test_swap_audio_gives_each_sample_the_next_ones_tokens():
    audio = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2) + 1
    swapped = swap_audio(audio, [2, 4, 3])
    assert torch.equal(swapped[0, :2], audio[1, :2]) and not swapped[0, 2:].any()
    assert torch.equal(swapped[1, :3], audio[2, :3]) and not swapped[1, 3:].any()
    assert torch.equal(swapped[2, :2], audio[0, :2]) and not swapped[2, 2:].any()


def test_schedule_values():
    o = OptimSection()                   # official: 1e-6 -> 3e-5 over 3000 steps, cosine to 1e-5 over 90k
    assert lr_at(0, o) == pytest.approx(1e-6)
    assert lr_at(1500, o) == pytest.approx(1.55e-5)
    assert lr_at(2999, o) == pytest.approx(1e-6 + 29e-6 * 2999 / 3000)
    assert lr_at(3000, o) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 30)))
    assert lr_at(45000, o) == pytest.approx(2e-5)
    assert lr_at(90000, o) == pytest.approx(1e-5)
    assert lr_at(0, OptimSection(warmup_steps=0)) == pytest.approx(3e-5)


# --- whole runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overfit_run(base):
    """One clip, one prompt, one answer, no dropout: the model must learn to say it."""
    lr = 3e-2
    out = base / "overfit"
    raw = run_config(base, out,
                     model={"lora_dropout": 0.0, "qformer_dropout": 0.0},
                     data={"train": str(base / "overfit.json"), "valid": str(base / "overfit.json"),
                           "prompts": str(base / "one_prompt.json")},
                     optim={"init_lr": lr, "min_lr": lr, "warmup_start_lr": lr, "warmup_steps": 0,
                            "max_steps": OVERFIT_STEPS, "batch_size": 1},
                     run={"save_every": OVERFIT_STEPS, "val_every": OVERFIT_STEPS})
    return train_in_process(raw)


def test_a_few_steps_lower_the_loss(overfit_run):
    log = read_log(overfit_run.parent)
    losses = [r["loss"] for r in log]
    assert [r["step"] for r in log] == list(range(1, OVERFIT_STEPS + 1))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(r["lr"] == pytest.approx(3e-2) and r["tokens_per_s"] > 0 for r in log)
    valid = read_log(overfit_run.parent, "valid")
    assert len(valid) == 1 and valid[0]["accuracy"] == 1.0, valid


def test_cpu_bf16_autocast_and_a_muted_beats_stream(base):
    """`[run] cpu_amp = "bf16"` autocasts on CPU (first loss within bf16 rounding of the same fp32
    run's, not equal) and `[model] beats_stream_gain = 0` starts ln_audio at 0, from where it trains."""
    lr = 3e-2

    def run(name: str, cpu_amp: str) -> tuple[list[float], Path]:
        raw = run_config(base, base / name,
                         model={"lora_dropout": 0.0, "qformer_dropout": 0.0, "beats_stream_gain": 0.0},
                         data={"train": str(base / "overfit.json"), "prompts": str(base / "one_prompt.json")},
                         optim={"init_lr": lr, "min_lr": lr, "warmup_start_lr": lr, "warmup_steps": 0,
                                "max_steps": 5, "batch_size": 1},
                         run={"save_every": 5, "val_every": 5, "cpu_amp": cpu_amp})
        if cpu_amp == "none":
            model, _ = loop.build_model(TrainConfig.from_dict(raw).model)
            assert torch.count_nonzero(model.ln_audio.weight) == 0
        checkpoint = train_in_process(raw)
        return [r["loss"] for r in read_log(checkpoint.parent)], checkpoint

    fp32, _ = run("fp32", "none")
    bf16, checkpoint = run("bf16", "bf16")
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=0.05), (bf16, fp32)
    assert bf16[-1] < bf16[0], bf16
    gain = trained(checkpoint)["ln_audio.weight"]
    assert 0 < gain.abs().max() < 1, gain


@pytest.fixture
def caches(monkeypatch) -> list:
    """Every FrozenEncoderCache the training runs of a test create, in order."""
    from train.encoder_cache import FrozenEncoderCache

    made = []
    original_init = FrozenEncoderCache.__init__

    def remember(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FrozenEncoderCache, "__init__", remember)
    return made


def test_cached_encoder_outputs_train_exactly_like_the_encoders(base, tmp_path, caches):
    """`[run] cache_encoders`: each clip's frozen Whisper and BEATs outputs are computed once and
    reused (clip0 is in the set twice, and every clip comes back in the second epoch); with
    batches of one clip the cached run ends bitwise equal to the run that encodes every step."""
    sections = {"model": {"lora_dropout": 0.0, "qformer_dropout": 0.0},
                "data": {"valid": str(base / "valid.json")},
                "optim": {"batch_size": 1, "accum_steps": 2, "max_steps": 4}}
    plain = train_in_process(run_config(base, tmp_path / "plain", **sections))
    raw = run_config(base, tmp_path / "cached", **sections)
    raw["run"]["cache_encoders"] = True
    cached = train_in_process(raw)
    assert len(caches) == 1
    cache = caches[0]
    assert len(cache) == 3                                  # clip0, clip1, clip2
    assert cache.misses == 3 and cache.hits > cache.misses  # 8 training samples + 2 x 2 validation
    assert max_diff(trained(plain), trained(cached)) == 0.0
    assert [r["loss"] for r in read_log(plain.parent, "valid")] == [r["loss"] for r in read_log(cached.parent, "valid")]


def test_encoder_cache_on_disk_serves_a_later_run(base, tmp_path, caches):
    """`[run] encoder_cache_dir`: a second run with the same encoders and audio computes no encoder
    output and trains exactly as the first; a rewritten audio file misses (its entry is keyed by the
    file's size and time, not its path alone)."""
    sections = {"model": {"lora_dropout": 0.0, "qformer_dropout": 0.0},
                "optim": {"batch_size": 1, "max_steps": 3},
                "run": {"cache_encoders": True, "encoder_cache_dir": str(tmp_path / "encoder-cache")}}
    first = train_in_process(run_config(base, tmp_path / "first", **sections))
    second = train_in_process(run_config(base, tmp_path / "second", **sections))
    assert [c.misses for c in caches] == [3, 0] and caches[1].disk_hits == 3
    assert len(list((tmp_path / "encoder-cache").glob("*.pt"))) == 3
    assert max_diff(trained(first), trained(second)) == 0.0

    clip = next(iter(caches[1].entries))[0]
    os.utime(clip, ns=(0, 0))           # as if rewritten: same path, another stamp
    train_in_process(run_config(base, tmp_path / "third", **sections))
    assert caches[2].misses == 1 and caches[2].disk_hits == 2


def test_encoder_cache_dir_needs_cache_encoders(base, tmp_path):
    raw = run_config(base, tmp_path / "run", run={"encoder_cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="encoder_cache_dir needs cache_encoders"):
        train_in_process(raw)


def test_checkpoint_has_the_official_layout(overfit_run, tiny_model):
    model, _ = tiny_model
    ckpt = torch.load(overfit_run, map_location="cpu", weights_only=True)
    assert set(ckpt["model"]) == set(model.trainable_state_dict())
    assert {"optimizer", "scheduler", "scaler", "rng", "data", "step", "config"} <= set(ckpt)
    assert ckpt["step"] == OVERFIT_STEPS and ckpt["data"]["position"] == OVERFIT_STEPS
    model_cfg = ckpt["config"]["model"]
    assert Path(model_cfg["llama_path"]).is_dir() and Path(model_cfg["beats_path"]).is_file()
    assert (model_cfg["lora_alpha"], model_cfg["lora_rank"]) == (32.0, 8)


def test_overfitted_checkpoint_exports_and_answers(overfit_run, base, tmp_path):
    from export.export import export_model
    from train.official import checkpoint_sources

    sources = checkpoint_sources(overfit_run)
    out = export_model(ckpt=overfit_run, whisper=sources["whisper"], beats=sources["beats"], llm=sources["llm"],
                       out=tmp_path / "model", quant="f32", log=lambda _m: None)
    r = subprocess.run([sys.executable, "-m", "salmonn_cli", "ask", str(base / "clip0.wav"), OVERFIT_PROMPT,
                        "--model", str(out), "--json", "--max-tokens", "8", "--threads", "1"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["text"] == OVERFIT_ANSWER and answer["stop_reason"] == "eos", answer


def test_two_gloo_processes_equal_one_process(base, tmp_path):
    """Global batch 2: one process x batch 2, one process x batch 1 x 2 accumulation steps, and two
    torchrun processes x batch 1 end with the same parameters (dropout off: it is random per process)."""
    sections = {"model": {"lora_dropout": 0.0, "qformer_dropout": 0.0}}
    one = train_in_process(run_config(base, tmp_path / "one", **sections))
    accum = train_in_process(run_config(base, tmp_path / "accum", optim={"batch_size": 1, "accum_steps": 2},
                                        **sections))
    config = write_toml(run_config(base, tmp_path / "ddp", optim={"batch_size": 1}, **sections), tmp_path / "ddp.toml")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "train", str(config)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = tmp_path / "ddp" / "last.pth"
    # two processes add the same two per-sample gradients as two accumulation steps: bitwise equal
    assert max_diff(trained(accum), trained(ddp)) == 0.0
    # one batch of 2 sums inside its matmuls, in another order: float noise in the gradients, which
    # AdamW scales up where a gradient is ~0 (it divides by sqrt(v) + 1e-8)
    d_params = max_diff(trained(one), trained(ddp))
    d_grads = max_diff(*(first_moments(p) for p in (one, ddp)))
    print(f"DDP vs one process: max |param diff| {d_params:.2e}, max |Adam first moment diff| {d_grads:.2e}")
    assert d_params <= DDP_ATOL and d_grads <= GRAD_ATOL
    assert torch.load(ddp, map_location="cpu", weights_only=True)["world_size"] == 2
    one_log, ddp_log = read_log(one.parent), read_log(ddp.parent)
    for a, b in zip(one_log, ddp_log):
        assert (a["step"], a["target_tokens"]) == (b["step"], b["target_tokens"])
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_ATOL)


def test_sigkilled_run_resumes_exactly(base, tmp_path):
    """Dropout on (so the RNG state must be restored). Killed after its step-2 checkpoint, resumed."""
    steps = 6
    sections = {"optim": {"max_steps": steps}, "run": {"save_every": 2, "val_every": 100}}
    reference = train_in_process(run_config(base, tmp_path / "reference", **sections))
    config = write_toml(run_config(base, tmp_path / "killed", **sections), tmp_path / "killed.toml")
    process = subprocess.Popen(train_command(config), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if log.exists() and any(json.loads(line)["step"] >= 3 for line in log.read_text().splitlines() if line):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, process.stderr.read().decode()[-3000:]
    killed_at = torch.load(tmp_path / "killed" / "last.pth", map_location="cpu", weights_only=True)["step"]
    assert killed_at in (2, 4)
    r = subprocess.run(train_command(config, "--resume"), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "killed" / "last.pth"
    assert max_diff(trained(reference), trained(resumed)) == 0.0                  # bitwise
    a = torch.load(reference, map_location="cpu", weights_only=True)["optimizer"]["state"]
    b = torch.load(resumed, map_location="cpu", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, steps + 1))
    assert [r["loss"] for r in read_log(tmp_path / "killed")] == [r["loss"] for r in read_log(reference.parent)]


def test_resume_refuses_a_different_run(base, tmp_path):
    raw = run_config(base, tmp_path / "run", optim={"max_steps": 1}, run={"save_every": 1})
    with pytest.raises(ConfigError, match="--resume"):
        train_in_process(raw, resume=True)
    train_in_process(raw)
    with pytest.raises(ConfigError, match="exists"):
        train_in_process(raw)
    raw["optim"]["batch_size"] = 1
    with pytest.raises(ConfigError, match="global batch"):
        train_in_process(raw, resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    official.atomic_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        official.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_activation_stories_then_stage3(overfit_run, base, tmp_path):
    """Stage 3: stories written at a reduced LoRA scale, then trained on at the normal scale."""
    from train.activation import write_stories

    clips = [base / "clip0.wav", base / "clip1.wav"]
    stories = write_stories(overfit_run, clips, tmp_path / "stories.json", lora_scale=2.0, max_new_tokens=6,
                            log=lambda _m: None)
    data = json.loads((tmp_path / "stories.json").read_text())
    assert data["annotation"] == stories and len(stories) == 2
    assert all(s["task"] == "audio_story_telling" and s["text"] and Path(s["path"]).is_file() for s in stories)
    assert stories[0]["text"] != OVERFIT_ANSWER       # the reduced scale loosens the stage-2 behaviour
    raw = run_config(base, tmp_path / "stage3", model={"init_checkpoint": str(overfit_run)},
                     data={"train": str(tmp_path / "stories.json")},
                     optim={"batch_size": 1, "max_steps": 2, "warmup_steps": 0})
    stage3 = torch.load(train_in_process(raw), map_location="cpu", weights_only=True)
    assert stage3["step"] == 2 and stage3["config"]["model"]["lora_alpha"] == 32.0
    assert max_diff(stage3["model"], trained(overfit_run)) > 0


# --- [align]: the CTC warm-up of the connector (train/align.py) ---------------------------------

def test_ctc_targets_take_the_transcript_else_the_caption_once_per_clip():
    from train.align import ctc_targets

    samples = [Sample(path="a.wav", text="a tone", task="audiocaption"), Sample(path="a.wav", text="hello", task="asr"),
               Sample(path="b.wav", text="yes", task="QA", question="Is it?"),
               Sample(path="c.wav", text="a bell", task="audiocaption"),
               Sample(path="c.wav", text="a gong", task="audiocaption")]
    assert [(s.path, s.text) for s in ctc_targets(samples, ["asr", "audiocaption"])] == [("a.wav", "hello"),
                                                                                          ("c.wav", "a bell")]
    assert [s.text for s in ctc_targets(samples, ["audiocaption"])] == ["a tone", "a bell"]


def test_ctc_head_greedy_merges_repeats_and_drops_blanks():
    from train.align import CtcHead

    head = CtcHead(torch.randn(10, 4), [7, 3])
    best = [1, 1, 0, 1, 2, 2, 0, 0]                    # classes: 0 blank, 1 -> id 7, 2 -> id 3
    log_probs = torch.full((len(best), 3), -9.0)
    log_probs[torch.arange(len(best)), torch.tensor(best)] = 0.0
    assert head.greedy(log_probs) == [7, 7, 3]
    assert head.classes([3, 7]) == [2, 1]


def test_piece_vocabulary_spells_any_word_of_its_alphabet_and_decodes_back():
    from train.align import PieceCtcHead, PieceVocabulary, spoken_form

    texts = ["The cat sat on the mat.", "A cat! Another cat, that's three cats.", "Nothing at all", ""]
    vocabulary = PieceVocabulary.train(texts, 40)
    assert spoken_form("Don't  STOP, 3 cats!") == "don't stop 3 cats"
    for text in ("the cat sat", "that's another mat", "hat on a cat"):     # "hat" was never heard whole
        assert vocabulary.decode(vocabulary.encode(text)) == text
    assert vocabulary.encode("...") == [] and len(vocabulary) <= 40
    assert PieceVocabulary(vocabulary.serialized).encode("the mat") == vocabulary.encode("the mat")

    head = PieceCtcHead(4, vocabulary)
    target = head.target("the cat")
    assert min(target) >= 1                              # class 0 is the blank
    path = [target[0], target[0], 0] + [c for t in target[1:] for c in (t, 0)]
    log_probs = torch.full((len(path), 1 + len(vocabulary)), -9.0)
    log_probs[torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert head.transcript(log_probs) == "the cat"


@pytest.mark.parametrize("pieces", [0, 40])
def test_alignment_learns_the_targets_and_the_lm_stage_starts_from_it(base, tmp_path, monkeypatch, pieces):
    """`[align] steps`: the CTC loss falls until greedy CTC decoding spells each clip's target; a run that
    finds OUT_DIR/align.pth loads it instead of aligning again and ends bitwise where the aligning run ended."""
    import train.align as align_module
    from train.data import Tokenizer

    monkeypatch.setattr(align_module, "LOG_EVERY", 10)
    steps = 120 if pieces else 60                       # a word-piece head starts from random, not from embeddings
    raw = run_config(base, tmp_path / "aligned", model={"lora_dropout": 0.0, "qformer_dropout": 0.0,
                                                         "trim_windows": True},
                     optim={"max_steps": 1, "batch_size": 2}, run={"cache_encoders": True})
    raw["align"] = {"steps": steps, "lr": 1e-2, "batch_size": 2, "pieces": pieces}
    for bad in ({"steps": -1}, {"steps": 5, "pieces": 8}, {"steps": 5, "pieces": -1}):
        with pytest.raises(ConfigError, match=r"\[align\]"):
            TrainConfig.from_dict({**raw, "align": bad})
    first = train_in_process(raw)
    log = [json.loads(line) for line in (first.parent / "align.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10, steps + 1, 10))
    assert log[-1]["ctc"] < 0.2 * log[0]["ctc"], log
    assert log[-1]["cached_clips"] == 2                 # clip0 (asr "beep") and clip1 (its caption); clip2 is QA only

    model, config = loop.build_model(TrainConfig.from_dict(raw).model)
    head = align_module.load_alignment(first.parent / align_module.ALIGN_NAME, model)
    model.eval()
    tokenizer = Tokenizer(raw["model"]["llama_path"])
    for clip, text in (("clip0.wav", "beep"), ("clip1.wav", "a low tone")):
        wave = load_wave(Sample(path=str(base / clip), text="", task="asr"), config)
        mel, fbank = clip_features(wave, config)
        with torch.no_grad():
            tokens = encode_batch(model, torch.from_numpy(mel)[None], [torch.from_numpy(fbank)])
            if pieces:
                assert head.transcript(head(tokens)[0]) == text, clip
            else:
                assert head.greedy(head(tokens)[0]) == tokenizer.encode(text), clip

    again = tmp_path / "again"
    again.mkdir()
    (again / align_module.ALIGN_NAME).write_bytes((first.parent / align_module.ALIGN_NAME).read_bytes())
    raw["run"]["out_dir"] = str(again)
    second = train_in_process(raw)
    assert not (again / "align.jsonl").exists()
    assert max_diff(trained(first), trained(second)) == 0.0



def test_tag_head_pools_each_clip_over_its_own_tokens_only():
    from train.align import TagHead

    torch.manual_seed(0)
    head = TagHead(6, ["", "bell", "siren"])
    tokens = torch.randn(2, 5, 6)
    padded = tokens.clone()
    padded[0, 3:] = 100.0                              # beyond clip 0's 3 tokens: must not count
    assert torch.allclose(head(tokens, [3, 5]), head(padded, [3, 5]))
    assert torch.allclose(head(tokens[:1, :3], [3])[0], head(tokens, [3, 5])[0])


@pytest.mark.parametrize("clip_token_hidden, ctc_weight", [(0, 1.0), (16, 1.0), (16, 0.0)])
def test_alignment_tags_clips_with_their_annotated_class(base, tmp_path, monkeypatch, clip_token_hidden, ctc_weight):
    """`[align] tag_field`: a TagHead (with a clip token: a ClipTagHead on that token) learns each clip's
    class from the field (entries without it: "") beside the CTC loss; the log shows its loss falling
    and every clip of the last steps named right. With `ctc_weight` 0 the window tokens' path (Q-Former,
    projection) is left exactly as it was. (The LM step after it reads length-grouped batches:
    `[data] group_by_length`.)"""
    import train.align as align_module
    import train.loop as loop_module

    window_path = {}

    def watched_align(model, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("speech_")}
        result = align_module.align(model, *args, **kwargs)
        window_path.update({n: torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before})
        return result

    monkeypatch.setattr(loop_module, "align", watched_align)

    monkeypatch.setattr(align_module, "LOG_EVERY", 10)
    entries = json.loads((base / "train.json").read_text())["annotation"]
    tagged = tmp_path / "tagged.json"
    tagged.write_text(json.dumps({"annotation": [{**e, "event": "high"} if e["path"] == "clip0.wav" else e
                                                 for e in entries]}))
    for name in TONES:
        (tmp_path / name).symlink_to(base / name)
    assert align_module.clip_tags(tagged, "event") == {(str(tmp_path / "clip0.wav"),): "high",
                                                      (str(tmp_path / "clip1.wav"),): "",
                                                      (str(tmp_path / "clip2.wav"),): ""}
    raw = run_config(base, tmp_path / "run", model={"qformer_dropout": 0.0, "trim_windows": True,
                                                    "clip_token_hidden": clip_token_hidden},
                     data={"train": str(tagged), "group_by_length": True}, optim={"max_steps": 1, "batch_size": 2},
                     run={"cache_encoders": True})
    raw["align"] = {"steps": 40, "lr": 1e-2, "batch_size": 2, "tag_field": "event", "tag_weight": 1.0,
                    "ctc_weight": ctc_weight}
    with pytest.raises(ConfigError, match="ctc_weight must be a finite number >= 0; 0 needs a tag_field"):
        TrainConfig.from_dict({**raw, "align": {"steps": 1, "ctc_weight": 0.0}})
    with pytest.raises(ConfigError, match="tag_weight"):
        TrainConfig.from_dict({**raw, "align": {"steps": 1, "tag_weight": -1.0}})
    with pytest.raises(ConfigError, match="tag_field needs steps"):
        TrainConfig.from_dict({**raw, "align": {"steps": 0, "tag_field": "event"}})
    with pytest.raises(ConfigError, match="no entry"):
        train_in_process({**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "misspelt")},
                          "align": {**raw["align"], "tag_field": "evnt"}})
    train_in_process(raw)
    log = [json.loads(line) for line in (tmp_path / "run" / "align.jsonl").read_text().splitlines()]
    assert log[-1]["tag"] < 0.2 * log[0]["tag"] and log[-1]["tag_accuracy"] == 1.0, log
    saved = torch.load(tmp_path / "run" / align_module.ALIGN_NAME, weights_only=True)
    head_keys = ({"names", "none", "log_scale"} if clip_token_hidden else
                 {"attention.weight", "attention.bias", "classifier.weight", "classifier.bias"})
    assert saved["tag_classes"] == ["", "high"] and set(saved["tag_head"]) == head_keys
    assert any(k.startswith("clip_token_head.") for k in saved["model"]) == bool(clip_token_hidden)
    assert window_path and all(window_path.values()) == (ctc_weight == 0), window_path

def test_trimmed_clip_features_equal_the_full_chunk(tiny_model):
    """With trim_windows the log-mel is computed over the clip and a little padding only: bitwise the
    full 30 s computation (measured: max difference 0 for lengths 400 samples to beyond 30 s)."""
    import dataclasses

    from salmonn_cli import features

    _, config = tiny_model
    trimmed = dataclasses.replace(config, trim_windows=True)
    rng = np.random.default_rng(0)
    for n in (400, 16123, 80000, 479900, 600000):
        wave = 0.1 * rng.standard_normal(n)
        mel, fbank = clip_features(wave, trimmed)
        full = features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels,
                                            n_samples=int(round(config.max_seconds * config.sample_rate)))
        assert mel.shape == full.shape and np.array_equal(mel, full), n
        assert np.array_equal(fbank, features.beats_fbank(wave))


@pytest.mark.parametrize("pieces", [0, 40])
def test_ctc_loss_kept_in_the_lm_stage(base, tmp_path, pieces):
    """`[align] lm_weight`: the CTC loss stays in the LM stage's objective: logged per step as `ctc`, the
    logged LM loss of the first step unchanged (same start), the trained connector different."""
    def config(name: str, lm_weight: float) -> dict:
        raw = run_config(base, tmp_path / name, model={"lora_dropout": 0.0, "qformer_dropout": 0.0, "trim_windows": True},
                         optim={"max_steps": 3, "batch_size": 2}, run={"cache_encoders": True})
        raw["align"] = {"steps": 5, "lr": 1e-2, "batch_size": 2, "lm_weight": lm_weight, "pieces": pieces}
        return raw

    with pytest.raises(ConfigError, match="lm_weight"):
        TrainConfig.from_dict({**config("bad", 1.0), "align": {"steps": 0, "lm_weight": 1.0}})
    plain = train_in_process(config("plain", 0.0))
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "align.pth").write_bytes((plain.parent / "align.pth").read_bytes())
    kept = train_in_process(config("kept", 1.0))
    plain_log, kept_log = read_log(plain.parent), read_log(kept.parent)
    assert all("ctc" not in r for r in plain_log) and all(r["ctc"] > 0 for r in kept_log), kept_log
    assert plain_log[0]["loss"] == kept_log[0]["loss"]
    assert max_diff(trained(plain), trained(kept)) > 0


def test_cpu_autocast_auto_follows_the_cpu(monkeypatch):
    from train import loop, official

    assert (loop.cpu_autocast_mode("none"), loop.cpu_autocast_mode("bf16")) == ("none", "bf16")
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: True)
    assert loop.cpu_autocast_mode("auto") == "bf16"
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: False)
    assert loop.cpu_autocast_mode("auto") == "none"
