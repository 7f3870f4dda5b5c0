"""The int8 audio encoder: ONNX Runtime's quantizer over the exported fp32 graph (export/onnx_encoder.py).

Only the MatMuls with a constant weight (the linear layers) of Whisper and BEATs are quantized, with one
weight scale per output column; Whisper's first and last layers, the convolutions, the attention products
(two activations), the Q-Former and the projection stay fp32. Those choices are what keeps the audio tokens
within the quality bar (benchmarks/encoder_int8.py, BENCHMARKS.md "int8 audio encoder"): the activations
are quantized per call with one scale per tensor, and the layers next to the input and the output lose the
most to that.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.encoder import INPUT_FBANK, INPUT_MEL
from salmonn_cli.errors import SalmonnError, quoted
from salmonn_cli.manifest import ENCODER_QUANTS  # noqa: F401  (the choices, re-exported for export)

FP32_ENCODER_FILE = "audio_encoder.onnx"
# LLM quantizations that are exact or nearly (the reference path, f32; f16 within 5e-3 of its logits) keep
# the fp32 encoder; an integer-quantized LLM gets the int8 encoder, whose audio tokens move less than its
# own rounding does (BENCHMARKS.md, "int8 audio encoder")
FP32_ENCODER_LLM_QUANTS = ("f32", "f16")


def default_encoder_quant(llm_quant: str) -> str:
    """The audio encoder an export gets without --encoder-quant, given the LLM's quantization."""
    return "fp32" if llm_quant in FP32_ENCODER_LLM_QUANTS else "int8"
# The ways to reach int8 that benchmarks/encoder_int8.py compares; METHOD is the one export uses.
METHODS = ("dynamic", "dynamic_per_channel", "nbits8")
METHOD = "dynamic_per_channel"
# MatMulNBits: weights in blocks of this many input rows, one scale each; accuracy level 4 quantizes the
# activations to int8 per block too and runs the int8 dot-product kernels.
NBITS_BLOCK = 32
NBITS_ACCURACY_LEVEL = 4
# Groups of layers: which model inputs reach a MatMul tells where it belongs.
PARTS = {frozenset({INPUT_MEL}): "whisper", frozenset({INPUT_FBANK}): "beats"}
QUANTIZED_PARTS = ("whisper", "beats")
# A Whisper layer's linear layers (q, k, v, out, fc1, fc2), in graph order; this many layers at each end stay fp32.
WHISPER_LINEARS_PER_LAYER = 6
WHISPER_FP32_EDGE_LAYERS = 1
# Outputs that carry a tensor's shape and not its values (the Q-Former's queries are expanded to
# Whisper's frame count: they depend on its shape, and are still the Q-Former's).
SHAPE_ONLY = ("Shape", "Size")


def encoder_file_name(encoder_quant: str) -> str:
    return FP32_ENCODER_FILE if encoder_quant == "fp32" else f"audio_encoder-{encoder_quant}.onnx"


def weight_matmul_parts(model) -> dict[str, str]:
    """MatMul node name -> 'whisper', 'beats' or 'fusion' (Q-Former, projection, constants), for the
    MatMuls whose second input is an initializer."""
    initializers = {i.name for i in model.graph.initializer}
    reaches: dict[str, frozenset] = {INPUT_MEL: frozenset({INPUT_MEL}), INPUT_FBANK: frozenset({INPUT_FBANK})}
    parts = {}
    for node in model.graph.node:
        reached = frozenset() if node.op_type in SHAPE_ONLY else \
            frozenset().union(*(reaches.get(name, frozenset()) for name in node.input))
        for name in node.output:
            reaches[name] = reached
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers:
            parts[node.name] = PARTS.get(reached, "fusion")
    return parts


def quantized_nodes(model, parts: tuple[str, ...] = QUANTIZED_PARTS,
                    fp32_edge_layers: int = WHISPER_FP32_EDGE_LAYERS) -> list[str]:
    """The weight MatMuls of `parts` to quantize: all but those of Whisper's first and last
    `fp32_edge_layers` layers."""
    by_part = weight_matmul_parts(model)
    whisper = [name for name, part in by_part.items() if part == "whisper"]
    if len(whisper) % WHISPER_LINEARS_PER_LAYER:
        raise ValueError(f"{len(whisper)} Whisper linear layers, not a multiple of {WHISPER_LINEARS_PER_LAYER}")
    edge = WHISPER_LINEARS_PER_LAYER * fp32_edge_layers
    kept = set(whisper[:edge] + whisper[len(whisper) - edge:]) if edge else set()
    return [name for name, part in by_part.items() if part in parts and name not in kept]


def quantize_encoder(src: Path, dst: Path, method: str = METHOD, parts: tuple[str, ...] = QUANTIZED_PARTS,
                     fp32_edge_layers: int = WHISPER_FP32_EDGE_LAYERS) -> None:
    """Write the int8 encoder of the fp32 graph `src` to `dst` (a new file; `src` is only read)."""
    import onnx

    if method not in METHODS:
        raise ValueError(f"unknown encoder quantization method {method!r}; choose one of {', '.join(METHODS)}")
    # onnx refuses to read external weights that have other hard links (a guard against planted links):
    # say so in one line, with the way out, instead of its error deep inside the load
    weights = src.with_name(src.name + ".data")
    if weights.is_file() and weights.stat().st_nlink > 1:
        raise SalmonnError(f"{quoted(weights)} has other hard links (a `cp -al` copy?), and onnx will not read "
                           "such a file: copy it (cp --remove-destination) or the directory (cp -r) first")
    model = onnx.load(str(src))
    # The exporter's intermediate shapes disagree with ONNX's own shape inference in places
    # ("Inferred shape and existing shape differ"), which the quantizer runs: let it infer them afresh.
    del model.graph.value_info[:]
    nodes = quantized_nodes(model, parts, fp32_edge_layers)
    if method == "nbits8":
        quantized = _nbits8(model, nodes)
    else:
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
            plain = Path(tmp) / "fp32.onnx"
            onnx.save(model, str(plain), save_as_external_data=True, location="fp32.onnx.data")
            del model
            out = Path(tmp) / "int8.onnx"
            _dynamic(plain, out, nodes, per_channel=method == "dynamic_per_channel")
            quantized = onnx.load(str(out))
    _save_one_file(quantized, dst)


def _nbits8(model, nodes: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=NBITS_BLOCK, is_symmetric=True,
                                          accuracy_level=NBITS_ACCURACY_LEVEL, bits=8)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_include=nodes, algo_config=config)
    _quiet(quantizer.process)
    return quantizer.model.model


def _dynamic(src: Path, dst: Path, nodes: list[str], per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet(lambda: quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                                    per_channel=per_channel, weight_type=QuantType.QInt8,
                                    use_external_data_format=True))


def _quiet(fn):
    """ONNX Runtime's quantizers log a line per node at INFO and advise pre-processing at WARNING."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        root.setLevel(level)


def _save_one_file(model, dst: Path) -> None:
    """One self-contained file (the int8 weights of a Whisper large-v2-shaped encoder stay under
    protobuf's 2 GiB), written under a temporary name and renamed."""
    with atomic_file(dst) as f:
        f.write(model.SerializeToString())
