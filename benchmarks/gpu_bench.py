"""The GPU check of issue 20: CUDA parity and speed, as a Markdown section for BENCHMARKS.md.

    python benchmarks/gpu_bench.py prepare --work DIR            # random-weight real shapes, no GPU needed
    python benchmarks/gpu_bench.py run --work DIR --tiny-model M --out SECTION.md [--device cuda]
    python benchmarks/gpu_bench.py run --quick ...                # the official-tiny fixture only (CPU dry run)

`prepare` builds, with the project's own tools and random weights (nothing downloaded): the official-format
encoder files of SALMONN-7B (Whisper large-v2, BEATs iter3, the Q-Former; artefacts.build_official, with a
one-layer LLM since only the encoder is exported from them), their ONNX export (export.onnx_encoder), and a
Vicuna-7B-layout LLaMA GGUF in f16 written by export.gguf.write_llama_gguf from random tensors. `run` quantizes
it to q4_k_m with llama.cpp, then measures, each section on its own (a failure is written down and the
others go on; the Markdown is rewritten after every section, so a cut-short run leaves what it had):

  parity   official-tiny f32 (exact attention) on --device: greedy and 4-beam tokens against the official
           reference; audio embeddings on the device against the CPU, max |Δ|
  encoder  ms per 30 s clip: ORT CUDA fp32 and fp16 against PyTorch CUDA fp16 (and fp32)
  llm      prefill and decode tok/s, ours against llama.cpp's own loop (llm_bench), time to first token
  memory   peak GPU memory of `salmonn ask --device cuda` per quant (NVML, whole device) against a PyTorch fp16
           pipeline of the same shapes (transformers generate), which also gives its speed
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

import artefacts  # noqa: E402

PROMPT = "Describe the audio."
REFERENCE_INPUTS = {"speech": "speech_2p5s.wav", "long": "long_40s.wav", "short": "short_0p4s.wav"}
REFERENCE_STEPS = 8
QUANTS = ("q4_k_m", "f16")
MIB = 1 << 20
ENCODER_ONNX = artefacts.ENCODER_ONNX
TTFT_GOAL_S = 0.150
LLAMA_CPP_GOAL = 0.97


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


# --- prepare: random-weight real shapes ------------------------------------------------------------

class RandomLlama:
    """A reader over random LLaMA weights with the interface of train.hf_files' checkpoint readers:
    fp16-exact normal values, drawn from one pool at a random offset per tensor (fast enough for 7B)."""

    POOL = 1 << 26

    def __init__(self, dims, seed: int = 0):
        import numpy as np

        from export.gguf import _expected_shapes

        self.shapes = _expected_shapes(dims, dims.vocab_size)
        self.rng = np.random.default_rng(seed)
        pool = self.rng.standard_normal(self.POOL, dtype=np.float32).astype(np.float16).astype(np.float32)
        self.pool = np.concatenate([pool, pool])      # any window of POOL values is a view

    def names(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def load(self, name):
        import numpy as np

        shape = self.shapes[name]
        n = int(np.prod(shape))
        start = int(self.rng.integers(0, self.POOL))
        values = self.pool[start:start + min(n, self.POOL)]
        if n > self.POOL:
            values = np.resize(values, n)
        if "norm" in name:
            return (1.0 + 0.1 * values).reshape(shape)
        scale = 0.2 if ("embed_tokens" in name or "lm_head" in name) else 0.02
        return (scale * values).reshape(shape)


def write_random_llama_gguf(out: Path, dims, tokenizer_dir: Path, out_type: str = "f16") -> Path:
    """export.gguf's writer on random weights of `dims` (no LoRA), tokenizer from `tokenizer_dir`."""
    import export.gguf as gguf_export

    if out.is_file():
        return out
    tmp = out.with_suffix(".partial")
    real_open = gguf_export.open_checkpoint
    gguf_export.open_checkpoint = lambda _dir: RandomLlama(dims)
    try:
        gguf_export.write_llama_gguf(tmp, tokenizer_dir, dims, {}, 0.0, out_type)
    finally:
        gguf_export.open_checkpoint = real_open
    os.replace(tmp, out)
    return out


def prepare(work: Path) -> dict:
    """The encoder ONNX and the 7B f16 GGUF (no llama.cpp, no GPU needed)."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _, onnx_path = artefacts.real_shape_encoder(work, log)
    onnx_dir = onnx_path.parent
    t1 = time.perf_counter()
    log("writing the random 7B f16 GGUF")
    llm7 = artefacts.bench_config("7b").llm
    gguf = write_random_llama_gguf(work / "llm-7b-f16.gguf", llm7, artefacts.OFFICIAL_TINY / "vicuna")
    t2 = time.perf_counter()
    log("converting the encoder to fp16")
    fp16_onnx(onnx_dir / ENCODER_ONNX, work / "enc" / "onnx-fp16" / ENCODER_ONNX)
    t3 = time.perf_counter()
    model_dirs(work, ("f16",))            # hashes the files for its manifest while the GPU machine waits
    return {"encoder_s": t1 - t0, "gguf_s": t2 - t1, "fp16_onnx_s": t3 - t2, "f16_dir_s": time.perf_counter() - t3}


def model_dirs(work: Path, quants=QUANTS) -> dict[str, Path]:
    """quant -> a model directory of the real-shape encoder and the 7B GGUF (q4_k_m quantized here by
    llama.cpp)."""
    from salmonn_cli.manifest import manifest_dict

    config = artefacts.bench_config("7b")
    f16 = work / "llm-7b-f16.gguf"
    dirs = {}
    for quant in quants:
        out = work / f"model-7b-{quant}"
        dirs[quant] = out
        if (out / artefacts.MANIFEST_NAME).is_file():
            continue
        tmp = work / f".model-7b-{quant}.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        for f in (work / "enc" / "onnx").iterdir():
            if not (tmp / f.name).exists():
                os.link(f, tmp / f.name)
        gguf = tmp / f"llm-{quant}.gguf"
        if quant == "f16":
            if not gguf.exists():
                os.link(f16, gguf)
        else:
            from export.quantize import quantize_gguf

            log(f"quantizing the 7B GGUF to {quant} with llama.cpp")
            t0 = time.perf_counter()
            quantize_gguf(f16, gguf, quant)
            log(f"quantized in {time.perf_counter() - t0:.1f} s")
        manifest = manifest_dict(config, ENCODER_ONNX, gguf.name, quant, tmp)
        (tmp / artefacts.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out)
    return dirs


# --- run: the sections -----------------------------------------------------------------------------

def parity(tiny_model: Path, fixture: Path, device: str) -> dict:
    import numpy as np

    from salmonn_cli.ask import embed_file
    from salmonn_cli.decoding import DecodingOptions
    from salmonn_cli.pipeline import Pipeline, RuntimeOptions

    from salmonn_cli.encoder import AudioEncoder

    reference = json.loads((fixture / "reference.json").read_text())["inputs"]
    rows = {}
    with Pipeline(str(tiny_model), RuntimeOptions(n_threads=4, device=device),
                  DecodingOptions(max_tokens=REFERENCE_STEPS, beams=4)) as p:
        placement = p.placement.as_dict()
        on_device = p.encoder
        cpu_encoder = AudioEncoder(tiny_model / ENCODER_ONNX, n_threads=4, device="cpu")
        for name, wav in REFERENCE_INPUTS.items():
            p.encoder = cpu_encoder
            cpu_embeds = embed_file(p, str(fixture / wav), truncate=True).embeds
            p.encoder = on_device
            embeds = embed_file(p, str(fixture / wav), truncate=True).embeds
            greedy = p.answer(embeds, PROMPT, DecodingOptions(max_tokens=REFERENCE_STEPS, beams=1)).tokens
            beam4 = p.answer(embeds, PROMPT, DecodingOptions(max_tokens=REFERENCE_STEPS, beams=4)).tokens
            rows[name] = {"greedy": greedy == reference[name]["greedy_ids"][1:],
                          "beam4": beam4 == reference[name]["beam4_ids"][1:],
                          "greedy_tokens": greedy, "beam4_tokens": beam4,
                          "embeds_max_abs_diff_vs_cpu": float(np.abs(embeds - cpu_embeds).max())}
    return {"placement": placement, "inputs": rows}


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()                                    # warm-up: allocations, cuDNN/cuBLAS plans
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), times


def fp16_onnx(src: Path, dst: Path) -> Path:
    """The encoder with fp16 weights and arithmetic (float32 inputs and output kept), by ONNX Runtime's
    own converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if dst.is_file():
        return dst
    model = convert_float_to_float16(str(src), keep_io_types=True)     # a path: shape inference past 2 GB
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst


def encoder(work: Path, official_dir: Path, clip: Path, device: str, repeats: int, quick: bool,
            tiny_model: Path | None) -> dict:
    """ms per clip for each engine on the same features; max |Δ| against ORT fp32 on the device."""
    import numpy as np

    from salmonn_cli import audio
    from salmonn_cli.encoder import AudioEncoder as OrtEncoder
    from salmonn_cli.manifest import load_manifest
    from salmonn_cli.pipeline import encoder_inputs

    if quick:
        onnx_path = tiny_model / ENCODER_ONNX
        official = artefacts.fixture_official()
        config = load_manifest(tiny_model, verify=False).config
    else:
        onnx_path = work / "enc" / "onnx" / ENCODER_ONNX
        official = artefacts.OfficialPaths(official_dir / "salmonn.pth", official_dir / "whisper",
                                           official_dir / "beats.pt", official_dir / "vicuna")
        config = artefacts.encoder_config()
    wave, _ = audio.fit_to_chunk(audio.load_audio(clip, config.sample_rate), config.sample_rate,
                                 config.min_seconds, config.max_seconds)
    mel, fbank = encoder_inputs(wave, config)
    engines, outputs, rows, errors = {}, {}, {}, {}

    def add(name, make):
        try:
            t0 = time.perf_counter()
            engines[name] = make()
            rows[name] = {"load_s": time.perf_counter() - t0}
        except Exception as e:          # one engine failing (fp16 conversion, ...) is written down
            errors[name] = one_line_error(e)
            log(f"encoder engine {name} failed:\n{traceback.format_exc()}")

    def ort(path, dev):
        enc = OrtEncoder(path, n_threads=os.cpu_count() or 1, device=dev)
        return lambda: enc(mel, fbank), enc.provider

    add("ORT fp32", lambda: ort(onnx_path, device))
    if not quick:
        add("ORT fp16", lambda: ort(fp16_onnx(onnx_path, work / "enc" / "onnx-fp16" / ENCODER_ONNX), device))
    torch_engines(official, mel, fbank, add)
    for name, (fn, provider) in list(engines.items()):
        try:
            rows[name]["provider"] = provider
            outputs[name] = np.asarray(fn(), dtype=np.float32)
            rows[name]["median_ms"], rows[name]["runs_ms"] = _median_ms(fn, repeats)
        except Exception as e:
            errors[name] = one_line_error(e)
            rows.pop(name, None)
    reference = outputs.get("ORT fp32")
    for name, out in outputs.items():
        if reference is not None and name in rows:
            rows[name]["max_abs_diff_vs_ort_fp32"] = float(np.abs(out - reference).max())
    cpu_diff = None
    if reference is not None and rows.get("ORT fp32", {}).get("provider") == "CUDAExecutionProvider":
        cpu = OrtEncoder(onnx_path, n_threads=os.cpu_count() or 1, device="cpu")
        cpu_diff = float(np.abs(cpu(mel, fbank) - reference).max())
    return {"clip_seconds": len(wave) / config.sample_rate, "mel_frames": int(mel.shape[1]),
            "fbank_frames": int(len(fbank)), "audio_tokens": None if reference is None else int(reference.shape[0]),
            "engines": rows, "errors": errors, "ort_cuda_vs_cpu_max_abs_diff": cpu_diff}


def torch_engines(official, mel, fbank, add) -> None:
    """PyTorch eager engines of the same encoder (train.model.AudioEncoder) on CUDA: fp16 and fp32."""
    import torch

    if not torch.cuda.is_available():
        return
    from train.model import AudioEncoder as TorchEncoder
    from train.official import load_official

    def make(dtype):
        def build():
            model, _ = load_official(official.ckpt, official.whisper, official.beats, official.llm, llm_weights=False)
            enc = TorchEncoder(model).eval().to("cuda", dtype)
            mel_t = torch.from_numpy(mel[None]).to("cuda", dtype)
            fbank_t = torch.from_numpy(fbank[None]).to("cuda", dtype)

            def run_once():
                with torch.no_grad():
                    out = enc(mel_t, fbank_t).float().cpu().numpy()
                return out
            return run_once, f"torch {torch.__version__} cuda"
        return build

    add("PyTorch fp16", make(torch.float16))
    add("PyTorch fp32", make(torch.float32))


def llm(dirs: dict[str, Path], clip: Path, steps: int, repeats: int, device: str) -> dict:
    import llm_bench

    return llm_bench.run(dirs, clip, steps, repeats, threads=min(8, os.cpu_count() or 1), prompt=PROMPT,
                         device=device)


class GpuMemory:
    """Peak used memory of GPU 0 (NVML, the whole device) while it runs, sampled every 5 ms; None
    without NVML (nvidia-ml-py) or a GPU."""

    def __init__(self):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:           # no pynvml, no driver, no GPU
            pass
        self.baseline = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used if self.handle is not None else 0

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.005)

    def __enter__(self):
        if self.handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.handle is not None:
            self._thread.join()

    @property
    def peak_mib(self) -> float | None:
        return (self.peak - self.baseline) / MIB if self.handle is not None else None


def ask_on_gpu(model_dir: Path, clip: Path, steps: int, device: str) -> dict:
    """One whole `salmonn ask --json --verbose` in a fresh process: exit code, placement, peak GPU memory."""
    command = [sys.executable, "-m", "salmonn_cli", "ask", str(clip), PROMPT, "-m", str(model_dir),
               "--device", device, "--json", "--truncate", "--max-tokens", str(steps), "--verbose"]
    with GpuMemory() as mem:
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
        wall = time.perf_counter() - t0
    row = {"returncode": done.returncode, "wall_s": wall, "peak_gpu_mib": mem.peak_mib,
           "stderr": done.stderr.strip()[-600:]}
    if done.returncode == 0:
        answer = json.loads(done.stdout)
        row.update(device=answer["device"], timings=answer["timings"], tokens=len(answer["tokens"]))
    return row


def memory(dirs: dict[str, Path], clip: Path, steps: int, device: str, official_dir: Path | None,
           quick: bool, tiny_model: Path) -> dict:
    rows = {f"{quant} --device {device}": ask_on_gpu(model_dir, clip, steps, device)
            for quant, model_dir in dirs.items()}
    rows["official-tiny f32 --device auto"] = ask_on_gpu(tiny_model, clip, steps, "auto")   # what auto picks
    if not quick and official_dir is not None:
        rows["PyTorch fp16"] = torch_fp16_reference(official_dir, clip, steps)
    return rows


def torch_fp16_reference(official_dir: Path, clip: Path, steps: int) -> dict:
    with GpuMemory() as mem:
        done = subprocess.run([sys.executable, str(Path(__file__)), "torch-fp16", "--official", str(official_dir),
                               "--clip", str(clip), "--steps", str(steps)],
                              capture_output=True, text=True, cwd=REPO, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the PyTorch fp16 reference failed: {done.stderr.strip()[-400:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "peak_gpu_mib": mem.peak_mib}


def torch_fp16_main(official_dir: Path, clip: Path, steps: int) -> dict:
    """Our PyTorch encoder and a Vicuna-7B-layout LLaMA (random, initialised on the GPU) in fp16 through
    transformers generate(inputs_embeds=...), greedy, exactly `steps` + 1 new tokens."""
    import sentencepiece
    import torch
    from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    sys.path.insert(0, str(REPO / "tests"))
    from official_format import llama_hf_config

    from salmonn_cli import audio
    from salmonn_cli.pipeline import encoder_inputs
    from train.model import AudioEncoder as TorchEncoder
    from train.official import load_official

    config7 = artefacts.bench_config("7b")
    o = official_dir
    model, config = load_official(o / "salmonn.pth", o / "whisper", o / "beats.pt", o / "vicuna", llm_weights=False)
    enc = TorchEncoder(model).eval().to("cuda", torch.float16)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        llama = LlamaForCausalLM(llama_hf_config(config7.llm)).eval()
    torch.set_default_dtype(torch.float32)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(o / "vicuna" / "tokenizer.model"))
    before, after = config7.prompt_pieces(PROMPT)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def once():
        clock = Clock()
        with torch.no_grad():
            start = time.perf_counter()
            wave, _ = audio.fit_to_chunk(audio.load_audio(clip, config.sample_rate), config.sample_rate,
                                         config.min_seconds, config.max_seconds)
            mel, fbank = encoder_inputs(wave, config)
            audio_embeds = enc(torch.from_numpy(mel[None]).to("cuda", torch.float16),
                               torch.from_numpy(fbank[None]).to("cuda", torch.float16))
            torch.cuda.synchronize()
            encoded = time.perf_counter()
            embed = llama.get_input_embeddings()
            ids_before = torch.tensor([[config7.llm.bos_token_id] + spm.encode(before)], device="cuda")
            ids_after = torch.tensor([spm.encode(after)], device="cuda")
            embeds = torch.cat([embed(ids_before), audio_embeds[None].to(torch.float16), embed(ids_after)], dim=1)
            llama.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                           device="cuda"),
                           max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, num_beams=1,
                           logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
        return {"encode_s": encoded - start, "first_token_s": clock.times[0] - start,
                "prefill_s": clock.times[0] - encoded, "decode_s": clock.times[-1] - clock.times[0],
                "decode_steps": len(clock.times) - 1, "prompt_tokens": int(embeds.shape[1])}

    once()                                                  # warm-up
    runs = [once() for _ in range(2)]
    best = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {**best, "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
            "torch": torch.__version__, "dtype": "float16", "gpu": torch.cuda.get_device_name(0)}


def probe() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpu"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["gpu"] = f"none ({e})"
    import llama_cpp
    import onnxruntime

    from salmonn_cli.device import llama_cuda_problem, ort_cuda_problem

    info.update(onnxruntime=onnxruntime.__version__, ort_providers=onnxruntime.get_available_providers(),
                ort_cuda_problem=ort_cuda_problem(), llama_cpp_python=llama_cpp.__version__,
                llama_cuda_problem=llama_cuda_problem())
    try:      # not imported: torch's CUDA libraries loaded first crash llama.cpp's CUDA build here
        from importlib.metadata import version
        info["torch"] = version("torch")
    except Exception:
        pass
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                           if l.startswith("model name"))
        info["cores"] = os.cpu_count()
    except (OSError, StopIteration):
        pass
    return info


def one_line_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"[:400]


# --- Markdown --------------------------------------------------------------------------------------

def f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    p = r.get("probe", {})
    lines = ["## GPU: CUDA end to end (issue 20)", "",
             f"`benchmarks/gpu_check.sh` on {r.get('date', '?')}. GPU: {p.get('gpu', '?')}; CPU: {p.get('cpu', '?')}, "
             f"{p.get('cores', '?')} cores; Python {p.get('python', '?')}, onnxruntime-gpu {p.get('onnxruntime', '?')}, "
             f"llama-cpp-python {p.get('llama_cpp_python', '?')} "
             f"({'CPU-only build' if p.get('llama_cuda_problem') else 'built there with GGML_CUDA=on'}), "
             f"torch {p.get('torch', '?')}. "
             f"Device asked for: `{r.get('device', '?')}`.", ""]
    if p.get("ort_cuda_problem") or p.get("llama_cuda_problem"):
        lines += [f"CUDA problems found: encoder: {p.get('ort_cuda_problem') or 'none'}; LLM: "
                  f"{p.get('llama_cuda_problem') or 'none'}.", ""]
    if "parity" in r:
        par = r["parity"]
        lines += ["### Parity: the official-tiny fixture (f32 GGUF, exact attention)", "",
                  f"Placement: {json.dumps(par['placement'])}.", "",
                  "| input | greedy = official | 4 beams = official | audio embeddings max \\|Δ\\| device vs CPU |",
                  "|---|---|---|---|"]
        for name, row in par["inputs"].items():
            lines.append(f"| {name} | {'yes' if row['greedy'] else 'NO ' + str(row['greedy_tokens'])} | "
                         f"{'yes' if row['beam4'] else 'NO ' + str(row['beam4_tokens'])} | "
                         f"{row['embeds_max_abs_diff_vs_cpu']:.1e} |")
        lines.append("")
    if "encoder" in r:
        e = r["encoder"]
        lines += ["### Audio encoder, one 30 s clip", "",
                  f"mel {e['mel_frames']} frames, fbank {e['fbank_frames']} frames -> {e['audio_tokens']} audio tokens; "
                  "the same numpy features for every engine (not timed); median of the runs after one warm-up.", "",
                  "| engine | runs on | ms (median) | load s | max \\|Δ\\| vs ORT fp32 |", "|---|---|---|---|---|"]
        for name, row in e["engines"].items():
            lines.append(f"| {name} | {row.get('provider', '?')} | {f(row.get('median_ms'))} | {f(row.get('load_s'))} | "
                         f"{f(row.get('max_abs_diff_vs_ort_fp32'), '{:.1e}')} |")
        for name, err in e.get("errors", {}).items():
            lines.append(f"| {name} | failed: {err} | | | |")
        if e.get("ort_cuda_vs_cpu_max_abs_diff") is not None:
            lines += ["", f"ORT CUDA fp32 against ORT CPU on the real shapes: max |Δ| {e['ort_cuda_vs_cpu_max_abs_diff']:.1e}."]
        lines.append("")
    if "llm" in r:
        q = r["llm"]
        lines += ["### LLM: our runtime vs llama.cpp's own loop, same context", "",
                  f"Decode: {r.get('steps')} greedy steps, EOS ignored; medians of {r.get('repeats')} alternating runs. "
                  f"Goal: decode ours/llama.cpp >= {LLAMA_CPP_GOAL}; time to first token <= {TTFT_GOAL_S * 1000:.0f} ms "
                  "(warm: read the clip, features, encoder, prefill, first token).", "",
                  "| quant | prompt tokens | prefill tok/s ours | llama.cpp | decode tok/s ours | llama.cpp | ratio | "
                  "same tokens | first token ms | encoder |", "|---|---|---|---|---|---|---|---|---|---|"]
        for quant, row in q["quants"].items():
            ours, ref = row["ours"], row["llama_cpp"]
            n = row["prompt_tokens"]
            d_ours = row["decode_steps"] / ours["decode_s"]
            d_ref = row["decode_steps"] / ref["decode_s"]
            ttft = row["warm_first_token"]["first_token_s"] * 1000
            lines.append(f"| {quant} | {n} | {n / ours['prefill_s']:.0f} | {n / ref['prefill_s']:.0f} | {d_ours:.1f} | "
                         f"{d_ref:.1f} | {d_ours / d_ref:.2f}x | {'yes' if row['same_tokens'] else 'no'} | {ttft:.0f} | "
                         f"{row.get('encoder_provider', '?')} |")
        lines.append("")
    if "memory" in r:
        lines += ["### Peak GPU memory, one whole `salmonn ask` (and the PyTorch fp16 pipeline)", "",
                  "NVML's used memory of the whole GPU, peak minus the idle level before the process started.", "",
                  "| run | exit | placement | peak GPU MiB | wall s | decode tok/s |", "|---|---|---|---|---|---|"]
        for name, row in r["memory"].items():
            if name == "PyTorch fp16":
                lines.append(f"| PyTorch fp16 (transformers generate, same shapes) | 0 | all CUDA | {f(row['peak_gpu_mib'], '{:.0f}')} "
                             f"(max allocated {row['max_memory_allocated_mib']:.0f}) | – | "
                             f"{row['decode_steps'] / row['decode_s']:.1f} |")
                continue
            dev = row.get("device", {})
            placement = (f"encoder {dev.get('encoder_provider')}, LLM {dev.get('llm_gpu_layers')}/{dev.get('llm_layers')} "
                         "layers on GPU") if dev else row.get("stderr", "")[-200:].replace("|", "/").replace("\n", " ")
            tps = row.get("timings", {}).get("decode_tokens_per_s")
            lines.append(f"| `ask {name}` | {row['returncode']} | {placement} | {f(row['peak_gpu_mib'], '{:.0f}')} | "
                         f"{row['wall_s']:.1f} | {f(tps)} |")
        if "PyTorch fp16" in r["memory"]:
            t = r["memory"]["PyTorch fp16"]
            lines += ["", f"PyTorch fp16 pipeline, warm: encoder {t['encode_s'] * 1000:.0f} ms, first token "
                          f"{t['first_token_s'] * 1000:.0f} ms, prefill {t['prompt_tokens'] / t['prefill_s']:.0f} tok/s."]
        lines.append("")
    if r.get("errors"):
        lines += ["### Failed sections", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()] + [""]
    if r.get("seconds"):
        lines += ["Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) + ".", ""]
    return "\n".join(lines)


def run(args) -> int:
    import datetime

    import salmonn_cli.llm  # noqa: F401  before any llama_cpp: it loads ORT's CUDA libraries first

    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": args.device, "errors": {}, "seconds": {}, "steps": args.steps, "repeats": args.repeats}
    out = Path(args.out)
    work = Path(args.work)
    fixture = Path(args.fixture)
    clip = Path(args.clip) if args.clip else artefacts.make_clip(work, 30.0)
    official_dir = work / "enc" / "official"
    state = {}

    def save():
        out.write_text(markdown(results) + "\n", encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))

    def section(name, fn):
        if args.sections and name not in args.sections.split(","):
            return
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:      # written down; the other sections go on
            results["errors"][name] = one_line_error(e)
            log(f"{name} failed:\n{traceback.format_exc()}")
        results["seconds"][name] = time.perf_counter() - t0
        log(f"{name} took {results['seconds'][name]:.1f} s")
        save()

    def dirs():
        if "dirs" not in state:
            state["dirs"] = {"f32": Path(args.tiny_model)} if args.quick else model_dirs(work)
        return state["dirs"]

    section("probe", probe)
    section("parity", lambda: parity(Path(args.tiny_model), fixture, args.device))
    section("models", lambda: {k: str(v) for k, v in dirs().items()})
    section("llm", lambda: llm(dirs(), clip, args.steps, args.repeats, args.device))
    section("encoder", lambda: encoder(work, official_dir, clip, args.device, args.encoder_repeats, args.quick,
                                       Path(args.tiny_model)))
    section("memory", lambda: memory(dirs(), clip, args.steps, args.device, official_dir, args.quick,
                                     Path(args.tiny_model)))
    print(markdown(results))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    pre = sub.add_parser("prepare")
    pre.add_argument("--work", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tiny-model", required=True, help="the official-tiny fixture exported as f32")
    r.add_argument("--fixture", default=str(artefacts.OFFICIAL_TINY), help="official-tiny (reference.json, wavs)")
    r.add_argument("--clip", help="a 30 s clip [default: made from shared/fixtures/audio]")
    r.add_argument("--device", default="cuda")
    r.add_argument("--quick", action="store_true", help="the tiny fixture only (a dry run on the CPU)")
    r.add_argument("--steps", type=int, default=64)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--encoder-repeats", type=int, default=10)
    r.add_argument("--sections", default="", help="comma-separated subset of probe,parity,models,llm,memory,encoder")
    t = sub.add_parser("torch-fp16")
    t.add_argument("--official", required=True)
    t.add_argument("--clip", required=True)
    t.add_argument("--steps", type=int, required=True)
    args = ap.parse_args(argv)
    if args.stage == "prepare":
        print(json.dumps(prepare(Path(args.work))))
        return 0
    if args.stage == "torch-fp16":
        print("RESULT " + json.dumps(torch_fp16_main(Path(args.official), Path(args.clip), args.steps)), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
