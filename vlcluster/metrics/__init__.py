"""Mergeability metrics between modality experts and their correlation with the merge drop."""

METRICS = ("l2", "cosine", "ssd", "tssd")
