"""Merging modality experts into one modality-agnostic transformer.

Importing the package registers every method (``methods``, ``sparse``,
``regmean``), so ``METHODS`` is complete wherever a merge runs.
"""

from vlcluster.merge import methods, regmean, sparse  # noqa: F401  (registration)
