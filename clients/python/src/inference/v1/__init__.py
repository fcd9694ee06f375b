"""Generated from protos/ by tools/protos.py; never edit by hand."""
