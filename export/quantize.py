"""Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python)."""
from __future__ import annotations

import ctypes
from pathlib import Path

from salmonn_cli.errors import ModelError
from salmonn_cli.llm import set_llama_logging  # first: it loads the CUDA libraries llama.cpp binds to

import llama_cpp  # noqa: E402  (isort: skip)

# name -> llama.cpp llama_ftype. k-quants need rows divisible by 256; llama.cpp falls back to
# another type per tensor where they are not (all of a tiny test model).
QUANT_TYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, n_threads: int | None = None,
                  verbose: bool = False) -> None:
    """Write `src` (an f32/f16 GGUF) quantized as `quant` to `dst`. n_threads None: all cores."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    if not Path(src).is_file():
        raise ModelError(f"GGUF to quantize not found: {src}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = n_threads or 0
    set_llama_logging(verbose)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
