"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("03_build_hf.py: not implemented yet")
