from esper.cli.main import main

main()
