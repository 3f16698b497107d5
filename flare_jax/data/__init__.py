"""Data: tokenizers (and, later, grain sources and packing)."""
