"""The audio encoder (Whisper + BEATs + fusion + window Q-Former + projection) through ONNX Runtime."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from salmonn_cli.device import CUDA_PROVIDER, DeviceError, encoder_providers
from salmonn_cli.errors import DEBUG_ENV, ModelError, quoted

# Input/output names of the exported graph (export/onnx_encoder.py writes them).
INPUT_MEL = "mel"
INPUT_FBANK = "fbank"
OUTPUT_EMBEDS = "audio_embeds"


def session_options(n_threads: int):
    """ONNX Runtime's settings for the encoder (benchmarks/encoder_int8.py measures the alternatives):
    all graph optimizations (ORT's default level), pre-packed weights (its default) and the CPU arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    # The arena lets each layer reuse the last one's buffers instead of fresh pages per allocation;
    # it is shrunk after every call (RUN_OPTIONS) and memory patterns stay off, because the fbank
    # length changes with every clip and both would otherwise keep every size seen in a long transcription.
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


class AudioEncoder:
    """`device`: auto (CUDA where its provider loads), cpu, or cuda (DeviceError without it).
    `provider` is the provider the session really runs on."""

    def __init__(self, path: str | Path, n_threads: int = 1, device: str = "auto"):
        import onnxruntime as ort

        providers = encoder_providers(device)

        options = session_options(n_threads)
        # A CUDA provider that fails to load is logged by ORT, which then runs on the CPU: `provider`
        # reports that, and --device cuda turns it into an error below.
        if not os.environ.get(DEBUG_ENV):
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for corrupt graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load audio encoder {quoted(path)}: {first}") from None
        finally:
            ort.set_default_logger_severity(3)
        names = {i.name for i in self.session.get_inputs()}
        if names != {INPUT_MEL, INPUT_FBANK}:
            raise ModelError(f"audio encoder {quoted(path)} has inputs {sorted(names)}, "
                             f"expected {INPUT_MEL!r} and {INPUT_FBANK!r}")
        self.provider = self.session.get_providers()[0]
        self.run_options = ort.RunOptions()     # the CPU arena, shrunk after each call (session_options)
        if self.provider == "CPUExecutionProvider":
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if device == "cuda" and self.provider != CUDA_PROVIDER:
            raise DeviceError(f"--device cuda: ONNX Runtime's CUDA provider did not load for {quoted(path)} "
                              f"(set {DEBUG_ENV}=1 to see ONNX Runtime's log)")

    def __call__(self, mel: np.ndarray, fbank: np.ndarray) -> np.ndarray:
        """mel (n_mels, frames), fbank (F, 128) -> audio embeddings (n_tokens, llm_hidden) float32."""
        try:
            (embeds,) = self.session.run(
                [OUTPUT_EMBEDS],
                {INPUT_MEL: mel[None].astype(np.float32), INPUT_FBANK: fbank[None].astype(np.float32)},
                self.run_options,
            )
        except Exception as e:  # ORT's own types: the graph does not take what the manifest describes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"the audio encoder rejected mel {mel.shape} / fbank {fbank.shape} "
                             f"(does the manifest match the model?): {first}") from None
        return np.ascontiguousarray(embeds, dtype=np.float32)
