"""--device auto|cpu|cuda (issue 20) on a machine without a usable GPU, as CI's are: auto runs on the CPU
and says why, cuda fails with one line naming what is missing before anything loads, and what is reported
is what ONNX Runtime and llama.cpp really use. The checks of what is missing are also fed fake findings
(a driver but no cuDNN, a CPU-only onnxruntime) to see each message."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import OFFICIAL_TINY, REPO, salmonn
from salmonn_cli import cuda_libraries, device
from salmonn_cli.errors import SalmonnError

CLIP = OFFICIAL_TINY / "speech_2p5s.wav"
FAST = ("--max-tokens", "2", "--threads", "1")


@pytest.fixture(autouse=True)
def fresh_findings(monkeypatch):
    """Each test looks again (the module caches what it found once per process)."""
    monkeypatch.setattr(cuda_libraries, "_driver_problem", False)
    monkeypatch.setattr(device, "_ort_problem", False)


def no_usable_cuda() -> bool:
    return device.ort_cuda_problem() is not None and device.llama_cuda_problem() is not None


needs_no_cuda = pytest.mark.skipif("not no_usable_cuda()", reason="this machine has a working CUDA")


def one_error_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("salmonn: error: "), lines
    assert r.stdout == ""
    return lines[0]


@needs_no_cuda
def test_auto_runs_on_the_cpu_and_reports_the_real_providers(model_f32):
    r = salmonn("ask", CLIP, "Describe the audio.", "-m", model_f32, "--json", "--device", "auto", *FAST)
    assert r.returncode == 0, r.stderr
    placement = json.loads(r.stdout)["device"]
    assert placement["encoder"] == "cpu" and placement["encoder_provider"] == "CPUExecutionProvider"
    assert placement["llm_gpu_layers"] == 0 and placement["llm_layers"] == 3     # 2 layers + output
    assert [reason.split(":")[0] for reason in placement["why_cpu"]] == ["encoder", "LLM"]
    assert json.loads(r.stdout)["encoder_provider"] == "CPUExecutionProvider"


@needs_no_cuda
def test_auto_is_the_default_and_verbose_says_where_each_part_runs(model_f32):
    r = salmonn("ask", CLIP, "Describe the audio.", "-m", model_f32, "--verbose", *FAST)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("salmonn: audio encoder on CPUExecutionProvider; LLM on the CPU (encoder: ")
    assert r.stdout.strip()


@needs_no_cuda
@pytest.mark.parametrize("command", ["ask", "transcribe", "listen"])
def test_device_cuda_fails_in_one_line_naming_what_is_missing(model_f32, command):
    args = {"ask": (CLIP, "Describe the audio."), "transcribe": (CLIP,), "listen": ("--input", CLIP)}[command]
    r = salmonn(command, *args, "-m", model_f32, "--device", "cuda", *FAST)
    line = one_error_line(r)
    assert "--device cuda, but CUDA cannot be used: audio encoder: " in line
    assert "LLM: llama-cpp-python is a CPU-only build (make setup-cuda rebuilds it with CUDA)" in line


@needs_no_cuda
def test_device_cuda_with_the_llm_on_the_cpu_names_only_the_encoder(model_f32):
    r = salmonn("ask", CLIP, "Describe the audio.", "-m", model_f32, "--device", "cuda", "--n-gpu-layers", "0", *FAST)
    line = one_error_line(r)
    assert "audio encoder: " in line and "LLM:" not in line


@pytest.mark.parametrize("args, fragment", [
    (("--device", "tpu"), "--device must be one of auto, cpu, cuda, not 'tpu'"),
    (("--device", "cpu", "--n-gpu-layers", "4"), "--n-gpu-layers needs --device cuda or auto"),
])
def test_bad_device_options_are_one_line(model_f32, args, fragment):
    r = salmonn("ask", CLIP, "Describe the audio.", "-m", model_f32, *args, *FAST)
    assert fragment in one_error_line(r)


def test_cpu_is_cpu_whatever_the_machine(model_f32):
    r = salmonn("ask", CLIP, "Describe the audio.", "-m", model_f32, "--json", "--device", "cpu", *FAST)
    assert r.returncode == 0, r.stderr
    placement = json.loads(r.stdout)["device"]
    assert placement == {"encoder": "cpu", "encoder_provider": "CPUExecutionProvider", "llm_gpu_layers": 0,
                         "llm_layers": 3, "why_cpu": []}


def test_a_provider_that_does_not_load_is_an_error_not_a_cpu_run(model_f32, monkeypatch):
    """The checks pass (faked) but ONNX Runtime cannot start CUDA here: the session falls back to the CPU,
    which --device cuda must refuse; auto reports the CPU it really got."""
    from salmonn_cli.encoder import AudioEncoder

    monkeypatch.setattr(device, "ort_cuda_problem", lambda: None)
    onnx = model_f32 / "audio_encoder.onnx"
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers() and no_cuda_driver():
        with pytest.raises(device.DeviceError, match="ONNX Runtime's CUDA provider did not load"):
            AudioEncoder(onnx, device="cuda")
        assert AudioEncoder(onnx, device="auto").provider == "CPUExecutionProvider"
    encoder = AudioEncoder(onnx, device="cpu")
    assert encoder.provider == encoder.session.get_providers()[0] == "CPUExecutionProvider"


def no_cuda_driver() -> bool:
    cuda_libraries._driver_problem = False
    return device.driver_problem() is not None


# --- each missing piece, by name ------------------------------------------------------------------

class FakeOrt:
    __version__ = "1.31.1"

    def __init__(self, providers):
        self.providers = providers
        self.preloaded = False

    def get_available_providers(self):
        return self.providers

    def preload_dlls(self):
        print("Failed to load libcudnn.so.9")     # what onnxruntime prints, on stdout
        self.preloaded = True


def test_cpu_only_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", FakeOrt(["CPUExecutionProvider"]))
    assert device.ort_cuda_problem() == ("onnxruntime 1.31.1 has no CUDA provider (the CPU-only onnxruntime "
                                         "package is installed; make setup-cuda installs onnxruntime-gpu)")


def test_missing_cudnn_is_named_and_preload_output_kept_off_stdout(monkeypatch, capsys):
    fake = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", fake)
    monkeypatch.setattr(device, "driver_problem", lambda: None)
    monkeypatch.setattr(device, "_cuda_major", lambda: "13")
    monkeypatch.setattr(device, "_loads", lambda soname: not soname.startswith("libcudnn"))
    assert device.ort_cuda_problem() == "cuDNN 9 not found (make setup-cuda installs NVIDIA's runtime wheels)"
    assert fake.preloaded and capsys.readouterr().out == ""


def test_missing_runtime_libraries_are_named_once_each(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime",
                        FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    monkeypatch.setattr(device, "driver_problem", lambda: None)
    monkeypatch.setattr(device, "_cuda_major", lambda: "13")
    monkeypatch.setattr(device, "_loads", lambda soname: soname.startswith("libcudart"))
    assert device.ort_cuda_problem() == ("cuBLAS (CUDA 13), cuRAND, cuDNN 9 not found "
                                         "(make setup-cuda installs NVIDIA's runtime wheels)")


def test_no_driver_comes_first(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime",
                        FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    monkeypatch.setattr(device, "driver_problem", lambda: "no NVIDIA driver (libcuda.so.1 is not installed)")
    assert device.ort_cuda_problem() == "no NVIDIA driver (libcuda.so.1 is not installed)"
    with pytest.raises(device.DeviceError, match="^--device cuda, but CUDA cannot be used: audio encoder: no NVIDIA"):
        device.require_cuda("cuda", 0)
    assert device.encoder_providers("auto") == ["CPUExecutionProvider"]
    device.require_cuda("auto", None)                  # auto never fails for want of CUDA


def test_gpu_layers_follow_llama_cpps_rule(monkeypatch):
    import llama_cpp

    monkeypatch.setattr(device, "llama_cuda_problem", lambda: None)
    assert device.llm_gpu_layers("cuda", None) == -1 and device.llm_gpu_layers("auto", 10) == 10
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert device.offloaded_layers(-1, 32) == 33 and device.offloaded_layers(40, 32) == 33
    assert device.offloaded_layers(10, 32) == 10
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert device.offloaded_layers(-1, 32) == 0
    with pytest.raises(SalmonnError, match="--n-gpu-layers needs"):
        device.llm_gpu_layers("cpu", 3)
    assert device.llm_gpu_layers("cpu", None) == 0


def test_setup_cuda_builds_llama_cpp_for_the_common_architectures():
    r = subprocess.run(["make", "-n", "setup-cuda"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'" in r.stdout
    r = subprocess.run(["make", "-n", "llama-cuda"], capture_output=True, text=True, cwd=REPO)
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES='80-real;86-real;89-real;90'" in r.stdout
    assert "llama-cpp-python==0.3.36" in r.stdout


def test_cuda_libraries_are_loaded_before_llama_cpp_only_where_a_driver_is(monkeypatch, capsys):
    """A CUDA build of llama.cpp imported before onnxruntime-gpu's NVIDIA libraries crashed on an H200
    (two cuBLAS/cudart copies): salmonn_cli.llm loads them first, quietly, and only with a driver."""
    fake = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", fake)
    monkeypatch.setattr(cuda_libraries, "driver_problem", lambda: "no NVIDIA driver (libcuda.so.1 is not installed)")
    cuda_libraries.preload_cuda_libraries()
    assert not fake.preloaded
    monkeypatch.setattr(cuda_libraries, "driver_problem", lambda: None)
    cuda_libraries.preload_cuda_libraries()
    assert fake.preloaded and capsys.readouterr().out == ""


def test_importing_the_runtime_prints_nothing():
    import sys

    r = subprocess.run([sys.executable, "-c", "import salmonn_cli.llm, salmonn_cli.pipeline"], capture_output=True,
                       text=True, cwd=REPO)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
