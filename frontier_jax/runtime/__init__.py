"""Setting a model up on a mesh, without an optimizer: the model program (`program.py`),
per-device memory (`memory.py`) and the parameters-only restore (`restore.py`) shared by
training, inference, evaluation and post-training."""
