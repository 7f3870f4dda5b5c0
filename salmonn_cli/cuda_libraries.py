"""The NVIDIA driver and the CUDA libraries of onnxruntime-gpu's NVIDIA wheels: what salmonn_cli.llm must load
before llama.cpp, and what salmonn_cli.device asks about (kept apart from device, which reads llm)."""
from __future__ import annotations

import contextlib
import ctypes
import io

CUDA_PROVIDER = "CUDAExecutionProvider"

# --- the NVIDIA driver ---------------------------------------------------------------------------

_driver_problem: str | None | bool = False      # False: not looked at yet


def driver_problem() -> str | None:
    """None when the NVIDIA driver loads and sees a GPU, else what is wrong (checked once)."""
    global _driver_problem
    if _driver_problem is False:
        _driver_problem = _look_at_driver()
    return _driver_problem


def _look_at_driver() -> str | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 is not installed)"
    rc = cuda.cuInit(0)
    if rc != 0:
        return f"the NVIDIA driver cannot start CUDA (cuInit error {rc}: no GPU, or a driver/kernel mismatch)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the NVIDIA driver sees no GPU"
    return None


def preload_quietly(ort) -> None:
    """onnxruntime-gpu's `preload_dlls()` (how it finds the NVIDIA wheels' libraries), which prints its
    complaints on stdout, where answers go: they are dropped (callers name what is missing)."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls()
            except Exception:
                pass


def preload_cuda_libraries() -> None:
    """Load the NVIDIA wheels' CUDA libraries before llama.cpp's CUDA build is imported: it then binds to
    them too. Loaded after it, a second cudart/cuBLAS beside the toolkit's it was linked with crashes
    model loading (seen on an H200: segmentation fault in llama_model_load_from_file)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    if driver_problem() is None and CUDA_PROVIDER in ort.get_available_providers():
        preload_quietly(ort)
