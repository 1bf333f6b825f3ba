"""Gradient surgery: pure Gramian weightings (pcgrad.py) and the all-reduce-aware hook (distributed.py)."""
