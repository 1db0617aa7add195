module pycrio.local/conformance-images

go 1.22
