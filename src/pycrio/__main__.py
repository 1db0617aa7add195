"""`python -m pycrio` runs the CLI."""

from pycrio.cli import main

main(prog_name="pycrio")
