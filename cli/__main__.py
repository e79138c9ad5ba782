"""`python -m cli`: the `pneumo` command."""

from cli import main

main()
