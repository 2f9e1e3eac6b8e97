"""Data: sources -> batches of tensors."""
