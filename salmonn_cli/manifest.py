"""The exported model's contract: `salmonn.json` in a model directory.

Export writes it; the runtime trusts nothing else about a model. Every file it names is checked
against its sha256 before it is loaded (the check is cached by path, size, mtime and ctime).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from salmonn_cli.cache import salmonn_cache_dir
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.beams import MAX_BEAMS, is_beam_count
from salmonn_cli.errors import ModelError, SalmonnError, quoted
from salmonn_cli.prompt import prompt_segments

MANIFEST_NAME = "salmonn.json"
FORMAT_NAME = "salmonn-model"
FORMAT_VERSION = 1
HASH_CHUNK = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Config sizes: the largest real ones (vocabularies, context lengths) are a few hundred thousand.
MAX_CONFIG_INT = 1 << 21
# Whole-number config values that may be 0; every other one is at least 1.
ZERO_ALLOWED_INTS = {"clip_token_hidden", "audio_vocab", "llm.bos_token_id", "llm.eos_token_id"}
# Float config values with their own range: (low, high, low inclusive); the others are > 0.
MAX_WINDOW_SECONDS = 600.0
FLOAT_RANGES = {
    "min_seconds": (0.0, MAX_WINDOW_SECONDS, True),
    "max_seconds": (0.0, MAX_WINDOW_SECONDS, False),
    "second_per_window": (0.0, MAX_WINDOW_SECONDS, False),
    "second_stride": (0.0, MAX_WINDOW_SECONDS, False),
    "lora.dropout": (0.0, 1.0, True),
}
# How the audio encoder's weights are stored (export/encoder_quant.py); manifests without the key are fp32.
ENCODER_QUANTS = ("fp32", "int8")


@dataclass
class Manifest:
    model_dir: Path
    config: SalmonnConfig
    audio_encoder: str        # file name of the ONNX audio encoder
    llm: str                  # file name of the GGUF LLM
    quant: str                # quantization of the GGUF (f32, f16, q8_0, q4_k_m, ...)
    files: dict[str, dict]    # file name -> {"sha256": ..., "size": ...}
    # Optional: the LoRA as a llama.cpp adapter GGUF (exports made before it existed lack the key).
    lora_adapter: str | None = None
    # The decoding the model is answered with unless the user asks otherwise (`salmonn ask --beams`):
    # 1 = greedy. Export writes it under "decoding"; older manifests lack it and mean greedy.
    default_beams: int = 1
    # Whether `salmonn ask` cuts an answer that starts looping to its first copy unless told otherwise
    # (`--repetition-guard`); "decoding": {"repetition_guard": ...}, absent = off, as the official SALMONN decodes.
    default_repetition_guard: bool = False
    # The training tasks (the official annotation names: "asr", "translation", "audiocaption", "QA", ...)
    # the model learned; None = every task of the official SALMONN (its exports, and manifests without the key).
    tasks: tuple[str, ...] | None = None
    # fp32 (the exported graph) or int8 (its linear layers quantized by ONNX Runtime)
    encoder_quant: str = "fp32"

    def path(self, name: str) -> Path:
        return self.model_dir / name

    @property
    def exact_attention(self) -> bool:
        """f32 exports exist for fidelity: run them with exact attention (see parity notes)."""
        return self.quant == "f32"

    def trained_for(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    @property
    def merged_lora_scale(self) -> float:
        """The LoRA scale export merged into the LLM GGUF (alpha / r)."""
        return self.config.lora.scale


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def manifest_dict(config: SalmonnConfig, audio_encoder: str, llm: str, quant: str,
                  model_dir: Path, extra: dict | None = None, default_beams: int = 1,
                  tasks: list[str] | None = None, encoder_quant: str = "fp32",
                  repetition_guard: bool = False) -> dict:
    """The manifest for the files already written in `model_dir` (hashes computed here); `tasks`: the
    training tasks of a model that learned only some of the official SALMONN's (None: all of them)."""
    _check_beams(default_beams)
    _check_repetition_guard(repetition_guard)
    _check_encoder_quant(encoder_quant)
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    files = {n: file_entry(model_dir / n) for n in names}
    d = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
         "audio_encoder": audio_encoder, "encoder_quant": encoder_quant, "llm": llm, "quant": quant,
         "config": config.to_dict(), "files": files,
         "decoding": {"beams": default_beams, "repetition_guard": repetition_guard}}
    if tasks is not None:
        d["tasks"] = list(_checked_tasks(tasks))
    if extra:
        d.update(extra)
    return d


def load_manifest(model_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    root = Path(model_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ModelError(f"model path is a file, not a model directory: {quoted(root)}")
    if not root.is_dir():
        raise ModelError(f"model directory not found: {quoted(root)}")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ModelError(f"{quoted(root)} is not a salmonn model directory (no {MANIFEST_NAME}); "
                         "create one with `salmonn export`")
    try:
        d = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:   # ValueError: bad UTF-8, JSON, or a huge int
        raise ModelError(f"{quoted(mpath)} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ModelError(f"{quoted(mpath)} is not a salmonn model manifest")
    version = d.get("format_version")
    if not isinstance(version, int):
        raise ModelError(f"{quoted(mpath)} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ModelError(f"{quoted(mpath)} has format version {version}, this salmonn reads up to "
                         f"{FORMAT_VERSION}: upgrade salmonn")
    try:
        manifest = Manifest(model_dir=root, config=SalmonnConfig.from_dict(d["config"]),
                            audio_encoder=str(d["audio_encoder"]), llm=str(d["llm"]),
                            quant=str(d["quant"]), files=dict(d["files"]),
                            lora_adapter=_optional_name(d, "lora_adapter"),
                            default_beams=_default_beams(d),
                            default_repetition_guard=_default_repetition_guard(d),
                            tasks=_checked_tasks(d["tasks"]) if "tasks" in d else None,
                            encoder_quant=_check_encoder_quant(d.get("encoder_quant", "fp32")))
        check_files(manifest)
        check_config(manifest.config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{quoted(mpath)} is malformed: {e}") from None
    for name in (manifest.audio_encoder, manifest.llm, manifest.lora_adapter):
        if name is not None and name not in manifest.files:
            raise ModelError(f"{quoted(mpath)} does not list {name!r} in its files")
    if verify:
        verify_files(manifest)
    return manifest


# --- config values ------------------------------------------------------------------------------

def _type_ok(annotation: str, value) -> bool:
    """`value` fits a config field annotated `annotation` (annotations are strings here)."""
    if annotation.endswith(" | None"):
        return value is None or _type_ok(annotation[:-len(" | None")], value)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "tuple[str, ...]":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return True


def _check_field_types(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_field_types(value, f"{prefix}{f.name}.")
        elif not _type_ok(str(f.type), value):
            raise ValueError(f"config value {prefix}{f.name} = {value!r} is not a {f.type}")


def _check_field_ranges(obj, prefix: str = "") -> None:
    """Every size is a positive whole number below MAX_CONFIG_INT, every float positive (the
    exceptions are listed): a zero or negative size fails deep in a run or allocates nonsense."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_field_ranges(value, f"{key}.")
        elif value is None or str(f.type).removesuffix(" | None") not in ("int", "float"):
            continue
        elif str(f.type) == "int":
            low = 0 if key in ZERO_ALLOWED_INTS else 1
            if not low <= value <= MAX_CONFIG_INT:
                raise ValueError(f"config value {key} = {value} is outside {low}..{MAX_CONFIG_INT}")
        else:
            low, high, low_inclusive = FLOAT_RANGES.get(key, (0.0, math.inf, False))
            if not ((low <= value if low_inclusive else low < value) and value <= high):
                raise ValueError(f"config value {key} = {value} is outside "
                                 f"{'[' if low_inclusive else '('}{low:g}, {high:g}]")


def check_config(config: SalmonnConfig) -> None:
    """Raise ValueError unless every config value has its field's type and a sane range and the
    derived geometry and prompt template work out (a hand-edited manifest must fail here, not deep
    in a run)."""
    _check_field_types(config)
    _check_field_ranges(config)
    if not MIN_SAMPLE_RATE <= config.sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"config value sample_rate = {config.sample_rate} is outside "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
    llm = config.llm
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(llm, key) >= llm.vocab_size:
            raise ValueError(f"config value llm.{key} = {getattr(llm, key)} is not below vocab_size {llm.vocab_size}")
    if not config.audio_placeholder:
        raise ValueError("config value audio_placeholder is empty")
    if config.audio_placeholder not in config.speech_tag:
        raise ValueError(f"config value speech_tag {config.speech_tag!r} lacks the audio placeholder "
                         f"{config.audio_placeholder!r}")
    try:
        n_tokens = config.n_audio_tokens
        config.lora.scale
        prompt_segments(config, config.prompt_template.format(config.speech_tag + "?"))
    except (ArithmeticError, ValueError, IndexError, KeyError, SalmonnError) as e:
        raise ValueError(f"inconsistent config ({type(e).__name__}: {e})") from None
    if n_tokens < 1 or not 0 <= config.min_seconds <= config.max_seconds:
        raise ValueError("inconsistent config: no audio would reach the model")


def _optional_name(d: dict, key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a file name")
    return value


# --- the files it names ---------------------------------------------------------------------------

def check_file_name(name, what: str) -> None:
    """A file of the model directory itself: one plain name, never a path, so that a manifest
    cannot make salmonn open (or hash) a file elsewhere. (A symbolic link placed in the directory
    is the user's own choice and is followed.)"""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.basename(name) != name):
        raise ValueError(f"{what} {name!r} is not a file name inside the model directory")


def check_files(manifest: Manifest) -> None:
    for name, info in manifest.files.items():
        check_file_name(name, "the listed file")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise ValueError(f"bad file entry for {name!r}")
        if not SHA256_HEX.fullmatch(info["sha256"]):
            raise ValueError(f"the sha256 of {name!r} is not 64 hexadecimal digits")
        size = info.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ValueError(f"the size of {name!r} must be a whole number of bytes, not {size!r}")
    for what in ("audio_encoder", "llm", "lora_adapter"):
        name = getattr(manifest, what)
        if name is not None:
            check_file_name(name, what)
    if not manifest.quant:
        raise ValueError("quant is empty")


def _checked_tasks(tasks) -> tuple[str, ...]:
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a list of task names, not {tasks!r}")
    return tuple(tasks)


def _check_encoder_quant(encoder_quant) -> str:
    if encoder_quant not in ENCODER_QUANTS:
        raise ValueError(f"encoder_quant must be one of {', '.join(ENCODER_QUANTS)}, not {encoder_quant!r}")
    return encoder_quant


def file_entry(path: Path) -> dict:
    """The manifest's record of one file: its sha256 and size."""
    return {"sha256": sha256_of(path), "size": path.stat().st_size}


def _check_beams(beams) -> None:
    if not is_beam_count(beams):
        raise ValueError(f"decoding beams must be a whole number from 1 to {MAX_BEAMS}, not {beams!r}")


def _check_repetition_guard(guard) -> None:
    if not isinstance(guard, bool):
        raise ValueError(f"decoding repetition_guard must be true or false, not {guard!r}")


def _decoding(d: dict) -> dict:
    decoding = d.get("decoding", {})
    if not isinstance(decoding, dict):
        raise ValueError("decoding must be an object")
    return decoding


def _default_beams(d: dict) -> int:
    beams = _decoding(d).get("beams", 1)
    _check_beams(beams)
    return beams


def _default_repetition_guard(d: dict) -> bool:
    guard = _decoding(d).get("repetition_guard", False)
    _check_repetition_guard(guard)
    return guard


# --- integrity ----------------------------------------------------------------------------------

def _cache_path() -> Path:
    return salmonn_cache_dir() / "verified.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, text=True) as out:
            out.write(json.dumps(cache))
    except OSError:
        pass  # the cache is only an optimisation


def verify_files(manifest: Manifest) -> None:
    """Check every listed file against its sha256; a (path, size, mtime, ctime) hit in the cache
    skips hashing. ctime cannot be set back by hand, so an in-place edit that restores size and
    mtime is still hashed."""
    cache = _load_cache()
    changed = False
    for name, info in manifest.files.items():
        path = manifest.path(name)
        if not path.is_file():
            raise ModelError(f"model file missing: {quoted(path)}")
        st = path.stat()
        if "size" in info and st.st_size != info["size"]:
            raise ModelError(f"model file {quoted(path)} has {st.st_size} bytes, the manifest says "
                             f"{info['size']}: the file is truncated or replaced; re-export the model")
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, info["sha256"]]
        if cache.get(key) == stamp:
            continue
        if sha256_of(path) != info["sha256"]:
            raise ModelError(f"model file {quoted(path)} does not match its sha256 in the manifest: "
                             "the file is corrupted or replaced; re-export the model")
        cache[key] = stamp
        changed = True
    if changed:
        _save_cache(cache)
