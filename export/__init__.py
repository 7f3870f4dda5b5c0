"""Export: trained SALMONN checkpoints (train/) -> model directories the runtime loads (ONNX audio
encoder, GGUF LLM, salmonn.json). Needs the `train` extra; the runtime runs it as a program of its own."""
