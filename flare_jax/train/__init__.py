"""Training: optimizer, sharded train state, jitted steps, checkpoints, metrics and the loop."""
