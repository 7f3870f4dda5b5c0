"""Write the audio encoder (Whisper + BEATs + fusion + window Q-Former + projection) as one ONNX graph.

Inputs: `mel` (1, n_mels, 3000) and `fbank` (1, F, 128) with F dynamic; output: `audio_embeds`
(n_audio_tokens, llm_hidden). With `config.trim_windows` the mel length is dynamic too (the
runtime cuts it to the clip, salmonn_cli/trim.py) and so is the number of output tokens. The log-mel and fbank are computed by the numpy front end
(salmonn_cli/features.py), which keeps the STFT out of the graph (see onnx-notes: ORT's STFT
is too inaccurate for the official tolerance).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from salmonn_cli.config import SalmonnConfig
from salmonn_cli.encoder import INPUT_FBANK, INPUT_MEL, OUTPUT_EMBEDS
from salmonn_cli.trim import mel_frame_count

OPSET = 18
# The protobuf limit is 2 GiB; above this the weights go to `<name>.data` next to the graph.
EXTERNAL_DATA_ABOVE_BYTES = 1_800_000_000
FBANK_BINS = 128
FBANK_FRAMES_PER_SECOND = 100


def max_fbank_frames(config: SalmonnConfig) -> int:
    n = int(config.max_seconds * config.sample_rate)
    return 1 + (n - 400) // 160


def export_audio_encoder(audio_encoder: torch.nn.Module, config: SalmonnConfig, out_path: Path) -> None:
    """`audio_encoder` maps (mel, fbank) to (n_audio_tokens, llm_hidden), e.g. train.model.AudioEncoder."""
    audio_encoder = audio_encoder.eval()
    n_weight_bytes = sum(p.numel() * p.element_size() for p in audio_encoder.parameters())
    example_frames = min(max_fbank_frames(config), 4 * FBANK_FRAMES_PER_SECOND)
    fbank = torch.randn(1, example_frames, FBANK_BINS)
    mel = torch.randn(1, config.whisper.n_mels, mel_frame_count(config, example_frames))
    frames = torch.export.Dim("fbank_frames", min=config.beats.input_patch_size,
                              max=max_fbank_frames(config))
    mel_shape = {2: mel_dim(config)} if config.trim_windows else {}
    # the exporter logs a warning per missing optional operator library (torchvision, ...)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            audio_encoder, (mel, fbank), str(out_path),
            dynamo=True, opset_version=OPSET,
            input_names=[INPUT_MEL, INPUT_FBANK], output_names=[OUTPUT_EMBEDS],
            dynamic_shapes=(mel_shape, {1: frames}),
            external_data=n_weight_bytes > EXTERNAL_DATA_ABOVE_BYTES,
            verbose=False,
        )
    drop_node_metadata(out_path)
    check_dynamic_frames(out_path, INPUT_FBANK, 1)
    if config.trim_windows:
        check_dynamic_frames(out_path, INPUT_MEL, 2)


def drop_node_metadata(path: Path) -> None:
    """Remove the exporter's per-node debugging notes (Python stack traces with this machine's
    paths, object addresses such as `<function sym_min at 0x7f...>`): they change from one run to
    the next, and the same weights must give the same file and sha256."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def clear(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attribute in node.attribute:
                for subgraph in [attribute.g, *attribute.graphs]:
                    clear(subgraph)

    clear(model.graph)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]
    onnx.save(model, str(path))


def mel_dim(config: SalmonnConfig):
    """The trimmed mel length: an even number of columns (conv2 halves it), from one window's
    worth of Whisper frames to all of them."""
    frames = torch.export.Dim("whisper_frames", min=config.window_frames, max=config.encoder_frames)
    return (config.whisper.n_mel_frames // config.encoder_frames) * frames


def check_dynamic_frames(path: Path, name: str, axis: int) -> None:
    """torch.onnx can silently fall back to a static graph; make sure the axis stayed symbolic."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name == name:
            dim = inp.type.tensor_type.shape.dim[axis]
            if not dim.dim_param:
                raise RuntimeError(f"ONNX export specialised axis {axis} of {name!r} to {dim.dim_value}")
            return
    raise RuntimeError(f"exported graph has no input {name!r}")
