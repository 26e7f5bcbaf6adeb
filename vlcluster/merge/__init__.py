"""Merging modality experts into one modality-agnostic transformer.

``methods`` declares every method (parameters, inputs) without importing
torch; ``get_method`` imports the module holding a method's function
(``linear``, ``sparse``, ``regmean``) when it is first used.
"""
