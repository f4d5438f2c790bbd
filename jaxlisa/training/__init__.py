"""Training: optimizer and schedules, train state, the generic trainer loop, checkpoints."""
