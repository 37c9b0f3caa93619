"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("01_build_coarse.py: not implemented yet")
