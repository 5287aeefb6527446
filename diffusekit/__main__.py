"""`python -m diffusekit`: the same as the `diffusekit` command."""

from .cli import main

main()
