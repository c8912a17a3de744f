from terd.cli import main

main()
