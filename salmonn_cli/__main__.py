from salmonn_cli.cli import main

main()
