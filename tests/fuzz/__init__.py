"""Hypothesis fuzzing of the daemon's wire surfaces (see tests/fuzz/support.py)."""
