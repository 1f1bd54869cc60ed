from ce_cli.cli import main

main()
