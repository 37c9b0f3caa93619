"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("00_toy_world.py: not implemented yet")
