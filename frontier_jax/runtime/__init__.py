"""Setting a model up on a mesh, without an optimizer: per-device memory (`memory.py`) and the
parameters-only restore shared by training, inference, evaluation and post-training."""
