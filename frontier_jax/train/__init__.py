"""Pre-training: losses, optimizer, the pure train step, checkpoints and the host loop."""
