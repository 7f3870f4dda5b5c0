"""The int8 audio encoder (issue 18): quality against fp32, speed against PyTorch, ORT fp32 and CTranslate2 int8,
and ONNX Runtime's session options one change at a time. Writes JSON and a Markdown section for BENCHMARKS.md.

    python benchmarks/encoder_int8.py [--work DIR] [--threads 2] [--repeats 3] [--sections a,b,...]
                                      [--out benchmarks/encoder_int8.md]

Weights: the random-weight SALMONN-7B encoders of artefacts.real_shape_encoder (Whisper large-v2, BEATs
iter3, the official Q-Former; built and exported once into --work), and salmonn-nano's trained ones (built
from the shipped files with an fp32 encoder into --work, once per shipped version). Every timing section runs its engines in one process,
alternating them (the first of each round rotates), on the same numpy features of a 30 s clip of real audio;
medians of --repeats after one warm-up call each, so that the ratios stay fair on a busy machine.

Sections:
  quality  audio tokens int8 vs fp32 (cosine, max |Δ|) on every clip of ../shared/fixtures/audio, real-shape
           and nano weights; the official-tiny fixture's 8 greedy tokens with both encoders (`salmonn ask`)
  whole    the whole audio encoder: PyTorch eager fp32, ORT fp32, ORT int8
  whisper  the Whisper large-v2 encoder alone: PyTorch eager fp32, ORT fp32, ORT int8, CTranslate2 int8
           (`ct2-transformers-converter --quantization int8` of the same HF folder, `Whisper.encode`)
  options  the int8 whole encoder under ONNX Runtime session options, each changed alone from the runtime's
           (salmonn_cli/encoder.session_options), each timed in a pair with the runtime's settings
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

import artefacts  # noqa: E402
import pipeline as report  # noqa: E402  (the machine description and Markdown helpers)

SECTIONS = ("quality", "whole", "whisper", "options")
QUALITY_TARGETS = {"real-shape random": 0.999, "salmonn-nano": 0.995}
WHOLE_TARGET = 0.35          # int8 whole encoder / ORT fp32
CT2_TARGET = 1.7             # CTranslate2 int8 / ORT int8, Whisper alone
FIXTURE_STEPS = 8
PROMPT = "Describe the audio."
WHISPER_ONNX = "whisper_encoder.onnx"
BUSY_LOAD = 1.5             # 1-minute load average on 2 cores above which the report calls the machine shared


def log(message: str) -> None:
    print(f"[int8] {message}", file=sys.stderr, flush=True)


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def interleaved(engines: dict, repeats: int) -> dict:
    """name -> {median_s, runs_s, output}: every engine once to warm up, then `repeats` rounds in turn."""
    outputs = {name: fn() for name, fn in engines.items()}
    times = {name: [] for name in engines}
    names = list(engines)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            engines[name]()
            times[name].append(time.perf_counter() - start)
        log(f"round {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    return {name: {"median_s": statistics.median(times[name]), "runs_s": times[name], "output": outputs[name]}
            for name in names}


def session(path: Path, threads: int, **changes):
    """An ONNX Runtime CPU session set up as salmonn_cli.encoder does, with `changes` applied."""
    import onnxruntime as ort

    from salmonn_cli.encoder import session_options

    options = session_options(threads)
    for key, value in changes.items():
        if key == "config":
            for name, v in value.items():
                options.add_session_config_entry(name, v)
        else:
            setattr(options, key, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# Ways to make the int8 encoder that the quality section compares: name -> quantize_encoder arguments.
# "export's" is what `salmonn export --encoder-quant int8` writes.
VARIANTS = {
    "export's (per-channel, Whisper's first and last layers fp32)": {},
    "per-channel, every layer": {"fp32_edge_layers": 0},
    "per-tensor, every layer": {"method": "dynamic", "fp32_edge_layers": 0},
}
DEFAULT_VARIANT = next(iter(VARIANTS))


def int8_file(fp32: Path, out: Path, parts=None, **variant) -> Path:
    """`out`, with the settings in its name (export's, or `variant`'s), made once."""
    from export.encoder_quant import METHOD, QUANTIZED_PARTS, WHISPER_FP32_EDGE_LAYERS, quantize_encoder

    settings = {"method": METHOD, "fp32_edge_layers": WHISPER_FP32_EDGE_LAYERS, **variant}
    out = out.with_name(f"{out.stem}-{settings['method']}-edge{settings['fp32_edge_layers']}{out.suffix}")
    if not out.is_file():
        log(f"quantizing {fp32.name} to {out.name} (once)")
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_encoder(fp32, out, parts=parts or QUANTIZED_PARTS, **variant)
    return out


def clip_features(config, clip: Path):
    from salmonn_cli import audio
    from salmonn_cli.pipeline import encoder_inputs

    wave, _ = audio.fit_to_chunk(audio.load_audio(clip, config.sample_rate), config.sample_rate,
                                 config.min_seconds, config.max_seconds)
    return encoder_inputs(wave, config)


# --- quality -------------------------------------------------------------------------------------

def token_quality(fp32: Path, int8_files: dict[str, Path], config, threads: int) -> dict:
    """variant -> clip -> cosine, max |Δ| of the audio tokens against fp32."""
    import numpy as np

    from salmonn_cli.encoder import AudioEncoder

    clips = sorted(p for p in artefacts.AUDIO_FIXTURES.iterdir() if p.suffix in (".wav", ".mp3"))
    features = {clip.name: clip_features(config, clip) for clip in clips}
    engine = AudioEncoder(fp32, n_threads=threads, device="cpu")
    reference = {name: engine(*f) for name, f in features.items()}
    rows = {}
    for variant, path in int8_files.items():
        engine = AudioEncoder(path, n_threads=threads, device="cpu")
        rows[variant] = {}
        for name, f in features.items():
            a, b = reference[name], engine(*f)
            rows[variant][name] = {"cosine": cosine(a, b), "max_abs_diff": float(np.abs(a - b).max()),
                                   "max_abs": float(np.abs(a).max()), "tokens": int(a.shape[0])}
        log(f"quality: {variant}: min cosine {min(r['cosine'] for r in rows[variant].values()):.5f}")
    return rows


def fixture_tokens(work: Path) -> dict:
    """The official-tiny fixture exported f32 (exact), then its encoder requantized to int8: greedy tokens."""
    from export.requantize_encoder import requantize_encoder

    fp32_dir = artefacts.model_dirs(artefacts.fixture_official(), work / artefacts.FIXTURE_SHAPE, "f32", (), log)["f32"]
    int8_dir = work / artefacts.FIXTURE_SHAPE / "model-f32-int8-encoder"
    if not (int8_dir / artefacts.MANIFEST_NAME).is_file():
        shutil.rmtree(int8_dir, ignore_errors=True)
        shutil.copytree(fp32_dir, int8_dir)
        requantize_encoder(int8_dir, "int8", log)
    rows = {}
    for wav in ("speech_2p5s.wav", "long_40s.wav", "short_0p4s.wav"):
        tokens = {}
        for name, model in (("fp32", fp32_dir), ("int8", int8_dir)):
            done = subprocess.run([sys.executable, "-m", "salmonn_cli", "ask", str(artefacts.OFFICIAL_TINY / wav),
                                   PROMPT, "--model", str(model), "--json", "--temperature", "0", "--truncate",
                                   "--max-tokens", str(FIXTURE_STEPS), "--threads", "1"],
                                  capture_output=True, text=True, check=True)
            tokens[name] = json.loads(done.stdout)["tokens"]
        rows[wav] = {**tokens, "same": tokens["fp32"] == tokens["int8"]}
    return rows


def nano_fp32_model(work: Path):
    """salmonn-nano built from the shipped files with its fp32 encoder (the default build keeps only the
    int8 one), rebuilt when the shipped files change."""
    from export.nano import export_nano
    from salmonn_cli.default_model import BUILT_FROM_FILE, NANO_DATA_DIR, shipped_digest
    from salmonn_cli.manifest import load_manifest

    out, digest = work / "nano-fp32", shipped_digest(NANO_DATA_DIR)
    stamp = out / BUILT_FROM_FILE
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        log(f"building salmonn-nano with its fp32 encoder into {out}")
        export_nano(NANO_DATA_DIR, out, encoder_quant="fp32")
        stamp.write_text(digest + "\n")
    return load_manifest(out)


def quality(work: Path, threads: int) -> dict:
    _, real_fp32 = artefacts.real_shape_encoder(work, log)
    nano = nano_fp32_model(work)
    nano_fp32 = nano.path(nano.audio_encoder)
    out = {}
    for name, fp32, int8_dir, config in (
            ("real-shape random", real_fp32, work / "enc" / "onnx-int8", artefacts.encoder_config()),
            ("salmonn-nano", nano_fp32, work / "nano-int8", nano.config)):
        files = {v: int8_file(fp32, int8_dir / "audio_encoder-int8.onnx", **a) for v, a in VARIANTS.items()}
        out[name] = token_quality(fp32, files, config, threads)
    out["fixture"] = fixture_tokens(work)
    return out


# --- speed ---------------------------------------------------------------------------------------

def whole(work: Path, threads: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from train.model import AudioEncoder as TorchEncoder
    from train.official import load_official

    official, fp32 = artefacts.real_shape_encoder(work, log)
    int8 = int8_file(fp32, work / "enc" / "onnx-int8" / "audio_encoder-int8.onnx")
    config = artefacts.encoder_config()
    mel, fbank = clip_features(config, artefacts.make_clip(work, 30.0))
    feed = {"mel": mel[None].astype(np.float32), "fbank": fbank[None].astype(np.float32)}
    torch.set_num_threads(threads)
    model, _ = load_official(official.ckpt, official.whisper, official.beats, official.llm, llm_weights=False)
    torch_encoder = TorchEncoder(model).eval()
    mel_t, fbank_t = torch.from_numpy(feed["mel"]), torch.from_numpy(feed["fbank"])

    def torch_run():
        with torch.inference_mode():
            return torch_encoder(mel_t, fbank_t).numpy()

    sessions = {name: session(path, threads) for name, path in (("ORT fp32", fp32), ("ORT int8", int8))}
    engines = {"PyTorch fp32": torch_run,
               **{name: (lambda s=s: s.run(None, feed)[0]) for name, s in sessions.items()}}
    return _speed_rows(interleaved(engines, repeats), reference="ORT fp32")


def whisper_onnx(official: artefacts.OfficialPaths, out: Path) -> Path:
    """The HF Whisper encoder of `official` alone, exported like the audio encoder (dynamo, opset 18)."""
    import torch

    from export.onnx_encoder import OPSET, drop_node_metadata

    if out.is_file():
        return out
    from transformers import WhisperModel

    log("exporting the Whisper encoder alone to ONNX (once)")
    tmp = out.parent.with_name(out.parent.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = WhisperModel.from_pretrained(official.whisper).encoder.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, mel):
            return self.encoder(mel).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(LastHiddenState(), (torch.zeros(1, 80, 3000),), str(tmp / out.name), dynamo=True,
                          opset_version=OPSET, input_names=["mel"], output_names=["whisper_out"],
                          external_data=True, verbose=False)
    drop_node_metadata(tmp / out.name)
    shutil.rmtree(out.parent, ignore_errors=True)
    tmp.rename(out.parent)
    return out


def ct2_int8(official: artefacts.OfficialPaths, out: Path) -> Path:
    if not (out / "model.bin").is_file():
        log("converting the Whisper folder with ct2-transformers-converter --quantization int8 (once)")
        converter = Path(sys.executable).with_name("ct2-transformers-converter")
        subprocess.run([str(converter), "--model", str(official.whisper), "--output_dir", str(out),
                        "--quantization", "int8", "--force"], check=True, capture_output=True)
    return out


def whisper(work: Path, threads: int, repeats: int) -> dict:
    import ctranslate2
    import numpy as np
    import torch
    from transformers import WhisperModel

    official, _ = artefacts.real_shape_encoder(work, log)
    fp32 = whisper_onnx(official, work / "enc" / "whisper-onnx" / WHISPER_ONNX)
    int8 = int8_file(fp32, work / "enc" / "whisper-onnx-int8" / "whisper_encoder-int8.onnx", parts=("whisper",))
    ct2_dir = ct2_int8(official, work / "enc" / "whisper-ct2-int8")
    mel, _ = clip_features(artefacts.encoder_config(), artefacts.make_clip(work, 30.0))
    mel = mel[None].astype(np.float32)
    torch.set_num_threads(threads)
    torch_whisper = WhisperModel.from_pretrained(official.whisper).encoder.eval()
    mel_t = torch.from_numpy(mel)

    def torch_run():
        with torch.inference_mode():
            return torch_whisper(mel_t).last_hidden_state.numpy()

    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="int8", intra_threads=threads,
                                     inter_threads=1)
    ct2_mel = ctranslate2.StorageView.from_array(mel)
    sessions = {name: session(path, threads) for name, path in (("ORT fp32", fp32), ("ORT int8", int8))}
    engines = {"PyTorch fp32": torch_run,
               **{name: (lambda s=s: s.run(None, {"mel": mel})[0]) for name, s in sessions.items()},
               "CTranslate2 int8": lambda: np.array(ct2.encode(ct2_mel, to_cpu=True))}
    return _speed_rows(interleaved(engines, repeats), reference="ORT fp32")


def _speed_rows(results: dict, reference: str) -> dict:
    ref = results[reference]["output"]
    return {name: {"median_s": r["median_s"], "runs_s": r["runs_s"],
                   "vs_" + reference.replace(" ", "_"): r["median_s"] / results[reference]["median_s"],
                   "cosine_vs_" + reference.replace(" ", "_"): cosine(r["output"], ref)}
            for name, r in results.items()}


# --- session options -------------------------------------------------------------------------------

OPTION_VARIANTS = {
    "graph optimization: basic": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "graph optimization: extended": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
    "graph optimization: layout only": {"graph_optimization_level": "ORT_ENABLE_LAYOUT"},
    "intra-op threads 1": {"intra_op_num_threads": 1},
    "CPU memory arena off": {"enable_cpu_mem_arena": False},
    "memory patterns on": {"enable_mem_pattern": True},
    "pre-packed weights off": {"config": {"session.disable_prepacking": "1"}},
    "transformers optimizer (bert fusions), offline": {"optimizer": "bert"},
}


def options(work: Path, threads: int, repeats: int) -> dict:
    """Each change timed against the runtime's settings in its own interleaved pair (two int8 sessions
    alive at a time, not nine)."""
    import numpy as np
    import onnxruntime as ort

    _, fp32 = artefacts.real_shape_encoder(work, log)
    int8 = int8_file(fp32, work / "enc" / "onnx-int8" / "audio_encoder-int8.onnx")
    mel, fbank = clip_features(artefacts.encoder_config(), artefacts.make_clip(work, 30.0))
    feed = {"mel": mel[None].astype(np.float32), "fbank": fbank[None].astype(np.float32)}
    baseline = session(int8, threads)
    rows = {}
    for name, changes in OPTION_VARIANTS.items():
        changes = dict(changes)
        path, fused = int8, None
        if changes.pop("optimizer", None):
            path, fused = transformers_optimized(int8)
        if "graph_optimization_level" in changes:
            changes["graph_optimization_level"] = getattr(ort.GraphOptimizationLevel, changes["graph_optimization_level"])
        variant = session(path, threads, **changes)
        log(f"options: {name}")
        pair = _speed_rows(interleaved({"runtime": lambda: baseline.run(None, feed)[0],
                                        "changed": lambda: variant.run(None, feed)[0]}, repeats), reference="runtime")
        del variant
        rows[name] = {"median_s": pair["changed"]["median_s"], "runtime_median_s": pair["runtime"]["median_s"],
                      "vs_runtime": pair["changed"]["vs_runtime"], "cosine_vs_runtime": pair["changed"]["cosine_vs_runtime"],
                      **({"fused": fused} if fused else {})}
    return rows


def transformers_optimized(path: Path) -> tuple[Path, dict]:
    """ONNX Runtime's transformers optimizer (BERT fusions: attention, LayerNorm, GELU) on `path`."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    out = path.with_name(path.stem + "-bert-optimized.onnx")
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=False)
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(out))
    return out, fused


# --- the report ------------------------------------------------------------------------------------

def engines_table(rows: dict) -> str:
    return report.table(["engine", "s per 30 s", "vs ORT fp32", "cosine vs ORT fp32", "runs"],
                        [[k, f"{v['median_s']:.2f}", f"{v['vs_ORT_fp32']:.2f}x", f"{v['cosine_vs_ORT_fp32']:.5f}",
                          ", ".join(f"{x:.2f}" for x in v["runs_s"])] for k, v in rows.items()])


def markdown(results: dict, m: dict, args) -> str:
    command = " ".join(["python benchmarks/encoder_int8.py", *sys.argv[1:]])
    lines = [f"`{command}` on {m['date']}, one process per section, engines alternating.", "",
             f"Machine: {m['cpu']} ({m['cpu_features']}), {m['cores']} cores, {m['ram_gib']:.1f} GiB; "
             f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}"
             + (". **Shared machine**: other jobs ran on the same two cores, so absolute seconds are inflated and "
                "noisy" if m["load_average"][0] > BUSY_LOAD else " (nothing else running)")
             + "; the ratios come from interleaved runs in one process. "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    if "whole" in results:
        r = results["whole"]
        lines += ["Whole audio encoder (Whisper large-v2 + BEATs iter3 + Q-Former + projection, random weights), "
                  f"one 30 s clip of real audio, {args.threads} threads, median of {args.repeats}:", "",
                  engines_table(r), "", f"Target int8 <= {WHOLE_TARGET}x ORT fp32: {r['ORT int8']['vs_ORT_fp32']:.2f}x.", ""]
    if "whisper" in results:
        r = results["whisper"]
        ct2 = r["CTranslate2 int8"]["median_s"] / r["ORT int8"]["median_s"]
        lines += ["Whisper large-v2 encoder alone, same weights, same mel:", "",
                  engines_table(r), "", f"Target ORT int8 >= {CT2_TARGET}x faster than CTranslate2 int8: {ct2:.2f}x.", ""]
    if "options" in results:
        r = results["options"]
        lines += ["ONNX Runtime session options on the int8 whole encoder, each changed alone from the runtime's "
                  "(salmonn_cli/encoder.py: all graph optimizations, intra-op threads = --threads, CPU arena on and "
                  "shrunk after each call, no memory patterns, pre-packing on):", "",
                  report.table(["change", "s per 30 s", "runtime's s (same pair)", "vs runtime", "cosine vs runtime"],
                               [[k + (f" (fused: {v['fused']})" if v.get("fused") else ""), f"{v['median_s']:.2f}",
                                 f"{v['runtime_median_s']:.2f}", f"{v['vs_runtime']:.2f}x", f"{v['cosine_vs_runtime']:.6f}"]
                                for k, v in r.items()]), ""]
    if "quality" in results:
        q = results["quality"]
        for name in ("real-shape random", "salmonn-nano"):
            variants = q[name]
            clips = list(variants[DEFAULT_VARIANT])
            lines += [f"Audio tokens int8 vs fp32, {name} weights: cosine (target >= {QUALITY_TARGETS[name]} on every "
                      "clip); max |Δ| of export's / max |fp32|:", "",
                      report.table(["clip", "tokens", *variants, "max |Δ| / max |fp32|"],
                                   [[c, variants[DEFAULT_VARIANT][c]["tokens"],
                                     *(f"{v[c]['cosine']:.5f}" for v in variants.values()),
                                     f"{variants[DEFAULT_VARIANT][c]['max_abs_diff']:.3g} / "
                                     f"{variants[DEFAULT_VARIANT][c]['max_abs']:.3g}"] for c in clips]), ""]
        lines += [f"Official-tiny fixture, f32 LLM, {FIXTURE_STEPS} greedy tokens with the fp32 and export's int8 "
                  "encoder:", "",
                  report.table(["input", "same tokens"], [[k, "yes" if v["same"] else f"no: {v}"]
                                                          for k, v in q["fixture"].items()]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=artefacts.DEFAULT_WORK)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", type=Path, default=HERE / "encoder_int8.md")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    m = report.machine()
    results = {}
    json_path = args.out.with_suffix(".json")
    for name in sections:
        log(f"section {name}")
        fn = {"quality": quality, "whole": whole, "whisper": whisper, "options": options}[name]
        # each in a fresh process: no section inherits another's memory or threads (torch, CTranslate2)
        results[name] = report.isolated(fn, args.work, args.threads, *([] if name == "quality" else [args.repeats]))
        report.write_atomically(json_path, json.dumps({"machine": m, "results": results}, indent=2) + "\n")
        report.write_atomically(args.out, markdown(results, m, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
