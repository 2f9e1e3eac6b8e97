"""Tokenizers that turn images into discrete tokens (visual codes; later, colour palettes)."""
