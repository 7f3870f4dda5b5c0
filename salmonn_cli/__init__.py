"""salmonn: ask questions about audio on your own machine. The torch-free runtime and the `salmonn`
command (cli.py); README.md, "Layout", names every module."""
