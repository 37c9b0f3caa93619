"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("02_train_scm.py: not implemented yet")
