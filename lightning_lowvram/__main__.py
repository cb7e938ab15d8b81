from lightning_lowvram.cli import main

main()
