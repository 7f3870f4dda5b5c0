"""Audio encoder (Whisper + BEATs + fusion + window Q-Former + projection) on one clip: our ONNX export
through ONNX Runtime (the runtime's `AudioEncoder`) against the same model in PyTorch eager fp32
(train.model.AudioEncoder: transformers' WhisperEncoder, our BEATs and Q-Former), same inputs,
same thread count, alternating runs in one process."""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from artefacts import OfficialPaths

def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run(official: OfficialPaths, model_dir: Path, clip: Path, threads: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from salmonn_cli import audio, features
    from salmonn_cli.device import ort_cuda_problem
    from salmonn_cli.encoder import AudioEncoder as OrtEncoder
    from salmonn_cli.manifest import load_manifest
    from salmonn_cli.trim import mel_frame_count
    from train.model import AudioEncoder as TorchEncoder
    from train.official import load_official

    torch.set_num_threads(threads)
    model, config = load_official(official.ckpt, official.whisper, official.beats, official.llm, llm_weights=False)
    torch_encoder = TorchEncoder(model).eval()
    params = {"whisper": sum(p.numel() for p in model.speech_encoder.parameters()),
              "beats": sum(p.numel() for p in model.beats.parameters()),
              "qformer_and_projection": sum(p.numel() for p in torch_encoder.parameters())}
    params["qformer_and_projection"] -= params["whisper"] + params["beats"]
    manifest = load_manifest(model_dir)
    ort_encoders = {}
    for device in ("cpu", "cuda") if ort_cuda_problem() is None else ("cpu",):
        load_start = time.perf_counter()
        encoder = OrtEncoder(manifest.path(manifest.audio_encoder), n_threads=threads, device=device)
        ort_encoders[encoder.provider] = (encoder, time.perf_counter() - load_start)

    wave, _ = audio.fit_to_chunk(audio.load_audio(clip, config.sample_rate), config.sample_rate,
                                 config.min_seconds, config.max_seconds)
    features_s, (mel, fbank) = _timed(lambda: (
        features.log_mel_spectrogram(wave, n_mels=config.whisper.n_mels,
                                     n_samples=int(config.max_seconds * config.sample_rate)),
        features.beats_fbank(wave)))
    mel = mel[:, :mel_frame_count(config, len(fbank))]

    def torch_engine(device: str):
        encoder = torch_encoder if device == "cpu" else copy.deepcopy(torch_encoder).to(device)
        mel_t = torch.from_numpy(mel[None].astype(np.float32)).to(device)
        fbank_t = torch.from_numpy(fbank[None].astype(np.float32)).to(device)

        def run_once():
            with torch.no_grad():
                out = encoder(mel_t, fbank_t).cpu().numpy()
            return out
        return run_once

    engines = {}
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        engines[f"PyTorch {torch.__version__} eager fp32, {device}"] = torch_engine(device)
    for provider, (encoder, _) in ort_encoders.items():
        engines[f"ONNX Runtime {ort_version()}, {provider}"] = lambda encoder=encoder: encoder(mel, fbank)
    outputs = {name: fn() for name, fn in engines.items()}          # warm-up (first-call allocations)
    times = {name: [] for name in engines}
    names = list(engines)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:     # rotate who goes first
            times[name].append(_timed(engines[name])[0])
    reference = outputs[names[0]]
    return {
        "clip_seconds": len(wave) / config.sample_rate, "mel_frames": int(mel.shape[1]), "fbank_frames": int(len(fbank)),
        "audio_tokens": int(reference.shape[0]), "params": params, "threads": threads, "features_s": features_s,
        "ort_load_s": {provider: load_s for provider, (_, load_s) in ort_encoders.items()},
        "engines": {name: {"runs_s": times[name], "median_s": statistics.median(times[name]),
                           "max_abs_diff": float(np.abs(outputs[name] - reference).max())} for name in names},
    }


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
