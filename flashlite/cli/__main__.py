"""`python -m flashlite.cli`: the command line without the installed `flashlite` script."""
from flashlite.cli import main

main()
