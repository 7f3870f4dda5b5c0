"""`python -m salmonn_cli`: the `salmonn` command."""
from salmonn_cli.cli import main

main()
