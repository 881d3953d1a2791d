"""Training: Megatron-Core DDP + optimizer wiring and the training step."""
