from ce_cli.cli.main import main

main()
