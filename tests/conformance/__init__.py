"""critest (cri-tools) conformance: offline image stand-ins and their checks."""
