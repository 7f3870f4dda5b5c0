"""Which of ONNX Runtime's int8 paths is fastest on this CPU, on one Whisper large-v2 FFN product
(1500 x 1280 @ 1280 x 5120, random weights and inputs): each method of export/encoder_quant.py against fp32,
alternating in one process, medians.

    python benchmarks/int8_matmul_kernels.py [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS, IN, OUT = 1500, 1280, 5120


def one_matmul(path: Path, seed: int = 0):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(seed).standard_normal((IN, OUT)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["mel", "w"], ["y"], name="fc1")], "fc1",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [ROWS, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, OUT])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return weight


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import onnxruntime as ort

    from export.encoder_quant import METHODS, quantize_encoder
    from salmonn_cli.encoder import session_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        weight = one_matmul(fp32)
        paths = {"fp32": fp32}
        for method in METHODS:
            paths[method] = Path(tmp) / f"{method}.onnx"
            quantize_encoder(fp32, paths[method], method=method)
        sessions = {name: ort.InferenceSession(str(p), sess_options=session_options(args.threads),
                                               providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    x = np.random.default_rng(1).standard_normal((ROWS, IN)).astype(np.float32)
    exact = x @ weight
    times = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {"mel": x})
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"mel": x})
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    print("| path | ms | vs fp32 | relative error |\n|---|---|---|---|")
    for name, s in sessions.items():
        y = s.run(None, {"mel": x})[0]
        ms = statistics.median(times[name])
        print(f"| {name} | {1000 * ms:.0f} | {ms / base:.2f}x | {np.linalg.norm(y - exact) / np.linalg.norm(exact):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
