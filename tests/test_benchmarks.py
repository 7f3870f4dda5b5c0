"""benchmarks/pipeline.py keeps working: its whole --quick mode (every section on the official-tiny
fixture, a 5 s clip, 8 tokens; ~40 s here) runs and writes its tables.

Nothing here asserts a timing: speed is what the benchmark measures, not a pass/fail criterion. The one
number checked is exact: our runtime and llama.cpp's greedy loop, on the same context, choose the same
tokens. Without --nano-model the salmonn-nano row must say it was skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import CLI_ENV, REPO

BENCHMARK = REPO / "benchmarks" / "pipeline.py"
QUANTS = ("q4_k_m", "q8_0", "f16")


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start + 2:end]]


def test_quick_benchmark_writes_its_tables(model_f32, tmp_path):
    work = tmp_path / "work"
    # the fixture's f32 export where a rerun of the benchmark finds its cached one
    shutil.copytree(model_f32, work / "official-tiny" / "model-f32")
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--work", str(work), "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=CLI_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text.strip() == r.stdout.strip()
    for heading in ("## Machine", "## Model", "## Audio encoder", "## LLM: our runtime vs llama.cpp's own generation",
                    "### Against the PyTorch reference pipeline", "## Peak memory and time to first token",
                    "## Transcription", "## Quantization against f32", "## Time taken"):
        assert heading in text
    assert "Failed sections" not in text

    assert [row[0] for row in table_rows(text, "## Audio encoder")][0].startswith("PyTorch")
    llm_rows = table_rows(text, "## LLM: our runtime")
    assert [row[0] for row in llm_rows] == list(QUANTS)
    assert all(row[-1] == "yes" for row in llm_rows)            # same greedy tokens as llama.cpp's loop
    memory_rows = table_rows(text, "## Peak memory")
    assert [row[0] for row in memory_rows] == [f"`salmonn ask`, {q}" for q in QUANTS] + ["PyTorch reference, fp32"]
    asr_rows = table_rows(text, "## Transcription")
    assert asr_rows[-1][0] == "salmonn-nano" and "skipped: no --nano-model" in asr_rows[-1][-1]
    quality_rows = table_rows(text, "## Quantization against f32")
    assert [row[0] for row in quality_rows] == ["f32", "f16", "q8_0", "q4_k_m"]
