"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("05_evaluate.py: not implemented yet")
