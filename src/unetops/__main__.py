from unetops.cli import main

main()
