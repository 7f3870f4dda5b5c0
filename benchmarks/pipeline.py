"""End-to-end benchmark of the salmonn runtime against the references a user would compare it with.

    python benchmarks/pipeline.py [--quick] [--out BENCHMARKS.md] [--work DIR] [--threads N]
                                  [--nano-model DIR] [--nano-data DIR] [--sections a,b,...]

Model: real shapes with random weights (nothing downloaded): the Whisper large-v2 encoder, BEATs iter3
(12 x 768), the official Q-Former and projection, and a Vicuna-layout LLaMA: ~1.3B by default
(`--llm-shape 1b`, artefacts.LLM_1B) or Vicuna-7B (`--llm-shape 7b`, about 60 GB of RAM for the
PyTorch reference in f32). Built as official-format files and exported with `salmonn export` once, cached
in --work (default ~/.cache/salmonn/bench; `--sections ''` only builds them). `--quick` runs every part on
the official-tiny fixture, a 5 s clip and 8 tokens, in under a minute. The held-out transcription clips
come from --nano-data (a `python -m train.nano.make_data DIR --seed 0` output), else that set is made in
--work first (a few minutes).

Sections (every ratio is measured in the same run):
  encoder   audio encoder on one clip: ONNX Runtime vs PyTorch eager fp32
  llm       prefill and decode speed: our runtime vs llama.cpp's own loop on the same GGUF and context
  torch     the PyTorch reference pipeline (transformers generate with inputs_embeds): speed, memory,
            first token
  memory    peak resident memory and time to first token of `salmonn ask`, per quantization
  asr       salmonn-nano (--nano-model) vs faster-whisper, same Whisper tiny.en weights: WER and RTF
  quality   quantization against f32 on the official-tiny fixture: max |Δlogit|, greedy agreement

faster-whisper is not a dependency of salmonn: `pip install -e '.[bench]'` then
`pip install --no-deps faster-whisper==1.2.1` (its own requirements would add the CPU onnxruntime,
which overwrites onnxruntime-gpu's files).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import artefacts

HERE = Path(__file__).resolve().parent
PROMPT = "Describe the audio."
SECTIONS = ("encoder", "llm", "torch", "memory", "asr", "quality")
QUANTS = ("q4_k_m", "q8_0", "f16")
FIXTURE_QUANTS = ("f16", "q8_0", "q4_k_m")
FASTER_WHISPER_BEAMS = (1, 5)
VERSION_PACKAGES = ("numpy", "onnxruntime-gpu", "onnxruntime", "llama-cpp-python", "torch", "transformers", "peft",
                    "ctranslate2", "faster-whisper")
GIB = 1 << 30
MIB = 1 << 20
LLAMA_CPP_GOAL = 0.97


@dataclass
class Settings:
    quick: bool
    work: Path
    threads: int
    llm_shape: str
    quants: tuple[str, ...]
    clip_seconds: float
    steps: int                # decode steps timed
    repeats: int
    asr_clips: int
    quality_steps: int
    nano_model: Path | None
    nano_data: Path | None
    sections: tuple[str, ...]

    @classmethod
    def from_args(cls, args) -> "Settings":
        quick = args.quick
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        return cls(
            quick=quick, work=Path(args.work).expanduser(), threads=args.threads or os.cpu_count() or 1,
            llm_shape=args.llm_shape, quants=tuple(q.strip() for q in args.quants.split(",") if q.strip()),
            clip_seconds=5.0 if quick else 30.0,
            steps=args.tokens or (8 if quick else 32), repeats=args.repeats or (1 if quick else 3),
            asr_clips=args.asr_clips or (3 if quick else 100), quality_steps=8 if quick else 16,
            nano_model=Path(args.nano_model) if args.nano_model else None,
            nano_data=Path(args.nano_data) if args.nano_data else None, sections=sections)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def isolated(fn, *args):
    """Run `fn(*args)` in a fresh process, so that no section inherits another's threads (torch,
    llama.cpp and CTranslate2 each bring an OpenMP runtime) or memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure_process(command: list[str]) -> dict:
    """Peak RSS, wall time and first-output time of `command`, through a fresh helper process."""
    done = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), "--", *map(str, command)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak_rss.py failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(map(str, command[:3]))} ... exited with {result['returncode']}: "
                           f"{result['stderr_tail'].strip()[-500:]}")
    return result


# --- the sections --------------------------------------------------------------------------------

def torch_reference(s: Settings, art: artefacts.Artefacts) -> dict:
    o = art.official
    run = measure_process([sys.executable, HERE / "torch_pipeline.py", "--ckpt", o.ckpt, "--whisper", o.whisper,
                           "--beats", o.beats, "--llm", o.llm, "--clip", art.clip, "--tokens", s.steps,
                           "--threads", s.threads, "--prompt", PROMPT])
    line = next(l for l in run["stdout"].splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "peak_rss_bytes": run["peak_rss_bytes"],
            "wall_s": run["wall_s"], "first_output_s": run["first_output_s"]}


def memory(s: Settings, art: artefacts.Artefacts) -> dict:
    rows = {}
    for quant, model_dir in art.models.items():
        run = measure_process([sys.executable, "-m", "salmonn_cli", "ask", art.clip, PROMPT, "--model", model_dir,
                               "--max-tokens", s.steps + 1, "--threads", s.threads, "--truncate"])
        rows[quant] = {k: run[k] for k in ("peak_rss_bytes", "wall_s", "first_output_s")}
        rows[quant]["model_bytes"] = sum(p.stat().st_size for p in Path(model_dir).iterdir())
    return rows


def asr(s: Settings, art: artefacts.Artefacts) -> dict:
    import asr_bench

    data = s.nano_data or artefacts.nano_data(s.work, s.quick, log)
    entries = asr_bench.held_out_speech(data, s.asr_clips)
    result = {"data": str(data), "faster_whisper": isolated(asr_bench.run_faster_whisper, entries, s.threads,
                                                             FASTER_WHISPER_BEAMS)}
    if s.nano_model is None:
        result["nano"] = {"skipped": "no --nano-model DIR given"}
    else:
        result["nano"] = isolated(asr_bench.run_nano, s.nano_model, entries, s.threads)
    return result


def run_sections(s: Settings) -> tuple[dict, dict, dict]:
    """-> (results, errors, seconds) by section name; a failing section does not stop the others."""
    import encoder_bench
    import llm_bench
    import quant_quality

    results, errors, seconds = {}, {}, {}
    start = time.perf_counter()
    art = isolated(artefacts.prepare, s.work, s.quick, s.llm_shape, s.quants, s.clip_seconds, FIXTURE_QUANTS)
    seconds["artefacts"] = time.perf_counter() - start
    results["artefacts"] = art
    base_dir = art.models[s.quants[0]]
    jobs = {
        "encoder": lambda: isolated(encoder_bench.run, art.official, base_dir, art.clip, s.threads, s.repeats),
        "llm": lambda: isolated(llm_bench.run, art.models, art.clip, s.steps, s.repeats, s.threads, PROMPT),
        "torch": lambda: torch_reference(s, art),
        "memory": lambda: memory(s, art),
        "asr": lambda: asr(s, art),
        "quality": lambda: isolated(quant_quality.run, art.fixture_models, s.quality_steps, s.threads),
    }
    for name in s.sections:
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            results[name] = jobs[name]()
        except Exception as e:  # report what failed and carry on with the other sections
            errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log(f"{name} failed:\n{traceback.format_exc()}")
        seconds[name] = time.perf_counter() - t0
        log(f"{name} took {seconds[name]:.1f} s")
    return results, errors, seconds


# --- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/AMX"


def ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "none"
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip().replace("\n", "; ") or "none"


def versions() -> dict[str, str]:
    found = {}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "ram_gib": ram_bytes() / GIB, "gpu": gpu_name(), "os": platform.platform(),
            "python": platform.python_version(), "load_average": os.getloadavg(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --- the report ----------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def rate(n: float, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def shapes_section(s: Settings, art: artefacts.Artefacts) -> list[str]:
    c = art.config
    llm = c.llm
    if s.quick:
        what = "the official-tiny fixture (tests' shapes, random weights)"
    elif s.llm_shape == "7b":
        what = "SALMONN-7B's shapes with random weights: Vicuna-7B as the LLM"
    else:
        what = ("SALMONN-7B's encoders with random weights; the LLM is a **~1.3B Vicuna-layout LLaMA** "
                "(same layer design as Vicuna-7B: MHA, SiLU MLP, RMSNorm, vocab 32000), because the 7B in f32 "
                "(27 GB) does not fit this machine beside the rest")
    return [
        "## Model", "", f"Benchmarked model: {what}.", "",
        table(["part", "shape"], [
            ["Whisper encoder", f"{c.whisper.n_layers} layers, d_model {c.whisper.d_model}, {c.whisper.n_heads} heads, "
                                f"FFN {c.whisper.ffn_dim}, {c.whisper.n_mels} mels"],
            ["BEATs", f"{c.beats.encoder_layers} layers x {c.beats.encoder_embed_dim}, {c.beats.encoder_attention_heads} heads, "
                      f"FFN {c.beats.encoder_ffn_embed_dim}"],
            ["Q-Former", f"{c.qformer.n_layers} layers, hidden {c.qformer.hidden}, {c.qformer.n_heads} heads, "
                         f"{c.qformer.num_query_tokens} query/window, {c.window_frames}-frame windows, "
                         f"{c.n_audio_tokens} audio tokens"],
            ["LLM", f"{llm.n_layers} layers, hidden {llm.hidden_size}, {llm.n_heads} heads / {llm.n_kv_heads} KV heads, "
                    f"MLP {llm.intermediate_size}, vocab {llm.vocab_size}: "
                    f"{count(artefacts.llm_parameter_count(c))} parameters"],
            ["LoRA", f"r {c.lora.r}, alpha {c.lora.alpha:g}, on {', '.join(c.lora.targets)} (merged in the GGUF)"],
        ]), "",
        f"Clip: {s.clip_seconds:g} s of real audio (narration, speech over gunfire, two short utterances from "
        f"shared/fixtures/audio), prompt \"{PROMPT}\". Threads: {s.threads} for every engine. "
        f"Decode: {s.steps} greedy steps, EOS ignored. Repeats: {s.repeats} (medians).", ""]


def encoder_section(r: dict) -> list[str]:
    p = r["params"]
    engines = r["engines"]
    baseline = engines[next(iter(engines))]["median_s"]       # PyTorch on the CPU
    rows = [[name, fmt(e["median_s"], 3), ", ".join(f"{t:.3f}" for t in e["runs_s"]), ratio(baseline, e["median_s"]),
             f"{e['max_abs_diff']:.1e}"] for name, e in engines.items()]
    return [
        "## Audio encoder, one clip", "",
        f"Whisper {count(p['whisper'])} + BEATs {count(p['beats'])} + Q-Former/projection "
        f"{count(p['qformer_and_projection'])} parameters; mel {r['mel_frames']} frames, fbank "
        f"{r['fbank_frames']} frames -> {r['audio_tokens']} audio tokens, {r['threads']} threads. The same numpy "
        f"features go to every engine ({r['features_s']:.3f} s, not included below).", "",
        table(["engine", "seconds (median)", "runs", "speed-up vs PyTorch CPU", "max \\|Δ\\| vs PyTorch CPU"], rows),
        "", "ONNX session load: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["ort_load_s"].items()) + ".", ""]


def llm_section(r: dict, torch_r: dict | None) -> list[str]:
    rows = []
    for quant, q in r["quants"].items():
        n_prompt = q["prompt_tokens"]
        ours_p, ref_p = rate(n_prompt, q["ours"]["prefill_s"]), rate(n_prompt, q["llama_cpp"]["prefill_s"])
        ours_d, ref_d = rate(q["decode_steps"], q["ours"]["decode_s"]), rate(q["decode_steps"], q["llama_cpp"]["decode_s"])
        rows.append([quant, n_prompt, fmt(ours_p, 1), fmt(ref_p, 1), ratio(ours_p, ref_p),
                     fmt(ours_d), fmt(ref_d), ratio(ours_d, ref_d), "yes" if q["same_tokens"] else "no"])
    lines = [
        "## LLM: our runtime vs llama.cpp's own generation", "",
        f"Same GGUF, same llama.cpp context, same prompt embeddings, {r['threads']} threads, runs alternating "
        f"(llama-cpp-python {r['llama_cpp_python']}). Goal: ours / llama.cpp >= {LLAMA_CPP_GOAL} for decoding.", "",
        table(["quant", "prompt tokens", "prefill tok/s ours", "prefill tok/s llama.cpp", "ratio",
               "decode tok/s ours", "decode tok/s llama.cpp", "ratio", "same tokens"], rows), ""]
    if torch_r:
        t_p = rate(torch_r["prompt_tokens"], torch_r["prefill_s"])
        t_d = rate(torch_r["decode_steps"], torch_r["decode_s"])
        rows = [["PyTorch reference (fp32, transformers generate)", fmt(t_p, 1), "1.00x", fmt(t_d), "1.00x"]]
        for quant, q in r["quants"].items():
            o_p = rate(q["prompt_tokens"], q["ours"]["prefill_s"])
            o_d = rate(q["decode_steps"], q["ours"]["decode_s"])
            rows.append([f"ours, {quant}", fmt(o_p, 1), ratio(o_p, t_p), fmt(o_d), ratio(o_d, t_d)])
        lines += ["### Against the PyTorch reference pipeline", "",
                  f"Our PyTorch SALMONN (torch {torch_r['torch']}, {torch_r['threads']} threads), "
                  f"`generate(inputs_embeds=...)`, greedy, {torch_r['prompt_tokens']}-token prompt; one run.", "",
                  table(["pipeline", "prefill tok/s", "vs PyTorch", "decode tok/s", "vs PyTorch"], rows), ""]
    return lines


def memory_section(mem: dict | None, torch_r: dict | None, llm_r: dict | None) -> list[str]:
    ref_rss = torch_r["peak_rss_bytes"] if torch_r else None
    lines = ["## Peak memory and time to first token", ""]
    if mem or torch_r:
        rows = []
        for quant, m in (mem or {}).items():
            rows.append([f"`salmonn ask`, {quant}", gib(m["model_bytes"]), gib(m["peak_rss_bytes"]),
                         ratio(m["peak_rss_bytes"], ref_rss)])
        if torch_r:
            rows.append(["PyTorch reference, fp32", "", gib(ref_rss), "1.00x"])
        loaded = (f" The PyTorch reference holds {gib(torch_r['rss_loaded_bytes'])} GiB right after loading; "
                  "its peak also counts the safetensors pages mapped while the weights are copied."
                  if torch_r else "")
        lines += ["Peak resident set (ru_maxrss) of one whole run in a fresh process: load, read the clip, "
                  "encode, answer." + loaded, "",
                  table(["pipeline", "model files GiB", "peak RSS GiB", "vs PyTorch"], rows), ""]
    rows = []
    for quant, m in (mem or {}).items():
        warm = llm_r["quants"][quant]["warm_first_token"] if llm_r and quant in llm_r["quants"] else None
        rows.append([f"ours, {quant}", fmt(m["first_output_s"]), fmt(warm and warm["first_token_s"], 3),
                     fmt(warm and warm["encode_s"], 3), fmt(warm and warm["prefill_s"], 3)])
    if torch_r:
        rows.append(["PyTorch reference, fp32", fmt(torch_r["first_output_s"]), fmt(torch_r["first_token_warm_s"], 3),
                     fmt(torch_r["features_s"] + torch_r["encode_s"], 3), fmt(torch_r["prefill_s"], 3)])
    if rows:
        lines += ["Time to first token for the clip. Cold: from starting the process to the first answer text on "
                  "its stdout (imports, model load, audio, encoder, prefill). Warm: model already loaded, "
                  "audio file in -> first token chosen.", "",
                  table(["pipeline", "cold s", "warm s", "of which audio + encoder s", "of which prefill s"], rows), ""]
    return lines


def asr_section(r: dict) -> list[str]:
    rows = []
    fw = r["faster_whisper"]
    nano = r["nano"]
    fw_rtf = None
    if "skipped" in fw:
        rows.append(["faster-whisper", "", "", "", "", "", f"skipped: {fw['skipped']}"])
    else:
        for beam, b in fw["beams"].items():
            fw_rtf = fw_rtf or b["rtf"]
            rows.append([f"faster-whisper {fw['version']}, tiny.en int8, beam {beam}", pct(b["wer"]),
                         pct(b.get("wer_clean")), pct(b.get("wer_mix")), fmt(b["rtf"], 3),
                         ratio(b["rtf"], fw_rtf), f"load {fw['load_s']:.2f} s"])
    if "skipped" in nano:
        rows.append(["salmonn-nano", "", "", "", "", "", f"skipped: {nano['skipped']}"])
    else:
        rows.append([f"salmonn-nano ({nano['quant']}, our runtime)", pct(nano["wer"]),
                     pct(nano.get("wer_clean")), pct(nano.get("wer_mix")),
                     fmt(nano["rtf"], 3), ratio(nano["rtf"], fw_rtf), f"load {nano['load_s']:.2f} s"])
    any_run = next((b for b in (fw.get("beams") or {}).values()), None) or (nano if "rtf" in nano else None)
    counts = (f"{any_run['clips']} held-out clips ({any_run.get('n_wer_clean', 0)} clean speech, "
              f"{any_run.get('n_wer_mix', 0)} over a background event; {any_run['audio_s']:.0f} s of audio)"
              if any_run else "no clips")
    return ["## Transcription: salmonn-nano vs faster-whisper (same Whisper tiny.en weights)", "",
            f"{counts} from {r['data']}/test.json; WER by train/nano/evaluate.py. RTF = processing time / audio "
            "time, path in, text out, model load excluded; faster-whisper with its defaults otherwise.", "",
            table(["system", "WER %", "clean %", "mix %", "RTF", "RTF / faster-whisper beam 1", "note"], rows), ""]


def quality_section(r: dict) -> list[str]:
    rows = [["f32", "", "", "", mib(r["quants"]["f32"]["size_bytes"]),
             ", ".join(f"{k} {v}" for k, v in sorted(r["quants"]["f32"]["tensor_types"].items()))]]
    for quant, q in r["quants"].items():
        if quant == "f32":
            continue
        rows.append([quant, f"{q['max_abs_last']:.2e}", f"{q['max_abs_all']:.2e}",
                     f"{q['agree']}/{q['total']}", mib(q["size_bytes"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(q["tensor_types"].items()))])
    return ["## Quantization against f32 (official-tiny fixture)", "",
            f"LLM inputs of the fixture's {len(r['clips'])} clips (reference.npz), exact attention for every "
            f"model; {r['steps']} greedy steps teacher-forced with f32's tokens. f32 logits: std "
            f"{r['f32_logit_std']:.2f}, max |Δ| {r['f32_vs_official_max_abs']:.1e} from the official PyTorch "
            "reference. The fixture's rows are 64 wide, not a multiple of 256, so llama.cpp stores its k-quant "
            "tensors in fallback types (listed); rows of real widths (2048, 4096, 5632, 11008) take the k-quants.", "",
            table(["quant", "max \\|Δlogit\\| prompt", "max \\|Δlogit\\| all steps", "greedy agreement", "size",
                   "tensor types"], rows), ""]


def report(s: Settings, m: dict, results: dict, errors: dict, seconds: dict) -> str:
    art = results["artefacts"]
    v = m["versions"]
    lines = ["# salmonn pipeline benchmark", "",
             f"`python benchmarks/pipeline.py{' --quick' if s.quick else ''}` on {m['date']}"
             + (" (quick mode: tiny shapes, numbers only show that every part runs)" if s.quick else "") + ".", "",
             "## Machine", "",
             f"- CPU: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores; RAM {m['ram_gib']:.1f} GiB; GPU: {m['gpu']}",
             f"- {m['os']}, Python {m['python']}; load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}",
             "- " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    lines += shapes_section(s, art)
    torch_r = results.get("torch")
    if "encoder" in results:
        lines += encoder_section(results["encoder"])
    if "llm" in results:
        lines += llm_section(results["llm"], torch_r)
    if "memory" in results or torch_r:
        lines += memory_section(results.get("memory"), torch_r, results.get("llm"))
    if "asr" in results:
        lines += asr_section(results["asr"])
    if "quality" in results:
        lines += quality_section(results["quality"])
    if errors:
        lines += ["## Failed sections", ""] + [f"- {name}: {e}" for name, e in errors.items()] + [""]
    lines += ["## Time taken", "", table(["part", "seconds"], [[k, f"{v:.1f}"] for k, v in seconds.items()]), ""]
    return "\n".join(lines)


def _jsonable(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 5 s clip, few tokens: every part in ~1 min")
    ap.add_argument("--out", help="write the markdown report here (atomically) as well as to stdout")
    ap.add_argument("--json", help="write every raw measurement here (atomically)")
    ap.add_argument("--work", default=str(artefacts.DEFAULT_WORK), help="cache of built models, clips and data")
    ap.add_argument("--threads", type=int, help="threads for every engine [default: all cores]")
    ap.add_argument("--llm-shape", choices=artefacts.LLM_SHAPES, default="1b", help="LLM of the full benchmark")
    ap.add_argument("--quants", default=",".join(QUANTS), help="quantizations of the benchmarked model")
    ap.add_argument("--tokens", type=int, help="decode steps to time [default: 32, quick 8]")
    ap.add_argument("--repeats", type=int, help="alternating repeats per measurement [default: 3, quick 1]")
    ap.add_argument("--asr-clips", type=int, help="held-out clips for the transcription table [default: 100, quick 3]")
    ap.add_argument("--nano-model", help="salmonn-nano model directory (without it, its row is skipped)")
    ap.add_argument("--nano-data", help="nano data set directory with test.json [default: made in --work]")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    s = Settings.from_args(args)
    m = machine()
    started = time.perf_counter()
    results, errors, seconds = run_sections(s)
    seconds["total"] = time.perf_counter() - started
    text = report(s, m, results, errors, seconds)
    print(text)
    if args.out:
        write_atomically(Path(args.out), text)
    if args.json:
        raw = {"machine": m, "settings": dataclasses.asdict(s), "results": results, "errors": errors, "seconds": seconds}
        write_atomically(Path(args.json), json.dumps(raw, indent=1, default=_jsonable))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
