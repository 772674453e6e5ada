"""The step every method shares: capture, micro-batches, the user's loss, the template, block selection, the trust region, attention routing, the dtypes it computes in."""
