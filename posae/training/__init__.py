"""The training loop and what it is made of: batches, schedules, dead latents, checkpoints."""
