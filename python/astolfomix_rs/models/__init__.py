"""Model knowledge: the architecture registry and anatomy (what a checkpoint holds)."""
