"""Downstream tasks (one module each, registered in ``registry``) and their metrics."""
