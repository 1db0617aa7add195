"""pycrio-monitor: one process per pod that owns the pod's containers (the "pod" runtime type)."""
