"""Importers of the downstream tasks' real on-disk formats (see ``registry``)."""
