"""Evaluation metrics (DESIGN.md, "Metric definitions")."""
