"""Merging modality experts into one modality-agnostic transformer."""
