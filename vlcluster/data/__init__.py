"""Synthetic image-text data: scene generation, tokenizers, WebDataset shards."""
