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
from dataclasses import dataclass
from pathlib import Path

from salmonn_cli.cache import salmonn_cache_dir
from salmonn_cli.config import SalmonnConfig
from salmonn_cli.decoding import MAX_BEAMS, is_beam_count
from salmonn_cli.errors import ModelError

MANIFEST_NAME = "salmonn.json"
FORMAT_NAME = "salmonn-model"
FORMAT_VERSION = 1
ENV_MODEL_DIR = "SALMONN_MODEL"
HASH_CHUNK = 1 << 20


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

    def path(self, name: str) -> Path:
        return self.model_dir / name

    @property
    def exact_attention(self) -> bool:
        """f32 exports exist for fidelity: run them with exact attention (see parity notes)."""
        return self.quant == "f32"

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
                  model_dir: Path, extra: dict | None = None, default_beams: int = 1) -> dict:
    """The manifest for the files already written in `model_dir` (hashes computed here)."""
    _check_beams(default_beams)
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    files = {n: {"sha256": sha256_of(model_dir / n), "size": (model_dir / n).stat().st_size}
             for n in names}
    d = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
         "audio_encoder": audio_encoder, "llm": llm, "quant": quant,
         "config": config.to_dict(), "files": files, "decoding": {"beams": default_beams}}
    if extra:
        d.update(extra)
    return d


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    if model_dir is None or str(model_dir) == "":
        env = os.environ.get(ENV_MODEL_DIR)
        if not env:
            from salmonn_cli.default_model import default_model_dir

            return default_model_dir()
        model_dir = env
    return Path(model_dir).expanduser()


def load_manifest(model_dir: str | os.PathLike | None, verify: bool = True) -> Manifest:
    root = resolve_model_dir(model_dir)
    if root.exists() and not root.is_dir():
        raise ModelError(f"model path is a file, not a model directory: {root}")
    if not root.is_dir():
        raise ModelError(f"model directory not found: {root}")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ModelError(f"{root} is not a salmonn model directory (no {MANIFEST_NAME}); "
                         "create one with `salmonn export`")
    try:
        d = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:   # ValueError: bad UTF-8, JSON, or a huge int
        raise ModelError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ModelError(f"{mpath} is not a salmonn model manifest")
    version = d.get("format_version")
    if not isinstance(version, int):
        raise ModelError(f"{mpath} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ModelError(f"{mpath} has format version {version}, this salmonn reads up to "
                         f"{FORMAT_VERSION}: upgrade salmonn")
    try:
        manifest = Manifest(model_dir=root, config=SalmonnConfig.from_dict(d["config"]),
                            audio_encoder=str(d["audio_encoder"]), llm=str(d["llm"]),
                            quant=str(d["quant"]), files=dict(d["files"]),
                            lora_adapter=_optional_name(d, "lora_adapter"),
                            default_beams=_default_beams(d))
        for name, info in manifest.files.items():
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
                raise ValueError(f"bad file entry for {name!r}")
        check_config(manifest.config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{mpath} is malformed: {e}") from None
    for name in (manifest.audio_encoder, manifest.llm, manifest.lora_adapter):
        if name is not None and name not in manifest.files:
            raise ModelError(f"{mpath} does not list {name!r} in its files")
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


def check_config(config: SalmonnConfig) -> None:
    """Raise ValueError unless every config value has its field's type and the derived geometry
    and prompt template work out (a hand-edited manifest must fail here, not deep in a run)."""
    _check_field_types(config)
    try:
        n_tokens = config.n_audio_tokens
        config.lora.scale
        config.prompt_template.format("")
    except (ArithmeticError, ValueError, IndexError, KeyError) as e:
        raise ValueError(f"inconsistent config ({type(e).__name__}: {e})") from None
    if config.clip_token_hidden < 0:
        raise ValueError("inconsistent config: clip_token_hidden is negative")
    if n_tokens < 1 or config.sample_rate < 1 or not 0 <= config.min_seconds <= config.max_seconds:
        raise ValueError("inconsistent config: no audio would reach the model")


def _optional_name(d: dict, key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a file name")
    return value


def _check_beams(beams) -> None:
    if not is_beam_count(beams):
        raise ValueError(f"decoding beams must be a whole number from 1 to {MAX_BEAMS}, not {beams!r}")


def _default_beams(d: dict) -> int:
    decoding = d.get("decoding", {})
    if not isinstance(decoding, dict):
        raise ValueError("decoding must be an object")
    beams = decoding.get("beams", 1)
    _check_beams(beams)
    return beams


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
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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
            raise ModelError(f"model file missing: {path}")
        st = path.stat()
        if "size" in info and st.st_size != info["size"]:
            raise ModelError(f"model file {path} has {st.st_size} bytes, the manifest says "
                             f"{info['size']}: the file is truncated or replaced; re-export the model")
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, info["sha256"]]
        if cache.get(key) == stamp:
            continue
        if sha256_of(path) != info["sha256"]:
            raise ModelError(f"model file {path} does not match its sha256 in the manifest: "
                             "the file is corrupted or replaced; re-export the model")
        cache[key] = stamp
        changed = True
    if changed:
        _save_cache(cache)
