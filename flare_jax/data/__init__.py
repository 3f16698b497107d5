"""Data: tokenizers, example sources, packing into rows, and the grain input pipeline."""
