"""Optimizers that sit beside the gradient makers: the paper's hybrid SGD + AdamW protocol (hybrid.py), and
the baselines the field compares against, built from pinned optional libraries (baselines.py)."""
