"""Optimizers that sit beside the gradient makers (the paper's hybrid SGD + AdamW protocol)."""
