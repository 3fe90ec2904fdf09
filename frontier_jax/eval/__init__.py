"""Evaluation: perplexity / CE / bits per byte of held-out text (`perplexity`), sharded over the
mesh and processes (`scorer`), the `frontier-jax eval` driver (`run`), the lm-eval-harness
adapter (`lm_eval`) and the ablation runner (`ablate`).  It sits above train and infer."""
