"""Evaluation: metrics, statistical inference and file scoring (docs/METRICS.md)."""
