"""Text sources, tokenization into sequences, and the activation cache."""
