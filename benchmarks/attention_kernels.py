"""Which of ONNX Runtime's attention paths is fastest on this CPU, at one Whisper large-v2 encoder layer's
self-attention (1500 positions, 20 heads of 64; random queries, keys and values): the decomposed graph our
export writes (Reshape/Transpose, MatMul, Softmax, MatMul), ORT's fused MultiHeadAttention (com.microsoft),
ONNX's own Attention (opset 23), and the decomposed graph with both products in int8 (each operand quantized
per tensor on the fly). Alternating in one process, medians; error against the decomposed graph.

    python benchmarks/attention_kernels.py [--threads 2] [--repeats 7]

The attention products are the part of the int8 audio encoder that int8 linear layers do not touch
(BENCHMARKS.md, "int8 audio encoder"): this says whether a fused kernel would buy back that time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSITIONS, HEADS, HEAD_WIDTH = 1500, 20, 64
WIDTH = HEADS * HEAD_WIDTH
ENCODER_LAYERS = 32             # Whisper large-v2: the per-layer time x 32 is the encoder's attention time
IR_VERSION = 10                 # what onnxruntime 1.31 reads
MICROSOFT = "com.microsoft"


def _io(name: str):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, POSITIONS, WIDTH])


def _model(nodes: list, initializers: list, opsets: dict[str, int]):
    from onnx import helper

    graph = helper.make_graph(nodes, "attention", [_io("q"), _io("k"), _io("v")], [_io("out")], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                             ir_version=IR_VERSION)


def decomposed(int8_products: bool = False):
    """As torch.onnx writes scaled_dot_product_attention at opset 18; `int8_products`: both MatMuls of two
    activations through DynamicQuantizeLinear + MatMulIntegerToFloat (what quantize_dynamic would make of them)."""
    from onnx import TensorProto, helper

    initializers = [helper.make_tensor("heads_shape", TensorProto.INT64, [4], [1, POSITIONS, HEADS, HEAD_WIDTH]),
                    helper.make_tensor("out_shape", TensorProto.INT64, [3], [1, POSITIONS, WIDTH]),
                    helper.make_tensor("scale", TensorProto.FLOAT, [], [HEAD_WIDTH ** -0.5])]
    nodes = [helper.make_node("Reshape", [x, "heads_shape"], [f"{x}_heads"]) for x in "qkv"]
    nodes += [helper.make_node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Mul", ["q_t", "scale"], ["q_scaled"])]

    def product(a: str, b: str, out: str) -> None:
        if not int8_products:
            nodes.append(helper.make_node("MatMul", [a, b], [out]))
            return
        for x in (a, b):
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [f"{x}_u8", f"{x}_scale", f"{x}_zero"]))
        nodes.append(helper.make_node("MatMulIntegerToFloat", [f"{a}_u8", f"{b}_u8", f"{a}_scale", f"{b}_scale",
                                                               f"{a}_zero", f"{b}_zero"], [out], domain=MICROSOFT))

    product("q_scaled", "k_t", "scores")
    nodes.append(helper.make_node("Softmax", ["scores"], ["weights"], axis=-1))
    product("weights", "v_t", "heads_out")
    nodes += [helper.make_node("Transpose", ["heads_out"], ["merged"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["merged", "out_shape"], ["out"])]
    return _model(nodes, initializers, {"": 18, MICROSOFT: 1} if int8_products else {"": 18})


def multi_head_attention():
    from onnx import helper

    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain=MICROSOFT, num_heads=HEADS)
    return _model([node], [], {"": 18, MICROSOFT: 1})


def onnx_attention():
    from onnx import helper

    node = helper.make_node("Attention", ["q", "k", "v"], ["out"], q_num_heads=HEADS, kv_num_heads=HEADS)
    return _model([node], [], {"": 23})


PATHS = {
    "decomposed (the export's graph)": decomposed,
    "MultiHeadAttention (com.microsoft)": multi_head_attention,
    "Attention (ONNX opset 23)": onnx_attention,
    "decomposed, both products int8": lambda: decomposed(int8_products=True),
}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import onnxruntime as ort

    from salmonn_cli.encoder import session_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    sessions = {name: ort.InferenceSession(make().SerializeToString(), sess_options=session_options(args.threads),
                                           providers=["CPUExecutionProvider"]) for name, make in PATHS.items()}
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((1, POSITIONS, WIDTH)).astype(np.float32) for x in "qkv"}
    reference = next(iter(sessions.values())).run(None, feeds)[0]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(next(iter(times.values())))
    print(f"{args.threads} threads, medians of {args.repeats}; onnxruntime {ort.__version__}\n")
    print(f"| path | ms per layer | x {ENCODER_LAYERS} layers, s | vs decomposed | relative error |\n|---|---|---|---|---|")
    for name, s in sessions.items():
        out = s.run(None, feeds)[0]
        ms = statistics.median(times[name])
        error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        print(f"| {name} | {1000 * ms:.0f} | {ENCODER_LAYERS * ms:.2f} | {ms / base:.2f}x | {error:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
