"""Synthetic checkpoints and the benchmark (the only users of the generator)."""
