"""Downstream tasks and their metrics."""
