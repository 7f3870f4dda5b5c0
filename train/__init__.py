"""Training: the PyTorch SALMONN model, its checkpoints, the three stages and salmonn-nano (nano/).
Needs the `train` extra; it may import salmonn_cli (shapes, prompts, audio), never export."""
