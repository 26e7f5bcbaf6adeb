"""Training: objective, FSDP2 wrapping, optimizer, checkpoints, the loop."""
