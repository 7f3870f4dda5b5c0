"""Where each part runs: the audio encoder on ONNX Runtime's CUDA provider or the CPU, the LLM with
its layers offloaded to the GPU by a CUDA build of llama.cpp or on the CPU.

`auto` takes CUDA only where it really works, `cuda` fails with one line naming what is missing, and
what is reported is what the libraries say they use, never what was asked for. Torch-free.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from salmonn_cli.cuda_libraries import CUDA_PROVIDER, driver_problem, preload_quietly
from salmonn_cli.errors import SalmonnError

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"


class DeviceError(SalmonnError):
    """--device cuda was asked for and CUDA cannot be used."""


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise SalmonnError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    return device


# --- ONNX Runtime's CUDA provider ----------------------------------------------------------------

def _cuda_major() -> str:
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return ""
    return str(cuda_version).split(".")[0]


def _runtime_libraries(major: str) -> list[tuple[str, str]]:
    """(what, soname) of the libraries the CUDA provider loads, in load order."""
    return [(f"the CUDA {major} runtime", f"libcudart.so.{major}"),
            (f"cuBLAS (CUDA {major})", f"libcublasLt.so.{major}"),
            (f"cuBLAS (CUDA {major})", f"libcublas.so.{major}"),
            ("cuRAND", "libcurand.so.10"),
            ("cuDNN 9", "libcudnn.so.9")]


def _loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


_ort_problem: str | None | bool = False


def ort_cuda_problem() -> str | None:
    """None when ONNX Runtime's CUDA provider can load, else what is missing (checked once).

    onnxruntime-gpu finds the NVIDIA pip wheels' libraries only through `preload_dlls()`; it prints
    its complaints on stdout, where answers go, so they are caught here and replaced by one line."""
    global _ort_problem
    if _ort_problem is False:
        _ort_problem = _look_at_ort()
    return _ort_problem


def _look_at_ort() -> str | None:
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDA provider (the CPU-only onnxruntime package is "
                "installed; make setup-cuda installs onnxruntime-gpu)")
    problem = driver_problem()
    if problem:
        return problem
    major = _cuda_major()
    preload_quietly(ort)       # a library still missing is named below
    missing = [what for what, soname in _runtime_libraries(major) if not _loads(soname)]
    if missing:
        return f"{', '.join(dict.fromkeys(missing))} not found (make setup-cuda installs NVIDIA's runtime wheels)"
    return None


def encoder_providers(device: str) -> list[str]:
    """The providers to open the encoder's session with; raises DeviceError for `cuda` without one."""
    if device == "cpu":
        return [CPU_PROVIDER]
    problem = ort_cuda_problem()
    if problem is None:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise DeviceError(f"--device cuda: the audio encoder cannot run on CUDA: {problem}")
    return [CPU_PROVIDER]


# --- llama.cpp ------------------------------------------------------------------------------------

def llama_cuda_problem() -> str | None:
    """None when llama.cpp can offload layers to a GPU, else why not."""
    import llama_cpp

    from salmonn_cli.llm import init_backend

    init_backend()          # quiet: a CUDA build logs its devices when the backends start
    if llama_cpp.llama_supports_gpu_offload():
        return None
    lib = Path(llama_cpp.__file__).resolve().parent / "lib"
    if not any(lib.glob("libggml-cuda*")):
        return "llama-cpp-python is a CPU-only build (make setup-cuda rebuilds it with CUDA)"
    return driver_problem() or "llama.cpp's CUDA build found no usable GPU"


def llm_gpu_layers(device: str, n_gpu_layers: int | None) -> int:
    """Layers to offload (-1 = all): all on CUDA unless `n_gpu_layers` says how many."""
    if device == "cpu":
        if n_gpu_layers:
            raise SalmonnError("--n-gpu-layers needs --device cuda or auto, not --device cpu")
        return 0
    problem = llama_cuda_problem()
    if problem is None:
        return -1 if n_gpu_layers is None else n_gpu_layers
    if device == "cuda" and n_gpu_layers != 0:
        raise DeviceError(f"--device cuda: the LLM cannot run on CUDA: {problem}")
    return 0


def require_cuda(device: str, n_gpu_layers: int | None) -> None:
    """With --device cuda, one DeviceError naming everything missing, before anything loads."""
    if device != "cuda":
        return
    problems = []
    encoder = ort_cuda_problem()
    if encoder:
        problems.append(f"audio encoder: {encoder}")
    llm = llama_cuda_problem() if n_gpu_layers != 0 else None
    if llm and llm != encoder:
        problems.append(f"LLM: {llm}")
    if problems:
        raise DeviceError(f"--device cuda, but CUDA cannot be used: {'; '.join(problems)}")


def offloaded_layers(n_gpu_layers: int, n_layer: int) -> int:
    """Layers llama.cpp puts on the GPU for `n_gpu_layers` (its own rule: the output layer counts as
    one more; none without a GPU backend)."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    total = n_layer + 1
    return total if n_gpu_layers < 0 else min(n_gpu_layers, total)


@dataclass
class Placement:
    """Where a loaded pipeline runs, as the libraries report it."""
    encoder_provider: str
    llm_gpu_layers: int          # offloaded, output layer included
    llm_layers: int              # n_layer + 1
    why_cpu: list[str] = field(default_factory=list)    # with `auto`: why a part is not on CUDA

    @property
    def encoder(self) -> str:
        return "cuda" if self.encoder_provider == CUDA_PROVIDER else "cpu"

    def as_dict(self) -> dict:
        return {"encoder": self.encoder, "encoder_provider": self.encoder_provider,
                "llm_gpu_layers": self.llm_gpu_layers, "llm_layers": self.llm_layers, "why_cpu": self.why_cpu}

    def describe(self) -> str:
        llm = (f"{self.llm_gpu_layers}/{self.llm_layers} layers on the GPU" if self.llm_gpu_layers
               else "on the CPU")
        why = f" ({'; '.join(self.why_cpu)})" if self.why_cpu else ""
        return f"audio encoder on {self.encoder_provider}; LLM {llm}{why}"


def why_cpu(device: str, encoder_provider: str, n_gpu_layers: int | None, gpu_layers: int) -> list[str]:
    """What kept a part on the CPU under `auto` (nothing to explain for `cpu`, or a user's 0 layers)."""
    if device != "auto":
        return []
    reasons = []
    if encoder_provider != CUDA_PROVIDER:
        reasons.append(f"encoder: {ort_cuda_problem() or 'the CUDA provider did not load'}")
    if gpu_layers == 0 and n_gpu_layers != 0:
        reasons.append(f"LLM: {llama_cuda_problem()}")
    return reasons
