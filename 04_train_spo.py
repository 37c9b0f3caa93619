"""Placeholder: this stage is built by its own issue."""
import sys

sys.exit("04_train_spo.py: not implemented yet")
