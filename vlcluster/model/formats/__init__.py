"""Key layouts of checkpoints written by other code (one module per format)."""
