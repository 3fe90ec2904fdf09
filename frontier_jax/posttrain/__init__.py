"""Post-training: reward functions (rule-based, sandboxed code, a reward model), the sandbox, and
rejection sampling into SFT data."""
