"""`python -m pycrio.monitor`: the same as the `pycrio-monitor` command."""

from pycrio.monitor.main import main

main()
