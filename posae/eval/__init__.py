"""Evaluation of a trained SAE: metric families, metrics.json and plots (docs/metrics.md;
docs/ARCHITECTURE.md, "Evaluation")."""
