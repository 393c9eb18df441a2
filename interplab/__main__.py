from interplab.cli.main import main

main()
